//! The test kit that every crate's integration tests share: one set of deadlines, one way to
//! wait for a condition, tracing set up once, and [`EngineSystem`], a system of in-process
//! engines talking real gRPC on loopback. The system of engine *processes* is
//! [`crate::rsvc::RsvcSystem`].
//!
//! A test never sleeps to let something happen: it waits for the condition, up to
//! [`DEADLINE`], and a timeout names what it waited for.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rsvc_client::mgmt::{mgmt_client, MgmtApi, MgmtRequest, MgmtResponse, RankState};
use rsvc_client::{ClientConfig, Connections, RsvcClient};
use rsvc_server::{Engine, EngineConfig, ServiceFactory};
use tempfile::TempDir;

/// How long a test waits for a condition (a leader, a join, a repair) before it fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How often a test polls a condition.
pub const POLL: Duration = Duration::from_millis(50);

/// Sends the tests' tracing to the test's captured output, with `filter` unless `RUST_LOG`
/// says otherwise. Safe to call from every test.
pub fn init_tracing(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| filter.into()),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `f` until it returns `Some`, and panics naming `what` after [`DEADLINE`].
pub async fn wait_until<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    crate::wait_for(what, DEADLINE, POLL, f)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`wait_until`] for a test that is not async (it blocks its thread between polls).
pub fn wait_until_blocking<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// The services engine `rank` hosts.
pub type Factories = Arc<dyn Fn(u32) -> Vec<Arc<dyn ServiceFactory>> + Send + Sync>;

/// How to build an [`EngineSystem`]: see [`EngineSystem::builder`].
pub struct EngineSystemBuilder {
    n: u32,
    access_points: u32,
    factories: Factories,
    config: Arc<dyn Fn(&mut EngineConfig) + Send + Sync>,
    tls: bool,
}

/// The users whose client certificates a TLS [`EngineSystem`] makes: `admin` (group `admin`,
/// so it may administer), `alice` (group `staff`) and `bob` (no group).
pub const TLS_USERS: [(&str, &[&str]); 3] = [("admin", &["admin"]), ("alice", &["staff"]), ("bob", &[])];

impl EngineSystemBuilder {
    /// Mutual TLS everywhere: a fresh CA under the system's directory (`certs/`), an engine
    /// certificate per rank, and client certificates for [`TLS_USERS`]. The kit's own clients
    /// ([`EngineSystem::mgmt`], [`EngineSystem::connections`]) are `admin`.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// The lowest `n` ranks are access points, which host the management service; the others
    /// join through them. 0 (the default): standalone engines, no management service.
    pub fn access_points(mut self, n: u32) -> Self {
        self.access_points = n;
        self
    }

    /// What each engine hosts, by rank.
    pub fn factories(
        mut self,
        f: impl Fn(u32) -> Vec<Arc<dyn ServiceFactory>> + Send + Sync + 'static,
    ) -> Self {
        self.factories = Arc::new(f);
        self
    }

    /// Changes every engine's configuration (it starts from [`EngineConfig::for_tests`]).
    pub fn config(mut self, f: impl Fn(&mut EngineConfig) + Send + Sync + 'static) -> Self {
        self.config = Arc::new(f);
        self
    }

    /// Starts the engines, in rank order, and, with access points, waits until every engine
    /// is up in the system map.
    pub async fn start(self) -> EngineSystem {
        let mut sys = EngineSystem {
            tmp: TempDir::new().expect("temporary directory"),
            engines: Vec::new(),
            aps: Vec::new(),
            access_points: self.access_points,
            factories: self.factories,
            config: self.config,
            tls: self.tls,
        };
        if self.tls {
            // Spare ranks too, for engines a test adds later.
            let mut spec = rsvc_server::certs::CertSpec::new(sys.certs_dir());
            for rank in 1..=self.n + 4 {
                spec = spec.rank(rank);
            }
            for (user, groups) in TLS_USERS {
                spec = spec.user(user, groups);
            }
            rsvc_server::certs::generate(&spec).expect("test certificates");
        }
        for rank in 1..=self.n {
            let e = sys.start_engine(rank, "127.0.0.1:0").await;
            if rank <= sys.access_points {
                sys.aps.push((rank, e.addr().to_string()));
            }
            sys.engines.push(Some(e));
        }
        if sys.access_points > 0 {
            sys.wait_ranks(self.n as usize).await;
        }
        sys
    }
}

/// Engines in this process, each with its data directory under one temporary directory that
/// goes with the system. See the module docs.
pub struct EngineSystem {
    engines: Vec<Option<Engine>>,
    aps: Vec<(u32, String)>,
    access_points: u32,
    factories: Factories,
    config: Arc<dyn Fn(&mut EngineConfig) + Send + Sync>,
    tls: bool,
    // NB: last, so that the engines' handles go before their directory.
    tmp: TempDir,
}

impl EngineSystem {
    /// `n` engines hosting nothing but what [`EngineSystemBuilder::factories`] adds.
    pub fn builder(n: u32) -> EngineSystemBuilder {
        EngineSystemBuilder {
            n,
            access_points: 0,
            factories: Arc::new(|_| Vec::new()),
            config: Arc::new(|_| {}),
            tls: false,
        }
    }

    /// Where a TLS system's certificates are (see [`EngineSystemBuilder::tls`]).
    pub fn certs_dir(&self) -> PathBuf {
        self.tmp.path().join("certs")
    }

    /// The TLS files of client `user` (one of [`TLS_USERS`], or one a test generated into
    /// [`EngineSystem::certs_dir`]).
    pub fn tls_paths(&self, user: &str) -> rsvc_client::tls::TlsPaths {
        let dir = self.certs_dir();
        let (cert, key) = rsvc_server::certs::user_files(&dir, user);
        rsvc_client::tls::TlsPaths {
            ca: dir.join("ca.crt"),
            cert,
            key,
        }
    }

    /// Connections as the kit's own client: `admin` over TLS in a TLS system, plain otherwise.
    pub fn connections(&self) -> Connections {
        if self.tls {
            self.connections_as("admin")
        } else {
            Connections::default()
        }
    }

    /// Connections over TLS as client `user` (see [`EngineSystem::tls_paths`]).
    pub fn connections_as(&self, user: &str) -> Connections {
        let files = rsvc_client::tls::TlsFiles::load(self.tls_paths(user))
            .unwrap_or_else(|e| panic!("TLS files of {user}: {e}"));
        Connections::default().with_tls(Some(files))
    }

    /// The configuration engine `rank` starts with, listening on `listen`.
    pub fn config_of(&self, rank: u32, listen: &str) -> EngineConfig {
        let mut aps: Vec<(u32, String)> = self.aps.iter().filter(|(r, _)| *r != rank).cloned().collect();
        if rank <= self.access_points {
            // An access point's own entry: the empty address stands for its own.
            aps.push((rank, String::new()));
            aps.sort();
        }
        let mut cfg = EngineConfig {
            listen: listen.parse().expect("listen address"),
            access_points: aps,
            ..EngineConfig::for_tests(rank, self.data_dir(rank))
        };
        if self.tls {
            let dir = self.certs_dir();
            let (cert, key) = rsvc_server::certs::engine_files(&dir, rank);
            let paths = rsvc_client::tls::TlsPaths {
                ca: dir.join("ca.crt"),
                cert,
                key,
            };
            cfg.tls = Some(
                rsvc_client::tls::TlsFiles::load(paths)
                    .unwrap_or_else(|e| panic!("TLS files of rank {rank}: {e}")),
            );
        }
        (self.config)(&mut cfg);
        cfg
    }

    async fn start_engine(&self, rank: u32, listen: &str) -> Engine {
        Engine::start(self.config_of(rank, listen), (self.factories)(rank))
            .await
            .unwrap_or_else(|e| panic!("engine {rank} did not start: {e}"))
    }

    /// Engine `rank`'s data directory.
    pub fn data_dir(&self, rank: u32) -> PathBuf {
        self.tmp.path().join(format!("engine{rank}"))
    }

    /// The temporary directory everything lives in.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The running engine of `rank`.
    pub fn engine(&self, rank: u32) -> &Engine {
        self.engines[(rank - 1) as usize]
            .as_ref()
            .unwrap_or_else(|| panic!("engine {rank} is not running"))
    }

    /// The running engines, in rank order.
    pub fn engines(&self) -> impl Iterator<Item = &Engine> {
        self.engines.iter().flatten()
    }

    /// Whether engine `rank` runs.
    pub fn is_running(&self, rank: u32) -> bool {
        self.engines.get((rank - 1) as usize).is_some_and(Option::is_some)
    }

    /// Takes engine `rank` out of the system (to stop it, or drop it as a crash would).
    pub fn take(&mut self, rank: u32) -> Engine {
        self.engines[(rank - 1) as usize]
            .take()
            .unwrap_or_else(|| panic!("engine {rank} is not running"))
    }

    /// Stops engine `rank` gracefully (it hands over what it leads first).
    pub async fn stop(&mut self, rank: u32) {
        self.take(rank).shutdown().await;
    }

    /// Starts engine `rank` again on its data directory, on the same address it had if
    /// `listen` says so (or a new port with `127.0.0.1:0`).
    pub async fn restart(&mut self, rank: u32, listen: &str) -> &Engine {
        assert!(!self.is_running(rank), "engine {rank} still runs");
        let e = self.start_engine(rank, listen).await;
        self.engines[(rank - 1) as usize] = Some(e);
        self.engine(rank)
    }

    /// The access points, as `(rank, address)`.
    pub fn access_points(&self) -> Vec<(u32, String)> {
        self.aps.clone()
    }

    /// A management client with the kit's deadline.
    pub fn mgmt(&self) -> RsvcClient<MgmtApi> {
        mgmt_client(self.aps.clone(), self.connections(), Self::client_config())
    }

    /// Client settings with the kit's deadline.
    pub fn client_config() -> ClientConfig {
        ClientConfig {
            deadline: DEADLINE,
            ..ClientConfig::default()
        }
    }

    /// Waits until at least `n` engines are up in the system map.
    pub async fn wait_ranks(&self, n: usize) {
        let mgmt = self.mgmt();
        wait_until(&format!("{n} engines up in the system map"), || {
            let mgmt = &mgmt;
            async move {
                match mgmt.call(&MgmtRequest::SystemMap).await {
                    Ok(MgmtResponse::Map(m)) => {
                        (m.iter().filter(|r| r.state == RankState::Up).count() >= n).then_some(())
                    }
                    _ => None,
                }
            }
        })
        .await
    }

    /// Stops every running engine gracefully, then removes the data.
    pub async fn shutdown(mut self) {
        for e in self.engines.iter_mut() {
            if let Some(e) = e.take() {
                e.shutdown().await;
            }
        }
    }
}
