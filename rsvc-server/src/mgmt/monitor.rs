//! The management leader's monitor: health checks of every engine, re-creation of replicas
//! that an engine lost (a wiped disk), destruction of strays, and moving the replicas of an
//! engine that stays down. What it does each round is decided by pure functions
//! (`lost_replicas`, `stray_replicas`) that the unit tests cover.

use super::*;

/// A replica as the directory lists it: class, instance, rank, generation.
pub(super) type Listed = (String, String, u32, u32);

impl MgmtInner {
    /// Whether `rank` has missed its health checks for too long.
    pub(super) fn is_down(&self, rank: u32) -> bool {
        self.seen
            .lock()
            .expect("lock")
            .get(&rank)
            .is_some_and(|t| t.elapsed() > self.down_after)
            && self.failed_rounds(rank) >= 2
    }

    /// How many completed probe rounds in a row `rank` failed.
    pub(super) fn failed_rounds(&self, rank: u32) -> u32 {
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
    pub(super) async fn monitor_round(
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
        let hosted = self.probe(&ranks).await;
        let MgmtResponse::Instances(instances) = client
            .call(&MgmtRequest::ListInstances { class: None })
            .await
            .map_err(|e| e.to_string())?
        else {
            return Err("unexpected answer".into());
        };
        self.repair_lost(client, db, &ranks, &instances, &hosted).await;
        match self.reconf_after {
            Some(after) => self.move_off_dead(client, &ranks, instances, after).await,
            None => Ok(()),
        }
    }

    /// Asks every engine who it is and what it hosts, within one probe period each, and
    /// records who answered (`seen`, `failing`). Answers what each engine that answered hosts;
    /// only the engine of that rank and cluster counts as an answer.
    async fn probe(&self, ranks: &[RankInfo]) -> HashMap<u32, HashSet<(String, String, u32)>> {
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
        results.into_iter().filter_map(|(r, h)| Some((r, h?))).collect()
    }

    /// Moves the replicas of engines down for longer than `after` to spare engines (DAOS pool
    /// auto-reconfiguration), one change per instance per round: the next round sees the new
    /// list.
    async fn move_off_dead(
        &self,
        client: &rsvc_client::RsvcClient<MgmtApi>,
        ranks: &[RankInfo],
        instances: Vec<InstanceInfo>,
        after: Duration,
    ) -> Result<(), String> {
        let gone = |rank: u32| {
            self.failed_rounds(rank) >= 2
                && self
                    .seen
                    .lock()
                    .expect("lock")
                    .get(&rank)
                    .is_some_and(|t| t.elapsed() > after)
        };
        for m in plan_moves(&instances, ranks, gone, |r| self.is_down(r)) {
            let Some(to) = m.to else {
                tracing::warn!(class = %m.class, label = %m.label, rank = m.from, "replica's engine is down and no spare engine is up");
                continue;
            };
            tracing::info!(class = %m.class, label = %m.label, from = m.from, to, "auto-reconfiguration: moving a replica off a dead engine");
            let rm = MgmtRequest::RemoveReplica {
                class: m.class.clone(),
                label: m.label.clone(),
                rank: m.from,
            };
            client.call(&rm).await.map_err(|e| e.to_string())?;
            let add = MgmtRequest::AddReplica {
                class: m.class,
                label: m.label,
                rank: to,
            };
            client.call(&add).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Re-creates, under a new generation, the replicas that engines which answered no longer
    /// host (Restate's storage id, DAOS's replica generation): a wiped data directory, or a
    /// replica directory that was deleted. The old identity leaves the group first, so the
    /// lost replica can never vote again; the new one joins as a learner, catches up from the
    /// leader, and becomes a voter.
    ///
    /// NB: a replica counts as lost only once it was missing for `lost_after` in every round,
    /// so that an add or a remove in progress (the engine and the directory briefly disagree)
    /// is not mistaken for a loss.
    pub(super) async fn repair_lost(
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
                    let gen = gen_of(i, *rank);
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
            lost_replicas(
                &listed,
                hosted,
                &mut missing,
                Instant::now(),
                self.limits.lost_after,
            )
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
    pub(super) async fn add_back(
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
    pub(super) async fn add_mgmt(
        &self,
        db: &rdb::Db,
        ranks: &[RankInfo],
        rank: u32,
        gen: u32,
    ) -> Result<(), String> {
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
}

/// Which listed replicas are lost: their engine answered this round without them (at their
/// generation), and every round since `lost_after` ago did too. `missing` carries since when
/// each has been missing; a replica that is back, or whose engine did not answer, is forgotten
/// (an engine that does not answer is down, not wiped: that is the reconfiguration's business).
fn lost_replicas(
    listed: &[Listed],
    hosted: &HashMap<u32, HashSet<(String, String, u32)>>,
    missing: &mut HashMap<Listed, Instant>,
    now: Instant,
    lost_after: Duration,
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
        .filter(|(_, since)| now.duration_since(**since) >= lost_after)
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

/// A replica to move off an engine that is gone: to the spare engine `to`, or nowhere
/// (`None`: no engine is up that does not host the instance already).
#[derive(Debug, PartialEq, Eq)]
struct Move {
    class: String,
    label: String,
    from: u32,
    to: Option<u32>,
}

/// What the reconfiguration does this round (DAOS pool auto-reconfiguration): for each
/// instance, the first replica on a `gone` engine moves to the first engine of the map that
/// is up, not `down`, and hosts no replica of it. One move per instance per round: the next
/// round sees the new list. A gone replica with nowhere to go is reported as such.
fn plan_moves(
    instances: &[InstanceInfo],
    ranks: &[RankInfo],
    gone: impl Fn(u32) -> bool,
    down: impl Fn(u32) -> bool,
) -> Vec<Move> {
    let mut out = Vec::new();
    for i in instances {
        for (dead, _) in &i.replicas {
            if !gone(*dead) {
                continue;
            }
            let spare = ranks.iter().find(|r| {
                r.state == RankState::Up && !down(r.rank) && !i.replicas.iter().any(|(x, _)| *x == r.rank)
            });
            out.push(Move {
                class: i.class.clone(),
                label: i.label.clone(),
                from: *dead,
                to: spare.map(|r| r.rank),
            });
            if spare.is_some() {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOST: Duration = Duration::from_secs(2);

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
            lost_replicas(&listed, &h, &mut missing, t0, LOST).is_empty(),
            "one round is not enough"
        );
        assert!(lost_replicas(&listed, &h, &mut missing, at(t0, 1000), LOST).is_empty());
        assert_eq!(
            lost_replicas(&listed, &h, &mut missing, at(t0, 2000), LOST),
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
        assert!(lost_replicas(&listed, &gone, &mut missing, t0, LOST).is_empty());
        // It came back (an add in progress): the clock starts over.
        assert!(lost_replicas(&listed, &back, &mut missing, at(t0, 1500), LOST).is_empty());
        assert!(lost_replicas(&listed, &gone, &mut missing, at(t0, 2500), LOST).is_empty());
        // The engine did not answer: the clock starts over too.
        assert!(lost_replicas(&listed, &silent, &mut missing, at(t0, 4600), LOST).is_empty());
        assert!(lost_replicas(&listed, &gone, &mut missing, at(t0, 5000), LOST).is_empty());
        // An engine that hosts the instance at an older generation lost the listed one.
        let old = hosts(&[(2, &[("pool", 0)])]);
        assert!(lost_replicas(&listed, &old, &mut missing, at(t0, 6000), LOST).is_empty());
        assert_eq!(
            lost_replicas(&listed, &old, &mut missing, at(t0, 7000), LOST),
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

    fn inst(label: &str, ranks: &[u32]) -> InstanceInfo {
        InstanceInfo {
            class: "pool".into(),
            label: label.into(),
            db: 1,
            replicas: ranks.iter().map(|r| (*r, format!("a{r}"))).collect(),
            gens: ranks.iter().map(|r| (*r, 1)).collect(),
        }
    }

    fn map(up: &[u32], down: &[u32]) -> Vec<RankInfo> {
        let rank = |r: &u32, state| RankInfo {
            rank: *r,
            addr: format!("a{r}"),
            state,
        };
        let mut m: Vec<RankInfo> = up.iter().map(|r| rank(r, RankState::Up)).collect();
        m.extend(down.iter().map(|r| rank(r, RankState::Down)));
        m.sort_by_key(|r| r.rank);
        m
    }

    fn mv(label: &str, from: u32, to: Option<u32>) -> Move {
        Move {
            class: "pool".into(),
            label: label.into(),
            from,
            to,
        }
    }

    #[test]
    fn a_replica_on_a_gone_engine_moves_to_the_first_healthy_spare() {
        let instances = [inst("a", &[1, 2, 3]), inst("b", &[2, 4, 5])];
        // Rank 2 is gone; rank 4 is up in the map but failing its probes (down).
        let ranks = map(&[1, 3, 4, 5, 6], &[2]);
        let plan = plan_moves(&instances, &ranks, |r| r == 2, |r| r == 2 || r == 4);
        assert_eq!(plan, vec![mv("a", 2, Some(5)), mv("b", 2, Some(1))]);
    }

    #[test]
    fn one_move_per_instance_per_round_and_none_before_the_engine_is_gone() {
        let instances = [inst("a", &[1, 2, 3])];
        let ranks = map(&[4, 5], &[1, 2, 3]);
        // Two gone: only the first moves this round.
        let plan = plan_moves(&instances, &ranks, |r| r == 1 || r == 2, |r| r <= 3);
        assert_eq!(plan, vec![mv("a", 1, Some(4))]);
        // Down but not gone yet (not down for `reconf_after`): nothing moves.
        assert!(plan_moves(&instances, &ranks, |_| false, |r| r <= 3).is_empty());
    }

    #[test]
    fn a_gone_replica_without_a_spare_is_reported_and_the_next_is_tried() {
        let instances = [inst("a", &[1, 2, 3])];
        let ranks = map(&[1, 3], &[2]);
        let plan = plan_moves(&instances, &ranks, |r| r == 2 || r == 3, |r| r == 2);
        assert_eq!(plan, vec![mv("a", 2, None), mv("a", 3, None)]);
    }
}
