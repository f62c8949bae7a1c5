//! The management service: the system map and the directory of instances, itself a replicated
//! service on the access-point engines.
//!
//! LAYOUT: `/ranks` (Integer KVS: rank → RankInfo), `/instances` (Lexical KVS:
//! `class/label` → InstanceInfo), all postcard.
//!
//! CREATING AN INSTANCE follows DAOS's `dist_start`. The leader picks N engines that are up,
//! creates an empty replica on all but one, then creates the last one with the full member
//! list, which bootstraps the group. It records the instance only after all of that succeeded.
//! If any step fails, it destroys the replicas it started, so a failed create leaves nothing
//! behind.
//!
//! MODULES: `store` (the layout and its readers), `peers` (remote control of replicas on
//! other engines), `instances` (joins, create, add, remove, dictate) and `monitor` (the
//! leader task that probes engines and repairs or moves replicas).

mod instances;
mod monitor;
mod peers;
mod store;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::seq::SliceRandom;
use rdb::{int_key, DbId, KeyClass, Member, Path, Tx};
use rsvc_client::mgmt::{
    InstanceInfo, MgmtApi, MgmtError, MgmtRequest, MgmtResponse, RankInfo, RankState, MGMT_CLASS,
    MGMT_INSTANCE,
};

use crate::engine::EngineLimits;
use crate::leader_tasks::LeaderTasks;
use crate::service::{Ctx, ReplicatedService, ServiceError, StepUp};
use crate::transport::GrpcTransport;
use crate::wire::{self, pb};

use monitor::Listed;
use store::{gen_of, instances, put_instance, ranks, storage};

/// An instance in the user's words: `pool "tank"`.
fn named(class: &str, label: &str) -> String {
    format!("{class} {label:?}")
}

/// The management service of one engine. One value serves the engine's management replica;
/// the leader's monitor task shares its state.
pub struct Mgmt {
    inner: Arc<MgmtInner>,
}

/// What the service and its monitor task share.
struct MgmtInner {
    peers: Arc<GrpcTransport>,
    cluster: String,
    /// This engine, where the monitor sends its reconfiguration requests.
    me: (u32, String),
    /// Replicas on an engine down for this long are moved to a spare engine (DAOS pool
    /// auto-reconfiguration); `None` turns that off.
    reconf_after: Option<Duration>,
    /// How often the leader's monitor probes every engine.
    probe_every: Duration,
    /// Timeouts and bounds.
    limits: EngineLimits,
    /// An engine that failed its last probe and has not answered for this long is reported
    /// `Down` and gets no new replicas (two probe periods).
    down_after: Duration,
    /// When each engine last answered a health check; kept by the leader only.
    seen: Mutex<HashMap<u32, Instant>>,
    /// Engines that failed the last completed rounds of probes, with how many in a row. NB: a
    /// round can be held up by a repair or a move; an engine counts as down only if rounds saw
    /// it fail, never merely because no round ran.
    failing: Mutex<HashMap<u32, u32>>,
    /// Lost replicas whose old identity left the group but whose new one could not be added
    /// yet; retried every round. Kept by the leader only: a management failover in between
    /// leaves the instance a replica short until an operator adds one.
    pending: Mutex<Vec<Listed>>,
    /// Replicas found missing from their engine, since when; kept by the leader only (see
    /// [`lost_replicas`]).
    missing: Mutex<HashMap<Listed, Instant>>,
}

impl Mgmt {
    /// A management service on engine `me` reaching other engines through `peers`; its leader
    /// probes every engine about once per `election_max` (the engines' maximum election
    /// timeout, within `limits.probe_bounds`).
    pub fn new(
        peers: Arc<GrpcTransport>,
        cluster: impl Into<String>,
        me: (u32, String),
        reconf_after: Option<Duration>,
        election_max: Duration,
        limits: EngineLimits,
    ) -> Self {
        let probe_every = election_max.clamp(limits.probe_bounds.0, limits.probe_bounds.1);
        Mgmt {
            inner: Arc::new(MgmtInner {
                peers,
                cluster: cluster.into(),
                me,
                reconf_after,
                probe_every,
                limits,
                down_after: probe_every * 2,
                seen: Mutex::default(),
                failing: Mutex::default(),
                pending: Mutex::default(),
                missing: Mutex::default(),
            }),
        }
    }
}

#[async_trait]
impl ReplicatedService for Mgmt {
    type Api = MgmtApi;

    async fn step_up(&self, _db: &rdb::Db, _term: u64) -> Result<StepUp, ServiceError> {
        self.inner.seen.lock().expect("lock").clear();
        self.inner.missing.lock().expect("lock").clear();
        Ok(StepUp::Up)
    }

    fn leader_tasks(&self, db: &rdb::Db, term: u64, tasks: &mut LeaderTasks) {
        let mgmt = self.inner.clone();
        let db = db.clone();
        tasks.spawn("monitor", move |_| async move {
            let cfg = rsvc_client::ClientConfig {
                deadline: Duration::from_secs(5),
                ..Default::default()
            };
            let client = rsvc_client::mgmt::mgmt_client(vec![mgmt.me.clone()], mgmt.peers.clients(), cfg);
            loop {
                if let Err(e) = mgmt.monitor_round(&client, &db).await {
                    tracing::debug!(term, cause = %e, "monitor round failed");
                }
                tokio::time::sleep(mgmt.probe_every).await;
            }
        });
    }

    async fn bootstrap(&self, tx: &mut Tx) -> Result<(), ServiceError> {
        tx.create_kvs(&Path::root(), "ranks", KeyClass::Integer);
        tx.create_kvs(&Path::root(), "instances", KeyClass::Lexical);
        Ok(())
    }

    async fn handle(&self, ctx: &mut Ctx, req: MgmtRequest) -> Result<MgmtResponse, MgmtError> {
        authorize(&ctx.caller, &req)?;
        match req {
            MgmtRequest::Join {
                rank,
                addr,
                access_point,
                cluster,
                incarnation,
            } => {
                let joining = (rank, addr.as_str(), cluster.as_str(), incarnation);
                self.inner.join(ctx, joining, access_point).await
            }
            MgmtRequest::SystemMap => {
                let mut map = MgmtInner::up_ranks(&mut ctx.tx).await?;
                for r in &mut map {
                    if r.state == RankState::Up && self.inner.is_down(r.rank) {
                        r.state = RankState::Down;
                    }
                }
                Ok(MgmtResponse::Map(map))
            }
            MgmtRequest::CreateInstance {
                class,
                label,
                replicas,
            } => self.inner.create(ctx, class, label, replicas).await,
            MgmtRequest::DestroyInstance { class, label } => self.inner.destroy(ctx, &class, &label).await,
            MgmtRequest::TransferLeader {
                class,
                label,
                to_rank,
            } => self.inner.transfer_leader(ctx, &class, &label, to_rank).await,
            MgmtRequest::AddReplica { class, label, rank } => {
                self.inner.add_replica(ctx, class, label, rank).await
            }
            MgmtRequest::RemoveReplica { class, label, rank } => {
                self.inner.remove_replica(ctx, class, label, rank).await
            }
            MgmtRequest::Dictate { class, label, rank } => self.inner.dictate(ctx, class, label, rank).await,
            MgmtRequest::Locate { class, label } => MgmtInner::existing(&mut ctx.tx, &class, &label)
                .await
                .map(|(_, i)| MgmtResponse::Instance(i)),
            MgmtRequest::ListInstances { class } => MgmtInner::list(&mut ctx.tx, class.as_deref()).await,
            MgmtRequest::DescribeSelf => MgmtInner::describe_self(ctx).await,
        }
    }
}

/// Whether `caller` may make `req`: reads are open to every authenticated caller; system
/// administration needs an admin; a join needs the engine certificate of the joining rank.
/// Without TLS every caller passes (see [`crate::caller`]).
fn authorize(caller: &crate::Caller, req: &MgmtRequest) -> Result<(), MgmtError> {
    let what = match req {
        MgmtRequest::Join { rank, .. } => {
            return match caller.engine {
                _ if !caller.authenticated => Ok(()),
                Some(r) if r == *rank => Ok(()),
                _ => Err(MgmtError::Denied(format!(
                    "{caller} may not join as rank {rank}: that needs the engine certificate of rank {rank}"
                ))),
            };
        }
        MgmtRequest::SystemMap
        | MgmtRequest::Locate { .. }
        | MgmtRequest::ListInstances { .. }
        | MgmtRequest::DescribeSelf => return Ok(()),
        MgmtRequest::CreateInstance { .. } => "create an instance",
        MgmtRequest::DestroyInstance { .. } => "destroy an instance",
        MgmtRequest::TransferLeader { .. } => "transfer leadership",
        MgmtRequest::AddReplica { .. } => "add a replica",
        MgmtRequest::RemoveReplica { .. } => "remove a replica",
        MgmtRequest::Dictate { .. } => "dictate",
    };
    if caller.admin {
        Ok(())
    } else {
        Err(MgmtError::Denied(format!(
            "{caller} may not {what}: system administration needs a certificate in the admin group"
        )))
    }
}
