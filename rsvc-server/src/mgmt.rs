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

use std::sync::Arc;

use async_trait::async_trait;
use rand::seq::SliceRandom;
use rdb::{int_key, DbId, KeyClass, Member, Path, Tx};
use rsvc_client::mgmt::{
    InstanceInfo, MgmtApi, MgmtError, MgmtRequest, MgmtResponse, RankInfo, RankState, MGMT_CLASS,
    MGMT_INSTANCE,
};

use crate::service::{Ctx, ReplicatedService};
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

fn storage(e: impl std::fmt::Display) -> MgmtError {
    MgmtError::Storage(e.to_string())
}

/// The management service of one engine.
pub struct Mgmt {
    peers: Arc<GrpcTransport>,
    cluster: String,
}

impl Mgmt {
    /// A management service reaching other engines through `peers`.
    pub fn new(peers: Arc<GrpcTransport>, cluster: impl Into<String>) -> Self {
        Mgmt {
            peers,
            cluster: cluster.into(),
        }
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
            return Err(MgmtError::Exists(key));
        }
        let mut up: Vec<RankInfo> = Self::up_ranks(&mut ctx.tx)
            .await?
            .into_iter()
            .filter(|r| r.state == RankState::Up)
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

    /// Asks whichever replica of `info` leads to add or remove a member.
    async fn change_replicas(
        &self,
        info: &InstanceInfo,
        add: Option<&Member>,
        remove: Option<(u32, u32)>,
    ) -> Result<(), String> {
        let mut last = String::from("no replica answered");
        for _ in 0..50 {
            for (rank, addr) in &info.replicas {
                let Ok(mut peer) = self.peers.peer(addr) else {
                    continue;
                };
                let req = pb::ChangeReplicasRequest {
                    cluster: self.cluster.clone(),
                    class: info.class.clone(),
                    instance: info.label.clone(),
                    add: add.map(wire::member_to),
                    remove: remove.map(|(rank, gen)| pb::ReplicaRef { rank, gen }),
                };
                match peer.change_replicas(req).await {
                    Ok(_) => return Ok(()),
                    // The leader refused the change itself: retrying elsewhere will not help.
                    Err(s) if matches!(s.code(), tonic::Code::Internal | tonic::Code::InvalidArgument) => {
                        return Err(format!("rank {rank}: {}", s.message()));
                    }
                    // Not the leader, busy, down, or no replica there: ask the next one.
                    Err(s) => last = format!("rank {rank}: {}", s.message()),
                }
            }
            tokio::time::sleep(CHANGE_RETRY).await;
        }
        Err(last)
    }

    async fn add_replica(
        &self,
        ctx: &mut Ctx,
        class: String,
        label: String,
        rank: u32,
    ) -> Result<MgmtResponse, MgmtError> {
        let key = format!("{class}/{label}");
        let mut info = Self::instance(&mut ctx.tx, &key)
            .await?
            .ok_or(MgmtError::NotFound(key.clone()))?;
        if info.replicas.iter().any(|(r, _)| *r == rank) {
            return Err(MgmtError::Invalid(format!("rank {rank} already hosts {key}")));
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
            return Err(MgmtError::StartFailed(e));
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
        let key = format!("{class}/{label}");
        let mut info = Self::instance(&mut ctx.tx, &key)
            .await?
            .ok_or(MgmtError::NotFound(key.clone()))?;
        let Some(pos) = info.replicas.iter().position(|(r, _)| *r == rank) else {
            return Err(MgmtError::Invalid(format!("rank {rank} does not host {key}")));
        };
        if info.replicas.len() == 1 {
            return Err(MgmtError::Invalid(
                "cannot remove the last replica; destroy the instance".into(),
            ));
        }
        let gen = info.gens.iter().find(|(r, _)| *r == rank).map_or(1, |(_, g)| *g);
        let (_, addr) = info.replicas[pos].clone();
        let mut others = info.clone();
        others.replicas.remove(pos);
        self.change_replicas(&others, None, Some((rank, gen)))
            .await
            .map_err(MgmtError::StartFailed)?;
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

    /// Gives an access point that joined a replica of the management service.
    async fn add_access_point(&self, ctx: &Ctx, rank: u32, addr: &str) -> Result<(), MgmtError> {
        if ctx.db.members().iter().any(|m| m.replica.rank == rank) {
            return Ok(());
        }
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

    async fn bootstrap(&self, tx: &mut Tx) -> Result<(), String> {
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
            } => {
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
            MgmtRequest::SystemMap => Ok(MgmtResponse::Map(Self::up_ranks(&mut ctx.tx).await?)),
            MgmtRequest::CreateInstance {
                class,
                label,
                replicas,
            } => self.create(ctx, class, label, replicas).await,
            MgmtRequest::DestroyInstance { class, label } => {
                let key = format!("{class}/{label}");
                let info = Self::instance(&mut ctx.tx, &key)
                    .await?
                    .ok_or(MgmtError::NotFound(key.clone()))?;
                for (rank, addr) in &info.replicas {
                    if let Err(e) = self.stop_on(addr, &class, &label).await {
                        tracing::warn!(rank, cause = %e, "could not destroy a replica; it stays orphaned");
                    }
                }
                ctx.tx.delete(&instances(), key.into_bytes());
                Ok(MgmtResponse::Ok)
            }
            MgmtRequest::AddReplica { class, label, rank } => self.add_replica(ctx, class, label, rank).await,
            MgmtRequest::RemoveReplica { class, label, rank } => {
                self.remove_replica(ctx, class, label, rank).await
            }
            MgmtRequest::Locate { class, label } => {
                let key = format!("{class}/{label}");
                Self::instance(&mut ctx.tx, &key)
                    .await?
                    .map(MgmtResponse::Instance)
                    .ok_or(MgmtError::NotFound(key))
            }
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
        }
    }
}
