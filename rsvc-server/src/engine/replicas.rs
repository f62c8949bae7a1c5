//! Replica lifecycle on one engine: recovery at start, create, dictate, stop, and reopening
//! replicas that a storage error stopped.

use super::*;

impl Engine {
    fn replica_dir(&self, class: &str, instance: &str) -> PathBuf {
        self.inner.data_dir.join(class).join(instance)
    }

    fn options(&self) -> StartOptions {
        let mut o = StartOptions::new(self.inner.transport.clone(), self.inner.addr.clone());
        o.config = self.inner.db_config.clone();
        o.probe = self.inner.probe.clone();
        o
    }

    pub(super) async fn recover(&self) -> Result<(), EngineError> {
        for class_entry in std::fs::read_dir(&self.inner.data_dir)? {
            let class_dir = class_entry?.path();
            let Some(class) = class_dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            if !class_dir.is_dir() {
                continue;
            }
            for inst_entry in std::fs::read_dir(&class_dir)? {
                let dir = inst_entry?.path();
                let Some(instance) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                    continue;
                };
                // NB: a replica that cannot be opened stops the engine from starting. Serving
                // without it would report the engine healthy while one of its replicas is
                // missing from its group.
                match self.open_replica(&class, &instance, &dir).await {
                    Ok(_) => tracing::info!(%class, %instance, "recovered replica"),
                    Err(e) => {
                        return Err(EngineError::Recover {
                            class,
                            instance,
                            dir,
                            cause: e.to_string(),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    async fn open_replica(&self, class: &str, instance: &str, dir: &FsPath) -> Result<Db, EngineError> {
        let factory = self
            .inner
            .factories
            .get(class)
            .ok_or_else(|| EngineError::UnknownClass(class.into()))?;
        let db = Db::start(dir, self.options()).await?;
        let host = Host::start(class, instance, db.clone(), factory.create(instance));
        self.inner.hosts.write().expect("lock").insert(host);
        Ok(db)
    }

    /// Reopens replicas whose raft core a storage error stopped (a full disk, most often),
    /// once a second until each runs again: a restart of the engine is never needed. Says so
    /// once per replica and outage, not per attempt.
    ///
    /// NB: openraft stops a replica on its first storage error, and redb may need a reopen
    /// after a failed commit; reopening from the files is what a restart would do. Nothing
    /// acknowledged is lost: an entry counts only once it is durable on a quorum. While the
    /// replica is down its group runs on the others; the reopened replica catches up from
    /// the leader.
    pub(super) async fn revive_stopped(&self) {
        /// One replica's outage: when it began, and when the last reopen succeeded.
        struct Outage {
            since: std::time::Instant,
            reopened: Option<std::time::Instant>,
        }
        let mut stop = self.inner.shutdown.subscribe();
        let mut tick = tokio::time::interval(self.inner.limits.revive_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down: HashMap<(String, String), Outage> = HashMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if self.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            for h in self.hosts() {
                let key = (h.class.clone(), h.instance.clone());
                let Some(why) = h.db.status().stopped else {
                    // Up again; it counts once it stayed up (a full disk may stop it again
                    // at once, and that is still the same outage).
                    if let Some(o) = down.get(&key) {
                        if o.reopened
                            .is_some_and(|t| t.elapsed() >= self.inner.limits.revived_after)
                        {
                            tracing::info!(class = %h.class, instance = %h.instance,
                                down_ms = o.since.elapsed().as_millis() as u64,
                                "replica runs again after a storage error");
                            down.remove(&key);
                        }
                    }
                    continue;
                };
                down.entry(key.clone()).or_insert_with(|| {
                    tracing::warn!(class = %h.class, instance = %h.instance, cause = %why,
                        "replica stopped by a storage error; reopening it until it runs");
                    Outage {
                        since: std::time::Instant::now(),
                        reopened: None,
                    }
                });
                if let Err(e) = h.db.stop().await {
                    tracing::debug!(class = %h.class, instance = %h.instance, cause = %e, "stopping the failed replica");
                }
                // Only if nobody replaced or removed it meanwhile.
                if !self
                    .host(&h.class, &h.instance)
                    .is_some_and(|c| Arc::ptr_eq(&c, &h))
                {
                    down.remove(&key);
                    continue;
                }
                match self.open_replica(&h.class, &h.instance, h.db.dir()).await {
                    Ok(_) => {
                        if let Some(o) = down.get_mut(&key) {
                            o.reopened = Some(std::time::Instant::now());
                        }
                        tracing::debug!(class = %h.class, instance = %h.instance, "reopened after a storage error");
                    }
                    Err(e) => {
                        tracing::debug!(class = %h.class, instance = %h.instance, cause = %e, "reopen failed; trying again");
                    }
                }
            }
        }
    }

    /// Creates and starts a replica here (DAOS `dist_start`). With a non-empty `bootstrap`
    /// list, this replica also bootstraps the group (every other member must exist already).
    /// Idempotent for the same database id.
    pub async fn start_replica(
        &self,
        class: &str,
        instance: &str,
        db: DbId,
        gen: u32,
        bootstrap: Vec<Member>,
    ) -> Result<Member, EngineError> {
        if !valid_name(class) || !valid_name(instance) {
            return Err(EngineError::Invalid(format!(
                "bad class or instance name {class:?}/{instance:?}"
            )));
        }
        if !self.inner.factories.contains_key(class) {
            return Err(EngineError::UnknownClass(class.into()));
        }
        let dir = self.replica_dir(class, instance);
        // NB: the generation the caller asks for is the management directory's, and it is
        // authoritative. A replica of an older generation of the same group is an orphan (of a
        // repair or a move that failed half-way): replace it, or the directory would list an
        // identity this engine does not host, and take it for lost forever.
        if let Some(h) = self.host(class, instance) {
            let have = h.db.ident();
            if have.db == db && have.replica.gen < gen {
                tracing::info!(%class, %instance, old_gen = have.replica.gen, gen, "replacing an orphaned replica of an older generation");
                self.stop_replica(class, instance, true).await?;
            }
        }
        let member = match self.host(class, instance) {
            Some(h) if h.db.ident().db == db && h.db.ident().replica.gen == gen => h.db.member(),
            Some(h) if h.db.ident().db == db => {
                return Err(EngineError::Rdb(rdb::Error::Exists(format!(
                    "{class}/{instance} lives here at generation {}, newer than {gen}",
                    h.db.ident().replica.gen
                ))))
            }
            Some(_) => {
                return Err(EngineError::Rdb(rdb::Error::Exists(format!(
                    "another {class}/{instance} lives here"
                ))))
            }
            None => {
                Db::create(&dir, db, ReplicaId::new(self.inner.rank, gen), None)?;
                self.open_replica(class, instance, &dir).await?.member()
            }
        };
        if !bootstrap.is_empty() {
            let host = self.host(class, instance).expect("just started");
            match host.db.initialize(bootstrap).await {
                Ok(()) | Err(rdb::Error::Exists(_)) => {}
                Err(e) => return Err(e.into()),
            }
            // NB: until a leader's first entry commits, the membership lives in this replica's
            // log alone; the others are empty and cannot even campaign. Answering now would let
            // the management service record (and acknowledge) an instance that the loss of this
            // one engine destroys for good (found by the fault suite's wipe nemesis). A replica
            // that applied an entry of a leader knows the group is on a quorum.
            let formed = || {
                let s = host.db.status();
                s.up_term.is_some() || (s.leader.is_some() && s.applied_index.is_some_and(|i| i >= 1))
            };
            let deadline = tokio::time::Instant::now() + self.inner.limits.bootstrap_timeout;
            while !formed() {
                if tokio::time::Instant::now() >= deadline {
                    return Err(EngineError::Rdb(rdb::Error::Timeout(
                        "the new group elected no leader that committed its first entry".into(),
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(member)
    }

    /// Catastrophic recovery (DAOS's `DICTATE` start mode): makes the replica of
    /// `class/instance` here, of database `db` and generation `gen`, the only voter of its
    /// group, and waits until it leads. Answers its member and the term it leads in.
    ///
    /// DANGEROUS: entries that other replicas committed and this one never received are lost.
    /// The caller (the management service) checks that the group's quorum is gone, and takes
    /// the other replicas out of its directory.
    pub async fn dictate_replica(
        &self,
        class: &str,
        instance: &str,
        db: DbId,
        gen: u32,
    ) -> Result<(Member, u64), EngineError> {
        let host = self.host(class, instance).ok_or_else(|| {
            EngineError::Rdb(rdb::Error::NotFound(format!(
                "no replica of {class}/{instance} here"
            )))
        })?;
        let have = host.db.ident();
        if have.db != db || have.replica.gen != gen {
            return Err(EngineError::Precondition(format!(
                "the replica of {class}/{instance} here is generation {} of another group or generation than asked ({gen})",
                have.replica.gen
            )));
        }
        if host.db.up_term().is_some() {
            return Err(EngineError::Precondition(format!(
                "the replica of {class}/{instance} here leads; its group has a quorum"
            )));
        }
        let dir = host.db.dir().to_path_buf();
        drop(host);
        self.stop_replica(class, instance, false).await?;
        let rewritten = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || Db::dictate(&dir))
                .await
                .map_err(|e| EngineError::Invalid(format!("dictate panicked: {e}")))?
        };
        // Whatever became of the rewrite, the replica must run again: a replica left stopped
        // would be taken for lost by the management service.
        let db = self.open_replica(class, instance, &dir).await?;
        rewritten?;
        let term = db
            .wait_up(self.inner.limits.bootstrap_timeout)
            .await
            .map_err(|e| {
                EngineError::Rdb(rdb::Error::Timeout(format!(
                    "the dictated replica did not step up: {e}"
                )))
            })?;
        tracing::warn!(%class, %instance, term, "dictated: this replica is now its group's only voter, and leads");
        Ok((db.member(), term))
    }

    /// Stops a hosted replica and, with `destroy`, removes its files.
    pub async fn stop_replica(&self, class: &str, instance: &str, destroy: bool) -> Result<(), EngineError> {
        let host = self.inner.hosts.write().expect("lock").remove(class, instance);
        let Some(host) = host else {
            return Err(EngineError::Rdb(rdb::Error::NotFound(format!(
                "{class}/{instance}"
            ))));
        };
        host.db.stop().await?;
        if destroy {
            Db::destroy(host.db.dir())?;
        }
        Ok(())
    }
}
