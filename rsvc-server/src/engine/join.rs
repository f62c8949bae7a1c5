//! Joining the system through the access points; the first access point bootstraps the
//! management service when no system exists yet.

use super::*;

impl Engine {
    /// Bootstraps the management service if this is the first access point, then joins the
    /// system through the access points, retrying until it succeeds or the engine stops.
    pub(super) async fn join_system(&self, access_points: Vec<(u32, String)>, is_ap: bool) {
        use rsvc_client::mgmt::{mgmt_client, MgmtRequest, MGMT_CLASS, MGMT_INSTANCE};
        let first_ap = access_points.iter().map(|(r, _)| *r).min();
        if is_ap
            && first_ap == Some(self.inner.rank)
            && self.host(MGMT_CLASS, MGMT_INSTANCE).is_none()
            && self.no_system_yet(&access_points).await
        {
            let db = DbId::random();
            let res = async {
                let me = self
                    .start_replica(MGMT_CLASS, MGMT_INSTANCE, db, 1, vec![])
                    .await?;
                self.start_replica(MGMT_CLASS, MGMT_INSTANCE, db, 1, vec![me])
                    .await
            }
            .await;
            match res {
                Ok(_) => tracing::info!(rank = self.inner.rank, "bootstrapped the management service"),
                Err(e) => tracing::error!(cause = %e, "could not bootstrap the management service"),
            }
        }
        let cfg = rsvc_client::ClientConfig {
            deadline: std::time::Duration::from_secs(5),
            ..Default::default()
        };
        let client = mgmt_client(access_points, self.inner.transport.clients(), cfg);
        let req = MgmtRequest::Join {
            rank: self.inner.rank,
            addr: self.inner.addr.clone(),
            access_point: is_ap,
            cluster: self.inner.cluster.clone(),
            incarnation: self.inner.incarnation,
        };
        let mut stop = self.inner.shutdown.subscribe();
        let mut last_cause = None;
        loop {
            match client.call(&req).await {
                Ok(_) => {
                    tracing::info!(rank = self.inner.rank, "joined the system");
                    self.inner.joined.send_replace(JoinState::Joined);
                    return;
                }
                Err(rsvc_client::ClientError::Service(rsvc_client::mgmt::MgmtError::JoinRefused(why))) => {
                    tracing::error!(rank = self.inner.rank, cause = %why, "the system refused this engine");
                    self.inner.joined.send_replace(JoinState::Refused(why));
                    return;
                }
                Err(e) => {
                    let cause = e.to_string();
                    // Once per distinct cause: a system still forming is not worth a line a second.
                    if last_cause.as_ref() != Some(&cause) {
                        tracing::info!(rank = self.inner.rank, cause = %cause, "not joined yet; retrying");
                        last_cause = Some(cause.clone());
                    }
                    self.inner.joined.send_replace(JoinState::Joining(Some(cause)));
                }
            }
            if *stop.borrow()
                || tokio::time::timeout(self.inner.limits.join_retry, stop.changed())
                    .await
                    .is_ok()
            {
                return;
            }
        }
    }

    /// Whether the first access point, which hosts no management replica, may bootstrap the
    /// management service: only once a majority of the access points (itself included) has
    /// answered and none of them hosts a management replica. Waits while fewer answer; `false`
    /// if a system exists already or the engine stops.
    ///
    /// NB: without this, a first access point that lost its data directory would bootstrap a
    /// second, empty management service beside the real one, and clients that asked it would
    /// see a system with no engines and no instances. The management service lives on the
    /// access points, so a majority of them that knows of none means none has quorum. The
    /// caveat: if the ones that do host it are all among the silent minority and the answering
    /// ones lost their disks too, a second system forms; losing that many disks loses the
    /// system anyway.
    async fn no_system_yet(&self, access_points: &[(u32, String)]) -> bool {
        use rsvc_client::mgmt::MGMT_CLASS;
        let others: Vec<&(u32, String)> = access_points
            .iter()
            .filter(|(r, a)| *r != self.inner.rank && !a.is_empty())
            .collect();
        let mut stop = self.inner.shutdown.subscribe();
        let mut waiting_for: Vec<u32> = Vec::new();
        loop {
            let asks = others.iter().map(|(rank, addr)| async move {
                let answer = match self.inner.transport.peer(addr) {
                    Ok(mut p) => tokio::time::timeout(
                        self.inner.limits.bootstrap_identify_timeout,
                        p.identify(pb::IdentifyRequest {}),
                    )
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .map(|r| r.into_inner()),
                    Err(_) => None,
                };
                (*rank, answer)
            });
            let answers = futures::future::join_all(asks).await;
            if let Some((rank, _)) = answers.iter().find(|(_, a)| {
                a.as_ref().is_some_and(|a| {
                    a.cluster == self.inner.cluster && a.hosted.iter().any(|h| h.class == MGMT_CLASS)
                })
            }) {
                tracing::info!(
                    rank = self.inner.rank,
                    holder = rank,
                    "the management service exists already; joining it instead of bootstrapping one"
                );
                return false;
            }
            let silent: Vec<u32> = answers
                .iter()
                .filter(|(_, a)| a.is_none())
                .map(|(r, _)| *r)
                .collect();
            // This engine counts as one of the access points that answered.
            let answered = 1 + others.len() - silent.len();
            if answered * 2 > others.len() + 1 {
                return true;
            }
            if silent != waiting_for {
                tracing::info!(
                    rank = self.inner.rank,
                    ?silent,
                    "waiting for a majority of the access points to answer before bootstrapping the management service"
                );
                waiting_for = silent;
            }
            if *stop.borrow()
                || tokio::time::timeout(self.inner.limits.bootstrap_poll, stop.changed())
                    .await
                    .is_ok()
            {
                return false;
            }
        }
    }
}
