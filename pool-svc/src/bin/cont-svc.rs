//! `cont-svc`: container commands against a running system. Each command connects to the
//! pool, runs, and disconnects.
//!
//! Exit codes as `pool-svc`: 0 success, 1 refused (unknown pool or container, exists, busy),
//! 2 bad usage, 3 nothing reachable within the deadline, 4 out of space.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cont_svc::{ContInfo, ContRequest, ContResponse};
use pool_svc::{ContClient, PoolClient, PoolError};
use rsvc_client::mgmt::MgmtLocator;
use rsvc_client::{ClientConfig, ClientError, Connections, WireError};
use rsvc_server::config::parse_access_point;

#[derive(Parser, Debug)]
#[command(name = "cont-svc", about = "Containers of a pool on rsvc", version)]
struct Cli {
    /// Access point, `rank@host:port` (repeat or comma-separate).
    #[arg(
        long = "access-point",
        short = 'a',
        env = "RSVC_ACCESS_POINTS",
        value_delimiter = ',',
        global = true
    )]
    access_points: Vec<String>,
    /// The pool's label.
    #[arg(long, global = true, default_value = "")]
    pool: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 15, global = true)]
    timeout: u64,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Creates a container, with `name=value` properties.
    Create {
        label: String,
        #[arg(long = "prop")]
        props: Vec<String>,
    },
    /// Lists containers.
    List,
    /// Describes a container.
    Query { label: String },
    /// Destroys a container (two-phase); --force closes open handles.
    Destroy {
        label: String,
        #[arg(long)]
        force: bool,
    },
    /// Takes a snapshot and prints its epoch.
    Snapshot { label: String },
    /// Lists snapshot epochs.
    Snapshots { label: String },
    /// Allocates object ids and prints the range.
    AllocOids { label: String, count: u64 },
    /// Sets a user attribute.
    SetAttr {
        label: String,
        name: String,
        value: String,
    },
    /// Reads a user attribute.
    GetAttr { label: String, name: String },
    /// Lists user attributes.
    ListAttrs { label: String },
}

fn code_of(e: &ClientError<PoolError>) -> u8 {
    match e {
        ClientError::Service(_)
        | ClientError::NotFound(_)
        | ClientError::Wire(WireError::NoHandle | WireError::Stale) => 1,
        ClientError::Wire(WireError::NoSpace) => 4,
        ClientError::Wire(WireError::Invalid(_)) | ClientError::Codec(_) => 2,
        _ => 3,
    }
}

fn row(c: &ContInfo) -> String {
    format!(
        "{:<20} {:<11} {:>7} {:>9} {:>10}",
        c.label,
        format!("{:?}", c.state),
        c.handles,
        c.snapshots,
        c.next_oid
    )
}

async fn run(cli: Cli) -> Result<(), (u8, String)> {
    if cli.pool.is_empty() {
        return Err((2, "--pool LABEL is required".into()));
    }
    if cli.access_points.is_empty() {
        return Err((
            2,
            "--access-point rank@host:port is required (or RSVC_ACCESS_POINTS)".into(),
        ));
    }
    let aps: Vec<(u32, String)> = cli
        .access_points
        .iter()
        .map(|s| parse_access_point(s))
        .collect::<Result<_, _>>()
        .map_err(|e| (2, e))?;
    let conns = Connections::default();
    let cfg = ClientConfig {
        deadline: Duration::from_secs(cli.timeout),
        ..ClientConfig::default()
    };
    let loc = Arc::new(MgmtLocator::new(aps, conns.clone()));
    let fail = |e: ClientError<PoolError>| {
        let msg = match &e {
            ClientError::Service(inner) => inner.to_string(),
            other => other.to_string(),
        };
        (code_of(&e), msg)
    };
    let pool = PoolClient::connect(
        &cli.pool,
        loc,
        conns,
        cfg,
        "cont-svc-cli",
        Duration::from_secs(10),
    )
    .await
    .map_err(fail)?;
    let conts = ContClient::new(&pool);
    let json = cli.json;
    let out: serde_json::Value = match cli.cmd {
        Cmd::Create { label, props } => {
            let props = props
                .iter()
                .map(|p| {
                    p.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| (2, format!("--prop {p:?} is not name=value")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            conts.create(&label, props).await.map_err(fail)?;
            serde_json::json!({ "created": label })
        }
        Cmd::List => {
            let l = conts.list().await.map_err(fail)?;
            if !json {
                println!(
                    "{:<20} {:<11} {:>7} {:>9} {:>10}",
                    "LABEL", "STATE", "HANDLES", "SNAPSHOTS", "NEXT OID"
                );
                l.iter().for_each(|c| println!("{}", row(c)));
            }
            serde_json::to_value(&l).map_err(|e| (2, e.to_string()))?
        }
        Cmd::Query { label } => {
            let c = conts.query(&label).await.map_err(fail)?;
            if !json {
                println!(
                    "{:<20} {:<11} {:>7} {:>9} {:>10}",
                    "LABEL", "STATE", "HANDLES", "SNAPSHOTS", "NEXT OID"
                );
                println!("{}", row(&c));
            }
            serde_json::to_value(&c).map_err(|e| (2, e.to_string()))?
        }
        Cmd::Destroy { label, force } => {
            conts.destroy(&label, force).await.map_err(fail)?;
            serde_json::json!({ "destroyed": label })
        }
        Cmd::Snapshot { label } => {
            let h = conts.open(&label).await.map_err(fail)?;
            let e = conts.snapshot(h).await.map_err(fail)?;
            conts.close(h).await.map_err(fail)?;
            serde_json::json!({ "container": label, "epoch": e })
        }
        Cmd::Snapshots { label } => match pool
            .cont(ContRequest::SnapList { label: label.clone() })
            .await
            .map_err(fail)?
        {
            ContResponse::Epochs(es) => serde_json::json!({ "container": label, "epochs": es }),
            other => return Err((2, format!("unexpected answer {other:?}"))),
        },
        Cmd::AllocOids { label, count } => {
            let h = conts.open(&label).await.map_err(fail)?;
            let (start, count) = conts.alloc_oids(h, count).await.map_err(fail)?;
            conts.close(h).await.map_err(fail)?;
            serde_json::json!({ "container": label, "start": start, "count": count })
        }
        Cmd::SetAttr { label, name, value } => {
            pool.cont(ContRequest::AttrSet {
                label: label.clone(),
                name: name.clone(),
                value: value.into_bytes(),
            })
            .await
            .map_err(fail)?;
            serde_json::json!({ "container": label, "set": name })
        }
        Cmd::GetAttr { label, name } => match pool
            .cont(ContRequest::AttrGet {
                label,
                name: name.clone(),
            })
            .await
            .map_err(fail)?
        {
            ContResponse::Attr(Some(v)) => {
                serde_json::json!({ "name": name, "value": String::from_utf8_lossy(&v) })
            }
            ContResponse::Attr(None) => return Err((1, format!("no attribute {name:?}"))),
            other => return Err((2, format!("unexpected answer {other:?}"))),
        },
        Cmd::ListAttrs { label } => match pool.cont(ContRequest::AttrList { label }).await.map_err(fail)? {
            ContResponse::Names(n) => serde_json::json!(n),
            other => return Err((2, format!("unexpected answer {other:?}"))),
        },
    };
    let _ = pool.disconnect().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else if !matches!(out, serde_json::Value::Array(_)) && out.get("label").is_none() {
        println!("{out}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    rsvc_server::cli::run_main("cont-svc", run(cli))
}
