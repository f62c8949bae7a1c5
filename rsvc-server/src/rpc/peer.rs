//! The engine-to-engine gRPC service (`rsvc.peer.v1.Peer`): raft messages, identification and
//! replica lifecycle for the management leader.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rdb::Member;
use tonic::{Request, Response, Status};

use crate::engine::{ConnInfo, Engine, EngineError};
use crate::host::Host;
use crate::wire::{self, pb};

pub(crate) struct PeerSvc(pub(crate) Engine);

/// Admits a peer call only over a connection whose certificate is an engine's (with TLS on;
/// without it nobody is authenticated). Whatever the payload says, a client certificate cannot
/// send raft messages or start, stop or dictate replicas.
pub(crate) fn only_engines(
    req: Request<()>,
    refused: &std::sync::atomic::AtomicU64,
) -> Result<Request<()>, Status> {
    if let Some(ci) = req.extensions().get::<ConnInfo>() {
        if ci.caller.authenticated && ci.caller.engine.is_none() {
            refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(caller = %ci.caller, remote = ?ci.remote, "refused a peer call from a non-engine");
            return Err(Status::permission_denied(format!(
                "{} is not an engine of this cluster: peer calls need an engine certificate",
                ci.caller
            )));
        }
    }
    Ok(req)
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerSvc {
    async fn raft(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftReply>, Status> {
        let sender = crate::engine::caller_of(&req);
        let m = req.into_inner();
        let refuse = |why: String| {
            Ok(Response::new(pb::RaftReply {
                result: Some(pb::raft_reply::Result::Refused(why)),
            }))
        };
        if m.cluster != self.0.inner.cluster {
            return refuse(format!(
                "message for cluster {:?}, this is {:?}",
                m.cluster, self.0.inner.cluster
            ));
        }
        let rpc = match wire::rpc_from(m) {
            Ok(r) => r,
            Err(e) => return refuse(format!("malformed: {e}")),
        };
        // An engine speaks for its own rank only: a compromised engine cannot pose as
        // another replica of a group.
        if let Some(rank) = sender.engine {
            if rpc.from.rank != rank {
                tracing::warn!(
                    cert_rank = rank,
                    claimed = rpc.from.rank,
                    "refused a raft message sent in another rank's name"
                );
                return Err(Status::permission_denied(format!(
                    "the certificate names rank {rank}, the message claims rank {}",
                    rpc.from.rank
                )));
            }
        }
        let host = self.0.host_of_db(&rpc.db);
        let Some(host) = host else {
            return refuse(format!("no replica of db {} here", rpc.db));
        };
        match host.db.handle_rpc(rpc).await {
            Ok(b) => Ok(Response::new(pb::RaftReply {
                result: Some(pb::raft_reply::Result::Ok(b)),
            })),
            Err(r) => refuse(r.to_string()),
        }
    }

    async fn identify(
        &self,
        _req: Request<pb::IdentifyRequest>,
    ) -> Result<Response<pb::IdentifyReply>, Status> {
        // NB: a stopping engine drops its replicas one by one; a list taken now would make the
        // management leader take them for lost and re-create them elsewhere in time.
        if self.0.inner.stopping.load(Ordering::SeqCst) {
            return Err(Status::unavailable("engine stopping"));
        }
        let hosted = self
            .0
            .hosts()
            .iter()
            .map(|h| pb::HostedReplica {
                class: h.class.clone(),
                instance: h.instance.clone(),
                gen: h.db.ident().replica.gen,
            })
            .collect();
        Ok(Response::new(pb::IdentifyReply {
            rank: self.0.inner.rank,
            cluster: self.0.inner.cluster.clone(),
            incarnation: self.0.inner.incarnation,
            hosted,
        }))
    }

    async fn start_replica(
        &self,
        req: Request<pb::StartReplicaRequest>,
    ) -> Result<Response<pb::StartReplicaReply>, Status> {
        let r = req.into_inner();
        if r.cluster != self.0.inner.cluster {
            return Err(Status::permission_denied("wrong cluster"));
        }
        let db = wire::db_from(&r.db).map_err(Status::invalid_argument)?;
        let members: Result<Vec<Member>, String> = r.bootstrap.iter().map(wire::member_from).collect();
        let members = members.map_err(Status::invalid_argument)?;
        let m = self
            .0
            .start_replica(&r.class, &r.instance, db, r.gen, members)
            .await?;
        Ok(Response::new(pb::StartReplicaReply {
            member: Some(wire::member_to(&m)),
        }))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderReply>, Status> {
        let r = req.into_inner();
        let host = self.leader_host(&r.cluster, &r.class, &r.instance)?;
        if r.to_rank == self.0.inner.rank {
            // Already where it was asked to go: done, not an error.
            return Ok(Response::new(pb::TransferLeaderReply {
                new_leader: r.to_rank,
            }));
        }
        let to = if r.to_rank == 0 {
            host.db
                .transfer_target()
                .ok_or_else(|| Status::failed_precondition("no other voter"))?
        } else {
            host.db
                .status()
                .voters
                .into_iter()
                .find(|v| v.rank == r.to_rank)
                .ok_or_else(|| Status::invalid_argument(format!("rank {} holds no voter", r.to_rank)))?
        };
        host.db
            .transfer_leadership(to, self.0.inner.limits.transfer_timeout)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::TransferLeaderReply { new_leader: to.rank }))
    }

    async fn change_replicas(
        &self,
        req: Request<pb::ChangeReplicasRequest>,
    ) -> Result<Response<pb::ChangeReplicasReply>, Status> {
        self.change(req.into_inner())
            .await
            .map(|()| Response::new(pb::ChangeReplicasReply {}))
    }

    async fn dictate_replica(
        &self,
        req: Request<pb::DictateReplicaRequest>,
    ) -> Result<Response<pb::DictateReplicaReply>, Status> {
        let r = req.into_inner();
        if r.cluster != self.0.inner.cluster {
            return Err(Status::permission_denied("wrong cluster"));
        }
        let db = wire::db_from(&r.db).map_err(Status::invalid_argument)?;
        let (m, term) = self.0.dictate_replica(&r.class, &r.instance, db, r.gen).await?;
        Ok(Response::new(pb::DictateReplicaReply {
            member: Some(wire::member_to(&m)),
            term,
        }))
    }

    async fn stop_replica(
        &self,
        req: Request<pb::StopReplicaRequest>,
    ) -> Result<Response<pb::StopReplicaReply>, Status> {
        let r = req.into_inner();
        if r.cluster != self.0.inner.cluster {
            return Err(Status::permission_denied("wrong cluster"));
        }
        self.0.stop_replica(&r.class, &r.instance, r.destroy).await?;
        Ok(Response::new(pb::StopReplicaReply {}))
    }
}

impl PeerSvc {
    /// The replica of `class`/`instance` here, if this system's and leading.
    fn leader_host(&self, cluster: &str, class: &str, instance: &str) -> Result<Arc<Host>, Status> {
        if cluster != self.0.inner.cluster {
            return Err(Status::permission_denied("wrong cluster"));
        }
        let host = self
            .0
            .host(class, instance)
            .ok_or_else(|| Status::not_found("no such replica here"))?;
        if host.db.up_term().is_none() {
            return Err(Status::failed_precondition("not the leader"));
        }
        Ok(host)
    }

    async fn change(&self, r: pb::ChangeReplicasRequest) -> Result<(), Status> {
        let host = self.leader_host(&r.cluster, &r.class, &r.instance)?;
        let res = match (r.add, r.remove) {
            (Some(m), None) => {
                host.db
                    .add_replica(wire::member_from(&m).map_err(Status::invalid_argument)?)
                    .await
            }
            (None, Some(rm)) => {
                let gone = rdb::ReplicaId::new(rm.rank, rm.gen);
                if gone == host.db.ident().replica {
                    // NB: a leader does not remove itself. It hands leadership to a caught-up
                    // voter first, and the caller asks again, now of the new leader.
                    let to = host
                        .db
                        .transfer_target()
                        .ok_or_else(|| Status::failed_precondition("the last voter cannot be removed"))?;
                    host.db
                        .transfer_leadership(to, self.0.inner.limits.transfer_timeout)
                        .await
                        .map_err(|e| Status::unavailable(format!("handing over before removal: {e}")))?;
                    return Err(Status::unavailable(format!(
                        "leadership moved to rank {} before removing this replica",
                        to.rank
                    )));
                }
                host.db.remove_replica(gone).await
            }
            _ => return Err(Status::invalid_argument("exactly one of add and remove")),
        };
        res.map_err(|e| EngineError::Rdb(e).into())
    }
}
