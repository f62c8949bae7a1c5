//! rdb's [`Transport`] over gRPC: raft messages travel as `Peer.Raft` calls on one reused
//! HTTP/2 connection per peer engine.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdb::{RaftRpc, Transport, TransportError};
use tonic::transport::Channel;

use crate::wire::{self, pb};

/// Largest raft message (a snapshot chunk plus framing).
pub const MAX_RAFT_MESSAGE_BYTES: usize = 64 << 20;

/// How long a connect to a peer (TCP, and TLS if on) may take.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Connections to peer engines.
pub struct GrpcTransport {
    cluster: String,
    /// One reused connection per peer engine, with this engine's certificate if TLS is on.
    peers: rsvc_client::Connections,
    /// Where connections to peers leave from (see [`GrpcTransport::new`]).
    local: Option<std::net::IpAddr>,
}

impl GrpcTransport {
    /// A transport for engines of `cluster`, dialling from `local` (the engine's listen
    /// address, unless that is unspecified): a peer, a firewall or a fault proxy then sees
    /// which engine calls, not just a host.
    pub fn new(cluster: impl Into<String>, local: Option<std::net::IpAddr>) -> Self {
        GrpcTransport {
            cluster: cluster.into(),
            peers: rsvc_client::Connections::with_connect_timeout(PEER_CONNECT_TIMEOUT)
                .with_local_address(local),
            local,
        }
    }

    /// The same transport, speaking mutual TLS to peers with this engine's certificate.
    pub fn with_tls(mut self, tls: Option<Arc<rsvc_client::tls::TlsFiles>>) -> Self {
        self.peers = self.peers.with_tls(tls);
        self
    }

    /// A client connection pool that dials from the same address as the raft traffic, for
    /// the engine's own calls to the management service.
    pub(crate) fn clients(&self) -> rsvc_client::Connections {
        rsvc_client::Connections::default()
            .with_local_address(self.local)
            .with_tls(self.peers.tls().cloned())
    }

    /// The (reused) connection to the engine at `addr`.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, String> {
        self.peers.channel(addr)
    }

    pub(crate) fn peer(&self, addr: &str) -> Result<pb::peer_client::PeerClient<Channel>, String> {
        let ch = self.channel(addr)?;
        Ok(pb::peer_client::PeerClient::new(ch)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES))
    }
}

#[async_trait]
impl Transport for GrpcTransport {
    async fn call(&self, addr: &str, rpc: RaftRpc, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        let mut client = self.peer(addr).map_err(TransportError::Unreachable)?;
        let mut req = tonic::Request::new(wire::rpc_to(&self.cluster, rpc));
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.raft(req)).await {
            Err(_) => Err(TransportError::Timeout),
            Ok(Err(status)) => Err(TransportError::Unreachable(format!(
                "{addr}: {}",
                status.message()
            ))),
            Ok(Ok(reply)) => match reply.into_inner().result {
                Some(pb::raft_reply::Result::Ok(b)) => Ok(b),
                Some(pb::raft_reply::Result::Refused(why)) => {
                    Err(TransportError::Unreachable(format!("{addr} refused: {why}")))
                }
                None => Err(TransportError::Unreachable(format!("{addr}: empty reply"))),
            },
        }
    }
}
