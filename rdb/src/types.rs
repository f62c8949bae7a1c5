//! Identities and the openraft type configuration.
//!
//! openraft's types stay inside this crate: [`ReplicaId`], [`DbId`] and [`Member`] are what
//! callers see, and [`TypeConfig`] is crate-private plumbing.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::kv::{ApplyError, TxOps};

/// The id of one replicated database (one raft group), shared by all of its replicas.
///
/// Raft RPCs carry it so that an engine hosting many databases can route them, and so that a
/// message meant for another database is refused rather than misapplied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DbId(pub u128);

impl DbId {
    /// A fresh random id.
    pub fn random() -> Self {
        DbId(rand::random())
    }
}

impl fmt::Display for DbId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A replica is a rank (the engine that hosts it) and a generation.
///
/// The generation changes whenever a replica is created anew on the same rank, e.g. after its
/// disk was wiped: a new generation is a new raft voter, so a replica that lost its state can
/// never vote as if it still had it (DAOS replica gen, Restate storage id).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaId {
    /// The engine that hosts the replica.
    pub rank: u32,
    /// Incarnation of the replica on that rank.
    pub gen: u32,
}

impl ReplicaId {
    /// Creates a replica id.
    pub fn new(rank: u32, gen: u32) -> Self {
        ReplicaId { rank, gen }
    }

    /// The raft node id: `rank << 32 | gen`, as in DAOS.
    pub fn node_id(self) -> u64 {
        (u64::from(self.rank) << 32) | u64::from(self.gen)
    }

    /// Inverse of [`ReplicaId::node_id`].
    pub fn from_node_id(id: u64) -> Self {
        ReplicaId {
            rank: (id >> 32) as u32,
            gen: id as u32,
        }
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.rank, self.gen)
    }
}

/// A voter or learner as recorded in the raft membership.
///
/// `storage_id` is the random id the replica drew when its files were created. Every raft
/// message carries the storage id its sender expects, and a replica refuses a message that
/// names another one: a replica recreated on a wiped disk (new storage id) is thereby never
/// mistaken for the voter it replaced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Who.
    pub replica: ReplicaId,
    /// Transport address of the engine hosting it; opaque to rdb.
    pub addr: String,
    /// The replica's storage id (see the type docs).
    pub storage_id: u64,
}

/// The payload of one raft log entry: a batch of transactions (group commit).
///
/// NB: DAOS writes one transaction per log entry. rdb keeps each transaction inside exactly
/// one entry, applied atomically, but lets the leader pack every transaction that is waiting
/// while the previous entry is in flight into one entry: fewer, larger entries cost less to
/// encode, replicate and apply than one per transaction. (The log store's group flush is what
/// bounds fsyncs; see `storage::log`.)
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Command {
    /// Transactions, applied in order, each atomically.
    pub txs: Vec<TxRecord>,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} transaction(s)", self.txs.len())
    }
}

/// One transaction in a [`Command`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TxRecord {
    /// The leader term the transaction was bound to at `begin`. Apply refuses the transaction
    /// (with no effect) if the entry was appended in another term.
    pub term: u64,
    /// The queued updates.
    pub ops: TxOps,
}

/// The result of applying one entry: one result per transaction of its [`Command`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CommandResult {
    /// Aligned with [`Command::txs`].
    pub results: Vec<Result<(), ApplyError>>,
}

openraft::declare_raft_types!(
    /// rdb's openraft configuration: standard `u64` terms and openraft's default leader ids.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = Member,
        AsyncRuntime = openraft::TokioRuntime,
);

pub(crate) type NodeId = u64;
pub(crate) type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub(crate) type Vote = openraft::alias::VoteOf<TypeConfig>;
pub(crate) type Entry = openraft::alias::EntryOf<TypeConfig>;
pub(crate) type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub(crate) type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub(crate) type Raft = openraft::Raft<TypeConfig, crate::storage::sm::SmStore>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trip() {
        let r = ReplicaId::new(7, 3);
        assert_eq!(r.node_id(), (7u64 << 32) | 3);
        assert_eq!(ReplicaId::from_node_id(r.node_id()), r);
        let big = ReplicaId::new(u32::MAX, u32::MAX);
        assert_eq!(ReplicaId::from_node_id(big.node_id()), big);
    }
}
