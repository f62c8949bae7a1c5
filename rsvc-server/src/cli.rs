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
    /// Access point, `rank@host:port` (repeat); `RANK@` alone names this engine itself.
    #[arg(long = "access-point")]
    pub access_points: Vec<String>,
    /// Serve Prometheus metrics here.
    #[arg(long, env = "RSVC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Sub-second raft timers, for demos and tests on one machine.
    #[arg(long)]
    pub fast_timers: bool,
}

/// Starts an engine with `factories` from `args`, prints
/// `<name> ready rank=R addr=A metrics=M` on stdout, and runs until SIGTERM or SIGINT, when it
/// hands over leadership and stops.
pub async fn serve(
    name: &str,
    args: ServeArgs,
    factories: Vec<Arc<dyn ServiceFactory>>,
) -> Result<(), String> {
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
        file.advertise = args.advertise;
    }
    if let Some(d) = args.data_dir {
        file.data_dir = d;
    }
    if let Some(c) = args.cluster {
        file.cluster = c;
    }
    if args.metrics_listen.is_some() {
        file.metrics_listen = args.metrics_listen;
    }
    let mut self_ap = None;
    if !args.access_points.is_empty() {
        // `RANK@` names this engine itself, whose address is known only once it is bound.
        let mut aps = Vec::new();
        for a in args.access_points {
            match a.strip_suffix('@') {
                Some(r) => self_ap = Some(r.parse::<u32>().map_err(|_| format!("bad access point {a:?}"))?),
                None => aps.push(a),
            }
        }
        file.access_points = aps;
    }
    let mut cfg = file.engine_config()?;
    if let Some(r) = self_ap {
        cfg.access_points.push((r, String::new()));
    }
    if args.fast_timers {
        cfg.db = rdb::DbConfig::fast();
    }
    let engine = Engine::start(cfg, factories).await.map_err(|e| e.to_string())?;
    let metrics = match file.metrics_listen {
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: handing over leadership");
    engine.shutdown().await;
    Ok(())
}

/// Logging for engine binaries: `RUST_LOG`, or info with the chatty transport crates quieter,
/// to stderr.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,h2=warn,tower=warn,hyper=warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a binary's async `main` on a fresh runtime with logging set up; an error `(code, msg)`
/// is printed as `<name>: msg` and becomes the exit code.
pub fn run_main<F>(name: &str, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), (u8, String)>>,
{
    init_logging();
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
            eprintln!("{name}: {msg}");
            std::process::ExitCode::from(code)
        }
    }
}
