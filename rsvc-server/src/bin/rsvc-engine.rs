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

use clap::{Parser, Subcommand};
use rsvc_client::mgmt::{mgmt_client, MgmtLocator, MgmtRequest, MgmtResponse};
use rsvc_client::RsvcClient;
use rsvc_server::cli::{exit, failure, mgmt_code, Logging, ServeArgs, Target};
use rsvc_server::counter::{Counter, CounterApi, CounterError, CounterRequest, CounterResponse};
use rsvc_server::{FnFactory, ServiceFactory};

#[derive(Parser, Debug)]
#[command(name = "rsvc-engine", about = "rsvc engine and client commands", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs an engine until SIGTERM or SIGINT, then hands over leadership and stops.
    Serve(Box<ServeArgs>),
    /// Waits until N engines are up in the system map.
    Wait {
        #[command(flatten)]
        t: Target,
        /// How many engines.
        #[arg(long)]
        ranks: usize,
    },
    /// Creates a counter instance.
    Create {
        #[command(flatten)]
        t: Target,
        /// The instance's label.
        #[arg(long)]
        label: String,
        /// How many replicas, on distinct engines.
        #[arg(long, default_value_t = 3)]
        replicas: u32,
    },
    /// Adds to a counter and prints the new value.
    Add {
        #[command(flatten)]
        t: Target,
        /// The instance's label.
        #[arg(long)]
        label: String,
        /// The counter's name.
        name: String,
        /// What to add (may be negative).
        #[arg(allow_negative_numbers = true)]
        delta: i64,
    },
    /// Prints a counter.
    Get {
        #[command(flatten)]
        t: Target,
        /// The instance's label.
        #[arg(long)]
        label: String,
        /// The counter's name.
        name: String,
    },
    /// Prints the rank that leads an instance.
    Leader {
        #[command(flatten)]
        t: Target,
        /// The instance's label.
        #[arg(long)]
        label: String,
    },
    /// Prints the system map and the instances.
    Status {
        #[command(flatten)]
        t: Target,
    },
}

type Fail = (u8, String);

fn counter_client(t: &Target, label: &str) -> Result<RsvcClient<CounterApi>, Fail> {
    let aps = t.access_points().map_err(|e| (exit::USAGE, e))?;
    let conns = t.connections().map_err(|e| (exit::USAGE, e))?;
    Ok(RsvcClient::new(
        label,
        Arc::new(MgmtLocator::new(aps, conns.clone())),
        conns,
        t.client_config(),
    ))
}

fn mgmt(t: &Target) -> Result<RsvcClient<rsvc_client::mgmt::MgmtApi>, Fail> {
    let aps = t.access_points().map_err(|e| (exit::USAGE, e))?;
    Ok(mgmt_client(
        aps,
        t.connections().map_err(|e| (exit::USAGE, e))?,
        t.client_config(),
    ))
}

fn counter_fail(e: rsvc_client::ClientError<CounterError>) -> Fail {
    failure(e, |_| exit::REFUSED)
}

fn unexpected<T: std::fmt::Debug>(other: T) -> Fail {
    (exit::USAGE, format!("unexpected answer {other:?}"))
}

async fn run(cli: Cli) -> Result<(), Fail> {
    match cli.cmd {
        Cmd::Serve(args) => {
            let factories: Vec<Arc<dyn ServiceFactory>> = vec![Arc::new(FnFactory::new(|_: &str| Counter))];
            rsvc_server::cli::serve("rsvc-engine", *args, factories)
                .await
                .map_err(|e| (exit::USAGE, e))
        }
        Cmd::Wait { t, ranks } => {
            let up =
                rsvc_server::cli::wait_for_ranks(&mgmt(&t)?, ranks, std::time::Instant::now() + t.timeout)
                    .await?;
            println!("{up} engines are up");
            Ok(())
        }
        Cmd::Create { t, label, replicas } => {
            let req = MgmtRequest::CreateInstance {
                class: "counter".into(),
                label,
                replicas,
            };
            match mgmt(&t)?.call(&req).await.map_err(|e| failure(e, mgmt_code))? {
                MgmtResponse::Instance(i) => {
                    let ranks: Vec<String> = i.replicas.iter().map(|(r, a)| format!("{r}@{a}")).collect();
                    println!("created counter/{} on {}", i.label, ranks.join(" "));
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        Cmd::Add {
            t,
            label,
            name,
            delta,
        } => {
            let c = counter_client(&t, &label)?;
            match c
                .call(&CounterRequest::Add { name, delta })
                .await
                .map_err(counter_fail)?
            {
                CounterResponse::Value(v) => {
                    let (rank, term) = c.cached_leader().unwrap_or((0, 0));
                    println!("{v}\t(leader rank {rank}, term {term})");
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        Cmd::Get { t, label, name } => {
            let c = counter_client(&t, &label)?;
            match c
                .call(&CounterRequest::Get { name })
                .await
                .map_err(counter_fail)?
            {
                CounterResponse::Value(v) => {
                    println!("{v}");
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        Cmd::Leader { t, label } => {
            let (rank, term) = counter_client(&t, &label)?
                .locate_leader()
                .await
                .map_err(counter_fail)?;
            if t.json {
                println!("{{\"leader\": {rank}, \"term\": {term}}}");
            } else {
                println!("{rank}");
            }
            Ok(())
        }
        Cmd::Status { t } => {
            let m = mgmt(&t)?;
            let MgmtResponse::Map(ranks) = m
                .call(&MgmtRequest::SystemMap)
                .await
                .map_err(|e| failure(e, mgmt_code))?
            else {
                return Err((exit::USAGE, "unexpected answer".into()));
            };
            println!("{:<6} {:<24} STATE", "RANK", "ADDRESS");
            for r in ranks {
                println!("{:<6} {:<24} {:?}", r.rank, r.addr, r.state);
            }
            if let MgmtResponse::Instances(is) = m
                .call(&MgmtRequest::ListInstances { class: None })
                .await
                .map_err(|e| failure(e, mgmt_code))?
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
    let cli: Cli = match rsvc_server::cli::parse_args("rsvc-engine") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let logging = match cli.cmd {
        Cmd::Serve(_) => Logging::Serve,
        _ => Logging::Command,
    };
    rsvc_server::cli::run_main("rsvc-engine", logging, run(cli))
}

#[cfg(test)]
mod convention {
    use clap::CommandFactory;

    /// Every flag and subcommand has help text, and no required flag shows a default.
    #[test]
    fn the_cli_follows_the_convention() {
        rsvc_server::cli::assert_convention(super::Cli::command());
    }
}
