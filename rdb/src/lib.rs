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
//! Leadership is decided by a plain state machine (`leadership.rs`) that an async driver feeds
//! with openraft's metrics. A replica steps up in term t only when openraft leads t, a proof in
//! t succeeded (a ReadIndex round, then its whole log applied), and a quorum acknowledged it
//! within `quorum_timeout`; it steps down as soon as one of these fails. Leadership is reported
//! as a strictly alternating stream of [`LeaderEvent`]s.
//!
//! A leader answers queries from local state under a lease: for `read_lease` (half the maximum
//! election timeout) after the send time of the newest RPC a quorum acknowledged (openraft's
//! `last_quorum_acked`; no extra RPCs). That is safe for three reasons:
//! - openraft followers refuse votes and pre-votes for `election_timeout_max` after they last
//!   heard from their leader, which is after the leader sent what they acknowledged;
//! - a restarted replica, which forgot whom it followed, grants neither for
//!   `election_timeout_max` after it starts;
//! - every write acknowledged before the read is applied on this leader, since a leader steps
//!   up only after applying its whole log, and acknowledges only after applying.
//!
//! Outside the lease, the first query of a transaction pays a ReadIndex round itself.
//! `DbConfig::lease_reads = false` always pays it.
//!
//! Pre-vote is on: a replica that lost touch asks before it raises its term, so it never
//! deposes a healthy leader when it comes back. Leadership transfer is openraft's.
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
//! - The default timers (heartbeat 50 ms, election 100-250 ms) suit a LAN; a follower
//!   campaigns after about 350 ms without a heartbeat. Across slower links, raise them.
//! - After a whole-group restart, the first election waits one maximum election timeout (no
//!   votes are granted before that).
//! - An I/O error (ENOSPC included) while writing the log or state machine stops the replica
//!   (openraft treats storage errors as fatal; [`Status::stopped`] says why). It loses nothing
//!   that was acknowledged. [`Db::stop`] and [`Db::start`] on the same directory bring it back
//!   and it catches up from its peers; rsvc-server's engine does that by itself, once a
//!   second, until the replica runs.
//! - [`Db::resign`] leaves the group leaderless for about an election; prefer
//!   [`Db::transfer_leadership`], which takes one round trip.
//! - openraft 0.10 is an alpha, pinned exactly. Replicas written on openraft 0.9 are not
//!   supported (a 0.9 vote does not decode, so opening one fails): a group moves between the
//!   two as a whole, by creating a new one (see docs/design.md).
//! - Followers cannot refuse entries for lack of space; admission happens only on the leader.
//! - [`Db::dictate`] can lose committed data by design; it is for quorum loss only.

pub mod admission;
pub mod codec;
mod config;
mod db;
mod error;
pub mod fuzz;
pub mod kv;
mod leadership;
pub mod network;
mod storage;
mod tx;
mod types;

pub use admission::{FixedProbe, SharedFsProbe, SpaceProbe, StatvfsProbe};
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
