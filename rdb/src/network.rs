//! The transport seam: how raft messages travel between replicas.
//!
//! rdb encodes openraft's RPCs itself and hands a [`Transport`] opaque [`RaftRpc`]s addressed
//! by database id, replica id and storage id. A transport only moves bytes: the gRPC transport
//! of rsvc-server and the in-process [`LocalNet`] used in tests implement it without knowing
//! openraft. The receiving side passes the message to [`crate::Db::handle_rpc`], which refuses
//! a message for another database, another replica or another incarnation (storage id) of it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::types::{DbId, Member, NodeId, ReplicaId, TypeConfig};

/// Which raft RPC a [`RaftRpc`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RpcKind {
    /// AppendEntries (also heartbeats).
    Append,
    /// RequestVote.
    Vote,
    /// One chunk of a snapshot.
    Snapshot,
    /// Leadership transfer: the leader asks a caught-up follower to campaign now.
    TimeoutNow,
}

/// A raft message from one replica to another of the same database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftRpc {
    /// The database (raft group).
    pub db: DbId,
    /// Sender.
    pub from: ReplicaId,
    /// Addressee.
    pub to: ReplicaId,
    /// The addressee's storage id as recorded in the membership.
    pub to_storage_id: u64,
    /// What `payload` is.
    pub kind: RpcKind,
    /// The encoded openraft request.
    pub payload: Vec<u8>,
}

/// Why a replica refused a [`RaftRpc`] without processing it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    /// The engine hosts no replica of that database.
    #[error("no replica of db {0} here")]
    NoSuchDb(DbId),
    /// The replica here is another one (other rank or generation).
    #[error("message for replica {wanted}, this is {have}")]
    WrongReplica { wanted: ReplicaId, have: ReplicaId },
    /// The replica here is another incarnation (its storage was recreated).
    #[error("message for storage id {wanted:016x}, this replica has {have:016x}")]
    WrongStorage { wanted: u64, have: u64 },
    /// The replica is not running.
    #[error("replica stopped")]
    Stopped,
    /// The replica started too recently to grant votes.
    #[error("replica starting; no votes yet")]
    Starting,
    /// The payload could not be decoded.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Why a [`Transport::call`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The peer cannot be reached now; back off before trying again.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The call did not finish in time.
    #[error("timed out")]
    Timeout,
    /// The peer refused the message.
    #[error("refused: {0}")]
    Refused(Refusal),
}

/// Moves [`RaftRpc`]s to the engine at an address and brings back the reply payload.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Delivers `rpc` to the engine at `addr` (from [`Member::addr`]) and returns the reply
    /// produced by [`crate::Db::handle_rpc`] there. Must give up after `timeout`.
    async fn call(&self, addr: &str, rpc: RaftRpc, timeout: Duration) -> Result<Vec<u8>, TransportError>;
}

/// The receiving end: whatever can answer a [`RaftRpc`] (a [`crate::Db`], or an engine routing
/// to many).
#[async_trait]
pub trait RpcHandler: Send + Sync + 'static {
    /// Processes one message.
    async fn handle_rpc(&self, rpc: RaftRpc) -> Result<Vec<u8>, Refusal>;
}

/// openraft's view of the transport for one replica.
pub(crate) struct NetFactory {
    pub transport: Arc<dyn Transport>,
    pub db: DbId,
    pub me: ReplicaId,
}

impl RaftNetworkFactory<TypeConfig> for NetFactory {
    type Network = PeerConn;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerConn {
        PeerConn {
            transport: self.transport.clone(),
            db: self.db,
            me: self.me,
            target,
            member: node.clone(),
        }
    }
}

pub(crate) struct PeerConn {
    transport: Arc<dyn Transport>,
    db: DbId,
    me: ReplicaId,
    target: NodeId,
    member: Member,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, Member, RaftError<NodeId, E>>>;

impl PeerConn {
    async fn send<Req: Serialize, Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &self,
        kind: RpcKind,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E> {
        let payload = codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let rpc = RaftRpc {
            db: self.db,
            from: self.me,
            to: ReplicaId::from_node_id(self.target),
            to_storage_id: self.member.storage_id,
            kind,
            payload,
        };
        let reply = self
            .transport
            .call(&self.member.addr, rpc, option.hard_ttl())
            .await
            .map_err(|e| match e {
                TransportError::Timeout => RPCError::Unreachable(Unreachable::new(&std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "rpc timed out",
                ))),
                other => RPCError::Unreachable(Unreachable::new(&other)),
            })?;
        let res: Result<Resp, RaftError<NodeId, E>> =
            codec::decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(self.target, self.member.clone(), e))
        })
    }
}

/// [`InstallSnapshotRequest`] on the wire: the chunk as a byte string, so that postcard copies
/// it in one piece instead of visiting a megabyte one element at a time.
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotChunk {
    vote: openraft::Vote<NodeId>,
    meta: openraft::SnapshotMeta<NodeId, Member>,
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    done: bool,
}

impl From<InstallSnapshotRequest<TypeConfig>> for SnapshotChunk {
    fn from(r: InstallSnapshotRequest<TypeConfig>) -> Self {
        SnapshotChunk {
            vote: r.vote,
            meta: r.meta,
            offset: r.offset,
            data: r.data,
            done: r.done,
        }
    }
}

impl From<SnapshotChunk> for InstallSnapshotRequest<TypeConfig> {
    fn from(c: SnapshotChunk) -> Self {
        InstallSnapshotRequest {
            vote: c.vote,
            meta: c.meta,
            offset: c.offset,
            data: c.data,
            done: c.done,
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        self.send(RpcKind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.send(RpcKind::Snapshot, &SnapshotChunk::from(rpc), &option)
            .await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        self.send(RpcKind::Vote, &rpc, &option).await
    }
}

/// Faults the [`LocalNet`] injects, by rank.
#[derive(Default)]
struct Faults {
    /// Ranks cut off from everyone.
    isolated: HashSet<u32>,
    /// One-way cuts: messages from `.0` to `.1` are lost.
    blocked: HashSet<(u32, u32)>,
    /// Probability of losing any one message.
    drop_rate: f64,
    /// Added to every delivery.
    delay: Duration,
}

/// An in-process transport for tests: addresses name handlers registered in the same
/// process, and faults (partitions, one-way cuts, loss, delay) can be switched at will.
#[derive(Clone, Default)]
pub struct LocalNet {
    handlers: Arc<Mutex<HashMap<String, Arc<dyn RpcHandler>>>>,
    faults: Arc<Mutex<Faults>>,
}

impl LocalNet {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `handler` reachable at `addr`, replacing any earlier one.
    pub fn register(&self, addr: &str, handler: Arc<dyn RpcHandler>) {
        self.handlers
            .lock()
            .expect("lock")
            .insert(addr.to_string(), handler);
    }

    /// Makes `addr` unreachable, as if its engine died.
    pub fn unregister(&self, addr: &str) {
        self.handlers.lock().expect("lock").remove(addr);
    }

    /// Cuts `rank` off from every other rank, both ways.
    pub fn isolate(&self, rank: u32) {
        self.faults.lock().expect("lock").isolated.insert(rank);
    }

    /// Loses every message from `from` to `to` (one way).
    pub fn block(&self, from: u32, to: u32) {
        self.faults.lock().expect("lock").blocked.insert((from, to));
    }

    /// Drops messages with probability `rate` (0..=1).
    pub fn set_drop_rate(&self, rate: f64) {
        self.faults.lock().expect("lock").drop_rate = rate;
    }

    /// Delays every message by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.faults.lock().expect("lock").delay = delay;
    }

    /// Removes every fault.
    pub fn heal(&self) {
        *self.faults.lock().expect("lock") = Faults::default();
    }
}

#[async_trait]
impl Transport for LocalNet {
    async fn call(&self, addr: &str, rpc: RaftRpc, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        let (lost, delay) = {
            let f = self.faults.lock().expect("lock");
            let lost = f.isolated.contains(&rpc.from.rank)
                || f.isolated.contains(&rpc.to.rank)
                || f.blocked.contains(&(rpc.from.rank, rpc.to.rank))
                || (f.drop_rate > 0.0 && rand::random::<f64>() < f.drop_rate);
            (lost, f.delay)
        };
        if lost {
            // A lost message looks like silence, not like a refusal.
            tokio::time::sleep(timeout.min(Duration::from_millis(20))).await;
            return Err(TransportError::Unreachable(format!(
                "{addr}: message lost (injected)"
            )));
        }
        let handler = self.handlers.lock().expect("lock").get(addr).cloned();
        let Some(handler) = handler else {
            return Err(TransportError::Unreachable(format!("{addr}: nobody listening")));
        };
        let fut = async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            handler.handle_rpc(rpc).await
        };
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(TransportError::Timeout),
            Ok(Err(r)) => Err(TransportError::Refused(r)),
            Ok(Ok(reply)) => Ok(reply),
        }
    }
}
