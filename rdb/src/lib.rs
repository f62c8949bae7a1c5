//! # rdb: a replicated, hierarchical, transactional key-value store
//!
//! rdb is the storage layer of rsvc, modelled on DAOS's rdb. One rdb database is one raft
//! group (openraft 0.10, pinned to 0.10.0-alpha.37); each replica keeps its log and its state machine in two redb files.
//! Services above (rsvc-server) see transactions and leadership events, never openraft.
//!
//! ## DATA MODEL
//!
//! A tree of key-value stores (KVSs) under an always-present root. A key holds either bytes or
//! a child KVS. Each KVS has a key class: Generic, Integer (u64 keys in numeric order) or
//! Lexical (byte order). A KVS is destroyed only after its child KVSs; its values go with it.
//! See [`kv`] for the on-disk layout.
//!
//! ## TRANSACTIONS
//!
//! [`Db::begin`] binds a [`Tx`] to the term this replica leads. Queries read committed state
//! (never the transaction's own queued updates); updates are queued; [`Tx::commit`] sends them
//! as one unit that lands inside exactly one raft entry and waits until that entry is applied.
//! The apply is all-or-nothing: a deterministic failure (missing KVS, existing key, failed
//! precondition) leaves no effect and is the commit's result on every replica alike. A
//! non-deterministic failure (I/O) is a storage error: openraft stops the replica instead of
//! letting it diverge. If the entry lands in another term than the transaction's, the apply
//! refuses it too, so a transaction never outlives the leadership it was begun under.
//!
//! ## GROUP COMMIT
//!
//! Two levels. rdb packs the transactions that wait while `max_inflight_batches` entries are
//! in flight into the next entry. Below it, the log store never fsyncs on openraft's core
//! loop: `append` makes entries readable in memory at once, openraft replicates them while the
//! log's writer thread makes them durable, and one durable redb commit covers every append,
//! vote, truncation and purge queued behind the previous one (see `storage::log`). The leader's
//! fsync thus overlaps its followers', and one fsync per replica carries many transactions.
//!
//! ## READS AND LEADERSHIP
//!
//! A leader answers queries only while it can prove that no other leader exists. The proof is
//! a lease: the watcher confirms a quorum every heartbeat (a ReadIndex round), and for half a
//! minimum election timeout after a confirmation was *issued*, reads are served from local
//! state. That is safe for three reasons:
//! - openraft followers refuse votes for `election_timeout_max` after they last heard from
//!   their leader;
//! - a restarted replica, which forgot whom it followed, grants no vote for
//!   `election_timeout_max` after it starts;
//! - every write acknowledged before the read is applied on this leader, since a leader steps
//!   up only after applying its whole log, and acknowledges only after applying.
//!
//! Outside the lease, the first query of a transaction pays a ReadIndex round itself.
//! `DbConfig::lease_reads = false` always pays it. Leadership is reported as a strictly
//! alternating stream of [`LeaderEvent`]s. A StepUp comes only after such a round succeeded in
//! the new term (so the term's first entry is applied). A leader that cannot reach a quorum for
//! `quorum_timeout` reports StepDown and starts an election to shed its openraft leadership,
//! which openraft 0.9 would otherwise keep forever.
//!
//! ## DURABILITY
//!
//! Log appends and votes are fsynced before openraft hears they are durable (an append's flush
//! callback, a vote's return). The state machine is
//! written without fsync and re-applied from the log after a crash; building a snapshot first
//! makes it durable, and the log is only purged behind snapshots. Snapshots are files streamed
//! in bounded chunks.
//!
//! ## IDENTITY
//!
//! A replica is `(rank, generation)`; its raft node id is `rank << 32 | gen`. At creation it
//! draws a random storage id, written into every file and recorded with it in the membership.
//! Raft messages name the storage id they expect, so a replica recreated on a wiped disk is
//! refused as the voter it replaced; a replica whose files disagree refuses to start.
//!
//! ## FREE SPACE
//!
//! Before appending, the leader checks `statvfs` of its directory (see [`admission`]).
//! Ordinary transactions need DAOS's 4 MiB plus the replica's upkeep: room for its next
//! snapshot and for redb to grow each file by its size. Critical ones (deletes, destroys, small
//! `update_critical`s) need only 16 KiB. Refusals are immediate and append nothing. rdb starts
//! snapshots itself, every `snapshot_every_entries` and only where they fit, so that
//! compaction is never what fills the disk.
//!
//! ## CAVEATS
//!
//! - Lease reads assume that clock rates on the replicas differ by far less than 2x. A
//!   replica's monotonic clock that runs much slower than its peers' could outlive the lease.
//! - After a whole-group restart, the first election waits one maximum election timeout (no
//!   votes are granted before that).
//! - An I/O error (ENOSPC included) while writing the log or state machine stops the replica
//!   (openraft treats storage errors as fatal). It loses nothing that was acknowledged; it must
//!   be restarted once the disk is fixed, and catches up from its peers.
//! - [`Db::resign`] costs about two election timeouts; openraft 0.9 has no leadership transfer.
//! - Followers cannot refuse entries for lack of space; admission happens only on the leader.
//! - [`Db::dictate`] can lose committed data by design; it is for quorum loss only.

pub mod admission;
pub mod codec;
mod config;
mod db;
mod error;
pub mod kv;
mod leadership;
pub mod network;
mod storage;
mod tx;
mod types;

pub use admission::{FixedProbe, SpaceProbe, StatvfsProbe};
pub use config::DbConfig;
pub use db::{Committed, Db, Role, StartOptions, Status};
pub use error::{Error, Result};
pub use kv::{int_key, int_of_key, ApplyError, KeyClass, Op, Path, Value};
pub use leadership::LeaderEvent;
pub use network::{LocalNet, RaftRpc, Refusal, RpcHandler, RpcKind, Transport, TransportError};
pub use storage::{DiskFaults, Identity};
pub use tx::Tx;
pub use types::{DbId, Member, ReplicaId};

#[doc(hidden)]
pub mod testing {
    //! Access to the raw openraft storage for `openraft::testing::Suite`.
    pub use crate::storage::log::LogStore;
    pub use crate::storage::sm::SmStore;
    pub use crate::types::TypeConfig;

    /// Opens fresh log and state-machine stores in `dir`.
    pub fn stores(dir: &std::path::Path) -> (LogStore, SmStore) {
        let ident =
            crate::storage::create(dir, crate::DbId(1), crate::ReplicaId::new(0, 1), None).expect("create");
        let _ = ident;
        let f = crate::storage::open(dir, None).expect("open");
        (f.log, f.sm)
    }
}
