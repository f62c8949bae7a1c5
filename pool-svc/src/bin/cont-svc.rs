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
use pool_svc::client::pool_code;
use pool_svc::{ContClient, PoolClient, PoolError};
use rsvc_client::mgmt::MgmtLocator;
use rsvc_client::ClientError;
use rsvc_server::cli::{exit, failure, parse_label, Logging, Target};

#[derive(Parser, Debug)]
#[command(name = "cont-svc", about = "Containers of a pool on rsvc", version)]
struct Cli {
    /// The pool's label.
    #[arg(long, global = true, value_parser = parse_label)]
    pool: Option<String>,
    #[command(flatten)]
    t: Target,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Creates a container, with `name=value` properties.
    Create {
        /// The container's label.
        #[arg(value_parser = parse_label)]
        label: String,
        /// A property, `name=value` (repeat).
        #[arg(long = "prop", value_parser = parse_prop)]
        props: Vec<(String, String)>,
    },
    /// Lists containers.
    List,
    /// Describes a container.
    Query {
        /// The container's label.
        label: String,
    },
    /// Destroys a container (two-phase); --force closes open handles.
    Destroy {
        /// The container's label.
        label: String,
        /// Close the container's open handles first.
        #[arg(long)]
        force: bool,
    },
    /// Takes a snapshot and prints its epoch.
    Snapshot {
        /// The container's label.
        label: String,
    },
    /// Lists snapshot epochs.
    Snapshots {
        /// The container's label.
        label: String,
    },
    /// Allocates object ids and prints the range.
    AllocOids {
        /// The container's label.
        label: String,
        /// How many ids (at least 1).
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        count: u64,
    },
    /// Sets a user attribute.
    SetAttr {
        /// The container's label.
        label: String,
        /// The attribute's name.
        name: String,
        /// Its value.
        value: String,
    },
    /// Reads a user attribute.
    GetAttr {
        /// The container's label.
        label: String,
        /// The attribute's name.
        name: String,
    },
    /// Lists user attributes.
    ListAttrs {
        /// The container's label.
        label: String,
    },
}

/// Parses `name=value`.
fn parse_prop(p: &str) -> Result<(String, String), String> {
    match p.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{p:?} is not name=value")),
    }
}

type Fail = (u8, String);

fn fail(e: ClientError<PoolError>) -> Fail {
    failure(e, pool_code)
}

const HEADER: &str = "LABEL                STATE       HANDLES SNAPSHOTS   NEXT OID";

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

/// A container as JSON: its fields, with the uuid as 32 hex digits, as pool handles print.
fn cont_json(c: &ContInfo) -> serde_json::Value {
    let mut v = serde_json::to_value(c).unwrap_or_default();
    v["uuid"] = serde_json::json!(c.uuid.iter().map(|b| format!("{b:02x}")).collect::<String>());
    v
}

/// What a command prints: JSON for `--json`, and its text form.
struct Out {
    json: serde_json::Value,
    text: String,
}

fn out(json: serde_json::Value, text: impl Into<String>) -> Out {
    Out {
        json,
        text: text.into(),
    }
}

/// Runs a command that needs a container handle, and closes the handle whatever happened.
async fn with_open<T>(
    conts: &ContClient<'_>,
    label: &str,
    f: impl AsyncFnOnce(cont_svc::api::Handle) -> Result<T, ClientError<PoolError>>,
) -> Result<T, Fail> {
    let h = conts.open(label).await.map_err(fail)?;
    let res = f(h).await;
    let closed = conts.close(h).await;
    let v = res.map_err(fail)?;
    closed.map_err(fail)?;
    Ok(v)
}

async fn command(pool: &PoolClient, cmd: Cmd) -> Result<Out, Fail> {
    let conts = ContClient::new(pool);
    let unexpected = |other: ContResponse| (exit::USAGE, format!("unexpected answer {other:?}"));
    Ok(match cmd {
        Cmd::Create { label, props } => {
            conts.create(&label, props).await.map_err(fail)?;
            out(
                serde_json::json!({ "created": label }),
                format!("created container {label}"),
            )
        }
        Cmd::List => {
            let l = conts.list().await.map_err(fail)?;
            let mut text = HEADER.to_string();
            for c in &l {
                text.push('\n');
                text.push_str(&row(c));
            }
            out(
                serde_json::json!(l.iter().map(cont_json).collect::<Vec<_>>()),
                text,
            )
        }
        Cmd::Query { label } => {
            let c = conts.query(&label).await.map_err(fail)?;
            let text = format!("{HEADER}\n{}", row(&c));
            out(cont_json(&c), text)
        }
        Cmd::Destroy { label, force } => {
            conts.destroy(&label, force).await.map_err(fail)?;
            out(
                serde_json::json!({ "destroyed": label }),
                format!("destroyed container {label}"),
            )
        }
        Cmd::Snapshot { label } => {
            let e = with_open(&conts, &label, async |h| conts.snapshot(h).await).await?;
            out(
                serde_json::json!({ "container": label, "epoch": e }),
                format!("snapshot of {label} at epoch {e}"),
            )
        }
        Cmd::Snapshots { label } => match pool
            .cont(ContRequest::SnapList { label: label.clone() })
            .await
            .map_err(fail)?
        {
            ContResponse::Epochs(es) => {
                let text = es.iter().map(u64::to_string).collect::<Vec<_>>().join("\n");
                out(serde_json::json!({ "container": label, "epochs": es }), text)
            }
            other => return Err(unexpected(other)),
        },
        Cmd::AllocOids { label, count } => {
            let (start, count) =
                with_open(&conts, &label, async |h| conts.alloc_oids(h, count).await).await?;
            out(
                serde_json::json!({ "container": label, "start": start, "count": count }),
                format!("object ids {start}..{} of {label}", start + count),
            )
        }
        Cmd::SetAttr { label, name, value } => {
            pool.cont(ContRequest::AttrSet {
                label: label.clone(),
                name: name.clone(),
                value: value.into_bytes(),
            })
            .await
            .map_err(fail)?;
            out(
                serde_json::json!({ "container": label, "set": name }),
                format!("set attribute {name:?} of container {label}"),
            )
        }
        Cmd::GetAttr { label, name } => match pool
            .cont(ContRequest::AttrGet {
                label: label.clone(),
                name: name.clone(),
            })
            .await
            .map_err(fail)?
        {
            ContResponse::Attr(Some(v)) => {
                let v = String::from_utf8_lossy(&v).into_owned();
                out(serde_json::json!({ "name": name, "value": v }), v)
            }
            ContResponse::Attr(None) => {
                return Err((
                    exit::NOT_FOUND,
                    format!("container {label} has no attribute {name:?}"),
                ))
            }
            other => return Err(unexpected(other)),
        },
        Cmd::ListAttrs { label } => match pool.cont(ContRequest::AttrList { label }).await.map_err(fail)? {
            ContResponse::Names(n) => out(serde_json::json!(n), n.join("\n")),
            other => return Err(unexpected(other)),
        },
    })
}

async fn run(cli: Cli) -> Result<(), Fail> {
    // Every argument is checked before anything is opened.
    let Some(label) = cli.pool.clone() else {
        return Err((exit::USAGE, "--pool LABEL is required".into()));
    };
    let aps = cli.t.access_points().map_err(|e| (exit::USAGE, e))?;
    let conns = cli.t.connections().map_err(|e| (exit::USAGE, e))?;
    let loc = Arc::new(MgmtLocator::new(aps, conns.clone()));
    let pool = PoolClient::connect(
        &label,
        loc,
        conns,
        cli.t.client_config(),
        "cont-svc-cli",
        Duration::from_secs(10),
    )
    .await
    .map_err(fail)?;
    // NB: the pool handle is closed on every path, or each failed command would leave one
    // behind until its lease ran out.
    let res = command(&pool, cli.cmd).await;
    if let Err(e) = pool.disconnect().await {
        tracing::warn!(cause = %e, "could not close the pool handle; its lease will expire");
    }
    let o = res?;
    if cli.t.json {
        println!("{}", serde_json::to_string_pretty(&o.json).unwrap_or_default());
    } else if !o.text.is_empty() {
        println!("{}", o.text);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli: Cli = match rsvc_server::cli::parse_args("cont-svc") {
        Ok(c) => c,
        Err(code) => return code,
    };
    rsvc_server::cli::run_main("cont-svc", Logging::Command, run(cli))
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
