//! The client-facing gRPC service (`rsvc.v1.Rsvc`): calls to a replica's service and the
//! typed status of replicas.

use std::sync::atomic::Ordering;

use rsvc_client::wire::pb as cpb;
use rsvc_client::WireError;
use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::host::{Host, State};

impl Engine {
    fn hint_of(&self, host: &Host) -> cpb::Hint {
        let (leader, term) = host.db.hint();
        let up = host.db.up_term();
        let (rank, term) = match (up, leader) {
            (Some(t), _) => (self.inner.rank, t),
            // NB: a replica that does not serve never hints itself: openraft may still call it
            // leader (a leader cut off from its quorum), but a client must look elsewhere.
            (None, Some(l)) if l.rank != self.inner.rank => (l.rank, term),
            (None, _) => return cpb::Hint::default(),
        };
        let addr = host
            .db
            .members()
            .into_iter()
            .find(|m| m.replica.rank == rank)
            .map(|m| m.addr)
            .unwrap_or_default();
        cpb::Hint {
            valid: true,
            rank,
            term,
            addr,
        }
    }

    async fn call(&self, req: cpb::CallRequest, caller: std::sync::Arc<crate::Caller>) -> cpb::CallReply {
        let err = |e: WireError, hint: Option<cpb::Hint>| cpb::CallReply {
            hint,
            result: Some(cpb::call_reply::Result::Error(cpb::WireError::from(&e))),
        };
        if self.inner.stopping.load(Ordering::SeqCst) {
            return err(WireError::Shutdown, None);
        }
        if !self.inner.factories.contains_key(&req.class) {
            return err(
                WireError::Invalid(format!("unknown service class {:?}", req.class)),
                None,
            );
        }
        let Some(host) = self.host(&req.class, &req.instance) else {
            return err(WireError::NotReplica, None);
        };
        let hint = Some(self.hint_of(&host));
        let Some(adm) = host.admit() else {
            host.stats.not_leader.fetch_add(1, Ordering::Relaxed);
            let e = match host.state().0 {
                State::UpEmpty => WireError::Busy,
                _ => WireError::NotLeader,
            };
            return err(e, hint);
        };
        if req.probe {
            return cpb::CallReply {
                hint,
                result: Some(cpb::call_reply::Result::Ok(vec![])),
            };
        }
        let Ok(client_id) = <[u8; 16]>::try_from(req.client_id.as_slice()) else {
            return err(WireError::Invalid("client_id must be 16 bytes".into()), hint);
        };
        tracing::debug!(class = %req.class, instance = %req.instance, seq = req.seq, "request");
        let t = std::time::Instant::now();
        let res = host
            .handle(&adm, client_id, req.seq, req.acked, &req.payload, caller)
            .await;
        host.stats
            .latency_us_sum
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        let counter = if res.is_ok() {
            &host.stats.ok
        } else {
            &host.stats.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(Ok(b)) => cpb::CallReply {
                hint,
                result: Some(cpb::call_reply::Result::Ok(b)),
            },
            Ok(Err(service_error)) => err(WireError::Service(service_error), hint),
            Err(e) => {
                let hint = Some(self.hint_of(&host));
                err(e, hint)
            }
        }
    }
}

pub(crate) struct RsvcSvc(pub(crate) Engine);

#[tonic::async_trait]
impl cpb::rsvc_server::Rsvc for RsvcSvc {
    async fn call(&self, req: Request<cpb::CallRequest>) -> Result<Response<cpb::CallReply>, Status> {
        let caller = crate::engine::caller_of(&req);
        Ok(Response::new(self.0.call(req.into_inner(), caller).await))
    }

    async fn status(&self, req: Request<cpb::StatusRequest>) -> Result<Response<cpb::StatusReply>, Status> {
        let r = req.into_inner();
        let mut replicas: Vec<cpb::ReplicaStatus> = self
            .0
            .hosts()
            .iter()
            .filter(|h| r.class.is_empty() || h.class == r.class)
            .filter(|h| r.instance.is_empty() || h.instance == r.instance)
            .map(|h| (&replica_status(h)).into())
            .collect();
        replicas.sort_by(|a, b| (&a.class, &a.instance).cmp(&(&b.class, &b.instance)));
        Ok(Response::new(cpb::StatusReply {
            rank: self.0.inner.rank,
            replicas,
        }))
    }
}

/// What a hosted replica reports of itself.
fn replica_status(h: &Host) -> rsvc_client::ReplicaStatus {
    let s = h.db.status();
    let size = |f: &str| std::fs::metadata(h.db.dir().join(f)).map_or(0, |m| m.len());
    let ranks = |v: &[rdb::ReplicaId]| {
        let mut r: Vec<u32> = v.iter().map(|x| x.rank).collect();
        r.sort_unstable();
        r
    };
    rsvc_client::ReplicaStatus {
        class: h.class.clone(),
        instance: h.instance.clone(),
        rank: s.replica.rank,
        gen: s.replica.gen,
        role: match s.role {
            rdb::Role::Follower => "follower",
            rdb::Role::Candidate => "candidate",
            rdb::Role::Leader => "leader",
            rdb::Role::Learner => "learner",
            rdb::Role::Shutdown => "shutdown",
        }
        .into(),
        term: s.term,
        leader: s.leader.map(|l| l.rank),
        serving: h.db.up_term().is_some(),
        last_log_index: s.last_log_index,
        applied_index: s.applied_index,
        snapshot_index: s.snapshot_index,
        purged_index: s.purged_index,
        voters: ranks(&s.voters),
        learners: ranks(&s.learners),
        free_bytes: s.space.map(|x| x.free),
        upkeep_bytes: s.space.map(|x| x.upkeep),
        log_bytes: size("log.redb"),
        state_bytes: size("sm.redb"),
        stopped: s.stopped,
    }
}
