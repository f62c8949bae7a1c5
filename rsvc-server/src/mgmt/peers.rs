//! Remote control of other engines' replicas over the peer port: start, stop, identify, and
//! the calls that only an instance's leader accepts (membership changes, transfers).

use super::*;

impl MgmtInner {
    pub(super) async fn start_on(
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

    pub(super) async fn stop_on(&self, addr: &str, class: &str, label: &str) -> Result<(), String> {
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

    /// Asks the engine at `addr` who it is.
    pub(super) async fn identify(&self, addr: &str) -> Result<pb::IdentifyReply, String> {
        let mut peer = self.peers.peer(addr)?;
        match tokio::time::timeout(
            self.limits.join_identify_timeout,
            peer.identify(pb::IdentifyRequest {}),
        )
        .await
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!("{addr}: {}", s.message())),
            Err(_) => Err(format!(
                "{addr}: no answer within {:?}",
                self.limits.join_identify_timeout
            )),
        }
    }

    /// Sends `call` to the replicas of `info` until the leader accepts it, for up to `rounds`
    /// passes over them. A refusal of the request itself (INTERNAL, INVALID_ARGUMENT,
    /// DEADLINE_EXCEEDED) ends it; "not the leader", busy, unreachable and "no replica here"
    /// move on to the next replica (see `From<EngineError> for Status`).
    pub(super) async fn ask_leader<T, F, Fut>(
        &self,
        info: &InstanceInfo,
        rounds: usize,
        call: F,
    ) -> Result<T, String>
    where
        F: Fn(pb::peer_client::PeerClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut last = String::from("no replica answered");
        for round in 0..rounds {
            if round > 0 {
                tokio::time::sleep(self.limits.change_retry).await;
            }
            for (rank, addr) in &info.replicas {
                let Ok(peer) = self.peers.peer(addr) else { continue };
                match call(peer).await {
                    Ok(v) => return Ok(v),
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::Internal
                                | tonic::Code::InvalidArgument
                                | tonic::Code::DeadlineExceeded
                        ) =>
                    {
                        return Err(format!("rank {rank}: {}", s.message()));
                    }
                    Err(s) => last = format!("rank {rank}: {}", s.message()),
                }
            }
        }
        Err(last)
    }

    /// Asks whichever replica of `info` leads to hand leadership to `to_rank` (0: any).
    pub(super) async fn transfer(&self, info: &InstanceInfo, to_rank: u32) -> Result<u32, String> {
        let req = pb::TransferLeaderRequest {
            cluster: self.cluster.clone(),
            class: info.class.clone(),
            instance: info.label.clone(),
            to_rank,
        };
        self.ask_leader(info, 1, |mut peer| {
            let req = req.clone();
            async move { peer.transfer_leader(req).await.map(|r| r.into_inner().new_leader) }
        })
        .await
    }

    /// Asks whichever replica of `info` leads to add or remove a member, retrying while a
    /// leader is being elected or another membership change is in progress.
    pub(super) async fn change_replicas(
        &self,
        info: &InstanceInfo,
        add: Option<&Member>,
        remove: Option<(u32, u32)>,
    ) -> Result<(), String> {
        let req = pb::ChangeReplicasRequest {
            cluster: self.cluster.clone(),
            class: info.class.clone(),
            instance: info.label.clone(),
            add: add.map(wire::member_to),
            remove: remove.map(|(rank, gen)| pb::ReplicaRef { rank, gen }),
        };
        self.ask_leader(info, 50, |mut peer| {
            let req = req.clone();
            async move { peer.change_replicas(req).await.map(|_| ()) }
        })
        .await
    }
}
