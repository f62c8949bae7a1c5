//! What every engine binary shares: the `serve` flags and the run-until-signalled loop, so that
//! `rsvc-engine`, `pool-svc serve` and any other service binary behave the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::FileConfig;
use crate::engine::Engine;
use crate::service::ServiceFactory;

/// Flags of `serve`. Settings come from `--config FILE` (TOML), then `RSVC_*` environment
/// variables, then flags; the later wins.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This engine's rank.
    #[arg(long, env = "RSVC_RANK")]
    pub rank: Option<u32>,
    /// Listen address (port 0: any free port).
    #[arg(long, env = "RSVC_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address peers and clients dial.
    #[arg(long, env = "RSVC_ADVERTISE")]
    pub advertise: Option<String>,
    /// Data directory.
    #[arg(long, env = "RSVC_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// System name.
    #[arg(long, env = "RSVC_CLUSTER")]
    pub cluster: Option<String>,
    /// Access point, `rank@host:port` (repeat or comma-separate); `RANK@` alone names this
    /// engine itself. At least one is needed, here, in the file or in the environment.
    #[arg(long = "access-point", env = "RSVC_ACCESS_POINTS", value_delimiter = ',')]
    pub access_points: Vec<String>,
    /// Serve Prometheus metrics here.
    #[arg(long, env = "RSVC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// A preset of sub-second raft timers (heartbeat 50 ms, elections 400-800 ms), for demos
    /// and tests on one machine; the timer flags below still override it.
    #[arg(long)]
    pub fast_timers: bool,
    /// Leader heartbeat period, in ms (`[raft] heartbeat_ms`).
    #[arg(long, env = "RSVC_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Election timeout, lower bound, in ms (`[raft] election_timeout_min_ms`).
    #[arg(long, env = "RSVC_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Election timeout, upper bound, in ms (`[raft] election_timeout_max_ms`).
    #[arg(long, env = "RSVC_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// Deadline of a raft AppendEntries that carries entries, in ms (`[raft] append_timeout_ms`).
    #[arg(long, env = "RSVC_APPEND_TIMEOUT_MS")]
    pub append_timeout_ms: Option<u64>,
    /// Mutual TLS: this engine's files. Give all three (or `[tls]` in the config file).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Client certificates whose subject O holds this group may administer the system
    /// [default: admin].
    #[arg(long, env = "RSVC_ADMIN_GROUP")]
    pub admin_group: Option<String>,
    /// Listen on a non-loopback address without TLS: no authentication, everyone may do
    /// everything. For trusted networks and tests only.
    #[arg(long, env = "RSVC_INSECURE")]
    pub insecure: bool,
}

/// Where a party's TLS files are: flags, or `RSVC_TLS_*` in the environment.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// The cluster CA certificate (PEM) that every peer's certificate must chain to.
    #[arg(long, env = "RSVC_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// This party's certificate (PEM). Reloaded when the file changes.
    #[arg(long, env = "RSVC_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// This party's private key (PEM). Reloaded when the file changes.
    #[arg(long, env = "RSVC_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The paths, if any were given; an error if only some were.
    pub fn paths(&self) -> Result<Option<rsvc_client::tls::TlsPaths>, String> {
        rsvc_client::tls::TlsPaths::from_parts(
            self.tls_ca.clone(),
            self.tls_cert.clone(),
            self.tls_key.clone(),
        )
    }

    /// The files, loaded, if any were given.
    pub fn load(&self) -> Result<Option<Arc<rsvc_client::tls::TlsFiles>>, String> {
        match self.paths()? {
            None => Ok(None),
            Some(p) => Ok(Some(
                rsvc_client::tls::TlsFiles::load(p).map_err(|e| format!("TLS: {e}"))?,
            )),
        }
    }
}

/// The engine configuration `args` describe, and where to serve metrics: the file, then the
/// environment and flags (clap has merged those two: a flag wins over its variable), with
/// `--fast-timers` as a preset under the individual timer settings.
pub fn engine_config(args: &ServeArgs) -> Result<(crate::engine::EngineConfig, Option<SocketAddr>), String> {
    let mut file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    if args.rank.is_some() {
        file.rank = args.rank;
    }
    if let Some(l) = args.listen {
        file.listen = l;
    }
    if args.advertise.is_some() {
        file.advertise = args.advertise.clone();
    }
    if let Some(d) = &args.data_dir {
        file.data_dir = d.clone();
    }
    if let Some(c) = &args.cluster {
        file.cluster = c.clone();
    }
    if args.metrics_listen.is_some() {
        file.metrics_listen = args.metrics_listen;
    }
    if let Some(p) = args.tls.paths()? {
        file.tls.ca = Some(p.ca);
        file.tls.cert = Some(p.cert);
        file.tls.key = Some(p.key);
    }
    if let Some(g) = &args.admin_group {
        file.tls.admin_group = g.clone();
    }
    if args.insecure {
        file.insecure = true;
    }
    if args.fast_timers {
        let fast = rdb::DbConfig::fast();
        file.raft.heartbeat_ms = fast.heartbeat.as_millis() as u64;
        file.raft.election_timeout_min_ms = fast.election_timeout.0.as_millis() as u64;
        file.raft.election_timeout_max_ms = fast.election_timeout.1.as_millis() as u64;
    }
    let r = &mut file.raft;
    for (flag, field) in [
        (args.heartbeat_ms, &mut r.heartbeat_ms),
        (args.election_timeout_min_ms, &mut r.election_timeout_min_ms),
        (args.election_timeout_max_ms, &mut r.election_timeout_max_ms),
        (args.append_timeout_ms, &mut r.append_timeout_ms),
    ] {
        if let Some(v) = flag {
            *field = v;
        }
    }
    let mut self_ap = None;
    let mut cfg = if args.access_points.is_empty() {
        file.engine_config()?
    } else {
        // `RANK@` names this engine itself, whose address is known only once it is bound.
        let mut aps = Vec::new();
        for a in &args.access_points {
            match a.strip_suffix('@') {
                Some(r) => self_ap = Some(r.parse::<u32>().map_err(|_| format!("bad access point {a:?}"))?),
                None => aps.push(a.clone()),
            }
        }
        file.access_points = aps;
        file.engine_config()?
    };
    if let Some(r) = self_ap {
        cfg.access_points.push((r, String::new()));
    }
    if cfg.access_points.is_empty() {
        return Err(
            "no access points: give --access-point rank@host:port (repeat for each), \
             access_points in the config file, or RSVC_ACCESS_POINTS"
                .into(),
        );
    }
    Ok((cfg, file.metrics_listen))
}

/// Starts an engine with `factories` from `args`, waits until it has joined the system, prints
/// `<name> ready rank=R addr=A metrics=M` on stdout, and runs until SIGTERM or SIGINT, when it
/// hands over leadership and stops. An engine that cannot open its data, or that the system
/// refuses (another cluster, its rank alive elsewhere), returns an error and never prints
/// `ready`.
pub async fn serve(
    name: &str,
    args: ServeArgs,
    factories: Vec<Arc<dyn ServiceFactory>>,
) -> Result<(), String> {
    let (cfg, metrics_listen) = engine_config(&args)?;
    let engine = Engine::start(cfg, factories).await.map_err(|e| e.to_string())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    // "ready" means ready: wait (as long as it takes; an operator sees why in the log) until
    // the system has taken this engine in.
    tokio::select! {
        r = engine.wait_joined() => {
            if let Err(why) = r {
                engine.shutdown().await;
                return Err(format!("the system refused this engine: {why}"));
            }
        }
        _ = term.recv() => { engine.shutdown().await; return Ok(()); }
        _ = tokio::signal::ctrl_c() => { engine.shutdown().await; return Ok(()); }
    }
    let metrics = match metrics_listen {
        Some(a) => Some(
            crate::metrics::serve(engine.clone(), a)
                .await
                .map_err(|e| format!("metrics: {e}"))?,
        ),
        None => None,
    };
    println!(
        "{name} ready rank={} addr={} metrics={}",
        engine.rank(),
        engine.addr(),
        metrics.map_or("off".to_string(), |m| m.to_string())
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: handing over leadership");
    engine.shutdown().await;
    Ok(())
}

/// Where a client command finds the system, how long it may take, and how it prints: the
/// flags every client command of every binary shares.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Access point, `rank@host:port` (repeat or comma-separate). Required, here or in
    /// `RSVC_ACCESS_POINTS`.
    #[arg(
        long = "access-point",
        short = 'a',
        env = "RSVC_ACCESS_POINTS",
        value_delimiter = ',',
        global = true
    )]
    pub access_points: Vec<String>,
    /// Give up after this long: the whole command, the leader search included. Seconds
    /// (`15`, `0.5`) or with a unit (`500ms`, `2s`).
    #[arg(long, default_value = "15", value_parser = parse_timeout, global = true)]
    pub timeout: std::time::Duration,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Mutual TLS: this client's files (its certificate names the user and groups).
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl Target {
    /// The access points, parsed.
    pub fn access_points(&self) -> Result<Vec<(u32, String)>, String> {
        if self.access_points.is_empty() {
            return Err("--access-point rank@host:port is required (or RSVC_ACCESS_POINTS)".into());
        }
        self.access_points
            .iter()
            .map(|s| crate::config::parse_access_point(s))
            .collect()
    }

    /// Client settings whose deadline is `--timeout`.
    pub fn client_config(&self) -> rsvc_client::ClientConfig {
        rsvc_client::ClientConfig {
            deadline: self.timeout,
            ..rsvc_client::ClientConfig::default()
        }
    }

    /// A connection pool with the default connect timeout, over TLS if `--tls-*` were given.
    pub fn connections(&self) -> Result<rsvc_client::Connections, String> {
        Ok(
            rsvc_client::Connections::with_connect_timeout(self.client_config().connect_timeout)
                .with_tls(self.tls.load()?),
        )
    }
}

/// Exit codes shared by every client command.
pub mod exit {
    /// The service refused: an unknown pool, a label that exists, no handle.
    pub const REFUSED: u8 = 1;
    /// Bad usage or configuration, or a request the service calls invalid.
    pub const USAGE: u8 = 2;
    /// Nothing answered within the deadline.
    pub const UNREACHABLE: u8 = 3;
    /// Out of space.
    pub const NO_SPACE: u8 = 4;
    /// What the command names does not exist: a pool, a container, an attribute, a snapshot.
    pub const NOT_FOUND: u8 = 5;
    /// The caller's principal may not do this (an ACL, or system administration without an
    /// admin certificate).
    pub const DENIED: u8 = 6;

    /// The name of an exit code in JSON errors (`"code"`).
    pub fn name(code: u8) -> &'static str {
        match code {
            0 => "ok",
            REFUSED => "refused",
            USAGE => "usage",
            UNREACHABLE => "unreachable",
            NO_SPACE => "no_space",
            NOT_FOUND => "not_found",
            DENIED => "denied",
            _ => "failed",
        }
    }
}

/// A failed client call as `(exit code, message)`. `service` gives the code of the service's
/// own errors (usually [`exit::REFUSED`]).
pub fn failure<E: std::fmt::Display + std::fmt::Debug>(
    e: rsvc_client::ClientError<E>,
    service: impl Fn(&E) -> u8,
) -> (u8, String) {
    use rsvc_client::{ClientError, WireError};
    let code = match &e {
        ClientError::Service(inner) => service(inner),
        ClientError::NotFound(_) => exit::NOT_FOUND,
        ClientError::Security(_) => exit::DENIED,
        ClientError::Wire(WireError::NoHandle | WireError::Stale) => exit::REFUSED,
        ClientError::Wire(WireError::NoSpace) => exit::NO_SPACE,
        ClientError::Wire(WireError::Invalid(_)) | ClientError::Codec(_) => exit::USAGE,
        ClientError::Deadline { .. } | ClientError::NoReplicas { .. } | ClientError::Wire(_) => {
            exit::UNREACHABLE
        }
    };
    let msg = match &e {
        // The service's own words, not its debug form.
        ClientError::Service(inner) => inner.to_string(),
        other => other.to_string(),
    };
    (code, msg)
}

/// The exit code of a management service error.
pub fn mgmt_code(e: &rsvc_client::mgmt::MgmtError) -> u8 {
    use rsvc_client::mgmt::MgmtError;
    match e {
        MgmtError::Invalid(_) => exit::USAGE,
        MgmtError::NotFound(_) => exit::NOT_FOUND,
        MgmtError::Denied(_) => exit::DENIED,
        _ => exit::REFUSED,
    }
}

/// Waits until at least `ranks` engines are `Up` in the system map, or `deadline` passes.
pub async fn wait_for_ranks(
    mgmt: &rsvc_client::RsvcClient<rsvc_client::mgmt::MgmtApi>,
    ranks: usize,
    deadline: std::time::Instant,
) -> Result<usize, (u8, String)> {
    use rsvc_client::mgmt::{MgmtRequest, MgmtResponse, RankState};
    loop {
        let up = match mgmt.call_until(&MgmtRequest::SystemMap, deadline).await {
            Ok(MgmtResponse::Map(m)) => m.iter().filter(|r| r.state == RankState::Up).count(),
            Ok(other) => return Err((exit::USAGE, format!("unexpected answer {other:?}"))),
            Err(e) if std::time::Instant::now() >= deadline => return Err(failure(e, mgmt_code)),
            Err(_) => 0,
        };
        if up >= ranks {
            return Ok(up);
        }
        if std::time::Instant::now() >= deadline {
            return Err((
                exit::UNREACHABLE,
                format!("only {up} of {ranks} engines are up after the deadline"),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// What breaks the one CLI convention in a command tree, one line per finding: a subcommand
/// or an argument without help text, or a required argument that shows a default. Each binary
/// runs it on its parser in a unit test, so that a new flag cannot slip through undocumented.
pub fn convention_findings(cmd: &clap::Command) -> Vec<String> {
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path}: argument {id} has no help text"));
            }
            if a.is_required_set() && !a.get_default_values().is_empty() {
                out.push(format!("{path}: required argument {id} shows a default"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            let here = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                out.push(format!("{here}: no help text"));
            }
            walk(sub, &here, out);
        }
    }
    let mut out = Vec::new();
    walk(cmd, cmd.get_name(), &mut out);
    out
}

/// Asserts that a binary's parser follows the convention ([`convention_findings`], and clap's
/// own `debug_assert`); each binary calls it from a unit test.
pub fn assert_convention(cmd: clap::Command) {
    cmd.clone().debug_assert();
    let findings = convention_findings(&cmd);
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

/// Parses an instance label (a pool's, a container's): 1 to 128 of `A-Z a-z 0-9 . _ -`, not
/// starting with a dot, so that a bad one is a usage error before anything is sent.
pub fn parse_label(s: &str) -> Result<String, String> {
    if crate::engine::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a label: use 1 to 128 of A-Z a-z 0-9 . _ - and do not start with a dot"
        ))
    }
}

/// Parses a timeout: seconds (`15`, `0.5`), or a number with `ms` or `s`.
pub fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (say 15, 0.5, 500ms or 2s)"))?;
    if !v.is_finite() || v <= 0.0 || v * scale > 86_400.0 {
        return Err(format!("{s:?} must be more than 0 and at most a day"));
    }
    Ok(std::time::Duration::from_secs_f64(v * scale))
}

/// Where a binary's own log lines go, and how much of them.
#[derive(Clone, Debug)]
pub enum Logging {
    /// An engine: info (the chatty transport crates at warn) to stderr, because role and term
    /// changes are what an operator reads.
    Serve,
    /// A client command: warnings and errors only, so that a healthy call prints nothing but
    /// its result.
    Command,
    /// Nothing is set up here; the command sets up its own (the demo logs to a file).
    Custom,
}

/// The filter an engine logs with unless `RUST_LOG` says otherwise.
///
/// NB: openraft's heartbeat and replication workers log a WARN for every failed attempt to
/// reach a peer, tens of lines a second for one dead engine; they stay at ERROR here, and rdb
/// logs each peer that stops or starts answering once instead.
pub const SERVE_FILTER: &str = "info,openraft=warn,openraft::core::heartbeat=error,\
     openraft::replication=error,openraft::engine::handler::replication_handler=error,\
     h2=warn,tower=warn,hyper=warn";

/// Sets up logging to stderr with `default` as the filter unless `RUST_LOG` is set. Colour
/// codes only when stderr is a terminal and `NO_COLOR` is unset, so that `serve 2>file`
/// writes plain text.
pub fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()),
        )
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Sets up logging into `file` (appending), without colour, at `RUST_LOG` or info.
pub fn init_file_logging(file: &std::path::Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(file)?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| SERVE_FILTER.into()),
        )
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(f))
        .try_init();
    Ok(())
}

/// Whether the command line asks for JSON output (`--json` before any `--`).
///
/// NB: read from the raw arguments, not the parsed ones, so that an error found while parsing
/// them (or in any command) comes out as JSON too.
pub fn json_requested() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// Prints a failed command's error: `<name>: msg` on stderr, or, with `--json`,
/// `{"error": {"code": "not_found", "exit": 5, "message": ...}}` on stdout (the exit code
/// is the same either way).
pub fn print_error(name: &str, code: u8, msg: &str) {
    if json_requested() {
        let e = serde_json::json!({ "error": { "code": exit::name(code), "exit": code, "message": msg } });
        println!("{}", serde_json::to_string_pretty(&e).unwrap_or_default());
    } else {
        eprintln!("{name}: {msg}");
    }
}

/// Parses the command line as `C`. Help and version print as clap prints them; any other
/// error is a usage error (exit 2), printed as JSON when `--json` was given.
pub fn parse_args<C: clap::Parser>(name: &str) -> Result<C, std::process::ExitCode> {
    match C::try_parse() {
        Ok(c) => Ok(c),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(e) if json_requested() => {
            // clap's first paragraph says what was wrong; the rest is usage and a hint.
            let text = e.to_string();
            let what: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            print_error(name, exit::USAGE, what.join(" ").trim_start_matches("error: "));
            Err(std::process::ExitCode::from(exit::USAGE))
        }
        Err(e) => {
            let _ = e.print();
            Err(std::process::ExitCode::from(exit::USAGE))
        }
    }
}

/// Runs a binary's async `main` on a fresh runtime with `logging` set up; an error
/// `(code, msg)` is printed by [`print_error`] and becomes the exit code.
pub fn run_main<F>(name: &str, logging: Logging, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), (u8, String)>>,
{
    match logging {
        Logging::Serve => init_logging(SERVE_FILTER),
        Logging::Command => init_logging("warn"),
        Logging::Custom => {}
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err((code, msg)) => {
            print_error(name, code, &msg);
            std::process::ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{convention_findings, engine_config, parse_timeout, ServeArgs};
    use clap::Parser;
    use std::time::Duration;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn settings(args: &[&str]) -> Result<crate::engine::EngineConfig, String> {
        let s = Serve::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        engine_config(&s.args).map(|(c, _)| c)
    }

    #[test]
    fn raft_timers_come_from_the_file_then_the_preset_then_each_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("engine.toml");
        std::fs::write(
            &file,
            "rank = 2\naccess_points = [\"1@a:1\"]\n[raft]\nheartbeat_ms = 40\nno_append_free_bytes = 123\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = settings(&["--config", f]).unwrap();
        assert_eq!(c.db.heartbeat, Duration::from_millis(40));
        // The preset replaces the timers only: the file's other settings stay.
        let c = settings(&["--config", f, "--fast-timers", "--election-timeout-max-ms", "900"]).unwrap();
        assert_eq!(c.db.heartbeat, Duration::from_millis(50));
        assert_eq!(
            c.db.election_timeout,
            (Duration::from_millis(400), Duration::from_millis(900))
        );
        assert_eq!(c.db.no_append_free_bytes, 123);
        let c = settings(&[
            "--config",
            f,
            "--append-timeout-ms",
            "700",
            "--heartbeat-ms",
            "30",
        ])
        .unwrap();
        assert_eq!(c.db.append_timeout, Duration::from_millis(700));
        assert_eq!(c.db.heartbeat, Duration::from_millis(30));
        // Timers that cannot work are refused before the engine starts.
        let e = settings(&["--config", f, "--election-timeout-min-ms", "5000"]).unwrap_err();
        assert!(e.contains("must be below"), "{e}");
        let e = settings(&["--config", f, "--heartbeat-ms", "600"]).unwrap_err();
        assert!(e.contains("at most half"), "{e}");
    }

    #[test]
    fn timeouts_take_fractions_and_units() {
        assert_eq!(parse_timeout("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("2s"), Ok(Duration::from_secs(2)));
        for bad in ["", "x", "-1", "0", "1h", "nan", "1e9"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn the_convention_check_finds_undocumented_flags_and_required_defaults() {
        use clap::{Arg, Command};
        let cmd = Command::new("x").subcommand(
            Command::new("sub").arg(Arg::new("bare").long("bare")).arg(
                Arg::new("req")
                    .long("req")
                    .help("h")
                    .required(true)
                    .default_value(""),
            ),
        );
        assert_eq!(
            convention_findings(&cmd),
            vec![
                "x sub: no help text".to_string(),
                "x sub: argument bare has no help text".to_string(),
                "x sub: required argument req shows a default".to_string(),
            ]
        );
    }
}
