//! Giving leadership up: resignation and transfer to a chosen voter.

use super::*;

impl Db {
    /// Gives up leadership: stops serving at once, stops heartbeats and stays out of elections
    /// until another replica leads or two maximum election timeouts passed. A lone voter takes
    /// its leadership up again after that.
    pub async fn resign(&self) -> Result<()> {
        let hold = self.inner.config.election_timeout.1 * 2;
        self.leader_cmd(LeaderCmd::Resign {
            until: Instant::now() + hold,
        });
        tracing::info!(replica = %self.inner.ident.replica, "resigning leadership");
        let mut up = self.inner.up.clone();
        let stepped_down = async {
            while up.borrow_and_update().is_some() {
                if up.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::time::timeout(hold, stepped_down)
            .await
            .map_err(|_| Error::Timeout("resign: still serving as leader".into()))
    }

    /// Hands leadership to `to`, a voter, without waiting for an election timeout.
    ///
    /// This replica stops serving at once (no transaction starts while leadership moves), waits
    /// until `to` holds every entry, then uses openraft's leadership transfer: every voter is
    /// told to drop its lease on this leader, and `to` campaigns as soon as it has flushed the
    /// leader's last entry. Done when another replica leads; on failure this replica takes its
    /// leadership up again.
    pub async fn transfer_leadership(&self, to: ReplicaId, timeout: Duration) -> Result<()> {
        if !self.members().iter().any(|m| m.replica == to) {
            return Err(Error::NotFound(format!("replica {to} is not a member")));
        }
        if to == self.inner.ident.replica {
            return Err(Error::Invalid("cannot transfer leadership to oneself".into()));
        }
        if self.up_term().is_none() {
            return Err(self.not_leader());
        }
        let deadline = Instant::now() + timeout;
        self.leader_cmd(LeaderCmd::Resign { until: deadline });
        let give_back = |e: Error| {
            self.leader_cmd(LeaderCmd::Unresign);
            Err(e)
        };
        // A target that is down or far behind is not worth waiting for long.
        let catch_up = timeout.min(self.inner.config.election_timeout.1 * 2);
        let caught_up = matches!(
            tokio::time::timeout(catch_up, self.wait_caught_up(to.node_id())).await,
            Ok(Ok(()))
        );
        if !caught_up {
            return give_back(Error::Timeout(format!("replica {to} did not catch up")));
        }
        if let Err(e) = self.inner.raft.trigger().transfer_leader(to.node_id()).await {
            return give_back(fatal(e));
        }
        let mut m = self.inner.raft.metrics();
        let me = self.inner.ident.replica.node_id();
        let moved = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), async {
            loop {
                if m.borrow_and_update().current_leader.is_some_and(|l| l != me) {
                    return true;
                }
                if m.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false);
        if moved {
            tracing::info!(from = %self.inner.ident.replica, to = %to, "leadership transferred");
            Ok(())
        } else {
            give_back(Error::Timeout("leadership did not move".into()))
        }
    }

    /// The voter that would take over leadership soonest: the most caught-up one. `None` if
    /// this replica does not lead or is the only voter.
    pub fn transfer_target(&self) -> Option<ReplicaId> {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        let me = self.inner.ident.replica.node_id();
        let voters: Vec<u64> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|&v| v != me)
            .collect();
        let repl = m.replication.as_ref()?;
        voters
            .into_iter()
            .max_by_key(|v| repl.get(v).cloned().flatten().map(|l| l.index))
            .map(ReplicaId::from_node_id)
    }

    /// Starts an election now.
    pub async fn campaign(&self) -> Result<()> {
        self.leader_cmd(LeaderCmd::Unresign);
        self.inner.raft.trigger().elect(false).await.map_err(fatal)
    }
}
