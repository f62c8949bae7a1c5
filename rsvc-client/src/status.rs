//! The typed status of replicas (etcd's maintenance `Status`): what one engine's replicas
//! report of themselves, read over the client port without going through any leader.

use std::time::Duration;

use crate::client::Connections;
use crate::wire::pb;

/// What one replica reports of itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaStatus {
    /// Its service class.
    pub class: String,
    /// Its instance.
    pub instance: String,
    /// The engine hosting it.
    pub rank: u32,
    /// Its generation on that engine.
    pub gen: u32,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`, by raft's account.
    pub role: String,
    /// The newest term it knows.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<u32>,
    /// Whether it leads and has proved it (stepped up): it admits requests and serves reads
    /// on its lease.
    pub serving: bool,
    /// Index of its last log entry.
    pub last_log_index: Option<u64>,
    /// Index of its last applied entry.
    pub applied_index: Option<u64>,
    /// Index its newest snapshot covers.
    pub snapshot_index: Option<u64>,
    /// Index its log is purged up to.
    pub purged_index: Option<u64>,
    /// Ranks of the voters of its group.
    pub voters: Vec<u32>,
    /// Ranks of the learners of its group.
    pub learners: Vec<u32>,
    /// Free bytes as its admission sees them (its filesystem's, less the upkeep of its
    /// engine's other replicas).
    pub free_bytes: Option<u64>,
    /// What its next snapshot and file growth may take.
    pub upkeep_bytes: Option<u64>,
    /// Size of its log file.
    pub log_bytes: u64,
    /// Size of its state machine file.
    pub state_bytes: u64,
    /// Why a storage error stopped it, if one did.
    pub stopped: Option<String>,
}

impl From<pb::ReplicaStatus> for ReplicaStatus {
    fn from(r: pb::ReplicaStatus) -> Self {
        ReplicaStatus {
            class: r.class,
            instance: r.instance,
            rank: r.rank,
            gen: r.gen,
            role: r.role,
            term: r.term,
            leader: r.leader_rank,
            serving: r.serving,
            last_log_index: r.last_log_index,
            applied_index: r.applied_index,
            snapshot_index: r.snapshot_index,
            purged_index: r.purged_index,
            voters: r.voters,
            learners: r.learners,
            free_bytes: r.free_bytes,
            upkeep_bytes: r.upkeep_bytes,
            log_bytes: r.log_bytes,
            state_bytes: r.state_bytes,
            stopped: (!r.stopped.is_empty()).then_some(r.stopped),
        }
    }
}

impl From<&ReplicaStatus> for pb::ReplicaStatus {
    fn from(r: &ReplicaStatus) -> Self {
        pb::ReplicaStatus {
            class: r.class.clone(),
            instance: r.instance.clone(),
            rank: r.rank,
            gen: r.gen,
            role: r.role.clone(),
            term: r.term,
            leader_rank: r.leader,
            serving: r.serving,
            last_log_index: r.last_log_index,
            applied_index: r.applied_index,
            snapshot_index: r.snapshot_index,
            purged_index: r.purged_index,
            voters: r.voters.clone(),
            learners: r.learners.clone(),
            free_bytes: r.free_bytes,
            upkeep_bytes: r.upkeep_bytes,
            log_bytes: r.log_bytes,
            state_bytes: r.state_bytes,
            stopped: r.stopped.clone().unwrap_or_default(),
        }
    }
}

/// Asks the engine at `addr` for the status of its replicas of `class` (all classes if
/// `None`) and `instance` (all instances if `None`), within `timeout`.
pub async fn replica_status(
    conns: &Connections,
    addr: &str,
    class: Option<&str>,
    instance: Option<&str>,
    timeout: Duration,
) -> Result<Vec<ReplicaStatus>, String> {
    let mut c = conns.get(addr)?;
    let req = pb::StatusRequest {
        class: class.unwrap_or_default().to_string(),
        instance: instance.unwrap_or_default().to_string(),
    };
    let reply = tokio::time::timeout(timeout, c.status(req))
        .await
        .map_err(|_| format!("{addr}: no status within {timeout:?}"))?
        .map_err(|s| format!("{addr}: {}", s.message()))?;
    Ok(reply.into_inner().replicas.into_iter().map(Into::into).collect())
}
