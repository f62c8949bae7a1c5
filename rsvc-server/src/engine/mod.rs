//! The engine: one process hosting many replicas, serving clients, peers and lifecycle calls
//! on one gRPC listener.
//!
//! - this module: configuration, errors, start and shutdown (with the hand-over of every led
//!   instance);
//! - `registry`: the hosted replicas, indexed by name for clients and by database id for
//!   raft messages;
//! - `join`: joining the system through the access points, and the first access point's
//!   bootstrap of the management service;
//! - `replicas`: replica lifecycle: recovery at start, create, dictate, stop, and reopening
//!   replicas that a storage error stopped;
//! - `listener`: every connection must send the HTTP/2 preface in time, and only so many may
//!   be waiting for theirs, so that idle or slowloris connections cannot hold descriptors.
//!
//! The gRPC adapters that call into it are in the crate's `rpc` module.

mod join;
mod listener;
pub(crate) use listener::{caller_of, ConnInfo};
mod registry;
mod replicas;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdb::{Db, DbConfig, DbId, Member, ReplicaId, SharedFsProbe, StartOptions};
use rsvc_client::wire::{self as cwire, pb as cpb};
use tokio::sync::watch;

use crate::host::Host;
use crate::service::ServiceFactory;
use crate::transport::{GrpcTransport, MAX_RAFT_MESSAGE_BYTES};
use crate::wire::pb;

use registry::Registry;

/// The engine's timeouts and bounds, and its management service's, each with its default
/// ([`EngineLimits::default`]). The raft timers are in [`DbConfig`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineLimits {
    /// How long a stopping engine tries to hand over one instance's leadership, and how long a
    /// leadership transfer may take (5 s).
    pub transfer_timeout: Duration,
    /// Pause between attempts to join the system (1 s).
    pub join_retry: Duration,
    /// How often the first access point asks the others whether a system exists, before it
    /// bootstraps the management service (200 ms).
    pub bootstrap_poll: Duration,
    /// How long an access point may take to answer that question (1 s).
    pub bootstrap_identify_timeout: Duration,
    /// How long a new group may take to elect its first leader and commit its first entry (on
    /// a quorum) before its creation counts as failed; also how long a dictated replica may
    /// take to lead (10 s).
    pub bootstrap_timeout: Duration,
    /// How often the engine looks for replicas that a storage error stopped (1 s).
    pub revive_period: Duration,
    /// A reopened replica counts as running again once it stayed up this long (3 s).
    pub revived_after: Duration,
    /// Requests served at once per client connection (256).
    pub requests_per_connection: usize,
    /// How long a new connection may take to send the HTTP/2 preface before it is closed,
    /// so that idle or slowloris connections cannot hold file descriptors (10 s).
    pub preface_timeout: Duration,
    /// Connections that may wait for their preface at once; one more is closed at once (512).
    pub max_pending_connections: usize,
    /// With TLS: failed handshakes allowed from one source address per window (20 per 1 s);
    /// beyond them its new connections are closed on arrival until the window passes, so
    /// that a flood of handshakes cannot take the engine's CPU.
    pub handshake_failures: (u32, Duration),
    /// Management leader: how long a joining engine may take to answer `Identify` (2 s).
    pub join_identify_timeout: Duration,
    /// Management leader: pause between rounds of asking an instance's replicas which one
    /// leads, for a membership change or a transfer (100 ms).
    pub change_retry: Duration,
    /// Management leader: how long a listed replica must be missing from its answering engine
    /// before it is re-created; a moment's absence could be an add or a remove in progress
    /// (2 s).
    pub lost_after: Duration,
    /// Management leader: it probes every engine once per maximum election timeout, within
    /// these bounds (200 ms, 1 s), so that a dead engine shows `Down` about as soon as its
    /// groups have replaced it.
    pub probe_bounds: (Duration, Duration),
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            transfer_timeout: Duration::from_secs(5),
            join_retry: Duration::from_secs(1),
            bootstrap_poll: Duration::from_millis(200),
            bootstrap_identify_timeout: Duration::from_secs(1),
            bootstrap_timeout: Duration::from_secs(10),
            revive_period: Duration::from_secs(1),
            revived_after: Duration::from_secs(3),
            requests_per_connection: 256,
            preface_timeout: Duration::from_secs(10),
            max_pending_connections: 512,
            handshake_failures: (20, Duration::from_secs(1)),
            join_identify_timeout: Duration::from_secs(2),
            change_retry: Duration::from_millis(100),
            lost_after: Duration::from_secs(2),
            probe_bounds: (Duration::from_millis(200), Duration::from_secs(1)),
        }
    }
}

/// What an engine needs to run.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This engine's rank: unique in the system, stable across restarts.
    pub rank: u32,
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The address peers and clients use to reach this engine (default: the bound address).
    pub advertise: Option<String>,
    /// One subdirectory per replica: `<data_dir>/<class>/<instance>/`.
    pub data_dir: PathBuf,
    /// System name; messages from another system are refused.
    pub cluster: String,
    /// rdb tunables for every hosted replica.
    pub db: DbConfig,
    /// The access points: engines hosting the management service, as `(rank, address)`. An
    /// empty address stands for this engine's own. An engine whose rank is listed is an access
    /// point; the lowest-ranked one bootstraps the management service on first start. Every
    /// engine joins the system through them. Empty: no management service (standalone).
    pub access_points: Vec<(u32, String)>,
    /// On the management leader: move the replicas of an engine that has been down this long
    /// to a spare engine. `None` leaves that to the operator.
    pub reconf_after: Option<std::time::Duration>,
    /// Timeouts and bounds.
    pub limits: EngineLimits,
    /// Mutual TLS on the listener and towards peers: every connection must present a
    /// certificate from the cluster CA (see [`rsvc_client::tls`]). `None`: plain TCP, where
    /// nobody is authenticated and every caller may do everything.
    pub tls: Option<Arc<rsvc_client::tls::TlsFiles>>,
    /// Members of this group (a client certificate's subject O) may administer the system:
    /// create and destroy pools, change replicas, evict, dictate (`admin`).
    pub admin_group: String,
    /// Allows listening on a non-loopback address without TLS; without it, [`Engine::start`]
    /// refuses to (anyone who reached the port could do anything).
    pub insecure: bool,
}

impl Default for EngineConfig {
    /// A standalone engine of rank 1 on a free loopback port, with its data in `rsvc-data`
    /// under the working directory, the default raft timers and limits, and automatic
    /// reconfiguration after 30 s (as the config file's defaults).
    fn default() -> Self {
        EngineConfig {
            rank: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            data_dir: PathBuf::from("rsvc-data"),
            cluster: "rsvc".into(),
            db: DbConfig::default(),
            access_points: Vec::new(),
            reconf_after: Some(Duration::from_secs(30)),
            limits: EngineLimits::default(),
            tls: None,
            admin_group: "admin".into(),
            insecure: false,
        }
    }
}

impl EngineConfig {
    /// An engine for tests: rank `rank` of cluster `test`, on a free loopback port, with its
    /// data in `data_dir`, fast raft timers (`DbConfig::fast`) and no automatic
    /// reconfiguration.
    pub fn for_tests(rank: u32, data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            rank,
            data_dir: data_dir.into(),
            cluster: "test".into(),
            db: DbConfig::fast(),
            reconf_after: None,
            ..EngineConfig::default()
        }
    }
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// I/O while binding or scanning the data directory.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// rdb refused.
    #[error("rdb: {0}")]
    Rdb(#[from] rdb::Error),
    /// Unknown service class.
    #[error("no service class {0:?} is registered on this engine")]
    UnknownClass(String),
    /// Bad argument.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The replica is not in a state where this can be done (a dictate of a leader, of a
    /// replica of another generation).
    #[error("{0}")]
    Precondition(String),
    /// The data directory is locked by another engine process.
    #[error("data directory {dir} is in use by another engine (pid {pid}); two engines cannot share one")]
    DataDirInUse {
        /// The directory.
        dir: PathBuf,
        /// The pid written by the engine holding the lock, as found in the lock file.
        pid: String,
    },
    /// A replica found in the data directory could not be opened.
    #[error("cannot open the replica {class}/{instance} in {dir}: {cause}")]
    Recover {
        /// Its service class.
        class: String,
        /// Its instance.
        instance: String,
        /// Its directory.
        dir: PathBuf,
        /// Why.
        cause: String,
    },
}

/// Where an engine stands with the system it joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinState {
    /// Still trying; the last reason it did not work yet, if any.
    Joining(Option<String>),
    /// In the system map, reachable by the management leader at its address.
    Joined,
    /// Refused for good (another cluster, or the rank is alive elsewhere).
    Refused(String),
}

pub(crate) struct Inner {
    pub(crate) rank: u32,
    pub(crate) addr: String,
    pub(crate) cluster: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) db_config: DbConfig,
    /// One free-space probe for every replica here: each one's margin also covers the upkeep
    /// of the others on the same data directory (see `rdb::admission`).
    pub(crate) probe: Arc<SharedFsProbe>,
    pub(crate) transport: Arc<GrpcTransport>,
    pub(crate) limits: EngineLimits,
    pub(crate) tls: Option<Arc<rsvc_client::tls::TlsFiles>>,
    pub(crate) admin_group: String,
    /// Connections whose TLS handshake failed (no certificate, another CA, expired, timed out).
    pub(crate) handshakes_refused: Arc<std::sync::atomic::AtomicU64>,
    /// Peer calls refused because the connection's certificate is not an engine's.
    pub(crate) peer_calls_refused: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) factories: HashMap<String, Arc<dyn ServiceFactory>>,
    pub(crate) hosts: RwLock<Registry>,
    pub(crate) stopping: AtomicBool,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Random per process: tells this engine from an earlier or later one of the same rank.
    pub(crate) incarnation: u64,
    /// Whether this engine is in the system yet; `Joined` from the start without access points.
    pub(crate) joined: watch::Sender<JoinState>,
    /// The data directory's lock, held until the engine has stopped (see [`lock_data_dir`]).
    pub(crate) lock: std::sync::Mutex<Option<std::fs::File>>,
}

/// Takes an exclusive `flock` on `<dir>/engine.lock` and writes this process's pid into it, so
/// that a second engine on the same directory fails at once instead of fighting over its files.
fn lock_data_dir(dir: &FsPath) -> Result<std::fs::File, EngineError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("engine.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        return Err(EngineError::DataDirInUse {
            dir: dir.to_path_buf(),
            pid: pid.trim().to_string(),
        });
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// A running engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Engine {
    /// Binds, recovers every replica found under the data directory, and starts serving.
    pub async fn start(
        cfg: EngineConfig,
        factories: Vec<Arc<dyn ServiceFactory>>,
    ) -> Result<Engine, EngineError> {
        if cfg.tls.is_none() && !cfg.listen.ip().is_loopback() && !cfg.insecure {
            return Err(EngineError::Invalid(format!(
                "refusing to listen on {} without TLS: anyone who reaches the port could do \
                 anything. Give a CA, certificate and key (--tls-ca, --tls-cert, --tls-key; \
                 `pool-svc certs` makes a set), or --insecure to run without authentication",
                cfg.listen
            )));
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let bound = listener.local_addr()?;
        let addr = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
        std::fs::create_dir_all(&cfg.data_dir)?;
        let lock = lock_data_dir(&cfg.data_dir)?;
        let (shutdown, _) = watch::channel(false);
        let source = Some(bound.ip()).filter(|ip| !ip.is_unspecified());
        let transport = Arc::new(GrpcTransport::new(cfg.cluster.clone(), source).with_tls(cfg.tls.clone()));
        let access_points: Vec<(u32, String)> = cfg
            .access_points
            .iter()
            .map(|(r, a)| (*r, if a.is_empty() { addr.clone() } else { a.clone() }))
            .collect();
        let is_ap = access_points.iter().any(|(r, _)| *r == cfg.rank);
        let mut factories = factories;
        if is_ap {
            let mgmt = crate::mgmt::Mgmt::new(
                transport.clone(),
                cfg.cluster.clone(),
                (cfg.rank, addr.clone()),
                cfg.reconf_after,
                cfg.db.election_timeout.1,
                cfg.limits.clone(),
            );
            factories.push(Arc::new(crate::service::OnceFactory::new(mgmt)));
        }
        let inner = Arc::new(Inner {
            rank: cfg.rank,
            addr,
            cluster: cfg.cluster.clone(),
            data_dir: cfg.data_dir.clone(),
            db_config: cfg.db.clone(),
            probe: Arc::new(SharedFsProbe::new(cfg.data_dir.clone(), cfg.db.free_space_cache)),
            transport,
            limits: cfg.limits.clone(),
            tls: cfg.tls.clone(),
            admin_group: cfg.admin_group.clone(),
            handshakes_refused: Arc::default(),
            peer_calls_refused: Arc::default(),
            factories: factories
                .into_iter()
                .map(|f| (f.class().to_string(), f))
                .collect(),
            hosts: RwLock::new(Registry::default()),
            stopping: AtomicBool::new(false),
            shutdown,
            incarnation: rand::random(),
            joined: watch::channel(if access_points.is_empty() {
                JoinState::Joined
            } else {
                JoinState::Joining(None)
            })
            .0,
            lock: std::sync::Mutex::new(Some(lock)),
        });
        let engine = Engine { inner };
        engine.recover().await?;

        let rsvc = cpb::rsvc_server::RsvcServer::new(crate::rpc::client::RsvcSvc(engine.clone()))
            .max_decoding_message_size(cwire::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(cwire::MAX_MESSAGE_BYTES);
        let peer = tonic::service::interceptor::InterceptedService::new(
            pb::peer_server::PeerServer::new(crate::rpc::peer::PeerSvc(engine.clone()))
                .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES),
            {
                let refused = engine.inner.peer_calls_refused.clone();
                move |req| crate::rpc::peer::only_engines(req, &refused)
            },
        );
        // The standard gRPC health service: "" is SERVING while the engine runs.
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let mut stop = engine.inner.shutdown.subscribe();
        let incoming = {
            use futures::StreamExt;
            let pending = listener::Pending::default();
            let limits = engine.inner.limits.clone();
            let (tls, admin_group) = (engine.inner.tls.clone(), engine.inner.admin_group.clone());
            let refused = engine.inner.handshakes_refused.clone();
            let failures = Arc::new(listener::HandshakeFailures::new(
                limits.handshake_failures.0,
                limits.handshake_failures.1,
            ));
            let handshake_timeout = limits.preface_timeout;
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .filter_map(move |r| {
                    let admitted = match r {
                        Ok(s) => {
                            let g = pending.admit(s, limits.max_pending_connections, limits.preface_timeout);
                            if g.is_none() {
                                tracing::debug!(
                                    pending = pending.count(),
                                    "too many connections without a preface; closed one"
                                );
                            }
                            g.map(Ok)
                        }
                        Err(e) => Some(Err(e)),
                    };
                    std::future::ready(admitted)
                })
                // TLS handshakes run side by side, at most as many as may wait for a preface.
                .map(move |r| {
                    let (tls, admin_group, refused, failures) = (
                        tls.clone(),
                        admin_group.clone(),
                        refused.clone(),
                        failures.clone(),
                    );
                    async move {
                        let g = match r {
                            Ok(g) => g,
                            Err(e) => return Some(Err(e)),
                        };
                        let Some(tls) = tls else {
                            return Some(Ok(listener::Conn::plain(g)));
                        };
                        let ip = listener::Conn::remote(&g).map(|a| a.ip());
                        if ip.is_some_and(|ip| failures.blocked(ip, std::time::Instant::now())) {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(
                                ?ip,
                                "closed a connection from an address whose handshakes keep failing"
                            );
                            return None;
                        }
                        match listener::Conn::tls(g, tls.server_config(), handshake_timeout, &admin_group)
                            .await
                        {
                            Ok(c) => Some(Ok(c)),
                            Err(r) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                if let (Some(ip), true) = (ip, r.costly) {
                                    failures.failed(ip, std::time::Instant::now());
                                }
                                tracing::warn!(cause = %r.why, "refused a connection");
                                None
                            }
                        }
                    }
                })
                .buffer_unordered(engine.inner.limits.max_pending_connections.max(1))
                .filter_map(std::future::ready)
        };
        let per_connection = engine.inner.limits.requests_per_connection;
        tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .concurrency_limit_per_connection(per_connection)
                .add_service(health_svc)
                .add_service(rsvc)
                .add_service(peer)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(cause = %e, "gRPC server failed");
            }
        });
        tracing::info!(rank = engine.inner.rank, addr = %engine.inner.addr, "engine serving");
        if !access_points.is_empty() {
            let e = engine.clone();
            tokio::spawn(async move { e.join_system(access_points, is_ap).await });
        }
        {
            let e = engine.clone();
            tokio::spawn(async move { e.revive_stopped().await });
        }
        Ok(engine)
    }

    /// Waits until this engine is in the system (at once without access points), or was
    /// refused for good. "Ready" means this: data open, serving, and reachable by the
    /// management leader at the advertised address.
    pub async fn wait_joined(&self) -> Result<(), String> {
        let mut rx = self.inner.joined.subscribe();
        let state = rx
            .wait_for(|s| !matches!(s, JoinState::Joining(_)))
            .await
            .map_err(|_| "engine stopped".to_string())?
            .clone();
        match state {
            JoinState::Refused(why) => Err(why),
            _ => Ok(()),
        }
    }

    /// Where this engine stands with its system.
    pub fn join_state(&self) -> JoinState {
        self.inner.joined.borrow().clone()
    }

    /// Random per engine process.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// The system name.
    pub fn cluster(&self) -> &str {
        &self.inner.cluster
    }

    /// This engine's rank.
    pub fn rank(&self) -> u32 {
        self.inner.rank
    }

    /// The address peers and clients reach this engine at.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Connections refused at the TLS handshake, and peer calls refused because the caller's
    /// certificate is not an engine's, since start.
    pub fn security_refusals(&self) -> (u64, u64) {
        (
            self.inner.handshakes_refused.load(Ordering::Relaxed),
            self.inner.peer_calls_refused.load(Ordering::Relaxed),
        )
    }

    /// Stops the engine: every led instance is handed to a caught-up peer (or, failing that,
    /// resigned), every replica stops, then the listener closes.
    pub async fn shutdown(&self) {
        // NB: hosts stay registered, and led instances keep serving, during the handover: the
        // new leader must still reach this replica to tell it that leadership moved, and a
        // young leader serves on while it waits to be old enough to hand over (see
        // `rdb::Db::transfer_leadership`). Only then does the engine refuse new calls.
        let hosts: Vec<Arc<Host>> = self.hosts();
        // Hand every led instance to a caught-up peer first, so that clients see a leader
        // change within a round trip rather than an election timeout.
        let handovers = hosts.iter().filter(|h| h.db.up_term().is_some()).map(|h| async move {
            let t = std::time::Instant::now();
            let res = match h.db.transfer_target() {
                Some(to) => h.db.transfer_leadership(to, self.inner.limits.transfer_timeout).await,
                None => Err(rdb::Error::NotFound("no other voter".into())),
            };
            match res {
                Ok(()) => tracing::info!(class = %h.class, instance = %h.instance, elapsed_ms = t.elapsed().as_millis() as u64, "handed over leadership"),
                Err(e) => {
                    tracing::warn!(class = %h.class, instance = %h.instance, cause = %e, "handover failed; resigning");
                    let _ = h.db.resign().await;
                }
            }
        });
        futures::future::join_all(handovers).await;
        self.inner.stopping.store(true, Ordering::SeqCst);
        let hosts: Vec<Arc<Host>> = self.inner.hosts.write().expect("lock").drain();
        for h in hosts {
            if let Err(e) = h.db.stop().await {
                tracing::warn!(class = %h.class, instance = %h.instance, cause = %e, "stop failed");
            }
        }
        let _ = self.inner.shutdown.send(true);
        // Every replica is closed: another engine may have the directory now.
        self.inner.lock.lock().expect("lock").take();
        tracing::info!(rank = self.inner.rank, "engine stopped");
    }
}
