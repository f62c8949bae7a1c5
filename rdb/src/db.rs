//! A replica: lifecycle, the leadership watcher, the commit batcher, membership, RPC intake.

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

use crate::admission::{Admission, SpaceProbe, StatvfsProbe, Verdict};
use crate::codec;
use crate::config::DbConfig;
use crate::error::{Error, Result};
use crate::kv::Op;
use crate::leadership::{leader_term, Action, Input, LeaderEvent, Leadership, Observed, Policy};
use crate::network::{NetFactory, RaftRpc, Refusal, Reply, RpcHandler, RpcKind, SnapshotChunk, Transport};
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

struct Pending {
    record: TxRecord,
    size: usize,
    reply: oneshot::Sender<Result<Committed>>,
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
    /// When this replica started; it grants no vote for `election_timeout_max` after.
    started: Instant,
}

/// A snapshot transfer in progress: chunks are written to `path` in order.
struct Incoming {
    transfer: u64,
    path: PathBuf,
    file: Option<std::fs::File>,
    offset: u64,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // An abandoned or failed transfer leaves no file behind; a finished one was renamed.
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
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
        let raft_config = opts
            .config
            .raft_config(&ident.db.to_string())
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let net = NetFactory {
            transport: opts.transport.clone(),
            db: ident.db,
            me: ident.replica,
            chunk_bytes: usize::try_from(opts.config.snapshot_chunk_bytes).unwrap_or(usize::MAX),
            chunk_timeout: opts.config.snapshot_chunk_timeout,
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
        let admission = Admission::new(opts.probe.clone(), dir.to_path_buf(), &opts.config);
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
            started: Instant::now(),
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

    /// Bootstraps a new group with `members` as its voters. Call on one replica (any), after
    /// every member was created and started. Fails with `Exists` if the group already has a
    /// membership.
    pub async fn initialize(&self, members: Vec<Member>) -> Result<()> {
        if !members.iter().any(|m| m.replica == self.inner.ident.replica) {
            return Err(Error::Invalid(
                "the initial replica list must include the initializing replica".into(),
            ));
        }
        let nodes: BTreeMap<NodeId, Member> = members.into_iter().map(|m| (m.replica.node_id(), m)).collect();
        match self.inner.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => Err(Error::Exists(e.to_string())),
            Err(RaftError::APIError(e)) => Err(Error::Invalid(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(fatal(e)),
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
        if let Verdict::Refuse { free, needed } = self.inner.admission.check(&ops)? {
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

    /// Builds a snapshot now and purges the log behind it, waiting at most `timeout` for the
    /// snapshot. Returns whether it was built and the log purged.
    /// Declines (returns false, and says why in the log) where the snapshot would not fit
    /// with the critical floor to spare: compaction must never be what fills the disk.
    pub async fn compact(&self, timeout: Duration) -> bool {
        if !self.snapshot_fits() {
            return false;
        }
        let raft = &self.inner.raft;
        let before = raft.metrics().borrow_watched().snapshot;
        if raft.trigger().snapshot().await.is_err() {
            return false;
        }
        let mut m = raft.metrics();
        let work = async {
            let snap = loop {
                let snap = m.borrow_and_update().snapshot;
                if snap.is_some() && snap != before {
                    break snap?;
                }
                m.changed().await.ok()?;
            };
            raft.trigger().purge_log(snap.index).await.ok()?;
            while m.borrow_and_update().purged.is_none_or(|p| p.index < snap.index) {
                m.changed().await.ok()?;
            }
            Some(snap.index)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Some(upto)) => {
                tracing::info!(upto, "compacted: snapshot built and log purged");
                true
            }
            _ => false,
        }
    }

    /// Whether a snapshot fits now (see [`admission`](crate::admission)).
    fn snapshot_fits(&self) -> bool {
        match self.inner.admission.snapshot_fits() {
            Ok(fits) => fits,
            Err(e) => {
                tracing::warn!(replica = %self.inner.ident.replica, cause = %e, "no snapshot");
                false
            }
        }
    }

    /// Adds a replica: first as a learner (waits until it has caught up), then as a voter.
    /// Adding a voter again is a no-op; adding a learner again promotes it.
    pub async fn add_replica(&self, member: Member) -> Result<()> {
        // Idempotent, so that a caller can retry after Busy: a change that failed half-way
        // leaves a learner behind, which is then only promoted.
        let id = member.replica.node_id();
        let (is_voter, is_learner) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow_watched();
            let ms = m.membership_config.membership();
            let voter = ms.voter_ids().any(|v| v == id);
            (voter, !voter && ms.learner_ids().any(|l| l == id))
        };
        if is_voter {
            return Ok(());
        }
        if !is_learner {
            self.inner
                .raft
                .add_learner(id, member, true)
                .await
                .map_err(|e| self.map_write_err(e))?;
        }
        self.inner
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.map_write_err(e))?;
        Ok(())
    }

    /// Removes a replica (voter or learner) from the group.
    pub async fn remove_replica(&self, replica: ReplicaId) -> Result<()> {
        let id = replica.node_id();
        let m = self
            .inner
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        let change = if m.membership().voter_ids().any(|v| v == id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if m.membership().learner_ids().any(|v| v == id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Err(Error::NotFound(format!("replica {replica} is not a member")));
        };
        self.inner
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.map_write_err(e))?;
        Ok(())
    }

    fn map_write_err(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Error {
        match e {
            RaftError::APIError(
                ClientWriteError::ForwardToLeader(_) | ClientWriteError::LogEntryDiscarded(_),
            ) => self.not_leader(),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => match c {
                openraft::error::ChangeMembershipError::InProgress(p) => Error::Busy(p.to_string()),
                other => Error::Invalid(other.to_string()),
            },
            RaftError::APIError(other) => Error::Raft(other.to_string()),
            RaftError::Fatal(f) => fatal(f),
        }
    }

    /// Gives up leadership: stops serving at once, stops heartbeats and stays out of elections
    /// until another replica leads or two maximum election timeouts passed. A lone voter takes
    /// its leadership up again after that.
    pub async fn resign(&self) -> Result<()> {
        let hold = self.inner.config.election_timeout.1 * 2;
        self.leader_cmd(LeaderCmd::Resign {
            until: Instant::now() + hold,
        });
        tracing::info!(replica = %self.inner.ident.replica, "resigning leadership");
        let mut up = self.inner.up.clone();
        let stepped_down = async {
            while up.borrow_and_update().is_some() {
                if up.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::time::timeout(hold, stepped_down)
            .await
            .map_err(|_| Error::Timeout("resign: still serving as leader".into()))
    }

    /// Hands leadership to `to`, a voter, without waiting for an election timeout.
    ///
    /// This replica stops serving at once (no transaction starts while leadership moves), waits
    /// until `to` holds every entry, then uses openraft's leadership transfer: every voter is
    /// told to drop its lease on this leader, and `to` campaigns as soon as it has flushed the
    /// leader's last entry. Done when another replica leads; on failure this replica takes its
    /// leadership up again.
    pub async fn transfer_leadership(&self, to: ReplicaId, timeout: Duration) -> Result<()> {
        if !self.members().iter().any(|m| m.replica == to) {
            return Err(Error::NotFound(format!("replica {to} is not a member")));
        }
        if to == self.inner.ident.replica {
            return Err(Error::Invalid("cannot transfer leadership to oneself".into()));
        }
        if self.up_term().is_none() {
            return Err(self.not_leader());
        }
        let deadline = Instant::now() + timeout;
        self.leader_cmd(LeaderCmd::Resign { until: deadline });
        let give_back = |e: Error| {
            self.leader_cmd(LeaderCmd::Unresign);
            Err(e)
        };
        let mut m = self.inner.raft.metrics();
        // A target that is down or far behind is not worth waiting for long.
        let catch_up = timeout.min(self.inner.config.election_timeout.1 * 2);
        let caught_up = tokio::time::timeout(catch_up, async {
            loop {
                let ok = {
                    let mm = m.borrow_and_update();
                    let last = mm.last_log_index;
                    mm.replication
                        .as_ref()
                        .and_then(|r| r.get(&to.node_id()).cloned())
                        .flatten()
                        .is_some_and(|l| Some(l.index) >= last)
                };
                if ok {
                    return true;
                }
                if m.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false);
        if !caught_up {
            return give_back(Error::Timeout(format!("replica {to} did not catch up")));
        }
        if let Err(e) = self.inner.raft.trigger().transfer_leader(to.node_id()).await {
            return give_back(fatal(e));
        }
        let me = self.inner.ident.replica.node_id();
        let moved = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), async {
            loop {
                if m.borrow_and_update().current_leader.is_some_and(|l| l != me) {
                    return true;
                }
                if m.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false);
        if moved {
            tracing::info!(from = %self.inner.ident.replica, to = %to, "leadership transferred");
            Ok(())
        } else {
            give_back(Error::Timeout("leadership did not move".into()))
        }
    }

    /// The voter that would take over leadership soonest: the most caught-up one. `None` if
    /// this replica does not lead or is the only voter.
    pub fn transfer_target(&self) -> Option<ReplicaId> {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        let me = self.inner.ident.replica.node_id();
        let voters: Vec<u64> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|&v| v != me)
            .collect();
        let repl = m.replication.as_ref()?;
        voters
            .into_iter()
            .max_by_key(|v| repl.get(v).cloned().flatten().map(|l| l.index))
            .map(ReplicaId::from_node_id)
    }

    /// Starts an election now.
    pub async fn campaign(&self) -> Result<()> {
        self.leader_cmd(LeaderCmd::Unresign);
        self.inner.raft.trigger().elect(false).await.map_err(fatal)
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
        if let Some(sm) = sm {
            storage::log::blocking(move || sm.sync()).await?;
        }
        // openraft's storage tasks end shortly after its core; wait until the files are free so
        // that the replica can be opened again at once.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.inner.files.iter().any(|w| w.strong_count() > 0) {
            if Instant::now() > deadline {
                return Err(Error::Timeout("stop: storage still in use after 10 s".into()));
            }
            tokio::time::sleep(STOP_POLL).await;
        }
        tracing::info!(replica = %self.inner.ident.replica, "stopped replica");
        Ok(())
    }

    /// Removes a stopped replica's directory.
    pub fn destroy(dir: &FsPath) -> Result<()> {
        storage::read_identity(dir)?;
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }

    /// Catastrophic recovery: rewrites the stopped replica in `dir` so that it is the only
    /// voter of its group, keeping every entry it has.
    ///
    /// DANGEROUS. Entries that other replicas committed but this one never received are lost,
    /// and if any other replica of the group is still alive, two groups now think they are the
    /// one. Use it only when a quorum is gone for good, then add new replicas.
    pub fn dictate(dir: &FsPath) -> Result<()> {
        let files = storage::open(dir, None)?;
        let me = files.ident.replica.node_id();
        let vote: Option<Vote> = files
            .log
            .read_vote_offline()
            .map_err(|e| Error::Storage(e.to_string()))?;
        let last: Option<LogId> = files
            .log
            .last_log_id_offline()
            .map_err(|e| Error::Storage(e.to_string()))?;
        let term = vote
            .map_or(0, |v| v.leader_id.term)
            .max(last.map_or(0, |l| l.leader_id.term))
            + 1;
        let member = Member {
            replica: files.ident.replica,
            addr: own_addr(&files, me)?,
            storage_id: files.ident.storage_id,
        };
        let membership = Membership::new(vec![BTreeSet::from([me])], BTreeMap::from([(me, member)]))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let entry = Entry {
            log_id: LogId::new(
                openraft::impls::leader_id_adv::LeaderId { term, node_id: me },
                last.map_or(0, |l| l.index + 1),
            ),
            payload: EntryPayload::Membership(membership),
        };
        files.log.append_offline(vec![entry])?;
        files.log.write_vote_offline(&Vote::new_committed(term, me))?;
        tracing::warn!(replica = %files.ident.replica, term, "dictated: this replica is now the only voter");
        Ok(())
    }

    /// Processes a raft message from a peer.
    pub async fn handle_rpc(&self, rpc: RaftRpc) -> std::result::Result<Vec<u8>, Refusal> {
        let me = &self.inner.ident;
        if rpc.db != me.db {
            return Err(Refusal::NoSuchDb(rpc.db));
        }
        if rpc.to != me.replica {
            return Err(Refusal::WrongReplica {
                wanted: rpc.to,
                have: me.replica,
            });
        }
        if rpc.to_storage_id != me.storage_id {
            return Err(Refusal::WrongStorage {
                wanted: rpc.to_storage_id,
                have: me.storage_id,
            });
        }
        if *self.inner.shutdown.borrow() {
            return Err(Refusal::Stopped);
        }
        // NB: a replica that just started does not remember which leader it promised, by
        // following it, not to replace: it grants no vote (nor pre-vote) for a maximum election
        // timeout. That keeps the old leader's read lease safe across a follower restart.
        if matches!(rpc.kind, RpcKind::Vote | RpcKind::PreVote)
            && self.inner.started.elapsed() < self.inner.config.election_timeout.1
        {
            return Err(Refusal::Starting);
        }
        let raft = &self.inner.raft;
        let bad = |e: codec::CodecError| Refusal::Malformed(e.to_string());
        fn reply<T: serde::Serialize, E: std::fmt::Display>(r: std::result::Result<T, E>) -> Reply<T> {
            r.map_err(|e| e.to_string())
        }
        let encoded = match rpc.kind {
            RpcKind::Append => codec::encode(&reply(
                raft.append_entries(codec::decode(&rpc.payload).map_err(bad)?)
                    .await,
            )),
            RpcKind::Vote => {
                codec::encode(&reply(raft.vote(codec::decode(&rpc.payload).map_err(bad)?).await))
            }
            RpcKind::PreVote => codec::encode(&reply(
                raft.pre_vote(codec::decode(&rpc.payload).map_err(bad)?).await,
            )),
            RpcKind::TransferLeader => {
                tracing::info!(replica = %me.replica, from = %rpc.from, "leadership transfer");
                self.leader_cmd(LeaderCmd::Unresign);
                let req = codec::decode(&rpc.payload).map_err(bad)?;
                codec::encode(&reply(raft.handle_transfer_leader(req).await))
            }
            RpcKind::Snapshot => {
                let chunk: SnapshotChunk = codec::decode(&rpc.payload).map_err(bad)?;
                codec::encode(&self.receive_snapshot(chunk).await)
            }
        };
        encoded.map_err(|e| Refusal::Malformed(e.to_string()))
    }

    /// Takes one chunk of a snapshot transfer; installs the snapshot after the last one.
    async fn receive_snapshot(
        &self,
        chunk: SnapshotChunk,
    ) -> Reply<Option<openraft::raft::SnapshotResponse<TypeConfig>>> {
        let mut slot = self.inner.incoming.lock().await;
        if chunk.offset == 0 {
            let path = {
                let sm = self.inner.sm.lock().expect("lock");
                sm.as_ref().ok_or("replica stopped")?.incoming_path()
            };
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| format!("cannot receive a snapshot: {e}"))?;
            // Replacing an older transfer removes its file (see `Incoming`).
            *slot = Some(Incoming {
                transfer: chunk.transfer,
                path,
                file: Some(file),
                offset: 0,
            });
        }
        let Some(inc) = slot.as_mut().filter(|i| i.transfer == chunk.transfer) else {
            return Err("no such snapshot transfer here; start again from offset 0".into());
        };
        if inc.offset != chunk.offset {
            return Err(format!(
                "snapshot chunk at {} but {} expected",
                chunk.offset, inc.offset
            ));
        }
        let mut file = inc.file.take().ok_or("snapshot transfer failed earlier")?;
        let data = chunk.data;
        let n = data.len() as u64;
        let done = chunk.done;
        let res = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            file.write_all(&data)?;
            if done {
                file.sync_all()?;
            }
            Ok::<_, std::io::Error>(file)
        })
        .await
        .map_err(|e| e.to_string())?;
        let file = match res {
            Ok(f) => f,
            Err(e) => {
                let path = inc.path.clone();
                *slot = None;
                let _ = std::fs::remove_file(path);
                return Err(format!("cannot write the snapshot: {e}"));
            }
        };
        inc.offset += n;
        if !done {
            inc.file = Some(file);
            return Ok(None);
        }
        let inc = slot.take().expect("checked above");
        drop(file);
        let snapshot = crate::storage::sm::SnapshotFile::open(inc.path.clone())
            .map_err(|e| format!("cannot reopen the snapshot: {e}"))?;
        let snapshot = crate::storage::sm::Snapshot {
            meta: chunk.meta,
            snapshot,
        };
        let res = self.inner.raft.install_full_snapshot(chunk.vote, snapshot).await;
        // Installed snapshots were renamed into place; anything else goes.
        let _ = std::fs::remove_file(&inc.path);
        res.map(Some).map_err(|e| e.to_string())
    }
}

/// Finds this replica's own membership entry (for its address) in its log or state machine.
fn own_addr(files: &storage::Files, me: NodeId) -> Result<String> {
    let mut reader = files.log.clone();
    let entries = futures::executor::block_on(openraft::RaftLogReader::try_get_log_entries(&mut reader, ..))
        .map_err(|e| Error::Storage(e.to_string()))?;
    for e in entries.iter().rev() {
        if let EntryPayload::Membership(m) = &e.payload {
            if let Some(n) = m.get_node(&me) {
                return Ok(n.addr.clone());
            }
        }
    }
    let mut sm = files.sm.clone();
    let (_, stored) =
        futures::executor::block_on(openraft::storage::RaftStateMachine::applied_state(&mut sm))
            .map_err(|e| Error::Storage(e.to_string()))?;
    stored
        .membership()
        .get_node(&me)
        .map(|n| n.addr.clone())
        .ok_or_else(|| Error::Invalid("this replica was never a member; nothing to dictate".into()))
}

#[async_trait]
impl RpcHandler for Db {
    async fn handle_rpc(&self, rpc: RaftRpc) -> std::result::Result<Vec<u8>, Refusal> {
        Db::handle_rpc(self, rpc).await
    }
}

/// How often a replica looks whether a snapshot is due.
const COMPACTOR_PERIOD: Duration = Duration::from_secs(1);
/// How long a background compaction after a refusal may wait for its snapshot.
const COMPACT_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds a snapshot once `every` entries were applied since the last one, where it fits.
/// openraft's own snapshot policy is off: it would build one whether or not the disk can hold
/// it, and an ENOSPC while building stops the raft core for good.
async fn run_compactor(inner: Weak<Inner>, every: u64, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(COMPACTOR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        let Some(inner) = inner.upgrade() else { break };
        let db = Db { inner };
        let due = {
            let m = db.inner.raft.metrics();
            let m = m.borrow_watched();
            let applied = m.last_applied.map_or(0, |l| l.index);
            let snap = m.snapshot.map_or(0, |l| l.index);
            applied.saturating_sub(snap) >= every
        };
        if due && db.snapshot_fits() {
            let _ = db.inner.raft.trigger().snapshot().await;
        }
    }
}

/// Packs waiting transactions into log entries, with at most `max_inflight_batches` entries in
/// flight: while they are, newcomers queue up and leave together as the next entry.
async fn run_batcher(
    raft: Raft,
    cfg: DbConfig,
    mut rx: mpsc::Receiver<Pending>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(cfg.max_inflight_batches));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closes"),
            _ = shutdown.changed() => break,
        };
        let first = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => break },
            _ = shutdown.changed() => break,
        };
        let mut bytes = first.size;
        let mut batch = vec![first];
        while batch.len() < cfg.max_batch_txs && bytes < cfg.max_batch_bytes {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.size;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (records, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.record, p.reply)).unzip();
            let res = raft.client_write(Command { txs: records }).await;
            drop(permit);
            match res {
                Ok(resp) => {
                    let term = resp.log_id.leader_id.term;
                    let index = resp.log_id.index;
                    for (reply, r) in replies.into_iter().zip(resp.data.results) {
                        let _ = reply.send(r.map(|()| Committed { term, index }).map_err(Error::Apply));
                    }
                }
                Err(e) => {
                    let err = match e {
                        // NB: a discarded entry was replaced in the log by another leader's, so it
                        // cannot commit; like a refusal, it is a NotLeader.
                        RaftError::APIError(
                            ClientWriteError::ForwardToLeader(_) | ClientWriteError::LogEntryDiscarded(_),
                        ) => Error::NotLeader {
                            leader: None,
                            term: 0,
                        },
                        RaftError::APIError(other) => Error::Raft(other.to_string()),
                        RaftError::Fatal(f) => fatal(f),
                    };
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}

/// What the leadership driver is told besides metrics.
enum LeaderCmd {
    Resign { until: Instant },
    Unresign,
}

/// What the leadership driver works with.
struct Driver {
    raft: Raft,
    cfg: DbConfig,
    /// Publishes the term this replica serves as leader in.
    up: watch::Sender<Option<u64>>,
    events: mpsc::UnboundedSender<LeaderEvent>,
    cmds: mpsc::UnboundedReceiver<LeaderCmd>,
    shutdown: watch::Receiver<bool>,
    me: ReplicaId,
    lease: Arc<Mutex<Option<(u64, Instant)>>>,
}

/// One metrics sample as the policy sees it.
fn observe(m: &openraft::RaftMetrics<TypeConfig>) -> Observed {
    let leading = leader_term(m);
    let sole_voter = {
        let mut voters = m.membership_config.membership().voter_ids();
        voters.next() == Some(m.id) && voters.next().is_none()
    };
    let quorum_acked = match leading {
        Some(_) if sole_voter => Some(Instant::now()),
        Some(_) => m
            .last_quorum_acked
            .as_ref()
            .and_then(|at| Instant::now().checked_sub(openraft::Instant::elapsed(&**at))),
        None => None,
    };
    Observed {
        leading,
        other_leader: m.current_leader.is_some_and(|l| l != m.id),
        quorum_acked,
    }
}

/// Proves leadership of the current term: a ReadIndex round, then the whole log applied.
async fn prove(raft: Raft, cfg: DbConfig) -> bool {
    let confirmed = matches!(
        tokio::time::timeout(
            cfg.quorum_timeout,
            raft.ensure_linearizable(ReadPolicy::ReadIndex)
        )
        .await,
        Ok(Ok(_))
    );
    if !confirmed {
        return false;
    }
    // NB: openraft restores a restarted leader in its old term (enable_leader_restore), with
    // the commit index it last persisted; a ReadIndex then only covers that. Before serving,
    // everything in the log when it took office must be applied: the new term's first entry
    // for a fresh leader (DAOS's debut entry), every entry written before the crash for a
    // restored one.
    let target = raft.metrics().borrow_watched().last_log_index;
    raft.wait(Some(cfg.election_timeout.1))
        .applied_index_at_least(target, "leader applies its whole log")
        .await
        .is_ok()
}

/// Feeds the leadership policy (see `leadership.rs`) and carries out what it decides.
async fn run_leadership(d: Driver) {
    let Driver {
        raft,
        cfg,
        up,
        events,
        mut cmds,
        mut shutdown,
        me,
        lease,
    } = d;
    let mut policy = Leadership::new(Policy {
        read_lease: cfg.read_lease(),
        quorum_timeout: cfg.quorum_timeout,
        startup_hold: cfg.election_timeout.1,
        lease_reads: cfg.lease_reads,
    });
    let mut metrics = raft.metrics();
    let (proof_tx, mut proofs) = mpsc::unbounded_channel::<(u64, bool)>();
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut input = Input::Started;
    loop {
        let prev = policy.up();
        let actions = policy.step(Instant::now(), input);
        // Publish first: a service that hears StepUp can begin at once, and one that hears
        // StepDown finds nothing left to serve.
        *lease.lock().expect("lock") = policy.lease();
        if policy.up() != prev {
            up.send_replace(policy.up());
        }
        for a in actions {
            match a {
                Action::Event(ev) => {
                    match ev {
                        LeaderEvent::StepUp { term } => tracing::info!(replica = %me, term, "step up"),
                        LeaderEvent::StepDown { term } => tracing::info!(replica = %me, term, "step down"),
                    }
                    let _ = events.send(ev);
                }
                Action::Prove { id, .. } => {
                    let (raft, cfg, tx) = (raft.clone(), cfg.clone(), proof_tx.clone());
                    tokio::spawn(async move {
                        let _ = tx.send((id, prove(raft, cfg).await));
                    });
                }
                Action::Heartbeats(on) => raft.runtime_config().heartbeat(on),
                Action::Elections(on) => raft.runtime_config().elect(on),
            }
        }
        input = tokio::select! {
            _ = shutdown.changed() => break,
            r = metrics.changed() => {
                if r.is_err() {
                    break;
                }
                Input::Observe(observe(&metrics.borrow_watched()))
            }
            _ = tick.tick() => Input::Observe(observe(&metrics.borrow_watched())),
            Some(cmd) = cmds.recv() => match cmd {
                LeaderCmd::Resign { until } => Input::Resign { until },
                LeaderCmd::Unresign => Input::Unresign,
            },
            Some((id, ok)) = proofs.recv() => Input::ProofDone { id, ok },
        };
    }
    *lease.lock().expect("lock") = None;
    up.send_replace(None);
    if let Some(term) = policy.up() {
        tracing::info!(replica = %me, term, "step down");
        let _ = events.send(LeaderEvent::StepDown { term });
    }
}
