//! `pool-svc`: run engines hosting the management and pool services, make their TLS
//! certificates (`pool-svc certs`), administer pools, and watch a failover (`pool-svc demo`).
//!
//! Exit codes: 0 success, 1 the service refused (exists, no handle, ...), 2 bad usage or
//! configuration, 3 nothing reachable within the deadline, 4 out of space, 5 no such pool,
//! container, attribute or snapshot. With `--json`, errors print as JSON on stdout too.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pool_svc::client::pool_code;
use pool_svc::{PoolApi, PoolClient, PoolError, PoolRequest, PoolResponse};
use rsvc_client::mgmt::{mgmt_client, MgmtApi, MgmtError, MgmtLocator, MgmtRequest, MgmtResponse};
use rsvc_client::{ClientError, Connections, RsvcClient};
use rsvc_server::cli::{exit, failure, mgmt_code, parse_label, Logging, ServeArgs, Target};
use serde::Serialize;

mod certs;
mod demo;

#[derive(Parser, Debug)]
#[command(name = "pool-svc", about = "DAOS-style pool service on rsvc", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs an engine hosting the management, pool and container services.
    Serve(Box<ServeArgs>),
    /// Makes a development CA and mutual TLS certificates for engines and clients in one step.
    ///
    /// Writes ca.crt and ca.key into --out (unless both exist: then they sign, so that an
    /// engine or a user can be added later), engine-<RANK>.crt and .key per rank, and
    /// <USER>.crt and .key per user. For development and tests: the CA's key stays on disk,
    /// and nothing can be revoked.
    Certs(certs::CertsArgs),
    /// System-wide views.
    System {
        #[command(subcommand)]
        cmd: SystemCmd,
    },
    /// Pool administration.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Replica management of a pool.
    Replicas {
        #[command(subcommand)]
        cmd: ReplicaCmd,
    },
    /// Starts a local 3-engine system, creates a pool, kills its leader under load, and shows
    /// the client riding over the failover.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand, Debug)]
enum SystemCmd {
    /// Ranks, addresses, states, and which instances each hosts.
    Status {
        #[command(flatten)]
        t: Target,
    },
    /// Waits until N engines are up in the system map (for scripts that start engines).
    Wait {
        #[command(flatten)]
        t: Target,
        /// How many engines.
        #[arg(long)]
        ranks: usize,
    },
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    /// Creates a pool with N service replicas.
    Create {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
        /// How many service replicas, on distinct engines.
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Lists pools.
    List {
        #[command(flatten)]
        t: Target,
    },
    /// Describes a pool: replicas, leader, term, handles, containers.
    Query {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
    },
    /// Destroys a pool and its containers.
    Destroy {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
    },
    /// Connects (opens a handle), prints it, and disconnects.
    Connect {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
    },
    /// Sets a user attribute.
    SetAttr {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
        /// The attribute's name.
        name: String,
        /// Its value.
        value: String,
    },
    /// Reads a user attribute.
    GetAttr {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
        /// The attribute's name.
        name: String,
    },
    /// Hands leadership of a pool's service to another replica (the most caught-up one, or
    /// `--to`), without an election timeout.
    TransferLeader {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
        /// The rank to hand it to (default: the most caught-up replica).
        #[arg(long)]
        to: Option<u32>,
    },
    /// Evicts every handle of a pool.
    Evict {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
    },
    /// Shows who may use a pool: its owner, owner group and ACL.
    GetAcl {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
    },
    /// Changes who may use a pool (needs its owner or an admin). Open handles are checked
    /// again at once: one that lost read is closed, one that lost write keeps read.
    SetAcl {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
        #[command(flatten)]
        access: AccessArgs,
    },
}

/// Who may use a pool. Without TLS nobody is authenticated and these are not enforced.
#[derive(clap::Args, Debug, Clone)]
struct AccessArgs {
    /// The pool's owner: a user, as a client certificate's CN names it (default: none, so only admins may change who may use it).
    #[arg(long)]
    owner: Option<String>,
    /// The pool's owner group, as a client certificate's O names it (default: admin).
    #[arg(long)]
    group: Option<String>,
    /// The whole ACL, DAOS syntax, entries separated by commas: `A::OWNER@:rw,A:G:GROUP@:r,
    /// A::alice@:rw,A:G:staff@:r,A::EVERYONE@:r` (default: `A::OWNER@:rw,A:G:GROUP@:rw`).
    #[arg(long, value_parser = parse_acl)]
    acl: Option<String>,
}

impl AccessArgs {
    /// The properties to set, in order.
    fn props(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(o) = &self.owner {
            out.push((pool_svc::access::OWNER_PROP, o.clone()));
        }
        if let Some(g) = &self.group {
            out.push((pool_svc::access::GROUP_PROP, g.clone()));
        }
        if let Some(a) = &self.acl {
            out.push((pool_svc::access::ACL_PROP, a.clone()));
        }
        out
    }
}

/// Checks an ACL before anything is sent, and gives it back in its normal form.
fn parse_acl(s: &str) -> Result<String, String> {
    s.parse::<rsvc_server::acl::Acl>().map(|a| a.to_string())
}

#[derive(Subcommand, Debug)]
enum ReplicaCmd {
    /// Adds a replica on a rank.
    Add {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
        /// The engine's rank.
        #[arg(long)]
        rank: u32,
    },
    /// Removes the replica on a rank.
    Remove {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
        /// The engine's rank.
        #[arg(long)]
        rank: u32,
    },
    /// DANGEROUS catastrophic recovery, for a pool whose quorum of replicas is lost for good:
    /// one surviving replica becomes the only one and leads, and the survivors left out are
    /// destroyed. Writes that the survivor never received are lost. Refused while a quorum of
    /// the replicas answers or one of them leads. Add replicas afterwards with `replicas add`.
    Dictate {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
        /// The survivor's rank (default: the surviving replica with the longest log).
        #[arg(long)]
        rank: Option<u32>,
        /// Required: says that you accept losing acknowledged writes.
        #[arg(long, required = true)]
        confirm_data_loss: bool,
    },
    /// What each replica reports of itself: role, term, leader, indexes and how far it lags
    /// the leader, file sizes, free space, and a storage error that stopped it. Asks each
    /// engine directly, so it works while the pool has no leader.
    Status {
        #[command(flatten)]
        t: Target,
        /// The pool's label (`--pool` works too, as in cont-svc).
        #[arg(long, visible_alias = "pool", value_parser = parse_label)]
        label: String,
        /// Only the replica on this rank.
        #[arg(long)]
        rank: Option<u32>,
    },
}

/// A failure with the exit code it maps to.
struct Fail(u8, String);

impl From<ClientError<MgmtError>> for Fail {
    fn from(e: ClientError<MgmtError>) -> Self {
        let (c, m) = failure(e, mgmt_code);
        Fail(c, m)
    }
}

impl From<ClientError<PoolError>> for Fail {
    fn from(e: ClientError<PoolError>) -> Self {
        let (c, m) = failure(e, pool_code);
        Fail(c, m)
    }
}

impl From<(u8, String)> for Fail {
    fn from((c, m): (u8, String)) -> Self {
        Fail(c, m)
    }
}

fn usage(e: String) -> Fail {
    Fail(exit::USAGE, e)
}

fn mgmt(t: &Target) -> Result<RsvcClient<MgmtApi>, Fail> {
    Ok(mgmt_client(
        t.access_points().map_err(usage)?,
        t.connections().map_err(usage)?,
        t.client_config(),
    ))
}

/// Sets pool properties one by one (each a replicated transaction).
async fn set_props(t: &Target, label: &str, props: Vec<(&'static str, String)>) -> Result<(), Fail> {
    if props.is_empty() {
        return Ok(());
    }
    let rpc = pool_rpc(t, label)?;
    for (name, value) in props {
        rpc.call(&PoolRequest::PropSet {
            name: name.into(),
            value,
        })
        .await?;
    }
    Ok(())
}

fn pool_rpc(t: &Target, label: &str) -> Result<RsvcClient<PoolApi>, Fail> {
    let conns = t.connections().map_err(usage)?;
    let loc = Arc::new(MgmtLocator::new(t.access_points().map_err(usage)?, conns.clone()));
    Ok(RsvcClient::new(label, loc, conns, t.client_config()))
}

fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    );
}

/// An instance as JSON (the 128-bit database id as hex: JSON numbers stop at 64 bits).
fn instance_json(i: &rsvc_client::mgmt::InstanceInfo) -> serde_json::Value {
    serde_json::json!({
        "class": i.class,
        "label": i.label,
        "db": format!("{:032x}", i.db),
        "replicas": i.replicas.iter().map(|(r, a)| serde_json::json!({ "rank": r, "addr": a })).collect::<Vec<_>>(),
        "generations": i.gens.iter().map(|(r, g)| serde_json::json!({ "rank": r, "gen": g })).collect::<Vec<_>>(),
    })
}

/// Who leads an instance, and in which term: the newest hint any replica gives to a probe.
async fn leader_of(conns: &Connections, i: &rsvc_client::mgmt::InstanceInfo) -> Option<(u32, u64)> {
    use rsvc_client::wire::{hint_of, pb};
    let mut best: Option<(u32, u64)> = None;
    for (_, addr) in &i.replicas {
        let Ok(mut c) = conns.get(addr) else { continue };
        let req = pb::CallRequest {
            class: i.class.clone(),
            instance: i.label.clone(),
            probe: true,
            ..Default::default()
        };
        let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(2), c.call(req)).await else {
            continue;
        };
        if let Some(h) = hint_of(reply.into_inner().hint.as_ref()) {
            if best.is_none_or(|(_, t)| h.hint.term > t) {
                best = Some((h.hint.rank, h.hint.term));
            }
        }
    }
    best
}

/// One replica of a pool as an engine reports it (or fails to).
struct ReplicaRow {
    rank: u32,
    addr: String,
    /// Its own report; `Ok(None)`: the engine answered but hosts no such replica (lost).
    status: Result<Option<rsvc_client::ReplicaStatus>, String>,
}

impl ReplicaRow {
    /// `up`, `stopped` (a storage error), `missing` (the engine lost it) or `down`.
    fn state(&self) -> &'static str {
        match &self.status {
            Ok(Some(s)) if s.stopped.is_some() => "stopped",
            Ok(Some(_)) => "up",
            Ok(None) => "missing",
            Err(_) => "down",
        }
    }

    /// How many entries it has yet to apply to catch up with the leader's applied index.
    fn lag(&self, leader_applied: Option<u64>) -> Option<u64> {
        let s = self.status.as_ref().ok()?.as_ref()?;
        leader_applied.map(|l| l.saturating_sub(s.applied_index.unwrap_or(0)))
    }

    /// Its JSON form: rank, address, state and lag, then its report's fields. The same shape
    /// wherever a command lists a pool's replicas.
    fn json(&self, leader_applied: Option<u64>) -> serde_json::Value {
        let mut v = match &self.status {
            Ok(Some(s)) => serde_json::to_value(s).unwrap_or_default(),
            Ok(None) => serde_json::json!({ "rank": self.rank }),
            Err(e) => serde_json::json!({ "rank": self.rank, "error": e }),
        };
        v["addr"] = serde_json::json!(self.addr);
        v["state"] = serde_json::json!(self.state());
        v["lag"] = serde_json::json!(self.lag(leader_applied));
        v
    }
}

/// Asks each engine hosting a replica of pool `label` (only `only`, if given) for its
/// replica's report, directly: this works while the pool has no leader.
async fn replica_rows(t: &Target, label: &str, only: Option<u32>) -> Result<Vec<ReplicaRow>, Fail> {
    let MgmtResponse::Instance(info) = mgmt(t)?
        .call(&MgmtRequest::Locate {
            class: "pool".into(),
            label: label.to_string(),
        })
        .await?
    else {
        return Err(Fail(exit::USAGE, "unexpected answer".into()));
    };
    let targets: Vec<&(u32, String)> = info
        .replicas
        .iter()
        .filter(|(r, _)| only.is_none_or(|o| o == *r))
        .collect();
    if targets.is_empty() {
        return Err(Fail(
            exit::NOT_FOUND,
            format!(
                "rank {} hosts no replica of pool {label:?}",
                only.unwrap_or_default()
            ),
        ));
    }
    // All at once: a paused engine costs the command one timeout, not one each.
    let conns = t.connections().map_err(usage)?;
    let asks = targets.into_iter().map(|(rank, addr)| {
        let conns = &conns;
        async move {
            let status = rsvc_client::replica_status(conns, addr, Some("pool"), Some(label), t.timeout)
                .await
                .map(|v| v.into_iter().next());
            ReplicaRow {
                rank: *rank,
                addr: addr.clone(),
                status,
            }
        }
    });
    Ok(futures::future::join_all(asks).await)
}

/// The applied index of the replica that serves as leader, if one answered.
fn leader_applied(rows: &[ReplicaRow]) -> Option<u64> {
    rows.iter()
        .filter_map(|r| r.status.as_ref().ok()?.as_ref())
        .filter(|s| s.serving)
        .filter_map(|s| s.applied_index)
        .max()
}

/// `replicas status`: each replica's own report, with its lag behind the leader's applied
/// index. An engine that does not answer is listed as such, not an error.
async fn replica_status(t: Target, label: String, only: Option<u32>) -> Result<(), Fail> {
    let rows = replica_rows(&t, &label, only).await?;
    let applied = leader_applied(&rows);
    if t.json {
        print_json(&rows.iter().map(|r| r.json(applied)).collect::<Vec<_>>());
        return Ok(());
    }
    println!(
        "{:<5} {:<4} {:<9} {:>6} {:>6} {:>9} {:>9} {:>6} {:>10} {:>12} STATE",
        "RANK", "GEN", "ROLE", "TERM", "LEADER", "APPLIED", "LAST LOG", "LAG", "LOG BYTES", "FREE"
    );
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |x| x.to_string());
    for r in &rows {
        match &r.status {
            Ok(Some(s)) => println!(
                "{:<5} {:<4} {:<9} {:>6} {:>6} {:>9} {:>9} {:>6} {:>10} {:>12} {}",
                s.rank,
                s.gen,
                if s.serving { "leader*" } else { s.role.as_str() },
                s.term,
                opt(s.leader.map(u64::from)),
                opt(s.applied_index),
                opt(s.last_log_index),
                opt(r.lag(applied)),
                s.log_bytes,
                opt(s.free_bytes),
                s.stopped
                    .as_deref()
                    .map_or("up".to_string(), |w| format!("stopped: {w}")),
            ),
            Ok(None) => println!(
                "{:<5} the engine hosts no replica of pool {label} (lost?)",
                r.rank
            ),
            Err(e) => println!("{:<5} down: {e}", r.rank),
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn run(cli: Cli) -> Result<(), Fail> {
    match cli.cmd {
        Cmd::Serve(args) => rsvc_server::cli::serve("pool-svc", *args, pool_svc::factories())
            .await
            .map_err(usage),
        Cmd::Demo(args) => demo::run(args).await.map_err(|e| Fail(1, e)),
        Cmd::Certs(args) => certs::run(args).map_err(usage),
        Cmd::System {
            cmd: SystemCmd::Wait { t, ranks },
        } => {
            let up =
                rsvc_server::cli::wait_for_ranks(&mgmt(&t)?, ranks, std::time::Instant::now() + t.timeout)
                    .await?;
            if t.json {
                print_json(&serde_json::json!({ "up": up }));
            } else {
                println!("{up} engines are up");
            }
            Ok(())
        }
        Cmd::System {
            cmd: SystemCmd::Status { t },
        } => {
            let m = mgmt(&t)?;
            let MgmtResponse::Map(ranks) = m.call(&MgmtRequest::SystemMap).await? else {
                return Err(Fail(2, "unexpected answer".into()));
            };
            let MgmtResponse::Instances(mut insts) =
                m.call(&MgmtRequest::ListInstances { class: None }).await?
            else {
                return Err(Fail(2, "unexpected answer".into()));
            };
            // The management service first: it is an instance too, with replicas and a leader.
            let MgmtResponse::Instance(me) = m.call(&MgmtRequest::DescribeSelf).await? else {
                return Err(Fail(2, "unexpected answer".into()));
            };
            insts.insert(0, me);
            let mut leaders = Vec::new();
            let conns = t.connections().map_err(usage)?;
            for i in &insts {
                leaders.push(leader_of(&conns, i).await);
            }
            if t.json {
                let insts: Vec<_> = insts
                    .iter()
                    .zip(&leaders)
                    .map(|(i, l)| {
                        let mut v = instance_json(i);
                        v["leader"] = serde_json::json!(l.map(|(r, _)| r));
                        v["term"] = serde_json::json!(l.map(|(_, t)| t));
                        v
                    })
                    .collect();
                print_json(&serde_json::json!({ "ranks": ranks, "instances": insts }));
                return Ok(());
            }
            println!("{:<6} {:<22} {:<9} INSTANCES", "RANK", "ADDRESS", "STATE");
            for r in &ranks {
                let hosted: Vec<String> = insts
                    .iter()
                    .filter(|i| i.replicas.iter().any(|(x, _)| *x == r.rank))
                    .map(|i| format!("{}/{}", i.class, i.label))
                    .collect();
                println!(
                    "{:<6} {:<22} {:<9} {}",
                    r.rank,
                    r.addr,
                    format!("{:?}", r.state),
                    hosted.join(" ")
                );
            }
            Ok(())
        }
        Cmd::Pool { cmd } => pool_cmd(cmd).await,
        Cmd::Replicas {
            cmd: ReplicaCmd::Status { t, label, rank },
        } => replica_status(t, label, rank).await,
        Cmd::Replicas {
            cmd: ReplicaCmd::Dictate { t, label, rank, .. },
        } => {
            let req = MgmtRequest::Dictate {
                class: "pool".into(),
                label,
                rank,
            };
            let MgmtResponse::Dictated { instance, rank, term } = mgmt(&t)?.call(&req).await? else {
                return Err(Fail(exit::USAGE, "unexpected answer".into()));
            };
            if t.json {
                let mut v = instance_json(&instance);
                v["rank"] = rank.into();
                v["term"] = term.into();
                print_json(&v);
            } else {
                println!(
                    "pool {}: the replica on rank {rank} is now the only one, and leads in term {term}; add replicas with `replicas add`",
                    instance.label
                );
            }
            Ok(())
        }
        Cmd::Replicas { cmd } => {
            let (t, req) = match cmd {
                ReplicaCmd::Add { t, label, rank } => (
                    t,
                    MgmtRequest::AddReplica {
                        class: "pool".into(),
                        label,
                        rank,
                    },
                ),
                ReplicaCmd::Remove { t, label, rank } => (
                    t,
                    MgmtRequest::RemoveReplica {
                        class: "pool".into(),
                        label,
                        rank,
                    },
                ),
                ReplicaCmd::Status { .. } | ReplicaCmd::Dictate { .. } => unreachable!("matched above"),
            };
            let r = mgmt(&t)?.call(&req).await?;
            if let (true, MgmtResponse::Instance(i)) = (t.json, &r) {
                print_json(&instance_json(i));
            } else if let MgmtResponse::Instance(i) = r {
                let ranks: Vec<String> = i.replicas.iter().map(|(r, _)| r.to_string()).collect();
                println!("pool {} now has replicas on ranks {}", i.label, ranks.join(","));
            }
            Ok(())
        }
    }
}

async fn pool_cmd(cmd: PoolCmd) -> Result<(), Fail> {
    match cmd {
        PoolCmd::Create {
            t,
            label,
            replicas,
            access,
        } => {
            let r = mgmt(&t)?
                .call(&MgmtRequest::CreateInstance {
                    class: "pool".into(),
                    label: label.clone(),
                    replicas,
                })
                .await?;
            // NB: not atomic with the create; until these land, the default ACL (no owner,
            // group admin) keeps everyone else out.
            set_props(&t, &label, access.props()).await?;
            if let (true, MgmtResponse::Instance(i)) = (t.json, &r) {
                print_json(&instance_json(i));
            } else if let MgmtResponse::Instance(i) = r {
                let ranks: Vec<String> = i.replicas.iter().map(|(r, a)| format!("{r}@{a}")).collect();
                println!("created pool {} with replicas on {}", i.label, ranks.join(" "));
            }
            Ok(())
        }
        PoolCmd::List { t } => {
            let MgmtResponse::Instances(is) = mgmt(&t)?
                .call(&MgmtRequest::ListInstances {
                    class: Some("pool".into()),
                })
                .await?
            else {
                return Err(Fail(2, "unexpected answer".into()));
            };
            if t.json {
                print_json(&is.iter().map(instance_json).collect::<Vec<_>>());
                return Ok(());
            }
            println!("{:<20} REPLICAS", "LABEL");
            for i in is {
                let ranks: Vec<String> = i.replicas.iter().map(|(r, _)| r.to_string()).collect();
                println!("{:<20} {}", i.label, ranks.join(","));
            }
            Ok(())
        }
        PoolCmd::Query { t, label } => {
            let PoolResponse::Info(i) = pool_rpc(&t, &label)?.call(&PoolRequest::Query).await? else {
                return Err(Fail(2, "unexpected answer".into()));
            };
            // Each replica's state, as its engine reports it (the leader's view of the group
            // says nothing about a replica that is down or behind).
            let rows = replica_rows(&t, &label, None).await?;
            let applied = leader_applied(&rows);
            if t.json {
                let mut v = serde_json::to_value(&i).unwrap_or_default();
                v["replicas"] = serde_json::json!(rows.iter().map(|r| r.json(applied)).collect::<Vec<_>>());
                print_json(&v);
                return Ok(());
            }
            let reps: Vec<String> = rows
                .iter()
                .map(|r| match (r.state(), r.lag(applied)) {
                    ("up", Some(0)) => format!("{} up", r.rank),
                    ("up", Some(n)) => format!("{} up, {n} behind", r.rank),
                    (state, _) => format!("{} {state}", r.rank),
                })
                .collect();
            println!("label        {}", i.label);
            println!("replicas     {}", reps.join("; "));
            println!("leader       rank {} (term {})", i.leader, i.term);
            println!("handles      {}", i.handles);
            println!("containers   {}", i.containers);
            println!("map version  {}", i.map_version);
            Ok(())
        }
        PoolCmd::Destroy { t, label } => {
            mgmt(&t)?
                .call(&MgmtRequest::DestroyInstance {
                    class: "pool".into(),
                    label: label.clone(),
                })
                .await?;
            if t.json {
                print_json(&serde_json::json!({ "destroyed": label }));
            } else {
                println!("destroyed pool {label}");
            }
            Ok(())
        }
        PoolCmd::Connect { t, label } => {
            let conns = t.connections().map_err(usage)?;
            let loc = Arc::new(MgmtLocator::new(t.access_points().map_err(usage)?, conns.clone()));
            let p = PoolClient::connect(
                &label,
                loc,
                conns,
                t.client_config(),
                "pool-svc-cli",
                Duration::from_secs(10),
            )
            .await?;
            let h = hex(&p.handle());
            p.disconnect().await?;
            if t.json {
                print_json(&serde_json::json!({ "pool": label, "handle": h, "disconnected": true }));
            } else {
                println!("connected to pool {label} with handle {h}, then disconnected");
            }
            Ok(())
        }
        PoolCmd::SetAttr {
            t,
            label,
            name,
            value,
        } => {
            pool_rpc(&t, &label)?
                .call(&PoolRequest::AttrSet {
                    name: name.clone(),
                    value: value.into_bytes(),
                })
                .await?;
            if t.json {
                print_json(&serde_json::json!({ "pool": label, "set": name }));
            } else {
                println!("set attribute {name:?} of pool {label}");
            }
            Ok(())
        }
        PoolCmd::GetAttr { t, label, name } => {
            let PoolResponse::Attr(v) = pool_rpc(&t, &label)?
                .call(&PoolRequest::AttrGet { name: name.clone() })
                .await?
            else {
                return Err(Fail(2, "unexpected answer".into()));
            };
            match v {
                Some(v) if t.json => {
                    print_json(&serde_json::json!({ "name": name, "value": String::from_utf8_lossy(&v) }))
                }
                Some(v) => println!("{}", String::from_utf8_lossy(&v)),
                None => {
                    return Err(Fail(
                        exit::NOT_FOUND,
                        format!("pool {label:?} has no attribute {name:?}"),
                    ))
                }
            }
            Ok(())
        }
        PoolCmd::TransferLeader { t, label, to } => {
            let req = MgmtRequest::TransferLeader {
                class: "pool".into(),
                label: label.clone(),
                to_rank: to,
            };
            let m = mgmt(&t)?;
            let MgmtResponse::Leader(r) = m.call(&req).await? else {
                return Err(Fail(2, "unexpected answer".into()));
            };
            // The term the new leader serves in, as the replicas' hints tell it.
            let term = match m
                .call(&MgmtRequest::Locate {
                    class: "pool".into(),
                    label: label.clone(),
                })
                .await?
            {
                MgmtResponse::Instance(i) => leader_of(&t.connections().map_err(usage)?, &i)
                    .await
                    .filter(|(l, _)| *l == r)
                    .map(|(_, t)| t),
                _ => None,
            };
            if t.json {
                print_json(&serde_json::json!({ "pool": label, "leader": r, "term": term }));
            } else {
                let term = term.map(|t| format!(" in term {t}")).unwrap_or_default();
                println!("pool {label} is led by rank {r}{term}");
            }
            Ok(())
        }
        PoolCmd::GetAcl { t, label } => {
            let PoolResponse::Props(props) = pool_rpc(&t, &label)?.call(&PoolRequest::PropGet).await? else {
                return Err(Fail(2, "unexpected answer".into()));
            };
            let get = |n: &str| {
                props
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let (owner, group) = (
                get(pool_svc::access::OWNER_PROP),
                get(pool_svc::access::GROUP_PROP),
            );
            let acl: rsvc_server::acl::Acl = get(pool_svc::access::ACL_PROP).parse().unwrap_or_default();
            if t.json {
                let entries: Vec<String> = acl.entries().iter().map(|e| e.to_string()).collect();
                print_json(
                    &serde_json::json!({ "pool": label, "owner": owner, "owner_group": group, "acl": entries }),
                );
            } else {
                println!("# owner: {owner}\n# owner group: {group}\n{acl:#}");
            }
            Ok(())
        }
        PoolCmd::SetAcl { t, label, access } => {
            let props = access.props();
            if props.is_empty() {
                return Err(Fail(
                    exit::USAGE,
                    "nothing to set: give --acl, --owner or --group".into(),
                ));
            }
            set_props(&t, &label, props).await?;
            if t.json {
                print_json(&serde_json::json!({ "pool": label, "set": true }));
            } else {
                println!("updated who may use pool {label}");
            }
            Ok(())
        }
        PoolCmd::Evict { t, label } => {
            let PoolResponse::Evicted(n) = pool_rpc(&t, &label)?.call(&PoolRequest::Evict).await? else {
                return Err(Fail(2, "unexpected answer".into()));
            };
            if t.json {
                print_json(&serde_json::json!({ "evicted": n }));
            } else {
                println!("evicted {n} handle(s)");
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli: Cli = match rsvc_server::cli::parse_args("pool-svc") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let logging = match cli.cmd {
        Cmd::Serve(_) => Logging::Serve,
        // The demo tells its own story on stdout and logs into its directory.
        Cmd::Demo(_) => Logging::Custom,
        _ => Logging::Command,
    };
    rsvc_server::cli::run_main("pool-svc", logging, async {
        run(cli).await.map_err(|Fail(c, m)| (c, m))
    })
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
