//! Tunables of one replica, with every default in one place.

use std::time::Duration;

/// Configuration of one rdb replica. `Default` gives production values; tests shorten timers.
#[derive(Clone, Debug)]
pub struct DbConfig {
    /// Heartbeat period of a leader.
    pub heartbeat: Duration,
    /// Election timeout range. No fsync runs on openraft's core loop (see `storage::log`), so
    /// the minimum only has to cover a few heartbeats and network round trips.
    pub election_timeout: (Duration, Duration),
    /// Deadline for one AppendEntries RPC that carries entries. openraft gives every
    /// replication RPC three quarters of a heartbeat, too little for a batch of large entries to
    /// a catching-up replica; heartbeats (no entries) keep openraft's deadline.
    pub append_timeout: Duration,
    /// Deadline for one snapshot chunk RPC (it carries `snapshot_chunk_bytes`).
    pub snapshot_chunk_timeout: Duration,
    /// Bytes per snapshot chunk.
    pub snapshot_chunk_bytes: u64,
    /// Build a snapshot (and purge the log behind it) every this many applied entries, where
    /// the snapshot fits on the disk; rdb checks about once a second.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind a snapshot, so that slightly lagging followers catch up
    /// from the log instead of a snapshot.
    pub keep_log_behind_snapshot: u64,
    /// Most entries per AppendEntries RPC.
    pub max_append_entries: u64,
    /// Most transactions packed into one log entry.
    pub max_batch_txs: usize,
    /// Most approximate bytes packed into one log entry (a single larger transaction still goes
    /// alone).
    pub max_batch_bytes: usize,
    /// Log entries a leader has in flight at once; while they are, new transactions wait and
    /// form the next batch (group commit).
    pub max_inflight_batches: usize,
    /// Below this much free space, plus the replica's upkeep (its next snapshot and redb's
    /// file growth; see [`admission`](crate::admission)), non-critical transactions are
    /// refused with `NoSpace` (DAOS: 4 MiB).
    pub no_append_free_bytes: u64,
    /// Below this much free space, even critical transactions are refused (DAOS: 16 KiB).
    pub critical_free_bytes: u64,
    /// A transaction counts as critical only with at most this many operations (DAOS: 8).
    pub max_critical_ops: usize,
    /// How long a free-space reading is reused.
    pub free_space_cache: Duration,
    /// How long a leader trusts a follower's last free-space report (they come on every
    /// AppendEntries reply). Older ones are treated as unknown, and unknown as room enough.
    pub space_report_ttl: Duration,
    /// A leader without a quorum acknowledgement this recent stops serving (StepDown). Must
    /// not exceed the maximum election timeout: followers refuse votes (and pre-votes) for that
    /// long after they last heard from the leader, so nobody else can lead sooner.
    pub quorum_timeout: Duration,
    /// Serve queries under a leader lease of half the maximum election timeout, counted from
    /// the last quorum confirmation, instead of a ReadIndex round per transaction. See the
    /// crate docs for why that is safe.
    pub lease_reads: bool,
}

impl Default for DbConfig {
    fn default() -> Self {
        DbConfig {
            // NB: no fsync runs on openraft's core loop, so heartbeats are never stuck behind
            // a disk. A follower campaigns only after its lease on the leader (one maximum
            // election timeout) and then one election timeout more ran out without a heartbeat:
            // at least 350 ms of silence, and a dead leader costs 350-500 ms. See docs/design.md.
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(100), Duration::from_millis(250)),
            append_timeout: Duration::from_secs(2),
            snapshot_chunk_timeout: Duration::from_secs(10),
            snapshot_chunk_bytes: 1 << 20,
            snapshot_every_entries: 10_000,
            keep_log_behind_snapshot: 1_000,
            max_append_entries: 256,
            max_batch_txs: 1024,
            max_batch_bytes: 4 << 20,
            max_inflight_batches: 2,
            no_append_free_bytes: 4 << 20,
            critical_free_bytes: 16 << 10,
            max_critical_ops: 8,
            free_space_cache: Duration::from_millis(250),
            space_report_ttl: Duration::from_secs(5),
            quorum_timeout: Duration::from_millis(250),
            lease_reads: true,
        }
    }
}

impl DbConfig {
    /// Timers for tests: elections within a second or two, with room for a test machine that
    /// runs many clusters at once (slower than the defaults, so that a starved test process
    /// does not see spurious elections).
    pub fn fast() -> Self {
        DbConfig {
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(400), Duration::from_millis(800)),
            quorum_timeout: Duration::from_millis(800),
            ..DbConfig::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let (lo, hi) = self.election_timeout;
        if lo >= hi {
            return Err(format!("election timeout min {lo:?} must be below max {hi:?}"));
        }
        if self.heartbeat * 2 > lo {
            return Err(format!(
                "heartbeat {:?} must be at most half the election timeout {lo:?}",
                self.heartbeat
            ));
        }
        if self.quorum_timeout > hi {
            return Err(format!(
                "quorum timeout {:?} must not exceed the maximum election timeout {hi:?}",
                self.quorum_timeout
            ));
        }
        if self.max_batch_txs == 0 || self.max_inflight_batches == 0 {
            return Err("batch limits must be positive".into());
        }
        Ok(())
    }

    /// How long a quorum acknowledgement lets the leader answer reads on its own: half the
    /// time a follower refuses votes after it heard from the leader (see `leadership.rs`).
    pub(crate) fn read_lease(&self) -> Duration {
        self.election_timeout.1 / 2
    }

    pub(crate) fn raft_config(&self, cluster: &str) -> openraft::Config {
        openraft::Config {
            cluster_name: cluster.to_string(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_timeout.0.as_millis() as u64,
            election_timeout_max: self.election_timeout.1.as_millis() as u64,
            install_snapshot_timeout: self.snapshot_chunk_timeout.as_millis() as u64,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            // rdb starts snapshots itself, where they fit (see `db::run_compactor`).
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: self.keep_log_behind_snapshot,
            max_payload_entries: self.max_append_entries,
            // A replica that cannot win asks first, so it never inflates the term and deposes a
            // healthy leader when it comes back (see `network::PeerConn::pre_vote`).
            enable_pre_vote: Some(true),
            // NB: never resume leadership without an election. A leader sends entries to its
            // followers before its own fsync (see `storage::log`); if that write fails (EIO,
            // ENOSPC) or the leader dies first, a quorum of followers may hold an entry the
            // leader reopens without. Restored in its old term, it would write another entry
            // at that index under the same log id, and the followers would keep the first:
            // a forked log and lost acknowledged writes (found by the fault suite; see
            // `t50_space::a_leader_that_lost_unflushed_entries_*`). An election's up-to-date
            // check refuses such a leader.
            enable_leader_restore: Some(false),
            ..Default::default()
        }
    }
}
