//! Changes to the system and the directory: joins, and an instance's create (DAOS's
//! `dist_start`, with rollback), replica add and remove, and dictate.

use super::*;

impl MgmtInner {
    /// Admits engine `rank` joining from `addr` only if it is of this cluster, reachable at
    /// `addr` as itself, and not a second engine of a rank whose engine is alive elsewhere.
    pub(super) async fn check_join(
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

    pub(super) async fn create(
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
        put_instance(&mut ctx.tx, key, &info)?;
        tracing::info!(class = %info.class, label = %info.label, replicas = ?info.replicas, "created instance");
        Ok(MgmtResponse::Instance(info))
    }

    pub(super) async fn add_replica(
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
        put_instance(&mut ctx.tx, key, &info)?;
        tracing::info!(%class, %label, rank, gen, "added replica");
        Ok(MgmtResponse::Instance(info))
    }

    pub(super) async fn remove_replica(
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
        let gen = gen_of(&info, rank);
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
        put_instance(&mut ctx.tx, key, &info)?;
        tracing::info!(%class, %label, rank, gen, "removed replica");
        Ok(MgmtResponse::Instance(info))
    }

    /// See [`MgmtRequest::Dictate`]. The survivor is asked over the peer port, and only once it
    /// leads alone does the directory change; the replicas that still answer are destroyed
    /// after that, since they would otherwise campaign in the old group.
    pub(super) async fn dictate(
        &self,
        ctx: &mut Ctx,
        class: String,
        label: String,
        rank: Option<u32>,
    ) -> Result<MgmtResponse, MgmtError> {
        let (key, mut info) = Self::existing(&mut ctx.tx, &class, &label).await?;
        let name = named(&class, &label);
        let gen_of = |rank: u32| gen_of(&info, rank);
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
        let statuses: Vec<rsvc_client::ReplicaStatus> = alive.iter().map(|(_, _, s)| s.clone()).collect();
        let survivor = choose_survivor(&name, info.replicas.len(), &statuses, rank)
            .map_err(MgmtError::DictateRefused)?;
        let addr = alive
            .iter()
            .find(|(r, _, _)| *r == survivor)
            .map(|(_, a, _)| a.clone())
            .expect("the survivor is one of those that answered");
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
        put_instance(&mut ctx.tx, key, &info)?;
        tracing::warn!(%class, %label, rank = survivor, term = reply.term, "dictated: one replica left, leading alone");
        Ok(MgmtResponse::Dictated {
            instance: info,
            rank: survivor,
            term: reply.term,
        })
    }

    /// Admits engine `rank` (see [`MgmtRequest::Join`]): `joining` is its rank, address,
    /// cluster and incarnation.
    pub(super) async fn join(
        &self,
        ctx: &mut Ctx,
        joining: (u32, &str, &str, u64),
        access_point: bool,
    ) -> Result<MgmtResponse, MgmtError> {
        let (rank, addr, cluster, incarnation) = joining;
        self.check_join(&mut ctx.tx, rank, addr, cluster, incarnation)
            .await?;
        let info = RankInfo {
            rank,
            addr: addr.to_string(),
            state: RankState::Up,
        };
        ctx.tx.update(
            &ranks(),
            int_key(u64::from(rank)),
            postcard::to_allocvec(&info).map_err(storage)?,
        );
        if access_point {
            self.add_access_point(ctx, rank, addr).await?;
        }
        tracing::info!(rank, %addr, access_point, "engine joined");
        Ok(MgmtResponse::Ok)
    }

    /// Stops and destroys every replica of `class/label` that answers, and forgets it.
    pub(super) async fn destroy(
        &self,
        ctx: &mut Ctx,
        class: &str,
        label: &str,
    ) -> Result<MgmtResponse, MgmtError> {
        let (key, info) = Self::existing(&mut ctx.tx, class, label).await?;
        for (rank, addr) in &info.replicas {
            if let Err(e) = self.stop_on(addr, class, label).await {
                tracing::warn!(rank, cause = %e, "could not destroy a replica; it stays orphaned");
            }
        }
        ctx.tx.delete(&instances(), key.into_bytes());
        Ok(MgmtResponse::Ok)
    }

    /// Hands the leadership of `class/label` to the replica on `to_rank` (`None`: the most
    /// caught-up one).
    pub(super) async fn transfer_leader(
        &self,
        ctx: &mut Ctx,
        class: &str,
        label: &str,
        to_rank: Option<u32>,
    ) -> Result<MgmtResponse, MgmtError> {
        let (_, info) = Self::existing(&mut ctx.tx, class, label).await?;
        if let Some(r) = to_rank.filter(|r| !info.replicas.iter().any(|(x, _)| x == r)) {
            return Err(MgmtError::Invalid(format!(
                "rank {r} hosts no replica of {}",
                named(class, label)
            )));
        }
        self.transfer(&info, to_rank.unwrap_or(0))
            .await
            .map(MgmtResponse::Leader)
            .map_err(MgmtError::TransferFailed)
    }

    /// Gives an access point that joined a replica of the management service.
    pub(super) async fn add_access_point(&self, ctx: &Ctx, rank: u32, addr: &str) -> Result<(), MgmtError> {
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

/// Which replica a dictate makes the only one, from the reports of the replicas that answer
/// (at their listed generation) out of `listed`: `want` if given, else the one with the
/// longest log (then the furthest applied, then the lowest rank). Refused, with the reason,
/// while one of them leads, while a quorum of the listed replicas answers (the group can still
/// elect a leader, and a dictate would split it), or when `want` is not among them.
fn choose_survivor(
    name: &str,
    listed: usize,
    alive: &[rsvc_client::ReplicaStatus],
    want: Option<u32>,
) -> Result<u32, String> {
    let ranks: Vec<u32> = alive.iter().map(|s| s.rank).collect();
    if let Some(s) = alive.iter().find(|s| s.serving) {
        return Err(format!(
            "{name} has a leader (rank {}, term {}); dictate is for a quorum lost for good",
            s.rank, s.term
        ));
    }
    if alive.len() > listed / 2 {
        return Err(format!(
            "{} of the {listed} replicas of {name} answer (ranks {ranks:?}), a quorum: it will elect a leader; see `replicas status`",
            alive.len(),
        ));
    }
    match want {
        Some(w) if ranks.contains(&w) => Ok(w),
        Some(w) => Err(format!(
            "rank {w} has no replica of {name} that answers; those that do: {ranks:?}"
        )),
        None => alive
            .iter()
            .max_by_key(|s| (s.last_log_index, s.applied_index, std::cmp::Reverse(s.rank)))
            .map(|s| s.rank)
            .ok_or_else(|| format!("no replica of {name} answers")),
    }
}

#[cfg(test)]
mod tests {
    use super::choose_survivor;
    use rsvc_client::ReplicaStatus;

    fn report(rank: u32, last: u64, serving: bool) -> ReplicaStatus {
        ReplicaStatus {
            class: "pool".into(),
            instance: "tank".into(),
            rank,
            gen: 1,
            role: if serving { "leader" } else { "candidate" }.into(),
            term: 4,
            leader: None,
            serving,
            last_log_index: Some(last),
            applied_index: Some(last),
            snapshot_index: None,
            purged_index: None,
            voters: vec![1, 2, 3, 4, 5],
            learners: vec![],
            free_bytes: None,
            upkeep_bytes: None,
            log_bytes: 0,
            state_bytes: 0,
            stopped: None,
        }
    }

    #[test]
    fn the_longest_log_survives_unless_the_operator_names_another() {
        let alive = [report(2, 40, false), report(4, 41, false)];
        assert_eq!(choose_survivor("pool", 5, &alive, None), Ok(4));
        assert_eq!(choose_survivor("pool", 5, &alive, Some(2)), Ok(2));
        let e = choose_survivor("pool", 5, &alive, Some(3)).unwrap_err();
        assert!(e.contains("rank 3 has no replica"), "{e}");
        // Equal logs: the lowest rank, so that the choice does not depend on answer order.
        let tie = [report(4, 40, false), report(2, 40, false)];
        assert_eq!(choose_survivor("pool", 5, &tie, None), Ok(2));
    }

    #[test]
    fn a_quorum_or_a_leader_refuses_and_nobody_cannot_be_chosen() {
        let three = [report(1, 9, false), report(2, 9, false), report(3, 9, false)];
        let e = choose_survivor("pool", 5, &three, None).unwrap_err();
        assert!(e.contains("a quorum"), "{e}");
        let led = [report(1, 9, true)];
        let e = choose_survivor("pool", 3, &led, None).unwrap_err();
        assert!(e.contains("has a leader"), "{e}");
        // Half of an even group is no quorum: 2 of 4 may dictate.
        assert_eq!(choose_survivor("pool", 4, &three[..2], None), Ok(1));
        assert!(choose_survivor("pool", 3, &[], None).is_err());
    }
}
