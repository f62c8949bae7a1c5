//! `rsvc-engine`: an engine hosting the management service and the example counter service,
//! plus the client commands to drive it.
//!
//! ```sh
//! rsvc-engine serve --rank 1 --listen 127.0.0.1:7001 --data-dir /tmp/r1 --access-point 1@127.0.0.1:7001
//! rsvc-engine create --access-point 1@127.0.0.1:7001 --label hits --replicas 3
//! rsvc-engine add    --access-point 1@127.0.0.1:7001 --label hits page 1
//! rsvc-engine get    --access-point 1@127.0.0.1:7001 --label hits page
//! rsvc-engine status --access-point 1@127.0.0.1:7001
//! ```
//!
//! Settings come from `--config FILE` (TOML), then `RSVC_*` environment variables, then flags;
//! the later wins.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rsvc_client::mgmt::{mgmt_client, MgmtLocator, MgmtRequest, MgmtResponse};
use rsvc_client::{ClientConfig, Connections, RsvcClient};
use rsvc_server::config::{parse_access_point, FileConfig};
use rsvc_server::counter::{Counter, CounterApi, CounterRequest, CounterResponse};
use rsvc_server::{Engine, FnFactory, ServiceFactory};

#[derive(Parser, Debug)]
#[command(name = "rsvc-engine", about = "rsvc engine and client commands", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug)]
struct ClientArgs {
    /// Access point, `rank@host:port` (repeat for each).
    #[arg(long = "access-point", required = true)]
    access_points: Vec<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs an engine until SIGTERM or SIGINT, then hands over leadership and stops.
    Serve {
        /// TOML configuration file; flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// This engine's rank.
        #[arg(long, env = "RSVC_RANK")]
        rank: Option<u32>,
        /// Listen address (port 0: any free port).
        #[arg(long, env = "RSVC_LISTEN")]
        listen: Option<SocketAddr>,
        /// Address peers and clients dial.
        #[arg(long, env = "RSVC_ADVERTISE")]
        advertise: Option<String>,
        /// Data directory.
        #[arg(long, env = "RSVC_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// System name.
        #[arg(long, env = "RSVC_CLUSTER")]
        cluster: Option<String>,
        /// Access point, `rank@host:port`; use `RANK@` alone for this engine itself.
        #[arg(long = "access-point")]
        access_points: Vec<String>,
        /// Serve Prometheus metrics here.
        #[arg(long, env = "RSVC_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Sub-second raft timers, for demos and tests on one machine.
        #[arg(long)]
        fast_timers: bool,
    },
    /// Creates a counter instance.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        label: String,
        #[arg(long, default_value_t = 3)]
        replicas: u32,
    },
    /// Adds to a counter and prints the new value.
    Add {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        label: String,
        name: String,
        #[arg(allow_negative_numbers = true)]
        delta: i64,
    },
    /// Prints a counter.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        label: String,
        name: String,
    },
    /// Prints the system map and the instances.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn access_points(list: &[String]) -> Result<Vec<(u32, String)>, String> {
    list.iter().map(|s| parse_access_point(s)).collect()
}

async fn serve(
    config: Option<PathBuf>,
    overrides: FileConfig,
    access_points: Vec<String>,
    fast_timers: bool,
) -> Result<(), String> {
    let mut file = match &config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let defaults = FileConfig::default();
    if overrides.rank.is_some() {
        file.rank = overrides.rank;
    }
    if overrides.listen != defaults.listen {
        file.listen = overrides.listen;
    }
    if overrides.advertise.is_some() {
        file.advertise = overrides.advertise;
    }
    if overrides.data_dir != defaults.data_dir {
        file.data_dir = overrides.data_dir;
    }
    if overrides.cluster != defaults.cluster {
        file.cluster = overrides.cluster;
    }
    if overrides.metrics_listen.is_some() {
        file.metrics_listen = overrides.metrics_listen;
    }
    let mut self_ap = None;
    if !access_points.is_empty() {
        // `RANK@` names this engine itself, whose address is known only once it is bound.
        let mut aps = Vec::new();
        for a in access_points {
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
    if fast_timers {
        cfg.db = rdb::DbConfig::fast();
    }
    let factories: Vec<Arc<dyn ServiceFactory>> = vec![Arc::new(FnFactory::new(|_: &str| Counter))];
    let engine = Engine::start(cfg, factories).await.map_err(|e| e.to_string())?;
    let metrics = match file.metrics_listen {
        Some(a) => Some(
            rsvc_server::metrics::serve(engine.clone(), a)
                .await
                .map_err(|e| format!("metrics: {e}"))?,
        ),
        None => None,
    };
    println!(
        "rsvc-engine ready rank={} addr={} metrics={}",
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

fn counter_client(c: &ClientArgs, label: &str) -> Result<RsvcClient<CounterApi>, String> {
    let aps = access_points(&c.access_points)?;
    let conns = Connections::default();
    let cfg = ClientConfig {
        deadline: Duration::from_secs(c.timeout),
        ..ClientConfig::default()
    };
    Ok(RsvcClient::new(
        label,
        Arc::new(MgmtLocator::new(aps, conns.clone())),
        conns,
        cfg,
    ))
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Serve {
            config,
            rank,
            listen,
            advertise,
            data_dir,
            cluster,
            access_points,
            metrics_listen,
            fast_timers,
        } => {
            let d = FileConfig::default();
            let overrides = FileConfig {
                rank,
                listen: listen.unwrap_or(d.listen),
                advertise,
                data_dir: data_dir.unwrap_or(d.data_dir),
                cluster: cluster.unwrap_or(d.cluster),
                metrics_listen,
                ..FileConfig::default()
            };
            serve(config, overrides, access_points, fast_timers).await
        }
        Cmd::Create {
            client,
            label,
            replicas,
        } => {
            let aps = access_points(&client.access_points)?;
            let cfg = ClientConfig {
                deadline: Duration::from_secs(client.timeout),
                ..ClientConfig::default()
            };
            let m = mgmt_client(aps, Connections::default(), cfg);
            let req = MgmtRequest::CreateInstance {
                class: "counter".into(),
                label,
                replicas,
            };
            match m.call(&req).await.map_err(|e| e.to_string())? {
                MgmtResponse::Instance(i) => {
                    let ranks: Vec<String> = i.replicas.iter().map(|(r, a)| format!("{r}@{a}")).collect();
                    println!("created counter/{} on {}", i.label, ranks.join(" "));
                    Ok(())
                }
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        Cmd::Add {
            client,
            label,
            name,
            delta,
        } => {
            let c = counter_client(&client, &label)?;
            match c
                .call(&CounterRequest::Add { name, delta })
                .await
                .map_err(|e| e.to_string())?
            {
                CounterResponse::Value(v) => {
                    let (rank, term) = c.cached_leader().unwrap_or((0, 0));
                    println!("{v}\t(leader rank {rank}, term {term})");
                    Ok(())
                }
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        Cmd::Get { client, label, name } => {
            let c = counter_client(&client, &label)?;
            match c
                .call(&CounterRequest::Get { name })
                .await
                .map_err(|e| e.to_string())?
            {
                CounterResponse::Value(v) => {
                    println!("{v}");
                    Ok(())
                }
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        Cmd::Status { client } => {
            let aps = access_points(&client.access_points)?;
            let cfg = ClientConfig {
                deadline: Duration::from_secs(client.timeout),
                ..ClientConfig::default()
            };
            let m = mgmt_client(aps, Connections::default(), cfg);
            let MgmtResponse::Map(ranks) =
                m.call(&MgmtRequest::SystemMap).await.map_err(|e| e.to_string())?
            else {
                return Err("unexpected answer".into());
            };
            println!("{:<6} {:<24} STATE", "RANK", "ADDRESS");
            for r in ranks {
                println!("{:<6} {:<24} {:?}", r.rank, r.addr, r.state);
            }
            if let MgmtResponse::Instances(is) = m
                .call(&MgmtRequest::ListInstances { class: None })
                .await
                .map_err(|e| e.to_string())?
            {
                println!("\n{:<10} {:<16} REPLICAS", "CLASS", "LABEL");
                for i in is {
                    let ranks: Vec<String> = i.replicas.iter().map(|(r, _)| r.to_string()).collect();
                    println!("{:<10} {:<16} {}", i.class, i.label, ranks.join(","));
                }
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,h2=warn,tower=warn,hyper=warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rsvc-engine: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rsvc-engine: {e}");
            ExitCode::from(2)
        }
    }
}
