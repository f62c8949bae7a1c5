//! Membership: bootstrap, adding replicas (as learners first), removing them.

use super::*;

impl Db {
    /// Bootstraps a new group with `members` as its voters. Call on one replica (any), after
    /// every member was created and started. Fails with `Exists` if the group already has a
    /// membership.
    pub async fn initialize(&self, members: Vec<Member>) -> Result<()> {
        if !members.iter().any(|m| m.replica == self.inner.ident.replica) {
            return Err(Error::Invalid(
                "the initial replica list must include the initializing replica".into(),
            ));
        }
        let nodes: BTreeMap<NodeId, Member> = members.into_iter().map(|m| (m.replica.node_id(), m)).collect();
        match self.inner.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => Err(Error::Exists(e.to_string())),
            Err(RaftError::APIError(e)) => Err(Error::Invalid(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(fatal(e)),
        }
    }

    /// Adds a replica: first as a learner (waits until it has caught up), then as a voter.
    /// Adding a voter again is a no-op; adding a learner again promotes it.
    pub async fn add_replica(&self, member: Member) -> Result<()> {
        // Idempotent, so that a caller can retry after Busy: a change that failed half-way
        // leaves a learner behind, which is then only promoted.
        let id = member.replica.node_id();
        let (is_voter, is_learner) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow_watched();
            let ms = m.membership_config.membership();
            let voter = ms.voter_ids().any(|v| v == id);
            (voter, !voter && ms.learner_ids().any(|l| l == id))
        };
        if is_voter {
            return Ok(());
        }
        if !is_learner {
            self.inner
                .raft
                .add_learner(id, member, true)
                .await
                .map_err(|e| self.map_write_err(e))?;
        }
        self.wait_caught_up(id).await?;
        self.inner
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.map_write_err(e))?;
        Ok(())
    }

    /// Waits until the learner `id` holds every entry this leader had when the wait began.
    ///
    /// NB: openraft's blocking `add_learner` returns once the learner is within
    /// `replication_lag_threshold` entries, and rdb packs many transactions into one entry, so
    /// a learner with none of a large state counted as caught up; promoted, it was a voter
    /// that could not yet help a quorum.
    pub(super) async fn wait_caught_up(&self, id: NodeId) -> Result<()> {
        let mut m = self.inner.raft.metrics();
        let target = m.borrow_watched().last_log_index;
        loop {
            {
                let mm = m.borrow_and_update();
                if leader_term(&mm).is_none() {
                    return Err(self.not_leader());
                }
                let matched = mm
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned())
                    .flatten()
                    .map(|l| l.index);
                if matched >= target {
                    return Ok(());
                }
            }
            m.changed()
                .await
                .map_err(|_| Error::Stopped("replica stopped".into()))?;
        }
    }

    /// Removes a replica (voter or learner) from the group.
    pub async fn remove_replica(&self, replica: ReplicaId) -> Result<()> {
        let id = replica.node_id();
        let m = self
            .inner
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        let change = if m.membership().voter_ids().any(|v| v == id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if m.membership().learner_ids().any(|v| v == id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Err(Error::NotFound(format!("replica {replica} is not a member")));
        };
        self.inner
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.map_write_err(e))?;
        Ok(())
    }

    fn map_write_err(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Error {
        match e {
            RaftError::APIError(
                ClientWriteError::ForwardToLeader(_) | ClientWriteError::LogEntryDiscarded(_),
            ) => self.not_leader(),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => match c {
                openraft::error::ChangeMembershipError::InProgress(p) => Error::Busy(p.to_string()),
                other => Error::Invalid(other.to_string()),
            },
            RaftError::APIError(other) => Error::Raft(other.to_string()),
            RaftError::Fatal(f) => fatal(f),
        }
    }
}
