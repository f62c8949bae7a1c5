//! The client: leader search, retries with backoff, deadlines, exactly-once sequencing.

use std::collections::{BTreeSet, HashMap};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use crate::api::ServiceApi;
use crate::error::{ClientError, WireError};
use crate::leader::{Outcome, ReplicaSet};
use crate::wire::{self, pb};

/// Client timing. Every call has a deadline: no call waits forever.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Overall deadline of one `call`, retries included.
    pub deadline: Duration,
    /// Deadline of one attempt against one replica.
    pub rpc_timeout: Duration,
    /// First backoff step; doubles per consecutive failed round, with full jitter.
    pub backoff_base: Duration,
    /// Largest backoff step.
    pub backoff_max: Duration,
    /// While an election is under way (the leader is unreachable, or replicas answer
    /// NotLeader), retry at most this far apart (jittered), however many attempts failed:
    /// such answers cost the servers nothing, and the new leader is found as soon as it
    /// serves. Other failures back off exponentially up to `backoff_max`.
    pub election_poll: Duration,
    /// How long establishing a TCP connection to one engine may take.
    pub connect_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            deadline: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            election_poll: Duration::from_millis(25),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Where the replicas of an instance are: `(rank, address)` pairs.
pub type Replicas = Vec<(u32, String)>;

/// Why a [`Locator`] could not say where an instance lives.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LocateError {
    /// The instance does not exist: retrying will not help.
    #[error("no such instance: {0}")]
    NotFound(String),
    /// The directory could not be asked now.
    #[error("directory unavailable: {0}")]
    Unavailable(String),
    /// The directory refused this client's certificate, or its own did not check out.
    #[error("{0}")]
    Security(String),
}

/// Looks up the replicas of an instance, e.g. by asking the management service.
#[tonic::async_trait]
pub trait Locator: Send + Sync + 'static {
    /// The replicas of `class`/`instance`, answered before `deadline` (the deadline of the
    /// call that needs them: a lookup never outlives its caller).
    async fn locate(&self, class: &str, instance: &str, deadline: Instant) -> Result<Replicas, LocateError>;
}

/// A fixed replica list.
#[derive(Clone, Debug)]
pub struct StaticLocator(pub Replicas);

#[tonic::async_trait]
impl Locator for StaticLocator {
    async fn locate(
        &self,
        _class: &str,
        _instance: &str,
        _deadline: Instant,
    ) -> Result<Replicas, LocateError> {
        Ok(self.0.clone())
    }
}

/// What a plain client adds to a failure that looks like a TLS engine's answer.
const TLS_HINT: &str = " (if the engines use TLS, give this client --tls-ca, --tls-cert and --tls-key)";

/// Connections to engines, shared by every client in a process.
#[derive(Clone)]
pub struct Connections {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    connect_timeout: Duration,
    local_address: Option<std::net::IpAddr>,
    tls: Option<Arc<crate::tls::TlsFiles>>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections::with_connect_timeout(ClientConfig::default().connect_timeout)
    }
}

impl Connections {
    /// A connection pool whose TCP connects give up after `connect_timeout`.
    pub fn with_connect_timeout(connect_timeout: Duration) -> Self {
        Connections {
            channels: Arc::default(),
            connect_timeout,
            local_address: None,
            tls: None,
        }
    }

    /// The same pool, speaking mutual TLS with `tls` (`None`: plain TCP). Engines are checked
    /// against [`crate::tls::ENGINE_NAME`]; see [`crate::tls`].
    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::TlsFiles>>) -> Self {
        self.tls = tls;
        self
    }

    /// Whether connections use TLS.
    pub fn tls(&self) -> Option<&Arc<crate::tls::TlsFiles>> {
        self.tls.as_ref()
    }

    /// The same pool, with connections leaving from `ip` (`None`: wherever the OS routes
    /// them). An engine dials its peers from the address it listens on, so that a peer, or a
    /// firewall between them, sees which engine is calling.
    pub fn with_local_address(mut self, ip: Option<std::net::IpAddr>) -> Self {
        self.local_address = ip;
        self
    }

    /// The (reused) connection to the engine at `addr` (host:port): plain, or mutual TLS
    /// with this pool's files; made lazily, on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut m = self.channels.lock().expect("lock");
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad address {addr}: {e}"))?
            .connect_timeout(self.connect_timeout)
            .local_address(self.local_address)
            .tcp_nodelay(true);
        let c = match &self.tls {
            None => ep.connect_lazy(),
            Some(tls) => ep.connect_with_connector_lazy(crate::tls::connector(
                tls.clone(),
                addr.to_string(),
                self.local_address,
                self.connect_timeout,
            )),
        };
        m.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// A client for the engine at `addr` (host:port), reusing its connection.
    pub fn get(&self, addr: &str) -> Result<pb::rsvc_client::RsvcClient<Channel>, String> {
        Ok(pb::rsvc_client::RsvcClient::new(self.channel(addr)?)
            .max_decoding_message_size(wire::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(wire::MAX_MESSAGE_BYTES))
    }
}

/// A client's exactly-once session: sequence numbers of mutating calls, and which are still
/// outstanding. Many calls may be in flight at once; the engine keeps one result per
/// outstanding seq, and the client's low-water mark ([`Session::acked`]) lets it forget the
/// rest (the client sessions of the Raft dissertation, 6.3).
#[derive(Debug, Default)]
struct Session {
    /// The last seq handed out.
    last: u64,
    /// Seqs whose calls have not ended.
    outstanding: BTreeSet<u64>,
}

impl Session {
    /// Every seq at or below this has ended: this client will not send it again.
    fn acked(&self) -> u64 {
        self.outstanding.first().map_or(self.last, |s| s - 1)
    }
}

/// One outstanding mutating call; ends it when dropped.
struct Outstanding {
    session: Arc<Mutex<Session>>,
    seq: u64,
}

impl Outstanding {
    fn begin(session: &Arc<Mutex<Session>>) -> Self {
        let mut s = session.lock().expect("lock");
        s.last += 1;
        let seq = s.last;
        s.outstanding.insert(seq);
        Outstanding {
            session: session.clone(),
            seq,
        }
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.session.lock().expect("lock").outstanding.remove(&self.seq);
    }
}

/// Counters a client keeps about itself.
#[derive(Debug)]
pub struct ClientStats {
    /// Attempts that failed and were tried again (another replica, or after a backoff) after
    /// the client first reached a leader: real retries, of a failover or a busy leader.
    pub retries: AtomicU64,
    /// Failed attempts before the client first reached a leader (a replica that answered
    /// NotLeader, or none that answered): a new client's leader search, not retries.
    pub searches: AtomicU64,
    /// Replica lists fetched from the locator (the management service).
    pub lookups: AtomicU64,
    /// Calls that succeeded.
    pub calls: AtomicU64,
    /// Latency of every successful call, retries included, in microseconds.
    latency_us: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Default for ClientStats {
    fn default() -> Self {
        ClientStats {
            retries: AtomicU64::new(0),
            searches: AtomicU64::new(0),
            lookups: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            // 1 us to 1 hour at 3 significant digits: a few tens of KiB per client.
            latency_us: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds"),
            ),
        }
    }
}

impl ClientStats {
    /// The latency of successful calls at quantile `q` (0.5 for the median), if any succeeded.
    pub fn latency(&self, q: f64) -> Option<Duration> {
        let h = self.latency_us.lock().expect("lock");
        (!h.is_empty()).then(|| Duration::from_micros(h.value_at_quantile(q)))
    }

    fn record(&self, took: Duration) {
        let us = (took.as_micros() as u64).max(1);
        let _ = self.latency_us.lock().expect("lock").record(us);
    }
}

/// A client of one instance of service `S`. It is `Send + Sync`: share it between tasks with
/// an `Arc`, and they may call at once (see the crate docs on exactly-once).
pub struct RsvcClient<S: ServiceApi> {
    instance: String,
    set: Mutex<ReplicaSet>,
    addrs: Mutex<HashMap<u32, String>>,
    locator: Arc<dyn Locator>,
    conns: Connections,
    client_id: [u8; 16],
    session: Arc<Mutex<Session>>,
    /// Whether any call has reached a leader yet (see [`ClientStats::searches`]).
    found_leader: std::sync::atomic::AtomicBool,
    cfg: ClientConfig,
    /// Retry and call counts.
    pub stats: ClientStats,
    _s: PhantomData<fn() -> S>,
}

struct Attempt {
    rank: u32,
    outcome: Result<Vec<u8>, Failure>,
}

/// Why one attempt failed.
enum Failure {
    /// The replica could not be reached or did not answer in time.
    Transport(String),
    /// The replica answered with an error.
    Wire(WireError),
    /// A certificate did not check out (see [`ClientError::Security`]).
    Security(String),
}

impl<S: ServiceApi> RsvcClient<S> {
    /// A client of `S`'s instance `instance`, finding replicas through `locator`.
    pub fn new(
        instance: impl Into<String>,
        locator: Arc<dyn Locator>,
        conns: Connections,
        cfg: ClientConfig,
    ) -> Self {
        RsvcClient {
            instance: instance.into(),
            set: Mutex::new(ReplicaSet::new([])),
            addrs: Mutex::new(HashMap::new()),
            locator,
            conns,
            client_id: rand::random(),
            session: Arc::default(),
            found_leader: std::sync::atomic::AtomicBool::new(false),
            cfg,
            stats: ClientStats::default(),
            _s: PhantomData,
        }
    }

    /// The instance this client talks to.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The leader this client believes in: `(rank, term)`.
    pub fn cached_leader(&self) -> Option<(u32, u64)> {
        self.set.lock().expect("lock").leader().map(|h| (h.rank, h.term))
    }

    async fn refresh(&self, deadline: Instant) -> Result<(), LocateError> {
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let replicas = self.locator.locate(S::CLASS, &self.instance, deadline).await?;
        tracing::debug!(class = S::CLASS, instance = %self.instance, ?replicas, "refreshed replica list");
        let mut addrs = self.addrs.lock().expect("lock");
        for (r, a) in &replicas {
            addrs.insert(*r, a.clone());
        }
        self.set
            .lock()
            .expect("lock")
            .reset(replicas.into_iter().map(|(r, _)| r));
        Ok(())
    }

    async fn attempt(&self, rank: u32, req: pb::CallRequest, timeout: Duration) -> Attempt {
        let addr = self.addrs.lock().expect("lock").get(&rank).cloned();
        // The replica could not be reached: forget it and say why.
        let unreachable = |msg: String| {
            self.set
                .lock()
                .expect("lock")
                .complete(rank, Outcome::Unreachable);
            Attempt {
                rank,
                outcome: Err(Failure::Transport(msg)),
            }
        };
        let Some(addr) = addr else {
            return unreachable(format!("no address for rank {rank}"));
        };
        let mut client = match self.conns.get(&addr) {
            Ok(c) => c,
            Err(e) => return unreachable(e),
        };
        let mut request = tonic::Request::new(req);
        request.set_timeout(timeout);
        let res = tokio::time::timeout(timeout, client.call(request)).await;
        let reply = match res {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                tracing::debug!(rank, %addr, code = ?status.code(), msg = status.message(), "call failed");
                if let Some(why) = crate::tls::certificate_problem(&status) {
                    return Attempt {
                        rank,
                        outcome: Err(Failure::Security(format!("rank {rank} at {addr}: {why}"))),
                    };
                }
                // NB: a plain client talking to a TLS engine reads its alert as HTTP/2 garbage.
                let hint = if self.conns.tls().is_none()
                    && (status.message().contains("h2 protocol error")
                        || status.message().contains("http2 error"))
                {
                    TLS_HINT
                } else {
                    ""
                };
                return unreachable(format!(
                    "rank {rank} at {addr}: {:?} {}{hint}",
                    status.code(),
                    status.message()
                ));
            }
            Err(_) => return unreachable(format!("rank {rank} at {addr}: timed out after {timeout:?}")),
        };
        let hint = wire::hint_of(reply.hint.as_ref());
        if let Some(h) = &hint {
            if let Some(a) = &h.addr {
                self.addrs
                    .lock()
                    .expect("lock")
                    .entry(h.hint.rank)
                    .or_insert_with(|| a.clone());
            }
        }
        let h = hint.map(|h| h.hint);
        let outcome = match reply.result {
            Some(pb::call_reply::Result::Ok(b)) => {
                self.set
                    .lock()
                    .expect("lock")
                    .complete(rank, Outcome::Answered(h));
                Ok(b)
            }
            Some(pb::call_reply::Result::Error(e)) => {
                let e = WireError::from(&e);
                let o = match &e {
                    WireError::NotLeader => Outcome::NotLeader(h),
                    WireError::NotReplica => Outcome::NotReplica,
                    WireError::Shutdown => Outcome::Unreachable,
                    _ => Outcome::Answered(h),
                };
                self.set.lock().expect("lock").complete(rank, o);
                Err(Failure::Wire(e))
            }
            None => {
                self.set
                    .lock()
                    .expect("lock")
                    .complete(rank, Outcome::Unreachable);
                Err(Failure::Transport(format!("rank {rank}: empty reply")))
            }
        };
        Attempt { rank, outcome }
    }

    /// Sends `req` (already encoded) until a leader answers or `deadline` passes.
    async fn send(
        &self,
        mut req: pb::CallRequest,
        deadline: Instant,
    ) -> Result<Vec<u8>, ClientError<S::Error>> {
        let start = Instant::now();
        let mut attempts = 0u32;
        let mut last = String::from("nothing tried");
        let mut round_failures = 0u32;
        // Whether an attempt looked like a plain client talking to a TLS engine: the final
        // error says so even if its last attempt failed otherwise (a timeout at the deadline).
        let mut plain_vs_tls = false;
        req.class = S::CLASS.to_string();
        req.instance = self.instance.clone();
        req.client_id = self.client_id.to_vec();
        loop {
            let now = Instant::now();
            if now >= deadline {
                if plain_vs_tls && !last.ends_with(TLS_HINT) {
                    last.push_str(TLS_HINT);
                }
                return Err(if attempts == 0 {
                    // Not one replica was tried: the leader search itself ran out of time.
                    ClientError::NoReplicas {
                        what: format!("{}/{}", S::CLASS, self.instance),
                        cause: last,
                    }
                } else {
                    ClientError::Deadline {
                        deadline_ms: deadline.saturating_duration_since(start).as_millis() as u64,
                        attempts,
                        last,
                    }
                });
            }
            let chosen = self.set.lock().expect("lock").choose();
            let rank = match chosen {
                Some(r) => r,
                None => {
                    match self.refresh(deadline).await {
                        Err(LocateError::NotFound(what)) => return Err(ClientError::NotFound(what)),
                        Err(LocateError::Security(why)) => return Err(ClientError::Security(why)),
                        Err(e) => last = format!("replica lookup failed: {e}"),
                        Ok(()) => {}
                    }
                    if self.set.lock().expect("lock").is_empty() {
                        round_failures += 1;
                        self.backoff(round_failures, deadline).await;
                    }
                    continue;
                }
            };
            attempts += 1;
            let timeout = self.cfg.rpc_timeout.min(deadline - now);
            req.acked = self.session.lock().expect("lock").acked();
            // Until this client first reached a leader, failed attempts are its leader search.
            let searching = !self.found_leader.load(Ordering::Relaxed);
            let a = self.attempt(rank, req.clone(), timeout).await;
            match a.outcome {
                Ok(b) => {
                    self.found_leader.store(true, Ordering::Relaxed);
                    self.stats.calls.fetch_add(1, Ordering::Relaxed);
                    self.stats.record(start.elapsed());
                    if attempts > 1 {
                        tracing::info!(class = S::CLASS, instance = %self.instance, rank = a.rank, attempts,
                            elapsed_ms = start.elapsed().as_millis() as u64, "call succeeded after retries");
                    }
                    return Ok(b);
                }
                Err(Failure::Wire(WireError::Service(b))) => {
                    return Err(wire::decode(&b)
                        .map(ClientError::Service)
                        .unwrap_or_else(|e| ClientError::Codec(e.to_string())));
                }
                // A certificate problem stays until an operator changes certificates.
                Err(Failure::Security(why)) => return Err(ClientError::Security(why)),
                // The retry contract is `WireError::is_retryable`'s.
                Err(Failure::Wire(e)) if !e.is_retryable() => {
                    return Err(ClientError::Wire(e));
                }
                Err(f) => {
                    if searching {
                        self.stats.searches.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    let (what, not_leader) = match &f {
                        Failure::Transport(m) | Failure::Security(m) => (m.clone(), false),
                        Failure::Wire(e) => {
                            (format!("rank {}: {e}", a.rank), matches!(e, WireError::NotLeader))
                        }
                    };
                    plain_vs_tls |= what.ends_with(TLS_HINT);
                    tracing::debug!(class = S::CLASS, instance = %self.instance, error = %what, "retrying");
                    last = what;
                    // A hint to a new leader is worth following at once; otherwise back off.
                    let next_is_leader = {
                        let s = self.set.lock().expect("lock");
                        s.leader().is_some_and(|l| l.rank != a.rank)
                    };
                    if !(not_leader && next_is_leader) {
                        round_failures += 1;
                        let electing = not_leader || matches!(f, Failure::Transport(_));
                        self.backoff_capped(round_failures, deadline, electing).await;
                    }
                }
            }
        }
    }

    async fn backoff(&self, failures: u32, deadline: Instant) {
        self.backoff_capped(failures, deadline, false).await
    }

    /// Full-jitter exponential backoff; capped at `election_poll` while `electing`.
    async fn backoff_capped(&self, failures: u32, deadline: Instant, electing: bool) {
        let exp = self
            .cfg
            .backoff_base
            .saturating_mul(1u32 << failures.min(16).saturating_sub(1));
        let max = if electing {
            self.cfg.election_poll.min(self.cfg.backoff_max)
        } else {
            self.cfg.backoff_max
        };
        let cap = exp.min(max);
        let jittered = cap.mul_f64(rand::random::<f64>());
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(jittered.min(remaining)).await;
    }

    /// Finds the current leader: `(rank, term)`.
    pub async fn locate_leader(&self) -> Result<(u32, u64), ClientError<S::Error>> {
        let req = pb::CallRequest {
            probe: true,
            ..Default::default()
        };
        self.send(req, Instant::now() + self.cfg.deadline).await?;
        self.cached_leader()
            .ok_or_else(|| ClientError::Codec("leader answered without a hint".into()))
    }

    /// Calls the service. Mutating requests are numbered so that a retry after a failover
    /// returns the first result instead of applying twice.
    pub async fn call(&self, req: &S::Request) -> Result<S::Response, ClientError<S::Error>> {
        self.call_until(req, Instant::now() + self.cfg.deadline).await
    }

    /// [`call`](Self::call) with its own deadline instead of the client's default: the leader
    /// search, every attempt and every backoff end by `deadline`.
    pub async fn call_until(
        &self,
        req: &S::Request,
        deadline: Instant,
    ) -> Result<S::Response, ClientError<S::Error>> {
        // The guard takes the seq off the outstanding set however the call ends, even if its
        // future is dropped: this client never retries it after that.
        let outstanding = S::is_mutating(req).then(|| Outstanding::begin(&self.session));
        let seq = outstanding.as_ref().map_or(0, |o| o.seq);
        let payload = wire::encode(req).map_err(|e| ClientError::Codec(e.to_string()))?;
        let b = self
            .send(
                pb::CallRequest {
                    seq,
                    payload,
                    ..Default::default()
                },
                deadline,
            )
            .await?;
        drop(outstanding);
        wire::decode(&b).map_err(|e| ClientError::Codec(e.to_string()))
    }
}
