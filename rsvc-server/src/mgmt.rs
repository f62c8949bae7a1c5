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

use crate::leader_tasks::LeaderTasks;
use crate::service::{Ctx, ReplicatedService, ServiceError, StepUp};
use crate::transport::GrpcTransport;
use crate::wire::{self, pb};

/// Pause between rounds of asking an instance's replicas which one leads.
const CHANGE_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

fn ranks() -> Path {
    Path::root().child("ranks")
}

fn instances() -> Path {
    Path::root().child("instances")
}

/// An instance in the user's words: `pool "tank"`.
fn named(class: &str, label: &str) -> String {
    format!("{class} {label:?}")
}

/// How long the leader waits for a joining engine to answer `Identify`.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(2);

fn storage(e: impl std::fmt::Display) -> MgmtError {
    MgmtError::Storage(e.to_string())
}

/// How often the management leader health-checks every engine: its maximum election timeout,
/// within these bounds, so that `system status` shows a dead engine `Down` about as soon as
/// its groups have replaced it.
const PROBE_BOUNDS: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(1));

/// The management service of one engine. One value serves the engine's management replica;
/// the leader's monitor task shares its state.
pub struct Mgmt {
    inner: Arc<MgmtInner>,
}

/// What the service and its monitor task share.
pub struct MgmtInner {
    peers: Arc<GrpcTransport>,
    cluster: String,
    /// This engine, where the monitor sends its reconfiguration requests.
    me: (u32, String),
    /// Replicas on an engine down for this long are moved to a spare engine (DAOS pool
    /// auto-reconfiguration); `None` turns that off.
    reconf_after: Option<Duration>,
    /// How often the leader's monitor probes every engine.
    probe_every: Duration,
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

/// A replica as the directory lists it: class, instance, rank, generation.
type Listed = (String, String, u32, u32);

/// How long a listed replica must be missing from its (answering) engine before the monitor
/// re-creates it: a moment's absence could be an add or a remove in progress.
const LOST_AFTER: Duration = Duration::from_secs(2);

impl std::ops::Deref for Mgmt {
    type Target = MgmtInner;
    fn deref(&self) -> &MgmtInner {
        &self.inner
    }
}

impl Mgmt {
    /// A management service on engine `me` reaching other engines through `peers`; its leader
    /// probes every engine about once per `election_max` (the engines' maximum election
    /// timeout, bounded to 200 ms..1 s).
    pub fn new(
        peers: Arc<GrpcTransport>,
        cluster: impl Into<String>,
        me: (u32, String),
        reconf_after: Option<Duration>,
        election_max: Duration,
    ) -> Self {
        let probe_every = election_max.clamp(PROBE_BOUNDS.0, PROBE_BOUNDS.1);
        Mgmt {
            inner: Arc::new(MgmtInner {
                peers,
                cluster: cluster.into(),
                me,
                reconf_after,
                probe_every,
                down_after: probe_every * 2,
                seen: Mutex::default(),
                failing: Mutex::default(),
                pending: Mutex::default(),
                missing: Mutex::default(),
            }),
        }
    }
}

impl MgmtInner {
    /// Whether `rank` has missed its health checks for too long.
    fn is_down(&self, rank: u32) -> bool {
        self.seen
            .lock()
            .expect("lock")
            .get(&rank)
            .is_some_and(|t| t.elapsed() > self.down_after)
            && self.failed_rounds(rank) >= 2
    }

    /// How many completed probe rounds in a row `rank` failed.
    fn failed_rounds(&self, rank: u32) -> u32 {
        self.failing
            .lock()
            .expect("lock")
            .get(&rank)
            .copied()
            .unwrap_or(0)
    }

    /// One round of the leader's monitor: ask every engine who it is and what it hosts (the
    /// health check), re-create replicas that engines which answered have lost, then move the
    /// replicas of engines down for longer than `reconf_after`.
    async fn monitor_round(
        &self,
        client: &rsvc_client::RsvcClient<MgmtApi>,
        db: &rdb::Db,
    ) -> Result<(), String> {
        let MgmtResponse::Map(ranks) = client
            .call(&MgmtRequest::SystemMap)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Err("unexpected answer".into());
        };
        let checks = ranks.iter().map(|r| async move {
            let reply = tokio::time::timeout(self.probe_every, self.identify(&r.addr)).await;
            // Only the engine of that rank and cluster counts as an answer.
            let hosted = match reply {
                Ok(Ok(me)) if me.rank == r.rank && me.cluster == self.cluster => Some(
                    me.hosted
                        .into_iter()
                        .map(|h| (h.class, h.instance, h.gen))
                        .collect::<HashSet<_>>(),
                ),
                _ => None,
            };
            (r.rank, hosted)
        });
        let results = futures::future::join_all(checks).await;
        {
            let mut seen = self.seen.lock().expect("lock");
            let now = Instant::now();
            for (rank, hosted) in &results {
                // First sight counts as seen, so an engine gets the full grace period.
                if hosted.is_some() || !seen.contains_key(rank) {
                    seen.insert(*rank, now);
                }
            }
            let mut failing = self.failing.lock().expect("lock");
            for (rank, hosted) in &results {
                if hosted.is_some() {
                    failing.remove(rank);
                } else {
                    *failing.entry(*rank).or_default() += 1;
                }
            }
        }
        let hosted: HashMap<u32, HashSet<(String, String, u32)>> =
            results.into_iter().filter_map(|(r, h)| Some((r, h?))).collect();
        let MgmtResponse::Instances(instances) = client
            .call(&MgmtRequest::ListInstances { class: None })
            .await
            .map_err(|e| e.to_string())?
        else {
            return Err("unexpected answer".into());
        };
        self.repair_lost(client, db, &ranks, &instances, &hosted).await;
        let Some(after) = self.reconf_after else {
            return Ok(());
        };
        for i in instances {
            for (dead, _) in &i.replicas {
                let gone = self.failed_rounds(*dead) >= 2
                    && self
                        .seen
                        .lock()
                        .expect("lock")
                        .get(dead)
                        .is_some_and(|t| t.elapsed() > after);
                if !gone {
                    continue;
                }
                let spare = ranks.iter().find(|r| {
                    r.state == RankState::Up
                        && !self.is_down(r.rank)
                        && !i.replicas.iter().any(|(x, _)| *x == r.rank)
                });
                let Some(spare) = spare else {
                    tracing::warn!(class = %i.class, label = %i.label, rank = dead, "replica's engine is down and no spare engine is up");
                    continue;
                };
                tracing::info!(class = %i.class, label = %i.label, from = dead, to = spare.rank, "auto-reconfiguration: moving a replica off a dead engine");
                let rm = MgmtRequest::RemoveReplica {
                    class: i.class.clone(),
                    label: i.label.clone(),
                    rank: *dead,
                };
                client.call(&rm).await.map_err(|e| e.to_string())?;
                let add = MgmtRequest::AddReplica {
                    class: i.class.clone(),
                    label: i.label.clone(),
                    rank: spare.rank,
                };
                client.call(&add).await.map_err(|e| e.to_string())?;
                break; // one change per instance per round; the next round sees the new list
            }
        }
        Ok(())
    }

    /// Re-creates, under a new generation, the replicas that engines which answered no longer
    /// host (Restate's storage id, DAOS's replica generation): a wiped data directory, or a
    /// replica directory that was deleted. The old identity leaves the group first, so the
    /// lost replica can never vote again; the new one joins as a learner, catches up from the
    /// leader, and becomes a voter.
    ///
    /// NB: a replica counts as lost only once it was missing for [`LOST_AFTER`] in every round,
    /// so that an add or a remove in progress (the engine and the directory briefly disagree)
    /// is not mistaken for a loss.
    async fn repair_lost(
        &self,
        client: &rsvc_client::RsvcClient<MgmtApi>,
        db: &rdb::Db,
        ranks: &[RankInfo],
        instances: &[InstanceInfo],
        hosted: &HashMap<u32, HashSet<(String, String, u32)>>,
    ) {
        // Second steps left over from earlier rounds first.
        let pending = std::mem::take(&mut *self.pending.lock().expect("lock"));
        for l in pending {
            self.add_back(client, db, ranks, &l).await;
        }
        // NB: a group of one replica that lost it has nothing to copy from: the instance is
        // gone, and only an operator can destroy it.
        let mut listed: Vec<Listed> = instances
            .iter()
            .filter(|i| i.replicas.len() > 1)
            .flat_map(|i| {
                i.replicas.iter().map(|(rank, _)| {
                    let gen = i.gens.iter().find(|(r, _)| r == rank).map_or(1, |(_, g)| *g);
                    (i.class.clone(), i.label.clone(), *rank, gen)
                })
            })
            .collect();
        // The management service's own replicas, from its membership.
        let me = db.ident().replica;
        listed.extend(
            db.status()
                .voters
                .iter()
                .filter(|v| **v != me)
                .map(|v| (MGMT_CLASS.to_string(), MGMT_INSTANCE.to_string(), v.rank, v.gen)),
        );
        for (rank, class, label, gen) in stray_replicas(instances, hosted) {
            let Some(r) = ranks.iter().find(|r| r.rank == rank) else {
                continue;
            };
            match self.stop_on(&r.addr, &class, &label).await {
                Ok(()) => {
                    tracing::warn!(%class, %label, rank, gen, "destroyed a stray replica: its group no longer has it (a dictate, or a removal while its engine was down)")
                }
                Err(e) => {
                    tracing::warn!(%class, %label, rank, cause = %e, "could not destroy a stray replica")
                }
            }
        }
        let lost = {
            let mut missing = self.missing.lock().expect("lock");
            lost_replicas(&listed, hosted, &mut missing, Instant::now())
        };
        for l in lost {
            let (class, label, rank, gen) = &l;
            tracing::warn!(%class, %label, rank, gen, "replica lost by its engine (wiped data?); re-creating it under a new generation");
            // The old identity leaves the group first, so that it can never vote again.
            let removed = if class == MGMT_CLASS {
                db.remove_replica(rdb::ReplicaId::new(*rank, *gen))
                    .await
                    .map_err(|e| e.to_string())
            } else {
                let rm = MgmtRequest::RemoveReplica {
                    class: class.clone(),
                    label: label.clone(),
                    rank: *rank,
                };
                client.call(&rm).await.map(|_| ()).map_err(|e| e.to_string())
            };
            match removed {
                Ok(()) => {
                    self.missing.lock().expect("lock").remove(&l);
                    self.add_back(client, db, ranks, &l).await;
                }
                Err(e) => {
                    tracing::warn!(%class, %label, rank, cause = %e, "could not remove a lost replica's identity yet");
                    // Back off: judge it anew from now.
                    self.missing
                        .lock()
                        .expect("lock")
                        .insert(l.clone(), Instant::now());
                }
            }
        }
    }

    /// The second step of a repair: a replica of the next generation on the same rank. If it
    /// fails, it stays pending and the next round tries again.
    async fn add_back(
        &self,
        client: &rsvc_client::RsvcClient<MgmtApi>,
        db: &rdb::Db,
        ranks: &[RankInfo],
        l: &Listed,
    ) {
        let (class, label, rank, gen) = l;
        let res = if class == MGMT_CLASS {
            self.add_mgmt(db, ranks, *rank, gen + 1).await
        } else {
            let add = MgmtRequest::AddReplica {
                class: class.clone(),
                label: label.clone(),
                rank: *rank,
            };
            match client.call(&add).await {
                Ok(_) => Ok(()),
                // Destroyed meanwhile, or re-added by someone else: nothing left to do.
                Err(rsvc_client::ClientError::Service(MgmtError::NotFound(_))) => Ok(()),
                Err(rsvc_client::ClientError::Service(MgmtError::Invalid(m)))
                    if m.contains("already hosts") =>
                {
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        };
        match res {
            Ok(()) => tracing::info!(%class, %label, rank, old_gen = gen, "re-created a lost replica"),
            Err(e) => {
                tracing::warn!(%class, %label, rank, cause = %e, "could not add a lost replica back yet; trying again");
                self.pending.lock().expect("lock").push(l.clone());
            }
        }
    }

    /// Adds a management replica of generation `gen` on `rank` (gone from the group under its
    /// old generation), unless the rank has one already.
    async fn add_mgmt(&self, db: &rdb::Db, ranks: &[RankInfo], rank: u32, gen: u32) -> Result<(), String> {
        if db.status().voters.iter().any(|v| v.rank == rank) {
            return Ok(());
        }
        let addr = ranks
            .iter()
            .find(|r| r.rank == rank)
            .map(|r| r.addr.clone())
            .ok_or_else(|| format!("rank {rank} is not in the system map"))?;
        let member = self
            .start_on(&addr, MGMT_CLASS, MGMT_INSTANCE, db.ident().db, gen, &[])
            .await?;
        db.add_replica(member).await.map_err(|e| e.to_string())
    }

    async fn start_on(
        &self,
        addr: &str,
        class: &str,
        label: &str,
        db: DbId,
        gen: u32,
        bootstrap: &[Member],
    ) -> Result<Member, String> {
        let mut peer = self.peers.peer(addr)?;
        let req = pb::StartReplicaRequest {
            cluster: self.cluster.clone(),
            class: class.to_string(),
            instance: label.to_string(),
            db: db.0.to_be_bytes().to_vec(),
            gen,
            bootstrap: bootstrap.iter().map(wire::member_to).collect(),
        };
        let reply = peer
            .start_replica(req)
            .await
            .map_err(|s| format!("{addr}: {}", s.message()))?;
        let m = reply.into_inner().member.ok_or("no member in reply")?;
        wire::member_from(&m)
    }

    async fn stop_on(&self, addr: &str, class: &str, label: &str) -> Result<(), String> {
        let mut peer = self.peers.peer(addr)?;
        let req = pb::StopReplicaRequest {
            cluster: self.cluster.clone(),
            class: class.to_string(),
            instance: label.to_string(),
            destroy: true,
        };
        match peer.stop_replica(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(format!("{addr}: {}", s.message())),
        }
    }

    async fn up_ranks(tx: &mut Tx) -> Result<Vec<RankInfo>, MgmtError> {
        let all = tx.iterate(&ranks(), .., usize::MAX).await.map_err(storage)?;
        let mut out = Vec::new();
        for (_, v) in all {
            if let rdb::Value::Bytes(b) = v {
                out.push(postcard::from_bytes::<RankInfo>(&b).map_err(storage)?);
            }
        }
        Ok(out)
    }

    /// The instance `class/label` and its directory key; `NotFound` if there is none.
    async fn existing(tx: &mut Tx, class: &str, label: &str) -> Result<(String, InstanceInfo), MgmtError> {
        let key = format!("{class}/{label}");
        let info = Self::instance(tx, &key)
            .await?
            .ok_or_else(|| MgmtError::NotFound(named(class, label)))?;
        Ok((key, info))
    }

    /// Asks the engine at `addr` who it is.
    async fn identify(&self, addr: &str) -> Result<pb::IdentifyReply, String> {
        let mut peer = self.peers.peer(addr)?;
        match tokio::time::timeout(IDENTIFY_TIMEOUT, peer.identify(pb::IdentifyRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!("{addr}: {}", s.message())),
            Err(_) => Err(format!("{addr}: no answer within {IDENTIFY_TIMEOUT:?}")),
        }
    }

    /// Admits engine `rank` joining from `addr` only if it is of this cluster, reachable at
    /// `addr` as itself, and not a second engine of a rank whose engine is alive elsewhere.
    async fn check_join(
        &self,
        tx: &mut Tx,
        rank: u32,
        addr: &str,
        cluster: &str,
        incarnation: u64,
    ) -> Result<(), MgmtError> {
        if cluster != self.cluster {
            return Err(MgmtError::JoinRefused(format!(
                "engine rank {rank} is of cluster {cluster:?}, this system is {:?}",
                self.cluster
            )));
        }
        let me = self
            .identify(addr)
            .await
            .map_err(|e| MgmtError::Unreachable(format!("rank {rank} at its advertised address {e}")))?;
        if me.rank != rank || me.incarnation != incarnation {
            return Err(MgmtError::JoinRefused(format!(
                "another engine (rank {}) answers at {addr}, the address rank {rank} advertises",
                me.rank
            )));
        }
        let old = Self::up_ranks(tx).await?.into_iter().find(|r| r.rank == rank);
        if let Some(old) = old.filter(|o| o.addr != addr) {
            if let Ok(them) = self.identify(&old.addr).await {
                if them.rank == rank && them.cluster == self.cluster && them.incarnation != incarnation {
                    return Err(MgmtError::JoinRefused(format!(
                        "rank {rank} is alive at {}; a second engine of that rank cannot join from {addr}",
                        old.addr
                    )));
                }
            }
        }
        Ok(())
    }

    async fn instance(tx: &mut Tx, key: &str) -> Result<Option<InstanceInfo>, MgmtError> {
        match tx.lookup(&instances(), key.as_bytes()).await.map_err(storage)? {
            Some(b) => Ok(Some(postcard::from_bytes(&b).map_err(storage)?)),
            None => Ok(None),
        }
    }

    async fn create(
        &self,
        ctx: &mut Ctx,
        class: String,
        label: String,
        n: u32,
    ) -> Result<MgmtResponse, MgmtError> {
        let key = format!("{class}/{label}");
        if !crate::engine::valid_name(&label) {
            return Err(MgmtError::Invalid(format!(
                "label {label:?} must be 1 to 128 of A-Z a-z 0-9 . _ - and not start with a dot"
            )));
        }
        if n == 0 || n > 9 {
            return Err(MgmtError::Invalid(format!(
                "replica count must be 1..=9, got {n}"
            )));
        }
        if class == MGMT_CLASS {
            return Err(MgmtError::Invalid(
                "the management service is not created by hand".into(),
            ));
        }
        if Self::instance(&mut ctx.tx, &key).await?.is_some() {
            return Err(MgmtError::Exists(named(&class, &label)));
        }
        let mut up: Vec<RankInfo> = Self::up_ranks(&mut ctx.tx)
            .await?
            .into_iter()
            .filter(|r| r.state == RankState::Up && !self.is_down(r.rank))
            .collect();
        if (up.len() as u32) < n {
            return Err(MgmtError::NotEnoughRanks {
                want: n,
                have: up.len() as u32,
            });
        }
        up.shuffle(&mut rand::rng());
        up.truncate(n as usize);
        up.sort_by_key(|r| r.rank);
        let db = DbId::random();
        let mut members = Vec::new();
        let mut started: Vec<&RankInfo> = Vec::new();
        let mut failure = None;
        for r in &up[1..] {
            match self.start_on(&r.addr, &class, &label, db, 1, &[]).await {
                Ok(m) => {
                    members.push(m);
                    started.push(r);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            let first = &up[0];
            match self.start_on(&first.addr, &class, &label, db, 1, &[]).await {
                Ok(m) => {
                    started.push(first);
                    members.insert(0, m);
                    if let Err(e) = self.start_on(&first.addr, &class, &label, db, 1, &members).await {
                        failure = Some(e);
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            for r in started {
                if let Err(e) = self.stop_on(&r.addr, &class, &label).await {
                    tracing::warn!(rank = r.rank, cause = %e, "rollback of a failed create left a replica behind");
                }
            }
            return Err(MgmtError::StartFailed(e));
        }
        let info = InstanceInfo {
            class,
            label,
            db: db.0,
            replicas: up.iter().map(|r| (r.rank, r.addr.clone())).collect(),
            gens: up.iter().map(|r| (r.rank, 1)).collect(),
        };
        ctx.tx.update(
            &instances(),
            key.into_bytes(),
            postcard::to_allocvec(&info).map_err(storage)?,
        );
        tracing::info!(class = %info.class, label = %info.label, replicas = ?info.replicas, "created instance");
        Ok(MgmtResponse::Instance(info))
    }

    /// Sends `call` to the replicas of `info` until the leader accepts it, for up to `rounds`
    /// passes over them. A refusal of the request itself (INTERNAL, INVALID_ARGUMENT,
    /// DEADLINE_EXCEEDED) ends it; "not the leader", busy, unreachable and "no replica here"
    /// move on to the next replica (see `From<EngineError> for Status`).
    async fn ask_leader<T, F, Fut>(&self, info: &InstanceInfo, rounds: usize, call: F) -> Result<T, String>
    where
        F: Fn(pb::peer_client::PeerClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut last = String::from("no replica answered");
        for round in 0..rounds {
            if round > 0 {
                tokio::time::sleep(CHANGE_RETRY).await;
            }
            for (rank, addr) in &info.replicas {
                let Ok(peer) = self.peers.peer(addr) else { continue };
                match call(peer).await {
                    Ok(v) => return Ok(v),
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::Internal
                                | tonic::Code::InvalidArgument
                                | tonic::Code::DeadlineExceeded
                        ) =>
                    {
                        return Err(format!("rank {rank}: {}", s.message()));
                    }
                    Err(s) => last = format!("rank {rank}: {}", s.message()),
                }
            }
        }
        Err(last)
    }

    /// Asks whichever replica of `info` leads to hand leadership to `to_rank` (0: any).
    async fn transfer(&self, info: &InstanceInfo, to_rank: u32) -> Result<u32, String> {
        let req = pb::TransferLeaderRequest {
            cluster: self.cluster.clone(),
            class: info.class.clone(),
            instance: info.label.clone(),
            to_rank,
        };
        self.ask_leader(info, 1, |mut peer| {
            let req = req.clone();
            async move { peer.transfer_leader(req).await.map(|r| r.into_inner().new_leader) }
        })
        .await
    }

    /// Asks whichever replica of `info` leads to add or remove a member, retrying while a
    /// leader is being elected or another membership change is in progress.
    async fn change_replicas(
        &self,
        info: &InstanceInfo,
        add: Option<&Member>,
        remove: Option<(u32, u32)>,
    ) -> Result<(), String> {
        let req = pb::ChangeReplicasRequest {
            cluster: self.cluster.clone(),
            class: info.class.clone(),
            instance: info.label.clone(),
            add: add.map(wire::member_to),
            remove: remove.map(|(rank, gen)| pb::ReplicaRef { rank, gen }),
        };
        self.ask_leader(info, 50, |mut peer| {
            let req = req.clone();
            async move { peer.change_replicas(req).await.map(|_| ()) }
        })
        .await
    }

    async fn add_replica(
        &self,
        ctx: &mut Ctx,
        class: String,
        label: String,
        rank: u32,
    ) -> Result<MgmtResponse, MgmtError> {
        let (key, mut info) = Self::existing(&mut ctx.tx, &class, &label).await?;
        if info.replicas.iter().any(|(r, _)| *r == rank) {
            return Err(MgmtError::Invalid(format!(
                "rank {rank} already hosts a replica of {}",
                named(&class, &label)
            )));
        }
        let target = Self::up_ranks(&mut ctx.tx)
            .await?
            .into_iter()
            .find(|r| r.rank == rank && r.state == RankState::Up)
            .ok_or_else(|| MgmtError::Invalid(format!("rank {rank} is not an engine that is up")))?;
        let gen = info
            .gens
            .iter()
            .find(|(r, _)| *r == rank)
            .map_or(1, |(_, g)| g + 1);
        let db = DbId(info.db);
        let member = self
            .start_on(&target.addr, &class, &label, db, gen, &[])
            .await
            .map_err(MgmtError::StartFailed)?;
        if let Err(e) = self.change_replicas(&info, Some(&member), None).await {
            let _ = self.stop_on(&target.addr, &class, &label).await;
            return Err(MgmtError::ChangeFailed(e));
        }
        info.replicas.push((rank, target.addr.clone()));
        info.replicas.sort();
        info.gens.retain(|(r, _)| *r != rank);
        info.gens.push((rank, gen));
        ctx.tx.update(
            &instances(),
            key.into_bytes(),
            postcard::to_allocvec(&info).map_err(storage)?,
        );
        tracing::info!(%class, %label, rank, gen, "added replica");
        Ok(MgmtResponse::Instance(info))
    }

    async fn remove_replica(
        &self,
        ctx: &mut Ctx,
        class: String,
        label: String,
        rank: u32,
    ) -> Result<MgmtResponse, MgmtError> {
        let (key, mut info) = Self::existing(&mut ctx.tx, &class, &label).await?;
        let Some(pos) = info.replicas.iter().position(|(r, _)| *r == rank) else {
            return Err(MgmtError::Invalid(format!(
                "rank {rank} hosts no replica of {}",
                named(&class, &label)
            )));
        };
        if info.replicas.len() == 1 {
            return Err(MgmtError::Invalid(
                "cannot remove the last replica; destroy the instance".into(),
            ));
        }
        let gen = info.gens.iter().find(|(r, _)| *r == rank).map_or(1, |(_, g)| *g);
        let (_, addr) = info.replicas[pos].clone();
        // NB: every replica is asked, the one to be removed included: it may be the leader,
        // and only the leader changes membership (it hands over first, then the new leader
        // removes it).
        self.change_replicas(&info, None, Some((rank, gen)))
            .await
            .map_err(MgmtError::ChangeFailed)?;
        if let Err(e) = self.stop_on(&addr, &class, &label).await {
            tracing::warn!(rank, cause = %e, "removed replica could not be destroyed (engine down?)");
        }
        info.replicas.remove(pos);
        ctx.tx.update(
            &instances(),
            key.into_bytes(),
            postcard::to_allocvec(&info).map_err(storage)?,
        );
        tracing::info!(%class, %label, rank, gen, "removed replica");
        Ok(MgmtResponse::Instance(info))
    }

    /// See [`MgmtRequest::Dictate`]. The survivor is asked over the peer port, and only once it
    /// leads alone does the directory change; the replicas that still answer are destroyed
    /// after that, since they would otherwise campaign in the old group.
    async fn dictate(
        &self,
        ctx: &mut Ctx,
        class: String,
        label: String,
        rank: Option<u32>,
    ) -> Result<MgmtResponse, MgmtError> {
        let (key, mut info) = Self::existing(&mut ctx.tx, &class, &label).await?;
        let name = named(&class, &label);
        let gen_of = |rank: u32| info.gens.iter().find(|(r, _)| *r == rank).map_or(1, |(_, g)| *g);
        let conns = self.peers.clients();
        let wait = self.probe_every.max(Duration::from_secs(1));
        let asks = info.replicas.iter().map(|(r, addr)| {
            let conns = &conns;
            let (class, label) = (&class, &label);
            async move {
                let got = rsvc_client::replica_status(conns, addr, Some(class), Some(label), wait).await;
                (*r, addr.clone(), got)
            }
        });
        // A survivor: its engine answers and runs the listed generation of the replica.
        let alive: Vec<(u32, String, rsvc_client::ReplicaStatus)> = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|(r, addr, got)| {
                let s = got
                    .ok()?
                    .into_iter()
                    .find(|s| s.gen == gen_of(r) && s.stopped.is_none())?;
                Some((r, addr, s))
            })
            .collect();
        if let Some((_, _, s)) = alive.iter().find(|(_, _, s)| s.serving) {
            return Err(MgmtError::DictateRefused(format!(
                "{name} has a leader (rank {}, term {}); dictate is for a quorum lost for good",
                s.rank, s.term
            )));
        }
        let quorum = info.replicas.len() / 2 + 1;
        let ranks_of = |v: &[(u32, String, rsvc_client::ReplicaStatus)]| {
            v.iter().map(|(r, _, _)| *r).collect::<Vec<_>>()
        };
        if alive.len() >= quorum {
            return Err(MgmtError::DictateRefused(format!(
                "{} of the {} replicas of {name} answer (ranks {:?}), a quorum: it will elect a leader; see `replicas status`",
                alive.len(),
                info.replicas.len(),
                ranks_of(&alive)
            )));
        }
        let chosen = match rank {
            Some(want) => alive.iter().find(|(r, _, _)| *r == want).ok_or_else(|| {
                MgmtError::DictateRefused(format!(
                    "rank {want} has no replica of {name} that answers; those that do: {:?}",
                    ranks_of(&alive)
                ))
            })?,
            None => alive
                .iter()
                .max_by_key(|(r, _, s)| (s.last_log_index, s.applied_index, std::cmp::Reverse(*r)))
                .ok_or_else(|| MgmtError::DictateRefused(format!("no replica of {name} answers")))?,
        };
        let (survivor, addr, _) = chosen.clone();
        let mut peer = self.peers.peer(&addr).map_err(MgmtError::DictateFailed)?;
        let req = pb::DictateReplicaRequest {
            cluster: self.cluster.clone(),
            class: class.clone(),
            instance: label.clone(),
            db: DbId(info.db).0.to_be_bytes().to_vec(),
            gen: gen_of(survivor),
        };
        let reply = peer
            .dictate_replica(req)
            .await
            .map_err(|s| MgmtError::DictateFailed(format!("rank {survivor}: {}", s.message())))?
            .into_inner();
        for (r, addr, _) in alive.iter().filter(|(r, _, _)| *r != survivor) {
            if let Err(e) = self.stop_on(addr, &class, &label).await {
                tracing::warn!(rank = r, cause = %e, "could not destroy a replica left out by a dictate; the monitor will");
            }
        }
        info.replicas.retain(|(r, _)| *r == survivor);
        ctx.tx.update(
            &instances(),
            key.into_bytes(),
            postcard::to_allocvec(&info).map_err(storage)?,
        );
        tracing::warn!(%class, %label, rank = survivor, term = reply.term, "dictated: one replica left, leading alone");
        Ok(MgmtResponse::Dictated {
            instance: info,
            rank: survivor,
            term: reply.term,
        })
    }

    /// Gives an access point that joined a replica of the management service.
    async fn add_access_point(&self, ctx: &Ctx, rank: u32, addr: &str) -> Result<(), MgmtError> {
        if ctx.db.status().voters.iter().any(|r| r.rank == rank) {
            return Ok(());
        }
        // A learner left by an earlier attempt is promoted; start_replica is idempotent.
        let db = ctx.db.ident().db;
        let member = self
            .start_on(addr, MGMT_CLASS, MGMT_INSTANCE, db, 1, &[])
            .await
            .map_err(MgmtError::StartFailed)?;
        ctx.db.add_replica(member).await.map_err(storage)?;
        tracing::info!(rank, "access point joined the management service");
        Ok(())
    }
}

#[async_trait]
impl ReplicatedService for Mgmt {
    type Api = MgmtApi;

    async fn step_up(&self, _db: &rdb::Db, _term: u64) -> Result<StepUp, ServiceError> {
        self.seen.lock().expect("lock").clear();
        self.missing.lock().expect("lock").clear();
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
        match req {
            MgmtRequest::Join {
                rank,
                addr,
                access_point,
                cluster,
                incarnation,
            } => {
                self.check_join(&mut ctx.tx, rank, &addr, &cluster, incarnation)
                    .await?;
                let info = RankInfo {
                    rank,
                    addr: addr.clone(),
                    state: RankState::Up,
                };
                ctx.tx.update(
                    &ranks(),
                    int_key(u64::from(rank)),
                    postcard::to_allocvec(&info).map_err(storage)?,
                );
                if access_point {
                    self.add_access_point(ctx, rank, &addr).await?;
                }
                tracing::info!(rank, %addr, access_point, "engine joined");
                Ok(MgmtResponse::Ok)
            }
            MgmtRequest::SystemMap => {
                let mut map = MgmtInner::up_ranks(&mut ctx.tx).await?;
                for r in &mut map {
                    if r.state == RankState::Up && self.is_down(r.rank) {
                        r.state = RankState::Down;
                    }
                }
                Ok(MgmtResponse::Map(map))
            }
            MgmtRequest::CreateInstance {
                class,
                label,
                replicas,
            } => self.create(ctx, class, label, replicas).await,
            MgmtRequest::DestroyInstance { class, label } => {
                let (key, info) = MgmtInner::existing(&mut ctx.tx, &class, &label).await?;
                for (rank, addr) in &info.replicas {
                    if let Err(e) = self.stop_on(addr, &class, &label).await {
                        tracing::warn!(rank, cause = %e, "could not destroy a replica; it stays orphaned");
                    }
                }
                ctx.tx.delete(&instances(), key.into_bytes());
                Ok(MgmtResponse::Ok)
            }
            MgmtRequest::TransferLeader {
                class,
                label,
                to_rank,
            } => {
                let (_, info) = MgmtInner::existing(&mut ctx.tx, &class, &label).await?;
                if let Some(r) = to_rank.filter(|r| !info.replicas.iter().any(|(x, _)| x == r)) {
                    return Err(MgmtError::Invalid(format!(
                        "rank {r} hosts no replica of {}",
                        named(&class, &label)
                    )));
                }
                self.transfer(&info, to_rank.unwrap_or(0))
                    .await
                    .map(MgmtResponse::Leader)
                    .map_err(MgmtError::TransferFailed)
            }
            MgmtRequest::AddReplica { class, label, rank } => self.add_replica(ctx, class, label, rank).await,
            MgmtRequest::RemoveReplica { class, label, rank } => {
                self.remove_replica(ctx, class, label, rank).await
            }
            MgmtRequest::Dictate { class, label, rank } => self.dictate(ctx, class, label, rank).await,
            MgmtRequest::Locate { class, label } => MgmtInner::existing(&mut ctx.tx, &class, &label)
                .await
                .map(|(_, i)| MgmtResponse::Instance(i)),
            MgmtRequest::ListInstances { class } => {
                let all = ctx
                    .tx
                    .iterate(&instances(), .., usize::MAX)
                    .await
                    .map_err(storage)?;
                let mut out = Vec::new();
                for (_, v) in all {
                    if let rdb::Value::Bytes(b) = v {
                        let i: InstanceInfo = postcard::from_bytes(&b).map_err(storage)?;
                        if class.as_ref().is_none_or(|c| *c == i.class) {
                            out.push(i);
                        }
                    }
                }
                Ok(MgmtResponse::Instances(out))
            }
            MgmtRequest::DescribeSelf => {
                let ranks = MgmtInner::up_ranks(&mut ctx.tx).await?;
                let mut voters = ctx.db.status().voters;
                voters.sort();
                let addr = |rank: u32| {
                    ranks
                        .iter()
                        .find(|r| r.rank == rank)
                        .map(|r| r.addr.clone())
                        .unwrap_or_default()
                };
                Ok(MgmtResponse::Instance(InstanceInfo {
                    class: MGMT_CLASS.into(),
                    label: MGMT_INSTANCE.into(),
                    db: ctx.db.ident().db.0,
                    replicas: voters.iter().map(|v| (v.rank, addr(v.rank))).collect(),
                    gens: voters.iter().map(|v| (v.rank, v.gen)).collect(),
                }))
            }
        }
    }
}

/// Which listed replicas are lost: their engine answered this round without them (at their
/// generation), and every round since [`LOST_AFTER`] ago did too. `missing` carries since when
/// each has been missing; a replica that is back, or whose engine did not answer, is forgotten
/// (an engine that does not answer is down, not wiped: that is the reconfiguration's business).
fn lost_replicas(
    listed: &[Listed],
    hosted: &HashMap<u32, HashSet<(String, String, u32)>>,
    missing: &mut HashMap<Listed, Instant>,
    now: Instant,
) -> Vec<Listed> {
    let mut now_missing = HashMap::new();
    for l in listed {
        let (class, label, rank, gen) = l;
        let Some(h) = hosted.get(rank) else { continue };
        if h.contains(&(class.clone(), label.clone(), *gen)) {
            continue;
        }
        let since = missing.get(l).copied().unwrap_or(now);
        now_missing.insert(l.clone(), since);
    }
    *missing = now_missing;
    let mut lost: Vec<Listed> = missing
        .iter()
        .filter(|(_, since)| now.duration_since(**since) >= LOST_AFTER)
        .map(|(l, _)| l.clone())
        .collect();
    lost.sort();
    lost
}

/// Replicas that engines host but whose instance's directory entry no longer lists on that
/// rank, at a generation the directory recorded: left behind by a dictate or by a removal
/// while their engine was down. Such a replica still campaigns in its old group, and with
/// another stray could even elect a leader there. NB: a replica being added has a generation
/// newer than the recorded one, and an instance being created is not listed yet; neither is a
/// stray.
fn stray_replicas(
    instances: &[InstanceInfo],
    hosted: &HashMap<u32, HashSet<(String, String, u32)>>,
) -> Vec<(u32, String, String, u32)> {
    let mut out = Vec::new();
    for (rank, set) in hosted {
        for (class, label, gen) in set {
            let Some(i) = instances.iter().find(|i| i.class == *class && i.label == *label) else {
                continue;
            };
            let listed = i.replicas.iter().any(|(r, _)| r == rank);
            let recorded = i.gens.iter().any(|(r, g)| r == rank && gen <= g);
            if !listed && recorded {
                out.push((*rank, class.clone(), label.clone(), *gen));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(class: &str, rank: u32, gen: u32) -> Listed {
        (class.into(), "x".into(), rank, gen)
    }

    fn hosts(of: &[(u32, &[(&str, u32)])]) -> HashMap<u32, HashSet<(String, String, u32)>> {
        of.iter()
            .map(|(r, hs)| {
                let set = hs
                    .iter()
                    .map(|(c, g)| (c.to_string(), "x".to_string(), *g))
                    .collect();
                (*r, set)
            })
            .collect()
    }

    /// A round at `t0` plus `ms` milliseconds.
    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_replica_missing_from_an_answering_engine_is_lost_after_a_while() {
        let listed = vec![l("pool", 1, 1), l("pool", 2, 1), l("pool", 3, 2)];
        let mut missing = HashMap::new();
        let t0 = Instant::now();
        // Rank 2 answers without its replica; rank 3 does not answer at all.
        let h = hosts(&[(1, &[("pool", 1)]), (2, &[])]);
        assert!(
            lost_replicas(&listed, &h, &mut missing, t0).is_empty(),
            "one round is not enough"
        );
        assert!(lost_replicas(&listed, &h, &mut missing, at(t0, 1000)).is_empty());
        assert_eq!(
            lost_replicas(&listed, &h, &mut missing, at(t0, 2000)),
            vec![l("pool", 2, 1)]
        );
        // A down engine is never "lost": that is reconfiguration's business.
        assert!(!missing.contains_key(&l("pool", 3, 2)));
    }

    #[test]
    fn a_replica_back_in_between_or_at_another_generation_is_judged_anew() {
        let listed = vec![l("pool", 2, 1)];
        let mut missing = HashMap::new();
        let t0 = Instant::now();
        let gone = hosts(&[(2, &[])]);
        let back = hosts(&[(2, &[("pool", 1)])]);
        let silent = hosts(&[]);
        assert!(lost_replicas(&listed, &gone, &mut missing, t0).is_empty());
        // It came back (an add in progress): the clock starts over.
        assert!(lost_replicas(&listed, &back, &mut missing, at(t0, 1500)).is_empty());
        assert!(lost_replicas(&listed, &gone, &mut missing, at(t0, 2500)).is_empty());
        // The engine did not answer: the clock starts over too.
        assert!(lost_replicas(&listed, &silent, &mut missing, at(t0, 4600)).is_empty());
        assert!(lost_replicas(&listed, &gone, &mut missing, at(t0, 5000)).is_empty());
        // An engine that hosts the instance at an older generation lost the listed one.
        let old = hosts(&[(2, &[("pool", 0)])]);
        assert!(lost_replicas(&listed, &old, &mut missing, at(t0, 6000)).is_empty());
        assert_eq!(
            lost_replicas(&listed, &old, &mut missing, at(t0, 7000)),
            vec![l("pool", 2, 1)]
        );
    }

    #[test]
    fn a_replica_its_directory_dropped_is_a_stray_but_one_being_added_or_created_is_not() {
        // Pool "x" lists ranks 1 (gen 1) and 3 (gen 2); rank 2 held gen 1 until a dictate, and
        // rank 4 never held one.
        let info = InstanceInfo {
            class: "pool".into(),
            label: "x".into(),
            db: 7,
            replicas: vec![(1, "a1".into()), (3, "a3".into())],
            gens: vec![(1, 1), (2, 1), (3, 2)],
        };
        let h = hosts(&[
            (1, &[("pool", 1)]),
            // The dictate's leftover.
            (2, &[("pool", 1)]),
            // An add in progress (a newer generation than recorded), and an instance of a
            // class whose directory entry does not exist yet (a create in progress).
            (3, &[("pool", 2), ("cont", 1)]),
            (4, &[("pool", 1)]),
        ]);
        assert_eq!(
            stray_replicas(std::slice::from_ref(&info), &h),
            vec![(2, "pool".into(), "x".into(), 1)]
        );
        // Re-added on rank 2 under generation 2: the directory lists it again.
        let mut readded = info.clone();
        readded.replicas.push((2, "a2".into()));
        readded.gens.retain(|(r, _)| *r != 2);
        readded.gens.push((2, 2));
        assert!(stray_replicas(&[readded.clone()], &hosts(&[(2, &[("pool", 2)])])).is_empty());
        // An add of generation 3 in progress on a rank the directory lists no more.
        readded.replicas.retain(|(r, _)| *r != 2);
        assert!(stray_replicas(&[readded], &hosts(&[(2, &[("pool", 3)])])).is_empty());
    }
}
