//! The engine: one process hosting many replicas, serving clients, peers and lifecycle calls
//! on one gRPC listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdb::{Db, DbConfig, DbId, Member, ReplicaId, SharedFsProbe, StartOptions};
use rsvc_client::wire::{self as cwire, pb as cpb};
use rsvc_client::WireError;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::host::{Host, State};
use crate::service::ServiceFactory;
use crate::transport::{GrpcTransport, MAX_RAFT_MESSAGE_BYTES};
use crate::wire::{self, pb};

/// How often the engine looks for replicas that a storage error stopped.
const REVIVE_PERIOD: Duration = Duration::from_secs(1);
/// A reopened replica counts as running again once it stayed up this long.
const REVIVED_AFTER: Duration = Duration::from_secs(3);

/// How long a stopping engine tries to hand over one instance's leadership.
const TRANSFER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Pause between attempts to join the system.
const JOIN_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How often the first access point asks the others whether a system exists, before it
/// bootstraps the management service.
const BOOTSTRAP_POLL: Duration = Duration::from_millis(200);

/// How long a new group may take to elect its first leader and commit its first entry (on a
/// quorum) before its creation counts as failed.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an access point may take to answer `Identify` before bootstrapping.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(1);

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

/// The hosted replicas, indexed both ways: by class and instance for the client path, and by
/// database id for raft messages, so that routing one costs O(1) however many instances the
/// engine hosts.
#[derive(Default)]
struct Registry {
    by_name: HashMap<(String, String), Arc<Host>>,
    by_db: HashMap<rdb::DbId, Arc<Host>>,
}

impl Registry {
    fn insert(&mut self, host: Arc<Host>) {
        let key = (host.class.clone(), host.instance.clone());
        if let Some(old) = self.by_name.insert(key, host.clone()) {
            self.by_db.remove(&old.db.ident().db);
        }
        self.by_db.insert(host.db.ident().db, host);
    }

    fn remove(&mut self, class: &str, instance: &str) -> Option<Arc<Host>> {
        let host = self.by_name.remove(&(class.to_string(), instance.to_string()))?;
        self.by_db.remove(&host.db.ident().db);
        Some(host)
    }

    fn drain(&mut self) -> Vec<Arc<Host>> {
        self.by_db.clear();
        self.by_name.drain().map(|(_, h)| h).collect()
    }
}

struct Inner {
    rank: u32,
    addr: String,
    cluster: String,
    data_dir: PathBuf,
    db_config: DbConfig,
    /// One free-space probe for every replica here: each one's margin also covers the upkeep
    /// of the others on the same data directory (see `rdb::admission`).
    probe: Arc<SharedFsProbe>,
    transport: Arc<GrpcTransport>,
    factories: HashMap<String, Arc<dyn ServiceFactory>>,
    hosts: RwLock<Registry>,
    stopping: AtomicBool,
    shutdown: watch::Sender<bool>,
    /// Random per process: tells this engine from an earlier or later one of the same rank.
    incarnation: u64,
    /// Whether this engine is in the system yet; `Joined` from the start without access points.
    joined: watch::Sender<JoinState>,
    /// The data directory's lock, held until the engine has stopped (see [`lock_data_dir`]).
    lock: std::sync::Mutex<Option<std::fs::File>>,
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
    inner: Arc<Inner>,
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
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let bound = listener.local_addr()?;
        let addr = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
        std::fs::create_dir_all(&cfg.data_dir)?;
        let lock = lock_data_dir(&cfg.data_dir)?;
        let (shutdown, _) = watch::channel(false);
        let source = Some(bound.ip()).filter(|ip| !ip.is_unspecified());
        let transport = Arc::new(GrpcTransport::new(cfg.cluster.clone(), source));
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

        let rsvc = cpb::rsvc_server::RsvcServer::new(RsvcSvc(engine.clone()))
            .max_decoding_message_size(cwire::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(cwire::MAX_MESSAGE_BYTES);
        let peer = pb::peer_server::PeerServer::new(PeerSvc(engine.clone()))
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        // The standard gRPC health service: "" is SERVING while the engine runs.
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let mut stop = engine.inner.shutdown.subscribe();
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .concurrency_limit_per_connection(256)
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

    /// Bootstraps the management service if this is the first access point, then joins the
    /// system through the access points, retrying until it succeeds or the engine stops.
    async fn join_system(&self, access_points: Vec<(u32, String)>, is_ap: bool) {
        use rsvc_client::mgmt::{mgmt_client, MgmtRequest, MGMT_CLASS, MGMT_INSTANCE};
        let first_ap = access_points.iter().map(|(r, _)| *r).min();
        if is_ap
            && first_ap == Some(self.inner.rank)
            && self.host(MGMT_CLASS, MGMT_INSTANCE).is_none()
            && self.no_system_yet(&access_points).await
        {
            let db = DbId::random();
            let res = async {
                let me = self
                    .start_replica(MGMT_CLASS, MGMT_INSTANCE, db, 1, vec![])
                    .await?;
                self.start_replica(MGMT_CLASS, MGMT_INSTANCE, db, 1, vec![me])
                    .await
            }
            .await;
            match res {
                Ok(_) => tracing::info!(rank = self.inner.rank, "bootstrapped the management service"),
                Err(e) => tracing::error!(cause = %e, "could not bootstrap the management service"),
            }
        }
        let cfg = rsvc_client::ClientConfig {
            deadline: std::time::Duration::from_secs(5),
            ..Default::default()
        };
        let client = mgmt_client(access_points, self.inner.transport.clients(), cfg);
        let req = MgmtRequest::Join {
            rank: self.inner.rank,
            addr: self.inner.addr.clone(),
            access_point: is_ap,
            cluster: self.inner.cluster.clone(),
            incarnation: self.inner.incarnation,
        };
        let mut stop = self.inner.shutdown.subscribe();
        let mut last_cause = None;
        loop {
            match client.call(&req).await {
                Ok(_) => {
                    tracing::info!(rank = self.inner.rank, "joined the system");
                    self.inner.joined.send_replace(JoinState::Joined);
                    return;
                }
                Err(rsvc_client::ClientError::Service(rsvc_client::mgmt::MgmtError::JoinRefused(why))) => {
                    tracing::error!(rank = self.inner.rank, cause = %why, "the system refused this engine");
                    self.inner.joined.send_replace(JoinState::Refused(why));
                    return;
                }
                Err(e) => {
                    let cause = e.to_string();
                    // Once per distinct cause: a system still forming is not worth a line a second.
                    if last_cause.as_ref() != Some(&cause) {
                        tracing::info!(rank = self.inner.rank, cause = %cause, "not joined yet; retrying");
                        last_cause = Some(cause.clone());
                    }
                    self.inner.joined.send_replace(JoinState::Joining(Some(cause)));
                }
            }
            if *stop.borrow() || tokio::time::timeout(JOIN_RETRY, stop.changed()).await.is_ok() {
                return;
            }
        }
    }

    /// Whether the first access point, which hosts no management replica, may bootstrap the
    /// management service: only once a majority of the access points (itself included) has
    /// answered and none of them hosts a management replica. Waits while fewer answer; `false`
    /// if a system exists already or the engine stops.
    ///
    /// NB: without this, a first access point that lost its data directory would bootstrap a
    /// second, empty management service beside the real one, and clients that asked it would
    /// see a system with no engines and no instances. The management service lives on the
    /// access points, so a majority of them that knows of none means none has quorum. The
    /// caveat: if the ones that do host it are all among the silent minority and the answering
    /// ones lost their disks too, a second system forms; losing that many disks loses the
    /// system anyway.
    async fn no_system_yet(&self, access_points: &[(u32, String)]) -> bool {
        use rsvc_client::mgmt::MGMT_CLASS;
        let others: Vec<&(u32, String)> = access_points
            .iter()
            .filter(|(r, a)| *r != self.inner.rank && !a.is_empty())
            .collect();
        let mut stop = self.inner.shutdown.subscribe();
        let mut waiting_for: Vec<u32> = Vec::new();
        loop {
            let asks = others.iter().map(|(rank, addr)| async move {
                let answer = match self.inner.transport.peer(addr) {
                    Ok(mut p) => tokio::time::timeout(IDENTIFY_TIMEOUT, p.identify(pb::IdentifyRequest {}))
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .map(|r| r.into_inner()),
                    Err(_) => None,
                };
                (*rank, answer)
            });
            let answers = futures::future::join_all(asks).await;
            if let Some((rank, _)) = answers.iter().find(|(_, a)| {
                a.as_ref().is_some_and(|a| {
                    a.cluster == self.inner.cluster && a.hosted.iter().any(|h| h.class == MGMT_CLASS)
                })
            }) {
                tracing::info!(
                    rank = self.inner.rank,
                    holder = rank,
                    "the management service exists already; joining it instead of bootstrapping one"
                );
                return false;
            }
            let silent: Vec<u32> = answers
                .iter()
                .filter(|(_, a)| a.is_none())
                .map(|(r, _)| *r)
                .collect();
            // This engine counts as one of the access points that answered.
            let answered = 1 + others.len() - silent.len();
            if answered * 2 > others.len() + 1 {
                return true;
            }
            if silent != waiting_for {
                tracing::info!(
                    rank = self.inner.rank,
                    ?silent,
                    "waiting for a majority of the access points to answer before bootstrapping the management service"
                );
                waiting_for = silent;
            }
            if *stop.borrow() || tokio::time::timeout(BOOTSTRAP_POLL, stop.changed()).await.is_ok() {
                return false;
            }
        }
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

    fn replica_dir(&self, class: &str, instance: &str) -> PathBuf {
        self.inner.data_dir.join(class).join(instance)
    }

    fn options(&self) -> StartOptions {
        let mut o = StartOptions::new(self.inner.transport.clone(), self.inner.addr.clone());
        o.config = self.inner.db_config.clone();
        o.probe = self.inner.probe.clone();
        o
    }

    async fn recover(&self) -> Result<(), EngineError> {
        for class_entry in std::fs::read_dir(&self.inner.data_dir)? {
            let class_dir = class_entry?.path();
            let Some(class) = class_dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            if !class_dir.is_dir() {
                continue;
            }
            for inst_entry in std::fs::read_dir(&class_dir)? {
                let dir = inst_entry?.path();
                let Some(instance) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                    continue;
                };
                // NB: a replica that cannot be opened stops the engine from starting. Serving
                // without it would report the engine healthy while one of its replicas is
                // missing from its group.
                match self.open_replica(&class, &instance, &dir).await {
                    Ok(_) => tracing::info!(%class, %instance, "recovered replica"),
                    Err(e) => {
                        return Err(EngineError::Recover {
                            class,
                            instance,
                            dir,
                            cause: e.to_string(),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    async fn open_replica(&self, class: &str, instance: &str, dir: &FsPath) -> Result<Db, EngineError> {
        let factory = self
            .inner
            .factories
            .get(class)
            .ok_or_else(|| EngineError::UnknownClass(class.into()))?;
        let db = Db::start(dir, self.options()).await?;
        let host = Host::start(class, instance, db.clone(), factory.create(instance));
        self.inner.hosts.write().expect("lock").insert(host);
        Ok(db)
    }

    /// Reopens replicas whose raft core a storage error stopped (a full disk, most often),
    /// once a second until each runs again: a restart of the engine is never needed. Says so
    /// once per replica and outage, not per attempt.
    ///
    /// NB: openraft stops a replica on its first storage error, and redb may need a reopen
    /// after a failed commit; reopening from the files is what a restart would do. Nothing
    /// acknowledged is lost: an entry counts only once it is durable on a quorum. While the
    /// replica is down its group runs on the others; the reopened replica catches up from
    /// the leader.
    async fn revive_stopped(&self) {
        /// One replica's outage: when it began, and when the last reopen succeeded.
        struct Outage {
            since: std::time::Instant,
            reopened: Option<std::time::Instant>,
        }
        let mut stop = self.inner.shutdown.subscribe();
        let mut tick = tokio::time::interval(REVIVE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down: HashMap<(String, String), Outage> = HashMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if self.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            for h in self.hosts() {
                let key = (h.class.clone(), h.instance.clone());
                let Some(why) = h.db.status().stopped else {
                    // Up again; it counts once it stayed up (a full disk may stop it again
                    // at once, and that is still the same outage).
                    if let Some(o) = down.get(&key) {
                        if o.reopened.is_some_and(|t| t.elapsed() >= REVIVED_AFTER) {
                            tracing::info!(class = %h.class, instance = %h.instance,
                                down_ms = o.since.elapsed().as_millis() as u64,
                                "replica runs again after a storage error");
                            down.remove(&key);
                        }
                    }
                    continue;
                };
                down.entry(key.clone()).or_insert_with(|| {
                    tracing::warn!(class = %h.class, instance = %h.instance, cause = %why,
                        "replica stopped by a storage error; reopening it until it runs");
                    Outage {
                        since: std::time::Instant::now(),
                        reopened: None,
                    }
                });
                if let Err(e) = h.db.stop().await {
                    tracing::debug!(class = %h.class, instance = %h.instance, cause = %e, "stopping the failed replica");
                }
                // Only if nobody replaced or removed it meanwhile.
                if !self
                    .host(&h.class, &h.instance)
                    .is_some_and(|c| Arc::ptr_eq(&c, &h))
                {
                    down.remove(&key);
                    continue;
                }
                match self.open_replica(&h.class, &h.instance, h.db.dir()).await {
                    Ok(_) => {
                        if let Some(o) = down.get_mut(&key) {
                            o.reopened = Some(std::time::Instant::now());
                        }
                        tracing::debug!(class = %h.class, instance = %h.instance, "reopened after a storage error");
                    }
                    Err(e) => {
                        tracing::debug!(class = %h.class, instance = %h.instance, cause = %e, "reopen failed; trying again");
                    }
                }
            }
        }
    }

    /// The hosted replica of `class`/`instance`, if any.
    pub fn host(&self, class: &str, instance: &str) -> Option<Arc<Host>> {
        self.inner
            .hosts
            .read()
            .expect("lock")
            .by_name
            .get(&(class.to_string(), instance.to_string()))
            .cloned()
    }

    /// Every hosted replica.
    pub fn hosts(&self) -> Vec<Arc<Host>> {
        self.inner
            .hosts
            .read()
            .expect("lock")
            .by_name
            .values()
            .cloned()
            .collect()
    }

    /// Creates and starts a replica here (DAOS `dist_start`). With a non-empty `bootstrap`
    /// list, this replica also bootstraps the group (every other member must exist already).
    /// Idempotent for the same database id.
    pub async fn start_replica(
        &self,
        class: &str,
        instance: &str,
        db: DbId,
        gen: u32,
        bootstrap: Vec<Member>,
    ) -> Result<Member, EngineError> {
        if !valid_name(class) || !valid_name(instance) {
            return Err(EngineError::Invalid(format!(
                "bad class or instance name {class:?}/{instance:?}"
            )));
        }
        if !self.inner.factories.contains_key(class) {
            return Err(EngineError::UnknownClass(class.into()));
        }
        let dir = self.replica_dir(class, instance);
        // NB: the generation the caller asks for is the management directory's, and it is
        // authoritative. A replica of an older generation of the same group is an orphan (of a
        // repair or a move that failed half-way): replace it, or the directory would list an
        // identity this engine does not host, and take it for lost forever.
        if let Some(h) = self.host(class, instance) {
            let have = h.db.ident();
            if have.db == db && have.replica.gen < gen {
                tracing::info!(%class, %instance, old_gen = have.replica.gen, gen, "replacing an orphaned replica of an older generation");
                self.stop_replica(class, instance, true).await?;
            }
        }
        let member = match self.host(class, instance) {
            Some(h) if h.db.ident().db == db && h.db.ident().replica.gen == gen => h.db.member(),
            Some(h) if h.db.ident().db == db => {
                return Err(EngineError::Rdb(rdb::Error::Exists(format!(
                    "{class}/{instance} lives here at generation {}, newer than {gen}",
                    h.db.ident().replica.gen
                ))))
            }
            Some(_) => {
                return Err(EngineError::Rdb(rdb::Error::Exists(format!(
                    "another {class}/{instance} lives here"
                ))))
            }
            None => {
                Db::create(&dir, db, ReplicaId::new(self.inner.rank, gen), None)?;
                self.open_replica(class, instance, &dir).await?.member()
            }
        };
        if !bootstrap.is_empty() {
            let host = self.host(class, instance).expect("just started");
            match host.db.initialize(bootstrap).await {
                Ok(()) | Err(rdb::Error::Exists(_)) => {}
                Err(e) => return Err(e.into()),
            }
            // NB: until a leader's first entry commits, the membership lives in this replica's
            // log alone; the others are empty and cannot even campaign. Answering now would let
            // the management service record (and acknowledge) an instance that the loss of this
            // one engine destroys for good (found by the fault suite's wipe nemesis). A replica
            // that applied an entry of a leader knows the group is on a quorum.
            let formed = || {
                let s = host.db.status();
                s.up_term.is_some() || (s.leader.is_some() && s.applied_index.is_some_and(|i| i >= 1))
            };
            let deadline = tokio::time::Instant::now() + BOOTSTRAP_TIMEOUT;
            while !formed() {
                if tokio::time::Instant::now() >= deadline {
                    return Err(EngineError::Rdb(rdb::Error::Timeout(
                        "the new group elected no leader that committed its first entry".into(),
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(member)
    }

    /// Catastrophic recovery (DAOS's `DICTATE` start mode): makes the replica of
    /// `class/instance` here, of database `db` and generation `gen`, the only voter of its
    /// group, and waits until it leads. Answers its member and the term it leads in.
    ///
    /// DANGEROUS: entries that other replicas committed and this one never received are lost.
    /// The caller (the management service) checks that the group's quorum is gone, and takes
    /// the other replicas out of its directory.
    pub async fn dictate_replica(
        &self,
        class: &str,
        instance: &str,
        db: DbId,
        gen: u32,
    ) -> Result<(Member, u64), EngineError> {
        let host = self.host(class, instance).ok_or_else(|| {
            EngineError::Rdb(rdb::Error::NotFound(format!(
                "no replica of {class}/{instance} here"
            )))
        })?;
        let have = host.db.ident();
        if have.db != db || have.replica.gen != gen {
            return Err(EngineError::Invalid(format!(
                "the replica of {class}/{instance} here is generation {} of another group or generation than asked ({gen})",
                have.replica.gen
            )));
        }
        if host.db.up_term().is_some() {
            return Err(EngineError::Invalid(format!(
                "the replica of {class}/{instance} here leads; its group has a quorum"
            )));
        }
        let dir = host.db.dir().to_path_buf();
        drop(host);
        self.stop_replica(class, instance, false).await?;
        let rewritten = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || Db::dictate(&dir))
                .await
                .map_err(|e| EngineError::Invalid(format!("dictate panicked: {e}")))?
        };
        // Whatever became of the rewrite, the replica must run again: a replica left stopped
        // would be taken for lost by the management service.
        let db = self.open_replica(class, instance, &dir).await?;
        rewritten?;
        let deadline = tokio::time::Instant::now() + BOOTSTRAP_TIMEOUT;
        loop {
            if let Some(term) = db.up_term() {
                tracing::warn!(%class, %instance, term, "dictated: this replica is now its group's only voter, and leads");
                return Ok((db.member(), term));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(EngineError::Rdb(rdb::Error::Timeout(
                    "the dictated replica did not step up".into(),
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops a hosted replica and, with `destroy`, removes its files.
    pub async fn stop_replica(&self, class: &str, instance: &str, destroy: bool) -> Result<(), EngineError> {
        let host = self.inner.hosts.write().expect("lock").remove(class, instance);
        let Some(host) = host else {
            return Err(EngineError::Rdb(rdb::Error::NotFound(format!(
                "{class}/{instance}"
            ))));
        };
        host.db.stop().await?;
        if destroy {
            Db::destroy(host.db.dir())?;
        }
        Ok(())
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
                Some(to) => h.db.transfer_leadership(to, TRANSFER_TIMEOUT).await,
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

    fn hint_of(&self, host: &Host) -> cpb::Hint {
        let (leader, term) = host.db.hint();
        let up = host.db.up_term();
        let (rank, term) = match (up, leader) {
            (Some(t), _) => (self.inner.rank, t),
            // NB: a replica that does not serve never hints itself: openraft may still call it
            // leader (a leader cut off from its quorum), but a client must look elsewhere.
            (None, Some(l)) if l.rank != self.inner.rank => (l.rank, term),
            (None, _) => return cpb::Hint::default(),
        };
        let addr = host
            .db
            .members()
            .into_iter()
            .find(|m| m.replica.rank == rank)
            .map(|m| m.addr)
            .unwrap_or_default();
        cpb::Hint {
            valid: true,
            rank,
            term,
            addr,
        }
    }

    async fn call(&self, req: cpb::CallRequest) -> cpb::CallReply {
        let err = |e: WireError, hint: Option<cpb::Hint>| cpb::CallReply {
            hint,
            result: Some(cpb::call_reply::Result::Error(cpb::WireError::from(&e))),
        };
        if self.inner.stopping.load(Ordering::SeqCst) {
            return err(WireError::Shutdown, None);
        }
        if !self.inner.factories.contains_key(&req.class) {
            return err(
                WireError::Invalid(format!("unknown service class {:?}", req.class)),
                None,
            );
        }
        let Some(host) = self.host(&req.class, &req.instance) else {
            return err(WireError::NotReplica, None);
        };
        let hint = Some(self.hint_of(&host));
        let Some(adm) = host.admit() else {
            host.stats.not_leader.fetch_add(1, Ordering::Relaxed);
            let e = match host.state().0 {
                State::UpEmpty => WireError::Busy,
                _ => WireError::NotLeader,
            };
            return err(e, hint);
        };
        if req.probe {
            return cpb::CallReply {
                hint,
                result: Some(cpb::call_reply::Result::Ok(vec![])),
            };
        }
        let Ok(client_id) = <[u8; 16]>::try_from(req.client_id.as_slice()) else {
            return err(WireError::Invalid("client_id must be 16 bytes".into()), hint);
        };
        tracing::debug!(class = %req.class, instance = %req.instance, seq = req.seq, "request");
        let t = std::time::Instant::now();
        let res = host
            .handle(&adm, client_id, req.seq, req.acked, &req.payload)
            .await;
        host.stats
            .latency_us_sum
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        let counter = if res.is_ok() {
            &host.stats.ok
        } else {
            &host.stats.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(Ok(b)) => cpb::CallReply {
                hint,
                result: Some(cpb::call_reply::Result::Ok(b)),
            },
            Ok(Err(service_error)) => err(WireError::Service(service_error), hint),
            Err(e) => {
                let hint = Some(self.hint_of(&host));
                err(e, hint)
            }
        }
    }
}

struct RsvcSvc(Engine);

#[tonic::async_trait]
impl cpb::rsvc_server::Rsvc for RsvcSvc {
    async fn call(&self, req: Request<cpb::CallRequest>) -> Result<Response<cpb::CallReply>, Status> {
        Ok(Response::new(self.0.call(req.into_inner()).await))
    }

    async fn status(&self, req: Request<cpb::StatusRequest>) -> Result<Response<cpb::StatusReply>, Status> {
        let r = req.into_inner();
        let mut replicas: Vec<cpb::ReplicaStatus> = self
            .0
            .hosts()
            .iter()
            .filter(|h| r.class.is_empty() || h.class == r.class)
            .filter(|h| r.instance.is_empty() || h.instance == r.instance)
            .map(|h| (&replica_status(h)).into())
            .collect();
        replicas.sort_by(|a, b| (&a.class, &a.instance).cmp(&(&b.class, &b.instance)));
        Ok(Response::new(cpb::StatusReply {
            rank: self.0.inner.rank,
            replicas,
        }))
    }
}

/// What a hosted replica reports of itself.
fn replica_status(h: &Host) -> rsvc_client::ReplicaStatus {
    let s = h.db.status();
    let size = |f: &str| std::fs::metadata(h.db.dir().join(f)).map_or(0, |m| m.len());
    let ranks = |v: &[rdb::ReplicaId]| {
        let mut r: Vec<u32> = v.iter().map(|x| x.rank).collect();
        r.sort_unstable();
        r
    };
    rsvc_client::ReplicaStatus {
        class: h.class.clone(),
        instance: h.instance.clone(),
        rank: s.replica.rank,
        gen: s.replica.gen,
        role: match s.role {
            rdb::Role::Follower => "follower",
            rdb::Role::Candidate => "candidate",
            rdb::Role::Leader => "leader",
            rdb::Role::Learner => "learner",
            rdb::Role::Shutdown => "shutdown",
        }
        .into(),
        term: s.term,
        leader: s.leader.map(|l| l.rank),
        serving: h.db.up_term().is_some(),
        last_log_index: s.last_log_index,
        applied_index: s.applied_index,
        snapshot_index: s.snapshot_index,
        purged_index: s.purged_index,
        voters: ranks(&s.voters),
        learners: ranks(&s.learners),
        free_bytes: s.space.map(|x| x.free),
        upkeep_bytes: s.space.map(|x| x.upkeep),
        log_bytes: size("log.redb"),
        state_bytes: size("sm.redb"),
        stopped: s.stopped,
    }
}

struct PeerSvc(Engine);

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerSvc {
    async fn raft(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftReply>, Status> {
        let m = req.into_inner();
        let refuse = |why: String| {
            Ok(Response::new(pb::RaftReply {
                result: Some(pb::raft_reply::Result::Refused(why)),
            }))
        };
        if m.cluster != self.0.inner.cluster {
            return refuse(format!(
                "message for cluster {:?}, this is {:?}",
                m.cluster, self.0.inner.cluster
            ));
        }
        let rpc = match wire::rpc_from(m) {
            Ok(r) => r,
            Err(e) => return refuse(format!("malformed: {e}")),
        };
        let host = self
            .0
            .inner
            .hosts
            .read()
            .expect("lock")
            .by_db
            .get(&rpc.db)
            .cloned();
        let Some(host) = host else {
            return refuse(format!("no replica of db {} here", rpc.db));
        };
        match host.db.handle_rpc(rpc).await {
            Ok(b) => Ok(Response::new(pb::RaftReply {
                result: Some(pb::raft_reply::Result::Ok(b)),
            })),
            Err(r) => refuse(r.to_string()),
        }
    }

    async fn identify(
        &self,
        _req: Request<pb::IdentifyRequest>,
    ) -> Result<Response<pb::IdentifyReply>, Status> {
        // NB: a stopping engine drops its replicas one by one; a list taken now would make the
        // management leader take them for lost and re-create them elsewhere in time.
        if self.0.inner.stopping.load(Ordering::SeqCst) {
            return Err(Status::unavailable("engine stopping"));
        }
        let hosted = self
            .0
            .hosts()
            .iter()
            .map(|h| pb::HostedReplica {
                class: h.class.clone(),
                instance: h.instance.clone(),
                gen: h.db.ident().replica.gen,
            })
            .collect();
        Ok(Response::new(pb::IdentifyReply {
            rank: self.0.inner.rank,
            cluster: self.0.inner.cluster.clone(),
            incarnation: self.0.inner.incarnation,
            hosted,
        }))
    }

    async fn start_replica(
        &self,
        req: Request<pb::StartReplicaRequest>,
    ) -> Result<Response<pb::StartReplicaReply>, Status> {
        let r = req.into_inner();
        if r.cluster != self.0.inner.cluster {
            return Err(Status::permission_denied("wrong cluster"));
        }
        let db = wire::db_from(&r.db).map_err(Status::invalid_argument)?;
        let members: Result<Vec<Member>, String> = r.bootstrap.iter().map(wire::member_from).collect();
        let members = members.map_err(Status::invalid_argument)?;
        match self
            .0
            .start_replica(&r.class, &r.instance, db, r.gen, members)
            .await
        {
            Ok(m) => Ok(Response::new(pb::StartReplicaReply {
                member: Some(wire::member_to(&m)),
            })),
            Err(EngineError::UnknownClass(c)) => Err(Status::not_found(format!("unknown class {c}"))),
            Err(EngineError::Invalid(m)) => Err(Status::invalid_argument(m)),
            Err(EngineError::Rdb(rdb::Error::Exists(m))) => Err(Status::already_exists(m)),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderReply>, Status> {
        let r = req.into_inner();
        let host = self.leader_host(&r.cluster, &r.class, &r.instance)?;
        if r.to_rank == self.0.inner.rank {
            // Already where it was asked to go: done, not an error.
            return Ok(Response::new(pb::TransferLeaderReply {
                new_leader: r.to_rank,
            }));
        }
        let to = if r.to_rank == 0 {
            host.db
                .transfer_target()
                .ok_or_else(|| Status::failed_precondition("no other voter"))?
        } else {
            host.db
                .status()
                .voters
                .into_iter()
                .find(|v| v.rank == r.to_rank)
                .ok_or_else(|| Status::invalid_argument(format!("rank {} holds no voter", r.to_rank)))?
        };
        host.db
            .transfer_leadership(to, TRANSFER_TIMEOUT)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::TransferLeaderReply { new_leader: to.rank }))
    }

    async fn change_replicas(
        &self,
        req: Request<pb::ChangeReplicasRequest>,
    ) -> Result<Response<pb::ChangeReplicasReply>, Status> {
        self.change(req.into_inner())
            .await
            .map(|()| Response::new(pb::ChangeReplicasReply {}))
    }

    async fn dictate_replica(
        &self,
        req: Request<pb::DictateReplicaRequest>,
    ) -> Result<Response<pb::DictateReplicaReply>, Status> {
        let r = req.into_inner();
        if r.cluster != self.0.inner.cluster {
            return Err(Status::permission_denied("wrong cluster"));
        }
        let db = wire::db_from(&r.db).map_err(Status::invalid_argument)?;
        match self.0.dictate_replica(&r.class, &r.instance, db, r.gen).await {
            Ok((m, term)) => Ok(Response::new(pb::DictateReplicaReply {
                member: Some(wire::member_to(&m)),
                term,
            })),
            Err(EngineError::Rdb(rdb::Error::NotFound(m))) => Err(Status::not_found(m)),
            Err(EngineError::Invalid(m)) => Err(Status::failed_precondition(m)),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn stop_replica(
        &self,
        req: Request<pb::StopReplicaRequest>,
    ) -> Result<Response<pb::StopReplicaReply>, Status> {
        let r = req.into_inner();
        if r.cluster != self.0.inner.cluster {
            return Err(Status::permission_denied("wrong cluster"));
        }
        match self.0.stop_replica(&r.class, &r.instance, r.destroy).await {
            Ok(()) => Ok(Response::new(pb::StopReplicaReply {})),
            Err(EngineError::Rdb(rdb::Error::NotFound(m))) => Err(Status::not_found(m)),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

impl PeerSvc {
    /// The replica of `class`/`instance` here, if this system's and leading.
    fn leader_host(&self, cluster: &str, class: &str, instance: &str) -> Result<Arc<Host>, Status> {
        if cluster != self.0.inner.cluster {
            return Err(Status::permission_denied("wrong cluster"));
        }
        let host = self
            .0
            .host(class, instance)
            .ok_or_else(|| Status::not_found("no such replica here"))?;
        if host.db.up_term().is_none() {
            return Err(Status::failed_precondition("not the leader"));
        }
        Ok(host)
    }

    async fn change(&self, r: pb::ChangeReplicasRequest) -> Result<(), Status> {
        let host = self.leader_host(&r.cluster, &r.class, &r.instance)?;
        let res = match (r.add, r.remove) {
            (Some(m), None) => {
                host.db
                    .add_replica(wire::member_from(&m).map_err(Status::invalid_argument)?)
                    .await
            }
            (None, Some(rm)) => {
                let gone = rdb::ReplicaId::new(rm.rank, rm.gen);
                if gone == host.db.ident().replica {
                    // NB: a leader does not remove itself. It hands leadership to a caught-up
                    // voter first, and the caller asks again, now of the new leader.
                    let to = host
                        .db
                        .transfer_target()
                        .ok_or_else(|| Status::failed_precondition("the last voter cannot be removed"))?;
                    host.db
                        .transfer_leadership(to, TRANSFER_TIMEOUT)
                        .await
                        .map_err(|e| Status::unavailable(format!("handing over before removal: {e}")))?;
                    return Err(Status::unavailable(format!(
                        "leadership moved to rank {} before removing this replica",
                        to.rank
                    )));
                }
                host.db.remove_replica(gone).await
            }
            _ => return Err(Status::invalid_argument("exactly one of add and remove")),
        };
        match res {
            Ok(()) => Ok(()),
            Err(rdb::Error::NotLeader { .. }) => Err(Status::failed_precondition("not the leader")),
            Err(rdb::Error::Busy(m)) => Err(Status::unavailable(m)),
            Err(rdb::Error::NotFound(m)) => Err(Status::not_found(m)),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}
