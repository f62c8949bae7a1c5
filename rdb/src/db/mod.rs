//! A replica: its handle and lifecycle, transactions' entry points, and the status it reports.
//!
//! The rest lives in one file per concern: `driver` (leadership), `batcher` (group commit),
//! `transfer` (resign and hand-over), `membership`, `compaction`, `recovery` (offline
//! operations) and `intake` (raft RPCs from peers).

mod batcher;
mod compaction;
mod driver;
mod intake;
mod membership;
mod recovery;
mod transfer;

use batcher::{run_batcher, Pending};
use compaction::{run_compactor, COMPACT_TIMEOUT};
use driver::{run_leadership, Driver, LeaderCmd};
use intake::Incoming;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, EntryPayload, Membership, ReadPolicy, ServerState};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::admission::{Admission, Quorum, SpaceProbe, StatvfsProbe, Verdict};
use crate::codec;
use crate::config::DbConfig;
use crate::error::{Error, Result};
use crate::kv::Op;
use crate::leadership::{leader_term, Action, Input, LeaderEvent, Leadership, Observed, Policy};
use crate::network::{
    AppendReply, NetFactory, RaftRpc, Refusal, Reply, RpcHandler, RpcKind, SnapshotChunk, Transport,
};
use crate::storage::{self, DiskFaults, Identity};
use crate::types::{
    Command, DbId, Entry, LogId, Member, NodeId, Raft, ReplicaId, TxRecord, TypeConfig, Vote,
};

/// How often `stop` checks whether openraft released the files.
const STOP_POLL: Duration = Duration::from_millis(5);

/// How to run a replica.
#[derive(Clone)]
pub struct StartOptions {
    /// Timers and bounds.
    pub config: DbConfig,
    /// Where raft messages go.
    pub transport: Arc<dyn Transport>,
    /// This replica's address as peers should record it.
    pub addr: String,
    /// Free-space readings; `statvfs` of the directory by default.
    pub probe: Arc<dyn SpaceProbe>,
    /// Disk fault injection (tests).
    pub faults: Option<DiskFaults>,
}

impl StartOptions {
    /// Options with production defaults.
    pub fn new(transport: Arc<dyn Transport>, addr: impl Into<String>) -> Self {
        StartOptions {
            config: DbConfig::default(),
            transport,
            addr: addr.into(),
            probe: Arc::new(StatvfsProbe),
            faults: None,
        }
    }
}

/// A replica's role as openraft sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Campaigning.
    Candidate,
    /// Leads (by openraft's account; see [`Status::up_term`] for rdb's).
    Leader,
    /// Replicates without a vote.
    Learner,
    /// Not running.
    Shutdown,
}

/// A point-in-time view of a replica.
#[derive(Clone, Debug)]
pub struct Status {
    /// This replica.
    pub replica: ReplicaId,
    /// openraft's role.
    pub role: Role,
    /// The newest term this replica knows.
    pub term: u64,
    /// The leader it knows of, if any.
    pub leader: Option<ReplicaId>,
    /// The term this replica serves as leader in (after StepUp, before StepDown).
    pub up_term: Option<u64>,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last applied entry.
    pub applied_index: Option<u64>,
    /// Index covered by the current snapshot.
    pub snapshot_index: Option<u64>,
    /// Log purged up to here.
    pub purged_index: Option<u64>,
    /// Voters of the effective membership.
    pub voters: Vec<ReplicaId>,
    /// Learners of the effective membership.
    pub learners: Vec<ReplicaId>,
    /// Why the replica stopped, if it did.
    pub stopped: Option<String>,
    /// Transactions refused by free-space admission so far.
    pub admission_rejections: u64,
    /// This replica's free-space reading (at most `free_space_cache` old), as it reports it to
    /// its leader; `None` if the probe failed.
    pub space: Option<crate::admission::SpaceReport>,
    /// Transactions committed (applied, successfully or not) through this replica as leader.
    pub commits: u64,
}

/// The result of a committed transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The term the transaction was committed in.
    pub term: u64,
    /// The log index of the entry that carried it.
    pub index: u64,
}

pub(crate) struct Inner {
    pub ident: Identity,
    pub dir: PathBuf,
    pub addr: String,
    pub config: DbConfig,
    pub raft: Raft,
    /// The state machine, for queries; `None` once stopped so the files can be reopened.
    pub sm: Mutex<Option<storage::sm::SmStore>>,
    /// Both redb files, to wait at stop until openraft's tasks let go of them.
    files: Vec<std::sync::Weak<redb::Database>>,
    /// The term this replica serves as leader in; written only by the watcher.
    pub up: watch::Receiver<Option<u64>>,
    events: Mutex<Option<mpsc::UnboundedReceiver<LeaderEvent>>>,
    /// Tells the leadership driver about resignations; the driver alone decides leadership.
    leader_cmds: mpsc::UnboundedSender<LeaderCmd>,
    batcher: mpsc::Sender<Pending>,
    admission: Admission,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    commits: AtomicU64,
    /// The read lease: (term, valid until). Written only by the leadership driver.
    lease: Arc<Mutex<Option<(u64, Instant)>>>,
    /// The snapshot being received from the leader, if any.
    incoming: tokio::sync::Mutex<Option<Incoming>>,
    /// Until when this replica grants no vote or pre-vote (see `intake`).
    pub(crate) votes_from: Instant,
}

/// One replica of a replicated database. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Db({} replica {})",
            self.inner.ident.db, self.inner.ident.replica
        )
    }
}

fn fatal(e: impl std::fmt::Display) -> Error {
    Error::Stopped(e.to_string())
}

impl Db {
    /// Creates the files of a new replica in `dir` and returns its identity. The replica is
    /// empty: start it and either [`Db::initialize`] it with the initial replica list (bootstrap)
    /// or let an existing group add it ([`Db::add_replica`]).
    pub fn create(
        dir: &FsPath,
        db: DbId,
        replica: ReplicaId,
        faults: Option<&DiskFaults>,
    ) -> Result<Identity> {
        let ident = storage::create(dir, db, replica, faults)?;
        tracing::info!(%db, %replica, dir = %dir.display(), "created replica");
        Ok(ident)
    }

    /// Reads who the replica in `dir` is, without starting it.
    pub fn identity(dir: &FsPath) -> Result<Identity> {
        storage::read_identity(dir)
    }

    /// Opens the replica in `dir` and starts it.
    pub async fn start(dir: &FsPath, opts: StartOptions) -> Result<Db> {
        opts.config.validate().map_err(Error::Invalid)?;
        let files = storage::open(dir, opts.faults.as_ref())?;
        let ident = files.ident;
        // NB: a replica that has followed a leader persisted that leader's vote. One that never
        // did has no lease to keep and may grant votes at once, so a new group elects its
        // first leader in one round.
        let followed = files
            .log
            .read_vote_offline()
            .map_err(|e| Error::Storage(e.to_string()))?
            .is_some();
        let raft_config = opts
            .config
            .raft_config(&ident.db.to_string())
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let admission = Admission::new(opts.probe.clone(), dir.to_path_buf(), &opts.config);
        let net = NetFactory {
            transport: opts.transport.clone(),
            db: ident.db,
            me: ident.replica,
            chunk_bytes: usize::try_from(opts.config.snapshot_chunk_bytes).unwrap_or(usize::MAX),
            chunk_timeout: opts.config.snapshot_chunk_timeout,
            append_timeout: opts.config.append_timeout,
            reports: admission.reports.clone(),
            reach: Default::default(),
        };
        let sm = files.sm.clone();
        let weak_files = vec![files.log.weak(), files.sm.weak()];
        let raft = Raft::new(
            ident.replica.node_id(),
            Arc::new(raft_config),
            net,
            files.log,
            files.sm,
        )
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;

        let (up_tx, up_rx) = watch::channel(None);
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (batch_tx, batch_rx) = mpsc::channel(opts.config.max_batch_txs * 4);
        let (shutdown, _) = watch::channel(false);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let lease = Arc::new(Mutex::new(None));
        let inner = Arc::new(Inner {
            ident,
            dir: dir.to_path_buf(),
            addr: opts.addr.clone(),
            config: opts.config.clone(),
            raft: raft.clone(),
            sm: Mutex::new(Some(sm)),
            files: weak_files,
            up: up_rx,
            events: Mutex::new(Some(ev_rx)),
            leader_cmds: cmd_tx,
            batcher: batch_tx,
            admission,
            shutdown,
            tasks: Mutex::new(Vec::new()),
            commits: AtomicU64::new(0),
            lease: lease.clone(),
            incoming: tokio::sync::Mutex::new(None),
            votes_from: if followed {
                Instant::now() + opts.config.election_timeout.1
            } else {
                Instant::now()
            },
        });
        // NB: a replica that just started grants no votes for election_timeout_max (see
        // handle_rpc); it does not campaign then either, or candidates that cannot win would
        // inflate the term and depose whoever wins next. The driver turns elections on after.
        raft.runtime_config().elect(false);
        let watcher = tokio::spawn(run_leadership(Driver {
            raft: raft.clone(),
            cfg: opts.config.clone(),
            up: up_tx,
            events: ev_tx,
            cmds: cmd_rx,
            shutdown: inner.shutdown.subscribe(),
            me: ident.replica,
            lease,
        }));
        let batcher = tokio::spawn(run_batcher(
            raft,
            opts.config.clone(),
            batch_rx,
            inner.shutdown.subscribe(),
        ));
        let compactor = tokio::spawn(run_compactor(
            Arc::downgrade(&inner),
            opts.config.snapshot_every_entries,
            inner.shutdown.subscribe(),
        ));
        inner
            .tasks
            .lock()
            .expect("lock")
            .extend([watcher, batcher, compactor]);
        tracing::info!(db = %ident.db, replica = %ident.replica, "started replica");
        Ok(Db { inner })
    }

    fn leader_cmd(&self, cmd: LeaderCmd) {
        // NB: fails only once the driver ended (the replica stops); then nothing leads anyway.
        let _ = self.inner.leader_cmds.send(cmd);
    }

    /// This replica's identity.
    pub fn ident(&self) -> Identity {
        self.inner.ident
    }

    /// The replica's data directory.
    pub fn dir(&self) -> &FsPath {
        &self.inner.dir
    }

    /// This replica as a membership entry.
    pub fn member(&self) -> Member {
        Member {
            replica: self.inner.ident.replica,
            addr: self.inner.addr.clone(),
            storage_id: self.inner.ident.storage_id,
        }
    }

    /// Takes the leadership event stream. There is one stream per replica; the second call
    /// returns `None`.
    pub fn take_events(&self) -> Option<mpsc::UnboundedReceiver<LeaderEvent>> {
        self.inner.events.lock().expect("lock").take()
    }

    /// The term this replica currently serves as leader in.
    pub fn up_term(&self) -> Option<u64> {
        // A replica that openraft stopped (a storage error) serves nothing, even before the
        // watcher has reported its step-down.
        if self.inner.raft.metrics().borrow_watched().running_state.is_err() {
            return None;
        }
        *self.inner.up.borrow()
    }

    /// Waits until this replica serves as leader or `timeout` passes.
    pub async fn wait_up(&self, timeout: Duration) -> Result<u64> {
        let mut rx = self.inner.up.clone();
        let fut = async {
            loop {
                if let Some(t) = *rx.borrow_and_update() {
                    return Ok(t);
                }
                if rx.changed().await.is_err() {
                    return Err(Error::Stopped("replica stopped".into()));
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| Error::Timeout("waiting for leadership".into()))?
    }

    /// The best hint about who leads: `(leader, term)`.
    pub fn hint(&self) -> (Option<ReplicaId>, u64) {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        (m.current_leader.map(ReplicaId::from_node_id), m.current_term)
    }

    /// The members (voters and learners) of the effective membership, with their addresses.
    pub fn members(&self) -> Vec<Member> {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        m.membership_config
            .membership()
            .nodes()
            .map(|(_, n)| n.clone())
            .collect()
    }

    pub(crate) fn not_leader(&self) -> Error {
        let (leader, term) = self.hint();
        Error::NotLeader { leader, term }
    }

    /// A snapshot of this replica's state.
    pub fn status(&self) -> Status {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let role = match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Candidate => Role::Candidate,
            ServerState::Follower => Role::Follower,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        let membership = m.membership_config.membership();
        let voters: Vec<ReplicaId> = membership.voter_ids().map(ReplicaId::from_node_id).collect();
        let learners: Vec<ReplicaId> = membership.learner_ids().map(ReplicaId::from_node_id).collect();
        Status {
            replica: self.inner.ident.replica,
            role,
            term: m.current_term,
            leader: m.current_leader.map(ReplicaId::from_node_id),
            up_term: *self.inner.up.borrow(),
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters,
            learners,
            stopped: m.running_state.as_ref().err().map(|e| e.to_string()),
            admission_rejections: self.inner.admission.rejected.load(Ordering::Relaxed),
            space: self.inner.admission.reading_for_status(),
            commits: self.inner.commits.load(Ordering::Relaxed),
        }
    }

    /// Begins a transaction bound to `term` (`None`: the term this replica leads now).
    /// Fails with `NotLeader` unless this replica serves as leader in that term.
    pub fn begin(&self, term: Option<u64>) -> Result<crate::tx::Tx> {
        let up = self.up_term();
        match (up, term) {
            (Some(u), None) => Ok(crate::tx::Tx::new(self.clone(), u)),
            (Some(u), Some(t)) if u == t => Ok(crate::tx::Tx::new(self.clone(), u)),
            _ => Err(self.not_leader()),
        }
    }

    /// A handle on the state machine's file for queries; fails once stopped.
    pub(crate) fn sm_database(&self) -> Result<Arc<redb::Database>> {
        let sm = self.inner.sm.lock().expect("lock");
        sm.as_ref()
            .map(|s| s.database().clone())
            .ok_or_else(|| Error::Stopped("replica stopped".into()))
    }

    /// Proves that this replica still leads `term` and that its state machine has applied
    /// everything committed before the call (ReadIndex).
    pub(crate) async fn ensure_linearizable(&self, term: u64) -> Result<()> {
        if self.up_term() != Some(term) {
            return Err(self.not_leader());
        }
        // Within the lease no other leader can exist (see the crate docs), and everything
        // acknowledged before now is applied here: serve from local state.
        let leased = self
            .inner
            .lease
            .lock()
            .expect("lock")
            .is_some_and(|(t, until)| t == term && Instant::now() < until);
        if leased {
            return Ok(());
        }
        let res = tokio::time::timeout(
            self.inner.config.quorum_timeout,
            self.inner.raft.ensure_linearizable(ReadPolicy::ReadIndex),
        )
        .await;
        match res {
            Ok(Ok(_)) if self.up_term() == Some(term) => Ok(()),
            Ok(Ok(_)) | Ok(Err(RaftError::APIError(_))) => Err(self.not_leader()),
            Ok(Err(RaftError::Fatal(e))) => Err(fatal(e)),
            Err(_) => Err(Error::Timeout(
                "could not reach a quorum to confirm leadership".into(),
            )),
        }
    }

    /// Appends `ops` as (part of) one log entry in `term` and waits until it is applied.
    pub(crate) async fn commit_ops(&self, term: u64, ops: Vec<Op>) -> Result<Committed> {
        if self.up_term() != Some(term) {
            return Err(self.not_leader());
        }
        let voters: Vec<NodeId> = {
            let m = self.inner.raft.metrics();
            let m = m.borrow_watched();
            m.membership_config.membership().voter_ids().collect()
        };
        let quorum = Quorum {
            me: self.inner.ident.replica.node_id(),
            voters: &voters,
        };
        if let Verdict::Refuse { free, needed } = self.inner.admission.check(&ops, quorum)? {
            // Refused at once, with nothing appended. A compaction may give space back for
            // later transactions; it runs in the background, never on this call's time.
            if self.inner.admission.compaction_slot() {
                let db = self.clone();
                tokio::spawn(async move { db.compact(COMPACT_TIMEOUT).await });
            }
            return Err(Error::NoSpace { free, needed });
        }
        let size = ops.iter().map(Op::approx_size).sum();
        let (tx, rx) = oneshot::channel();
        let p = Pending {
            record: TxRecord { term, ops },
            size,
            reply: tx,
        };
        self.inner
            .batcher
            .send(p)
            .await
            .map_err(|_| Error::Stopped("replica stopping".into()))?;
        let res = rx.await.map_err(|_| Error::Stopped("replica stopping".into()))?;
        if res.is_ok() {
            self.inner.commits.fetch_add(1, Ordering::Relaxed);
        }
        match res {
            Err(Error::NotLeader { .. }) => Err(self.not_leader()),
            r => r,
        }
    }

    /// Stops the replica: leadership is given up (StepDown is delivered), raft stops, and the
    /// state machine is made durable.
    pub async fn stop(&self) -> Result<()> {
        let _ = self.inner.shutdown.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock().expect("lock"));
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.inner.raft.shutdown().await;
        let sm = self.inner.sm.lock().expect("lock").take();
        // NB: a failed sync (a full disk) loses nothing: the log holds every applied entry.
        // The files are released either way, so that the replica can be reopened.
        let synced = match sm {
            Some(sm) => storage::log::blocking(move || sm.sync()).await,
            None => Ok(()),
        };
        // openraft's storage tasks end shortly after its core; wait until the files are free so
        // that the replica can be opened again at once.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.inner.files.iter().any(|w| w.strong_count() > 0) {
            if Instant::now() > deadline {
                return Err(Error::Timeout("stop: storage still in use after 10 s".into()));
            }
            tokio::time::sleep(STOP_POLL).await;
        }
        synced?;
        tracing::info!(replica = %self.inner.ident.replica, "stopped replica");
        Ok(())
    }
}
