//! One hosted replica: drives the service's hooks from rdb's leadership events, admits
//! requests only while Up, and runs each request in one transaction with its exactly-once
//! record.
//!
//! STATES: Down -> SteppingUp -> (Up | UpEmpty) -> SteppingDown -> Down. Requests are admitted
//! only in Up. Step-down first refuses new requests, then calls `drain`, waits for admitted
//! requests to finish, then calls `step_down`. Events come from rdb one at a time, so hooks
//! never overlap.
//!
//! EXACTLY-ONCE (DAOS svc_ops, with the client sessions of the Raft dissertation, 6.3): a
//! mutating request carries (client id, seq) and the client's acknowledged low-water mark
//! `acked` (it will never send a seq at or below it again). The engine keeps in
//! `/__rsvc/svc_ops`, written in the same transaction as the request's effects:
//!
//! - `client ++ seq` (big-endian) -> the encoded result, one per outstanding seq, so that many
//!   calls of one client may be in flight at once;
//! - `client ++ u64::MAX` -> the client's *floor*: results at or below it are forgotten.
//!
//! A retry of a seq whose result is kept gets that result; a seq at or below the floor is
//! `Stale`. A request's reads come from one snapshot, and results are forgotten only after the
//! floor above them committed, so a request that finds neither its result nor a floor above it
//! is the first of its seq, unless another attempt of the same seq is running right now: the
//! precondition "no result for this seq yet" lets only one of them apply. The floor moves in
//! steps of [`FLOOR_STEP`] acknowledged seqs (a raise expects the floor it read, so the floor
//! only rises), and the results below it are deleted right after. Entries of clients silent for
//! `SVC_OPS_MAX_AGE` are pruned at step-up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdb::{Db, KeyClass, LeaderEvent, Path, Tx};
use rsvc_client::WireError;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::wire_of;
use crate::leader_tasks::LeaderTasks;
use crate::service::{Ctx, ErasedService, HostedService, ServiceError, StepUp};

/// The framework's own KVS under the root.
pub(crate) const SYS_KVS: &[u8] = b"__rsvc";
const BOOTSTRAPPED: &[u8] = b"bootstrapped";
const SVC_OPS: &[u8] = b"svc_ops";
/// How long an exactly-once record of a silent client is kept (DAOS: 300 s).
pub const SVC_OPS_MAX_AGE: Duration = Duration::from_secs(300);

fn sys() -> Path {
    Path::root().child(SYS_KVS)
}

fn svc_ops() -> Path {
    sys().child(SVC_OPS)
}

/// A replica's serving state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Not leading.
    Down,
    /// Running `step_up`.
    SteppingUp,
    /// Leading, but the database is empty for the service.
    UpEmpty,
    /// Leading and serving.
    Up,
    /// Refusing new requests, draining, running `step_down`.
    SteppingDown,
}

/// The kept result of one mutating request (key `client ++ seq`).
#[derive(Serialize, Deserialize)]
struct OpRecord {
    /// Milliseconds since the epoch on the leader that wrote it.
    at_ms: u64,
    result: Result<Vec<u8>, Vec<u8>>,
}

/// A client's floor (key `client ++ u64::MAX`): its results at or below `acked` are forgotten.
#[derive(Serialize, Deserialize)]
struct Floor {
    /// Milliseconds since the epoch on the leader that wrote it.
    at_ms: u64,
    acked: u64,
}

/// The floor moves when a client's acknowledged mark passed it by this many seqs.
pub const FLOOR_STEP: u64 = 64;

/// The key of `client`'s result for `seq`, or (with `u64::MAX`) of its floor.
fn op_key(client: &[u8; 16], seq: u64) -> Vec<u8> {
    let mut k = client.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A hosted replica.
pub struct Host {
    /// Service class.
    pub class: String,
    /// Instance id.
    pub instance: String,
    /// The replica's database.
    pub db: Db,
    svc: Arc<dyn ErasedService>,
    /// State and the term it refers to.
    state: Mutex<(State, u64)>,
    /// The background tasks of the term this replica leads, while Up.
    tasks: Mutex<Option<LeaderTasks>>,
    inflight: AtomicUsize,
    idle: Notify,
    /// Request counters, for metrics.
    pub stats: HostStats,
}

/// Request counters of one hosted replica.
#[derive(Debug, Default)]
pub struct HostStats {
    /// Requests handled as leader that succeeded (service errors included).
    pub ok: std::sync::atomic::AtomicU64,
    /// Requests that failed with a framework error.
    pub failed: std::sync::atomic::AtomicU64,
    /// Requests refused because this replica does not serve as leader.
    pub not_leader: std::sync::atomic::AtomicU64,
    /// Sum of handling latencies, in microseconds.
    pub latency_us_sum: std::sync::atomic::AtomicU64,
}

/// Holds a request's admission; dropping it lets a pending step-down proceed.
pub struct Admitted<'a> {
    host: &'a Host,
    /// The term the request was admitted in.
    pub term: u64,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.host.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.host.idle.notify_waiters();
        }
    }
}

impl Host {
    /// Hosts `db` for `svc` and starts following its leadership events.
    pub fn start(class: &str, instance: &str, db: Db, svc: HostedService) -> Arc<Host> {
        let host = Arc::new(Host {
            class: class.to_string(),
            instance: instance.to_string(),
            db: db.clone(),
            svc: svc.0,
            state: Mutex::new((State::Down, 0)),
            tasks: Mutex::new(None),
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
            stats: HostStats::default(),
        });
        if let Some(mut events) = db.take_events() {
            let h = host.clone();
            tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    match ev {
                        LeaderEvent::StepUp { term } => h.step_up(term).await,
                        LeaderEvent::StepDown { term } => h.step_down(term).await,
                    }
                }
            });
        }
        host
    }

    /// The serving state and its term.
    pub fn state(&self) -> (State, u64) {
        *self.state.lock().expect("lock")
    }

    fn set_state(&self, s: State, term: u64) {
        *self.state.lock().expect("lock") = (s, term);
        tracing::info!(class = %self.class, instance = %self.instance, term, state = ?s, "service state");
    }

    async fn step_up(&self, term: u64) {
        self.set_state(State::SteppingUp, term);
        match self.try_step_up(term).await {
            Ok(StepUp::Up) => {
                self.set_state(State::Up, term);
                let mut tasks = LeaderTasks::new(term);
                self.svc.leader_tasks(&self.db, term, &mut tasks);
                *self.tasks.lock().expect("lock") = Some(tasks);
            }
            Ok(StepUp::Empty) => self.set_state(State::UpEmpty, term),
            Err(e) => {
                tracing::warn!(class = %self.class, instance = %self.instance, term, cause = %e, "step_up failed; giving up leadership");
                self.set_state(State::Down, term);
                let _ = self.db.resign().await;
            }
        }
    }

    async fn try_step_up(&self, term: u64) -> Result<StepUp, ServiceError> {
        let mut tx = self.db.begin(Some(term))?;
        let bootstrapped = match tx.get(&Path::root(), SYS_KVS).await {
            Ok(Some(_)) => tx.lookup(&sys(), BOOTSTRAPPED).await?.is_some(),
            Ok(None) => false,
            Err(e) => return Err(e.into()),
        };
        if !bootstrapped {
            let mut init = self.db.begin(Some(term))?;
            if tx.get(&Path::root(), SYS_KVS).await?.is_none() {
                init.create_kvs(&Path::root(), SYS_KVS, KeyClass::Lexical);
                init.create_kvs(&sys(), SVC_OPS, KeyClass::Lexical);
            }
            self.svc.bootstrap(&mut init).await?;
            init.update(&sys(), BOOTSTRAPPED, b"1".to_vec());
            init.commit().await?;
            tracing::info!(class = %self.class, instance = %self.instance, term, "bootstrapped a new database");
        } else {
            self.prune_svc_ops(tx).await;
        }
        self.svc.step_up(&self.db, term).await
    }

    async fn prune_svc_ops(&self, mut tx: Tx) {
        let Ok(all) = tx.iterate(&svc_ops(), .., usize::MAX).await else {
            return;
        };
        let cutoff = now_ms().saturating_sub(SVC_OPS_MAX_AGE.as_millis() as u64);
        let mut n = 0;
        for (k, v) in all {
            let rdb::Value::Bytes(b) = v else { continue };
            let at_ms = match k.len() {
                24 if k[16..] == [0xff; 8] => postcard::from_bytes::<Floor>(&b).map(|f| f.at_ms).ok(),
                24 => postcard::from_bytes::<OpRecord>(&b).map(|r| r.at_ms).ok(),
                // A record of the one-call-at-a-time format before sessions: of no use now.
                _ => Some(0),
            };
            if at_ms.is_none_or(|t| t < cutoff) {
                tx.delete(&svc_ops(), k);
                n += 1;
            }
        }
        if n > 0 {
            match tx.commit().await {
                Ok(_) => {
                    tracing::info!(class = %self.class, instance = %self.instance, pruned = n, "pruned old exactly-once records")
                }
                Err(e) => tracing::warn!(cause = %e, "pruning exactly-once records failed"),
            }
        }
    }

    async fn step_down(&self, term: u64) {
        let (s, _) = self.state();
        self.set_state(State::SteppingDown, term);
        let tasks = self.tasks.lock().expect("lock").take();
        if let Some(tasks) = tasks {
            tasks.stop().await;
        }
        if matches!(s, State::Up | State::UpEmpty) {
            self.svc.drain().await;
        }
        loop {
            let idle = self.idle.notified();
            if self.inflight.load(Ordering::Acquire) == 0 {
                break;
            }
            idle.await;
        }
        if matches!(s, State::Up | State::UpEmpty) {
            self.svc.step_down(term).await;
        }
        self.set_state(State::Down, term);
    }

    /// Admits a request if this replica is Up.
    pub fn admit(&self) -> Option<Admitted<'_>> {
        let st = self.state.lock().expect("lock");
        if st.0 != State::Up {
            return None;
        }
        self.inflight.fetch_add(1, Ordering::AcqRel);
        Some(Admitted {
            host: self,
            term: st.1,
        })
    }

    /// Runs one request; the caller has admitted it. `acked` is the client's low-water mark
    /// (see the module docs).
    pub async fn handle(
        &self,
        adm: &Admitted<'_>,
        client_id: [u8; 16],
        seq: u64,
        acked: u64,
        payload: &[u8],
        caller: Arc<crate::caller::Caller>,
    ) -> Result<Result<Vec<u8>, Vec<u8>>, WireError> {
        let term = adm.term;
        let mutating = seq > 0 && self.svc.is_mutating(payload)?;
        let mut tx = self.db.begin(Some(term)).map_err(|e| wire_of(&e))?;
        // The floor as read, and its value, for the precondition below.
        let mut floor = (None, 0);
        if mutating {
            let kept = tx
                .lookup(&svc_ops(), &op_key(&client_id, seq))
                .await
                .map_err(|e| wire_of(&e))?;
            if let Some(b) = kept {
                let rec: OpRecord =
                    postcard::from_bytes(&b).map_err(|e| WireError::Invalid(e.to_string()))?;
                tracing::debug!(class = %self.class, seq, "duplicate request: returning the first result");
                return Ok(rec.result);
            }
            let raw = tx
                .lookup(&svc_ops(), &op_key(&client_id, u64::MAX))
                .await
                .map_err(|e| wire_of(&e))?;
            let value = raw
                .as_deref()
                .and_then(|b| postcard::from_bytes::<Floor>(b).ok())
                .map_or(0, |f| f.acked);
            if seq <= value {
                return Err(WireError::Stale);
            }
            floor = (raw, value);
        }
        let mut ctx = Ctx {
            term,
            instance: self.instance.clone(),
            tx,
            client_id,
            db: self.db.clone(),
            caller,
        };
        let result = self.svc.handle(&mut ctx, payload).await?;
        let mut tx = if result.is_ok() {
            ctx.tx
        } else {
            // A failed request leaves no effect, but its result is still recorded.
            self.db.begin(Some(term)).map_err(|e| wire_of(&e))?
        };
        // A client's acknowledged mark is below every seq it still has outstanding; one that
        // says otherwise is not believed.
        let raise = (mutating && acked < seq && acked >= floor.1 + FLOOR_STEP).then_some(acked);
        if mutating {
            let (raw, _) = floor;
            let rec = OpRecord {
                at_ms: now_ms(),
                result: result.clone(),
            };
            let bytes = postcard::to_allocvec(&rec).map_err(|e| WireError::Invalid(e.to_string()))?;
            // NB: all critical (a precondition, small updates), so that the record never turns
            // an operator's delete or destroy into an ordinary transaction that low space
            // refuses; the rest of the transaction still decides.
            // NB: two attempts of one seq can run at once (a retry while the first attempt is
            // still in flight on the same leader). Only the first to apply finds the record
            // absent; the other fails its precondition, is retried, and gets the kept result.
            tx.expect(&svc_ops(), op_key(&client_id, seq), None);
            tx.update_critical(&svc_ops(), op_key(&client_id, seq), bytes);
            if let Some(acked) = raise {
                // The floor only rises: two raises at once would otherwise let the lower one
                // land last, below results already forgotten.
                tx.expect(&svc_ops(), op_key(&client_id, u64::MAX), raw);
                let f = Floor {
                    at_ms: now_ms(),
                    acked,
                };
                let bytes = postcard::to_allocvec(&f).map_err(|e| WireError::Invalid(e.to_string()))?;
                tx.update_critical(&svc_ops(), op_key(&client_id, u64::MAX), bytes);
            }
        }
        tx.commit().await.map_err(|e| wire_of(&e))?;
        if let Some(acked) = raise {
            self.forget_below(term, &client_id, acked).await;
        }
        Ok(result)
    }

    /// Deletes `client`'s kept results at or below its new floor `acked`, in a transaction of
    /// its own. Best effort: a concurrent one that deleted some first makes this one fail,
    /// and the next raise of the floor deletes what is left.
    async fn forget_below(&self, term: u64, client: &[u8; 16], acked: u64) {
        let Ok(mut tx) = self.db.begin(Some(term)) else {
            return;
        };
        let range = op_key(client, 0)..=op_key(client, acked);
        let Ok(kept) = tx.iterate(&svc_ops(), range, usize::MAX).await else {
            return;
        };
        if kept.is_empty() {
            return;
        }
        for (k, _) in kept {
            tx.delete(&svc_ops(), k);
        }
        if let Err(e) = tx.commit().await {
            tracing::debug!(class = %self.class, cause = %e, "forgetting acknowledged results failed; the next floor retries");
        }
    }
}
