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

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rsvc_client::mgmt::{mgmt_client, MgmtLocator, MgmtRequest, MgmtResponse};
use rsvc_client::{ClientConfig, Connections, RsvcClient};
use rsvc_server::cli::ServeArgs;
use rsvc_server::config::parse_access_point;
use rsvc_server::counter::{Counter, CounterApi, CounterRequest, CounterResponse};
use rsvc_server::{FnFactory, ServiceFactory};

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
    Serve(ServeArgs),
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
        Cmd::Serve(args) => {
            let factories: Vec<Arc<dyn ServiceFactory>> = vec![Arc::new(FnFactory::new(|_: &str| Counter))];
            rsvc_server::cli::serve("rsvc-engine", args, factories).await
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
    rsvc_server::cli::run_main("rsvc-engine", async { run(cli).await.map_err(|e| (2, e)) })
}
