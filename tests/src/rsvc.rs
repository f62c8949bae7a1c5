//! A system of real rsvc engine processes (`pool-svc serve`) on loopback.
//!
//! Every engine is an access point with a fixed port (found once, kept across restarts) and a
//! TOML file of its own, so that a restarted engine comes back exactly as it was.
//!
//! With [`Spec::tls`], the engines speak mutual TLS: the harness makes a CA and certificates
//! (`rsvc_server::certs`) under the system's directory, names them in each engine's `[tls]`
//! section, and its own clients are the admin user; [`RsvcSystem::connections_as`] and
//! [`RsvcSystem::tls_flags`] give the other users' clients, in process or as a command line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pool_svc::PoolApi;
use rsvc_client::mgmt::{mgmt_client, MgmtApi, MgmtLocator, MgmtRequest};
use rsvc_client::tls::{TlsFiles, TlsPaths};
use rsvc_client::wire::pb;
use rsvc_client::{ClientConfig, Connections, ReplicaStatus, RsvcClient};
use rustix::process::Signal;
use tokio::process::Command;

use crate::faultnet::{engine_ip, FaultNet};
use crate::kit::TLS_USERS;
use crate::proc::Proc;
use crate::{free_port, free_port_on, wait_for, DEADLINE};

/// How to run an engine: a program and the arguments before `serve`'s own flags.
#[derive(Clone, Debug)]
pub struct EngineCmd {
    /// The program, e.g. `target/release/pool-svc`.
    pub program: PathBuf,
    /// Arguments up to and including `serve`.
    pub prefix: Vec<String>,
}

impl EngineCmd {
    /// `pool-svc serve` at `program`.
    pub fn pool_svc(program: impl Into<PathBuf>) -> Self {
        EngineCmd {
            program: program.into(),
            prefix: vec!["serve".into()],
        }
    }
}

/// Raft timers of every engine, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    /// Leader heartbeat period.
    pub heartbeat_ms: u64,
    /// Election timeout, lower bound.
    pub election_min_ms: u64,
    /// Election timeout, upper bound.
    pub election_max_ms: u64,
}

impl Timers {
    /// The engine's production defaults (what a config file without `[raft]` gets).
    pub fn defaults() -> Self {
        Self::of(&rdb::DbConfig::default())
    }

    /// The timers of an rdb configuration.
    pub fn of(c: &rdb::DbConfig) -> Self {
        Timers {
            heartbeat_ms: c.heartbeat.as_millis() as u64,
            election_min_ms: c.election_timeout.0.as_millis() as u64,
            election_max_ms: c.election_timeout.1.as_millis() as u64,
        }
    }

    /// An election timeout of `election_ms` (randomised up to twice that, as etcd does) and a
    /// heartbeat of `heartbeat_ms`.
    pub fn matched(election_ms: u64, heartbeat_ms: u64) -> Self {
        Timers {
            heartbeat_ms,
            election_min_ms: election_ms,
            election_max_ms: election_ms * 2,
        }
    }

    /// What `--fast-timers` gives an engine (rdb's `DbConfig::fast`), for tests.
    pub fn fast() -> Self {
        Self::of(&rdb::DbConfig::fast())
    }
}

/// The shape of a system to start.
#[derive(Clone, Debug)]
pub struct Spec {
    /// How many engines, ranks `1..=engines`.
    pub engines: u32,
    /// How many of them (the lowest ranks) are access points; the others only know them.
    pub access_points: u32,
    /// The cluster name every engine is configured with.
    pub cluster: String,
    /// The raft timers of every engine.
    pub timers: Timers,
    /// More `[raft]` settings (TOML lines) for every engine.
    pub raft_extra: String,
    /// Put a [`FaultNet`] proxy in front of every engine (engine `r` on `127.0.1.r`), so that
    /// the harness can cut and delay the links between them.
    pub proxied: bool,
    /// Mutual TLS: a CA and certificates under `<dir>/certs` (engines `1..=engines`, the
    /// users of [`TLS_USERS`]: `admin` in group `admin`, `alice` in `staff`, `bob` in none), a
    /// `[tls]` section in every engine's file, and the system's own clients as `admin`.
    pub tls: bool,
}

impl Spec {
    /// `engines` engines, every one an access point, of cluster `bench`, with `timers`.
    pub fn new(engines: u32, timers: Timers) -> Self {
        Spec {
            engines,
            access_points: engines,
            cluster: "bench".into(),
            timers,
            raft_extra: String::new(),
            proxied: false,
            tls: false,
        }
    }
}

/// One engine of a [`RsvcSystem`].
pub struct Engine {
    /// Its rank.
    pub rank: u32,
    /// Where it listens (and is dialled).
    pub addr: String,
    /// Where it serves Prometheus metrics.
    pub metrics: String,
    /// Whether it is an access point.
    pub access_point: bool,
    /// Its config file.
    pub config: PathBuf,
    /// The running process, if it runs.
    pub proc: Option<Proc>,
    /// The paused flag: a paused engine is SIGSTOPped.
    pub paused: bool,
}

/// Real engine processes of one cluster. Dropping it kills them.
pub struct RsvcSystem {
    dir: PathBuf,
    cmd: EngineCmd,
    /// The cluster name.
    pub cluster: String,
    /// The engines by rank.
    pub engines: BTreeMap<u32, Engine>,
    /// The raft timers every engine runs with.
    pub timers: Timers,
    /// The proxies between the engines, if the spec asked for them.
    pub net: Option<FaultNet>,
    /// Where the certificates are, in a TLS system.
    certs: Option<PathBuf>,
    /// The system's own connections: plain, or over TLS as `admin`.
    conns: Connections,
}

impl RsvcSystem {
    /// Starts `n` engines (all access points) with `timers`, data under `dir`, and waits
    /// until every one has joined.
    pub async fn start(dir: &Path, cmd: EngineCmd, n: u32, timers: Timers) -> Result<RsvcSystem, String> {
        Self::start_spec(dir, cmd, Spec::new(n, timers)).await
    }

    /// Starts the system `spec` describes, data under `dir`, and waits until every engine
    /// has joined.
    pub async fn start_spec(dir: &Path, cmd: EngineCmd, spec: Spec) -> Result<RsvcSystem, String> {
        // NB: a port found free can be taken before the engine binds it (by another engine's
        // outgoing connection, most often). That is the harness's race, not the system's: start
        // the whole system again on fresh ports and empty data directories.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(dir, cmd.clone(), spec.clone()).await {
                Err(e) if attempt < 3 && e.contains("in use") => {
                    tracing::warn!(attempt, cause = %e, "a port was taken before an engine bound it; starting again");
                    for rank in 1..=spec.engines {
                        let _ = empty_dir(&Self::data_dir_in(dir, rank));
                    }
                }
                r => return r,
            }
        }
    }

    async fn start_once(dir: &Path, cmd: EngineCmd, spec: Spec) -> Result<RsvcSystem, String> {
        if spec.access_points == 0 || spec.access_points > spec.engines {
            return Err(format!(
                "{} access points of {} engines",
                spec.access_points, spec.engines
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let certs = spec.tls.then(|| dir.join("certs"));
        if let Some(certs) = &certs {
            // NB: `force`, so that a start again (a port was taken) or a directory used before
            // signs new certificates with the CA already there instead of failing on them.
            let mut cs = rsvc_server::certs::CertSpec::new(certs);
            cs.force = true;
            for rank in 1..=spec.engines {
                cs = cs.rank(rank);
            }
            for (user, groups) in TLS_USERS {
                cs = cs.user(user, groups);
            }
            rsvc_server::certs::generate(&cs)
                .map_err(|e| format!("certificates in {}: {e}", certs.display()))?;
        }
        let mut addrs = Vec::new();
        let mut metrics = BTreeMap::new();
        // With proxies: where each engine really listens (the advertised address is its proxy).
        let mut listens = BTreeMap::new();
        let mut net = spec.proxied.then(FaultNet::new);
        for rank in 1..=spec.engines {
            if let Some(net) = net.as_mut() {
                let ip = engine_ip(rank);
                let listen = SocketAddr::new(ip, free_port_on(ip)?);
                let proxy = SocketAddr::new(ip, free_port_on(ip)?);
                net.add(rank, proxy, listen)
                    .await
                    .map_err(|e| format!("proxy of rank {rank} on {proxy}: {e}"))?;
                listens.insert(rank, listen.to_string());
                addrs.push((rank, proxy.to_string()));
            } else {
                addrs.push((rank, format!("127.0.0.1:{}", free_port()?)));
            }
            metrics.insert(rank, format!("127.0.0.1:{}", free_port()?));
        }
        let aps: Vec<String> = addrs
            .iter()
            .take(spec.access_points as usize)
            .map(|(r, a)| format!("\"{r}@{a}\""))
            .collect();
        let t = spec.timers;
        let mut engines = BTreeMap::new();
        for (rank, addr) in &addrs {
            let config = dir.join(format!("engine{rank}.toml"));
            let listen = match listens.get(rank) {
                Some(l) => format!("{l}\"\nadvertise = \"{addr}"),
                None => addr.clone(),
            };
            let tls = match &certs {
                Some(certs) => {
                    let (cert, key) = rsvc_server::certs::engine_files(certs, *rank);
                    format!(
                        "\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                        certs.join(rsvc_server::certs::CA_CERT).display(),
                        cert.display(),
                        key.display()
                    )
                }
                None => String::new(),
            };
            let toml = format!(
                "rank = {rank}\nlisten = \"{listen}\"\nmetrics_listen = \"{}\"\ndata_dir = \"{}\"\n\
                 cluster = \"{}\"\naccess_points = [{}]\nreconf_after_secs = 0\n\n[raft]\nheartbeat_ms = {}\n\
                 election_timeout_min_ms = {}\nelection_timeout_max_ms = {}\n{}\n{tls}",
                metrics[rank],
                Self::data_dir_in(dir, *rank).display(),
                spec.cluster,
                aps.join(", "),
                t.heartbeat_ms,
                t.election_min_ms,
                t.election_max_ms,
                spec.raft_extra,
            );
            std::fs::write(&config, toml).map_err(|e| format!("{}: {e}", config.display()))?;
            engines.insert(
                *rank,
                Engine {
                    rank: *rank,
                    addr: addr.clone(),
                    metrics: metrics[rank].clone(),
                    access_point: *rank <= spec.access_points,
                    config,
                    proc: None,
                    paused: false,
                },
            );
        }
        let conns = match &certs {
            Some(certs) => tls_connections(certs, "admin")?,
            None => Connections::default(),
        };
        let mut sys = RsvcSystem {
            dir: dir.to_path_buf(),
            cmd,
            cluster: spec.cluster,
            engines,
            timers: t,
            net,
            certs,
            conns,
        };
        // All at once, as a supervisor would start them: the first access point bootstraps the
        // management service, the others join as soon as it answers.
        for rank in 1..=spec.engines {
            sys.spawn(rank)?;
        }
        for rank in 1..=spec.engines {
            sys.wait_ready(rank).await?;
        }
        Ok(sys)
    }

    fn data_dir_in(dir: &Path, rank: u32) -> PathBuf {
        dir.join(format!("engine{rank}"))
    }

    /// The data directory of the engine of `rank`.
    pub fn data_dir(&self, rank: u32) -> PathBuf {
        Self::data_dir_in(&self.dir, rank)
    }

    /// The log (stderr) of the engine of `rank`.
    pub fn log(&self, rank: u32) -> PathBuf {
        self.dir.join(format!("engine{rank}.log"))
    }

    fn spawn(&mut self, rank: u32) -> Result<(), String> {
        let log = self.log(rank);
        let e = self.engines.get_mut(&rank).ok_or("no such rank")?;
        let mut cmd = Command::new(&self.cmd.program);
        cmd.args(&self.cmd.prefix).arg("--config").arg(&e.config);
        // The engine's own default filter, as an operator's engine logs.
        cmd.env_remove("RUST_LOG");
        cmd.env_remove("RSVC_ACCESS_POINTS");
        e.proc = Some(Proc::spawn(cmd, &log)?);
        e.paused = false;
        Ok(())
    }

    async fn wait_ready(&mut self, rank: u32) -> Result<(), String> {
        let log = self.log(rank);
        let e = self.engines.get_mut(&rank).ok_or("no such rank")?;
        let p = e.proc.as_mut().ok_or("not running")?;
        p.line_with(" ready ", DEADLINE).await.map_err(|err| {
            // The log goes with a temporary directory: say here why the engine did not start.
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "engine {rank}: {err} (see {}); its log ends:\n{}",
                log.display(),
                tail.join("\n")
            )
        })?;
        Ok(())
    }

    /// Where the certificates are (`<dir>/certs`), in a TLS system.
    pub fn certs_dir(&self) -> Option<&Path> {
        self.certs.as_deref()
    }

    /// The TLS files of client `user` (one of [`TLS_USERS`], or one a test generated into
    /// [`certs_dir`](Self::certs_dir)); `None` without TLS.
    pub fn tls_paths(&self, user: &str) -> Option<TlsPaths> {
        self.certs.as_deref().map(|dir| user_paths(dir, user))
    }

    /// The system's own connections: over TLS as `admin` in a TLS system, plain otherwise.
    pub fn connections(&self) -> Connections {
        self.conns.clone()
    }

    /// New connections as client `user` over TLS; plain ones without TLS. Panics if the
    /// user's files do not load.
    pub fn connections_as(&self, user: &str) -> Connections {
        match &self.certs {
            Some(dir) => tls_connections(dir, user).unwrap_or_else(|e| panic!("{e}")),
            None => Connections::default(),
        }
    }

    /// The flags that make a client command (`pool-svc`, `cont-svc`) run as `user`:
    /// `--tls-ca CA --tls-cert CERT --tls-key KEY`, nothing without TLS.
    pub fn tls_flags(&self, user: &str) -> Vec<String> {
        self.tls_paths(user).map(|p| p.flags()).unwrap_or_default()
    }

    /// The same as environment variables (`RSVC_TLS_CA`, `RSVC_TLS_CERT`, `RSVC_TLS_KEY`),
    /// nothing without TLS.
    pub fn tls_env(&self, user: &str) -> Vec<(&'static str, String)> {
        match self.tls_paths(user) {
            Some(p) => vec![
                ("RSVC_TLS_CA", p.ca.display().to_string()),
                ("RSVC_TLS_CERT", p.cert.display().to_string()),
                ("RSVC_TLS_KEY", p.key.display().to_string()),
            ],
            None => Vec::new(),
        }
    }

    /// A [`Pinger`] of the engine of `rank`, over TLS as `admin` in a TLS system.
    pub async fn pinger(&self, rank: u32) -> Result<Pinger, String> {
        let e = self.engines.get(&rank).ok_or_else(|| format!("no rank {rank}"))?;
        Pinger::connect_with(&e.addr, self.conns.tls().cloned()).await
    }

    /// The access points, `(rank, addr)`.
    pub fn access_points(&self) -> Vec<(u32, String)> {
        self.engines
            .values()
            .filter(|e| e.access_point)
            .map(|e| (e.rank, e.addr.clone()))
            .collect()
    }

    /// The access points as the `--access-point` flag spells them: `1@addr,2@addr,...`.
    pub fn access_point_flag(&self) -> String {
        let aps: Vec<String> = self
            .access_points()
            .iter()
            .map(|(r, a)| format!("{r}@{a}"))
            .collect();
        aps.join(",")
    }

    /// A client of the management service.
    pub fn mgmt(&self, cfg: ClientConfig) -> RsvcClient<MgmtApi> {
        mgmt_client(self.access_points(), self.conns.clone(), cfg)
    }

    /// A client of pool `label` (no handle: attributes and queries need none). Clients share
    /// one connection per engine.
    pub fn pool(&self, label: &str, cfg: ClientConfig) -> RsvcClient<PoolApi> {
        let loc = Arc::new(MgmtLocator::new(self.access_points(), self.conns.clone()));
        RsvcClient::new(label, loc, self.conns.clone(), cfg)
    }

    /// A client of pool `label` that knows only the replica on `rank`: a client on the far
    /// side of a partition, with the old leader.
    pub fn pool_pinned(&self, label: &str, rank: u32, cfg: ClientConfig) -> Option<RsvcClient<PoolApi>> {
        let addr = self.engines.get(&rank)?.addr.clone();
        let loc = Arc::new(rsvc_client::StaticLocator(vec![(rank, addr)]));
        Some(RsvcClient::new(label, loc, self.conns.clone(), cfg))
    }

    /// Creates pool `label` with `replicas` replicas.
    pub async fn create_pool(&self, label: &str, replicas: u32) -> Result<(), String> {
        let req = MgmtRequest::CreateInstance {
            class: "pool".into(),
            label: label.into(),
            replicas,
        };
        self.mgmt(ClientConfig::default())
            .call(&req)
            .await
            .map(|_| ())
            .map_err(|e| format!("create pool {label}: {e}"))
    }

    /// Whether the engine of `rank` serves as leader of `class`/`label` now (a probe call).
    pub async fn serving(&self, rank: u32, class: &str, label: &str) -> bool {
        let Some(e) = self.engines.get(&rank) else {
            return false;
        };
        let Ok(mut c) = self.conns.get(&e.addr) else {
            return false;
        };
        let req = pb::CallRequest {
            class: class.into(),
            instance: label.into(),
            probe: true,
            ..Default::default()
        };
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_millis(500));
        matches!(
            tokio::time::timeout(Duration::from_millis(500), c.call(r)).await,
            Ok(Ok(reply)) if matches!(reply.get_ref().result, Some(pb::call_reply::Result::Ok(_)))
        )
    }

    /// The rank whose replica serves `class`/`label`, waiting up to `deadline`.
    pub async fn leader(&self, class: &str, label: &str, deadline: Duration) -> Result<u32, String> {
        let ranks: Vec<u32> = self.running();
        wait_for(
            &format!("a leader of {class}/{label}"),
            deadline,
            Duration::from_millis(10),
            || {
                let ranks = ranks.clone();
                async move {
                    for r in ranks {
                        if self.serving(r, class, label).await {
                            return Some(r);
                        }
                    }
                    None
                }
            },
        )
        .await
    }

    /// Ranks whose engines run and are not paused.
    pub fn running(&self) -> Vec<u32> {
        self.engines
            .values()
            .filter(|e| e.proc.is_some() && !e.paused)
            .map(|e| e.rank)
            .collect()
    }

    /// kill -9 of the engine of `rank`.
    pub async fn kill(&mut self, rank: u32) -> Result<(), String> {
        let p = self
            .engines
            .get_mut(&rank)
            .and_then(|e| e.proc.take())
            .ok_or("not running")?;
        p.kill().await;
        Ok(())
    }

    /// Removes everything in the data directory of the stopped engine of `rank`, as a
    /// replaced disk would (the directory stays: it may be a mount point).
    pub fn wipe(&self, rank: u32) -> Result<(), String> {
        let e = self.engines.get(&rank).ok_or("no such rank")?;
        if e.proc.is_some() {
            return Err(format!("rank {rank} is running; stop it before wiping its data"));
        }
        let dir = self.data_dir(rank);
        empty_dir(&dir).map_err(|err| format!("wipe {}: {err}", dir.display()))
    }

    /// Waits until the engine of `rank` hosts every replica in `before` (how far each had
    /// applied, by (class, instance), from [`applied`](Self::applied)) again,
    /// each applied at least as far, and the directory lists `rank` among each service
    /// instance's replicas again: what a wiped engine's repair must achieve.
    pub async fn wait_rebuilt(
        &self,
        rank: u32,
        before: &BTreeMap<(String, String), u64>,
        deadline: Duration,
    ) -> Result<(), String> {
        use rsvc_client::mgmt::{MgmtResponse, MGMT_CLASS};
        let mgmt = self.mgmt(ClientConfig::default());
        wait_for(
            &format!("rank {rank}'s replicas re-created and caught up"),
            deadline,
            Duration::from_millis(50),
            || async {
                let now = self.applied(rank).await.ok()?;
                if !before.iter().all(|(k, i)| now.get(k).is_some_and(|n| n >= i)) {
                    return None;
                }
                let Ok(MgmtResponse::Instances(is)) =
                    mgmt.call(&MgmtRequest::ListInstances { class: None }).await
                else {
                    return None;
                };
                let listed = |(class, label): &(String, String)| {
                    class == MGMT_CLASS
                        || is.iter().any(|i| {
                            &i.class == class
                                && &i.label == label
                                && i.replicas.iter().any(|(r, _)| *r == rank)
                        })
                };
                before.keys().all(listed).then_some(())
            },
        )
        .await
    }

    /// SIGTERM of the engine of `rank`, waiting for its exit.
    pub async fn stop(&mut self, rank: u32) -> Result<(), String> {
        let p = self
            .engines
            .get_mut(&rank)
            .and_then(|e| e.proc.take())
            .ok_or("not running")?;
        match p.stop(Duration::from_secs(30)).await {
            Some(s) if s.success() => Ok(()),
            other => Err(format!("engine {rank} did not stop cleanly: {other:?}")),
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) of the engine of `rank`.
    pub fn pause(&mut self, rank: u32, paused: bool) -> Result<(), String> {
        let e = self.engines.get_mut(&rank).ok_or("no such rank")?;
        let p = e.proc.as_ref().ok_or("not running")?;
        p.signal(if paused { Signal::STOP } else { Signal::CONT })?;
        e.paused = paused;
        Ok(())
    }

    /// Starts the engine of `rank` again, on its old address and data, and waits until it
    /// has joined.
    pub async fn restart(&mut self, rank: u32) -> Result<(), String> {
        self.spawn(rank)?;
        self.wait_ready(rank).await
    }

    /// Adds a replica of pool `label` on `rank` (learner until caught up, then voter); returns
    /// when the management service reports it done.
    pub async fn add_pool_replica(&self, label: &str, rank: u32) -> Result<(), String> {
        let req = MgmtRequest::AddReplica {
            class: "pool".into(),
            label: label.into(),
            rank,
        };
        let cfg = ClientConfig {
            deadline: Duration::from_secs(600),
            rpc_timeout: Duration::from_secs(600),
            ..ClientConfig::default()
        };
        self.mgmt(cfg)
            .call(&req)
            .await
            .map(|_| ())
            .map_err(|e| format!("add a replica of {label} on rank {rank}: {e}"))
    }

    /// What each replica on the engine of `rank` reports of itself (the typed `Status` call),
    /// by (class, instance).
    pub async fn status(&self, rank: u32) -> Result<BTreeMap<(String, String), ReplicaStatus>, String> {
        let e = self.engines.get(&rank).ok_or_else(|| format!("no rank {rank}"))?;
        let all =
            rsvc_client::replica_status(&self.conns, &e.addr, None, None, Duration::from_secs(2)).await?;
        Ok(all
            .into_iter()
            .map(|s| ((s.class.clone(), s.instance.clone()), s))
            .collect())
    }

    /// The raft term each replica on the engine of `rank` knows, by (class, instance).
    pub async fn terms(&self, rank: u32) -> Result<BTreeMap<(String, String), u64>, String> {
        Ok(self
            .status(rank)
            .await?
            .into_iter()
            .map(|(k, s)| (k, s.term))
            .collect())
    }

    /// How far each replica on the engine of `rank` has applied, by (class, instance).
    pub async fn applied(&self, rank: u32) -> Result<BTreeMap<(String, String), u64>, String> {
        Ok(self
            .status(rank)
            .await?
            .into_iter()
            .map(|(k, s)| (k, s.applied_index.unwrap_or(0)))
            .collect())
    }

    /// One per-replica metric (`rsvc_replica_*`) of the engine of `rank`, by (class, instance).
    pub async fn replica_metric(
        &self,
        rank: u32,
        name: &str,
    ) -> Result<BTreeMap<(String, String), u64>, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let e = self.engines.get(&rank).ok_or_else(|| format!("no rank {rank}"))?;
        let fetch = async {
            let mut s = tokio::net::TcpStream::connect(&e.metrics).await?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await?;
            let mut body = String::new();
            s.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        let body = tokio::time::timeout(Duration::from_secs(2), fetch)
            .await
            .map_err(|_| format!("metrics of rank {rank}: timed out"))?
            .map_err(|err| format!("metrics of rank {rank}: {err}"))?;
        let mut out = BTreeMap::new();
        let prefix = format!("{name}{{");
        for line in body.lines().filter(|l| l.starts_with(&prefix)) {
            let field = |k: &str| {
                let start = line.find(&format!("{k}=\""))? + k.len() + 2;
                let len = line[start..].find('"')?;
                Some(line[start..start + len].to_string())
            };
            let term = line.rsplit(' ').next().and_then(|t| t.parse().ok());
            if let (Some(c), Some(i), Some(t)) = (field("class"), field("instance"), term) {
                out.insert((c, i), t);
            }
        }
        Ok(out)
    }

    /// Configures failpoint `name` of the engine of `rank` with `fail` actions (`sleep(300)`,
    /// `return(EIO)`, `off`); `None` removes it. Needs an engine built with the `failpoints`
    /// feature (rsvc-fault's are): others answer 404, reported as an error.
    pub async fn failpoint(&self, rank: u32, name: &str, actions: Option<&str>) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let e = self.engines.get(&rank).ok_or_else(|| format!("no rank {rank}"))?;
        let (method, body) = match actions {
            Some(a) => ("PUT", a),
            None => ("DELETE", ""),
        };
        let req = format!(
            "{method} /failpoints/{name} HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(&e.metrics).await?;
            s.write_all(req.as_bytes()).await?;
            let mut reply = String::new();
            s.read_to_string(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        };
        let reply = tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .map_err(|_| format!("failpoint on rank {rank}: timed out"))?
            .map_err(|err| format!("failpoint on rank {rank}: {err}"))?;
        if reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(format!(
                "failpoint {name} on rank {rank}: {}",
                reply.lines().next().unwrap_or("no reply")
            ))
        }
    }

    /// The pid of the engine of `rank`.
    pub fn pid(&self, rank: u32) -> Option<rustix::process::Pid> {
        self.engines.get(&rank)?.proc.as_ref()?.pid()
    }
}

/// An open gRPC health client to one engine, for measuring the loopback round trip.
pub struct Pinger(tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>);

impl Pinger {
    /// Connects to the engine at `addr`, in plain TCP.
    pub async fn connect(addr: &str) -> Result<Pinger, String> {
        Self::connect_with(addr, None).await
    }

    /// Connects to the engine at `addr`, over mutual TLS with `tls` if given.
    pub async fn connect_with(addr: &str, tls: Option<Arc<TlsFiles>>) -> Result<Pinger, String> {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true);
        let ch = match tls {
            None => ep.connect().await,
            Some(tls) => {
                let timeout = rsvc_client::ClientConfig::default().connect_timeout;
                ep.connect_with_connector(rsvc_client::tls::connector(tls, addr.to_string(), None, timeout))
                    .await
            }
        }
        .map_err(|e| e.to_string())?;
        Ok(Pinger(tonic_health::pb::health_client::HealthClient::new(ch)))
    }

    /// One health check.
    pub async fn ping(&mut self) -> Result<(), String> {
        self.0
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The TLS files of client `user` in the certificate directory `dir`.
fn user_paths(dir: &Path, user: &str) -> TlsPaths {
    let (cert, key) = rsvc_server::certs::user_files(dir, user);
    TlsPaths {
        ca: dir.join(rsvc_server::certs::CA_CERT),
        cert,
        key,
    }
}

/// Connections over TLS as client `user`, whose files are in `dir`.
fn tls_connections(dir: &Path, user: &str) -> Result<Connections, String> {
    let files = TlsFiles::load(user_paths(dir, user)).map_err(|e| format!("TLS files of {user}: {e}"))?;
    Ok(Connections::default().with_tls(Some(files)))
}

/// Removes everything inside `dir`, which stays (it may be a mount point or a symlink).
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}
