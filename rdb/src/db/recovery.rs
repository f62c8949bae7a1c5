//! Offline operations on a stopped replica: destroy and the catastrophic `dictate`.

use super::*;

impl Db {
    /// Removes a stopped replica's directory.
    pub fn destroy(dir: &FsPath) -> Result<()> {
        storage::read_identity(dir)?;
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }

    /// Catastrophic recovery: rewrites the stopped replica in `dir` so that it is the only
    /// voter of its group, keeping every entry it has.
    ///
    /// DANGEROUS. Entries that other replicas committed but this one never received are lost,
    /// and if any other replica of the group is still alive, two groups now think they are the
    /// one. Use it only when a quorum is gone for good, then add new replicas.
    pub fn dictate(dir: &FsPath) -> Result<()> {
        let files = storage::open(dir, None)?;
        let me = files.ident.replica.node_id();
        let vote: Option<Vote> = files
            .log
            .read_vote_offline()
            .map_err(|e| Error::Storage(e.to_string()))?;
        let last: Option<LogId> = files
            .log
            .last_log_id_offline()
            .map_err(|e| Error::Storage(e.to_string()))?;
        let term = vote
            .map_or(0, |v| v.leader_id.term)
            .max(last.map_or(0, |l| l.leader_id.term))
            + 1;
        let member = Member {
            replica: files.ident.replica,
            addr: own_addr(&files, me)?,
            storage_id: files.ident.storage_id,
        };
        let membership = Membership::new(vec![BTreeSet::from([me])], BTreeMap::from([(me, member)]))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let entry = Entry {
            log_id: LogId::new(
                openraft::impls::leader_id_adv::LeaderId { term, node_id: me },
                last.map_or(0, |l| l.index + 1),
            ),
            payload: EntryPayload::Membership(membership),
        };
        files.log.append_offline(vec![entry])?;
        files.log.write_vote_offline(&Vote::new_committed(term, me))?;
        tracing::warn!(replica = %files.ident.replica, term, "dictated: this replica is now the only voter");
        Ok(())
    }
}

/// Finds this replica's own membership entry (for its address) in its log or state machine.
fn own_addr(files: &storage::Files, me: NodeId) -> Result<String> {
    let mut reader = files.log.clone();
    let entries = futures::executor::block_on(openraft::RaftLogReader::try_get_log_entries(&mut reader, ..))
        .map_err(|e| Error::Storage(e.to_string()))?;
    for e in entries.iter().rev() {
        if let EntryPayload::Membership(m) = &e.payload {
            if let Some(n) = m.get_node(&me) {
                return Ok(n.addr.clone());
            }
        }
    }
    let mut sm = files.sm.clone();
    let (_, stored) =
        futures::executor::block_on(openraft::storage::RaftStateMachine::applied_state(&mut sm))
            .map_err(|e| Error::Storage(e.to_string()))?;
    stored
        .membership()
        .get_node(&me)
        .map(|n| n.addr.clone())
        .ok_or_else(|| Error::Invalid("this replica was never a member; nothing to dictate".into()))
}
