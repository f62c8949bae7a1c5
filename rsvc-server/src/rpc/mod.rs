//! The gRPC adapters over the engine: [`client`] serves `rsvc.v1.Rsvc` (service calls and
//! replica status), [`peer`] serves `rsvc.peer.v1.Peer` (raft traffic and replica lifecycle).
//! Errors reach peers through one mapping, `From<EngineError> for tonic::Status` in
//! [`crate::error`].

pub(crate) mod client;
pub(crate) mod peer;
