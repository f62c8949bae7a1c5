//! One hosted replica: drives the service's hooks from rdb's leadership events, admits
//! requests only while Up, and runs each request in one transaction with its exactly-once
//! record.
//!
//! STATES: Down -> SteppingUp -> (Up | UpEmpty) -> SteppingDown -> Down. Requests are admitted
//! only in Up. Step-down first refuses new requests, then calls `drain`, waits for admitted
//! requests to finish, then calls `step_down`. Events come from rdb one at a time, so hooks
//! never overlap.
//!
//! EXACTLY-ONCE (DAOS svc_ops): a mutating request carries (client id, seq). The engine keeps,
//! per client, the last seq and its encoded result in `/__rsvc/svc_ops`, written in the same
//! transaction as the request's effects. A retry of that seq returns the stored result; an
//! older seq is `Stale`. Entries of clients silent for `SVC_OPS_MAX_AGE` are pruned at step-up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rdb::{Db, KeyClass, LeaderEvent, Path, Tx};
use rsvc_client::{ServiceApi, WireError};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::service::{Ctx, ReplicatedService, StepUp};

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

/// The service behind a replica with its types erased, so the engine can hold any.
#[async_trait]
pub trait ErasedService: Send + Sync + 'static {
    /// See [`ReplicatedService::bootstrap`].
    async fn bootstrap(&self, tx: &mut Tx) -> Result<(), String>;
    /// See [`ReplicatedService::step_up`].
    async fn step_up(&self, db: &Db, term: u64) -> Result<StepUp, String>;
    /// See [`ReplicatedService::drain`].
    async fn drain(&self);
    /// See [`ReplicatedService::step_down`].
    async fn step_down(&self, term: u64);
    /// Decodes, handles and encodes one request: `Ok(Ok(response))`, `Ok(Err(service error))`
    /// (both postcard), or a wire error for an undecodable request.
    async fn handle(&self, ctx: &mut Ctx, payload: &[u8]) -> Result<Result<Vec<u8>, Vec<u8>>, WireError>;
    /// Whether the encoded request mutates.
    fn is_mutating(&self, payload: &[u8]) -> Result<bool, WireError>;
}

/// Erases a [`ReplicatedService`].
pub struct Adapter<S>(pub S);

fn bad_request(e: postcard::Error) -> WireError {
    WireError::Invalid(format!("undecodable request: {e}"))
}

#[async_trait]
impl<S: ReplicatedService> ErasedService for Adapter<S> {
    async fn bootstrap(&self, tx: &mut Tx) -> Result<(), String> {
        self.0.bootstrap(tx).await
    }
    async fn step_up(&self, db: &Db, term: u64) -> Result<StepUp, String> {
        self.0.step_up(db, term).await
    }
    async fn drain(&self) {
        self.0.drain().await
    }
    async fn step_down(&self, term: u64) {
        self.0.step_down(term).await
    }
    async fn handle(&self, ctx: &mut Ctx, payload: &[u8]) -> Result<Result<Vec<u8>, Vec<u8>>, WireError> {
        let req = rsvc_client::wire::decode(payload).map_err(bad_request)?;
        let enc =
            |r: Result<Vec<u8>, postcard::Error>| r.map_err(|e| WireError::Invalid(format!("encode: {e}")));
        Ok(match self.0.handle(ctx, req).await {
            Ok(resp) => Ok(enc(rsvc_client::wire::encode(&resp))?),
            Err(err) => Err(enc(rsvc_client::wire::encode(&err))?),
        })
    }
    fn is_mutating(&self, payload: &[u8]) -> Result<bool, WireError> {
        let req: <S::Api as ServiceApi>::Request = rsvc_client::wire::decode(payload).map_err(bad_request)?;
        Ok(<S::Api as ServiceApi>::is_mutating(&req))
    }
}

/// The exactly-once record of one client.
#[derive(Serialize, Deserialize)]
struct OpRecord {
    seq: u64,
    /// Milliseconds since the epoch on the leader that wrote it.
    at_ms: u64,
    result: Result<Vec<u8>, Vec<u8>>,
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

/// Maps an rdb error on the request path to the wire.
pub(crate) fn wire_of(e: &rdb::Error) -> WireError {
    match e {
        rdb::Error::NotLeader { .. } | rdb::Error::Timeout(_) => WireError::NotLeader,
        rdb::Error::NoSpace { .. } => WireError::NoSpace,
        rdb::Error::Busy(_) => WireError::Busy,
        // A failed precondition is a lost race with a concurrent request: nothing was applied,
        // so the client may retry the very same request.
        rdb::Error::Apply(rdb::ApplyError::PreconditionFailed(_)) => WireError::Busy,
        rdb::Error::Apply(a) => WireError::Invalid(format!("transaction refused: {a}")),
        rdb::Error::Stopped(_) => WireError::Shutdown,
        other => WireError::Invalid(other.to_string()),
    }
}

impl Host {
    /// Hosts `db` for `svc` and starts following its leadership events.
    pub fn start(class: &str, instance: &str, db: Db, svc: Arc<dyn ErasedService>) -> Arc<Host> {
        let host = Arc::new(Host {
            class: class.to_string(),
            instance: instance.to_string(),
            db: db.clone(),
            svc,
            state: Mutex::new((State::Down, 0)),
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
            Ok(StepUp::Up) => self.set_state(State::Up, term),
            Ok(StepUp::Empty) => self.set_state(State::UpEmpty, term),
            Err(e) => {
                tracing::warn!(class = %self.class, instance = %self.instance, term, cause = %e, "step_up failed; giving up leadership");
                self.set_state(State::Down, term);
                let _ = self.db.resign().await;
            }
        }
    }

    async fn try_step_up(&self, term: u64) -> Result<StepUp, String> {
        let mut tx = self.db.begin(Some(term)).map_err(|e| e.to_string())?;
        let bootstrapped = match tx.get(&Path::root(), SYS_KVS).await {
            Ok(Some(_)) => tx
                .lookup(&sys(), BOOTSTRAPPED)
                .await
                .map_err(|e| e.to_string())?
                .is_some(),
            Ok(None) => false,
            Err(e) => return Err(e.to_string()),
        };
        if !bootstrapped {
            let mut init = self.db.begin(Some(term)).map_err(|e| e.to_string())?;
            if tx
                .get(&Path::root(), SYS_KVS)
                .await
                .map_err(|e| e.to_string())?
                .is_none()
            {
                init.create_kvs(&Path::root(), SYS_KVS, KeyClass::Lexical);
                init.create_kvs(&sys(), SVC_OPS, KeyClass::Lexical);
            }
            self.svc.bootstrap(&mut init).await?;
            init.update(&sys(), BOOTSTRAPPED, b"1".to_vec());
            init.commit().await.map_err(|e| e.to_string())?;
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
            if let rdb::Value::Bytes(b) = v {
                if postcard::from_bytes::<OpRecord>(&b).is_ok_and(|r| r.at_ms < cutoff) {
                    tx.delete(&svc_ops(), k);
                    n += 1;
                }
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

    /// Runs one request; the caller has admitted it.
    pub async fn handle(
        &self,
        adm: &Admitted<'_>,
        client_id: [u8; 16],
        seq: u64,
        payload: &[u8],
    ) -> Result<Result<Vec<u8>, Vec<u8>>, WireError> {
        let term = adm.term;
        let mutating = seq > 0 && self.svc.is_mutating(payload)?;
        let mut tx = self.db.begin(Some(term)).map_err(|e| wire_of(&e))?;
        if mutating {
            if let Some(b) = tx.lookup(&svc_ops(), &client_id).await.map_err(|e| wire_of(&e))? {
                let rec: OpRecord =
                    postcard::from_bytes(&b).map_err(|e| WireError::Invalid(e.to_string()))?;
                if rec.seq == seq {
                    tracing::debug!(class = %self.class, seq, "duplicate request: returning the first result");
                    return Ok(rec.result);
                }
                if rec.seq > seq {
                    return Err(WireError::Stale);
                }
            }
        }
        let mut ctx = Ctx {
            term,
            instance: self.instance.clone(),
            tx,
            client_id,
            db: self.db.clone(),
        };
        let result = self.svc.handle(&mut ctx, payload).await?;
        let mut tx = if result.is_ok() {
            ctx.tx
        } else {
            // A failed request leaves no effect, but its result is still recorded.
            self.db.begin(Some(term)).map_err(|e| wire_of(&e))?
        };
        if mutating {
            let rec = OpRecord {
                seq,
                at_ms: now_ms(),
                result: result.clone(),
            };
            let bytes = postcard::to_allocvec(&rec).map_err(|e| WireError::Invalid(e.to_string()))?;
            // NB: critical, so that the record alone never turns an operator's delete or
            // destroy into an ordinary transaction that low space refuses. It is small (a
            // sequence number and a result), and the rest of the transaction still decides.
            tx.update_critical(&svc_ops(), client_id.to_vec(), bytes);
        }
        tx.commit().await.map_err(|e| wire_of(&e))?;
        Ok(result)
    }
}
