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
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::admission::{SpaceReport, SpaceReports};
use crate::codec;
use crate::storage::sm::{Snapshot, SnapshotFile};
use crate::types::{DbId, Member, NodeId, ReplicaId, SnapshotMeta, TypeConfig, Vote};

/// Which raft RPC a [`RaftRpc`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RpcKind {
    /// AppendEntries (also heartbeats).
    Append,
    /// RequestVote.
    Vote,
    /// One chunk of a snapshot transfer.
    Snapshot,
    /// Leadership transfer: the leader tells every voter to let the named one take over now.
    TransferLeader,
    /// Pre-Vote: would the addressee grant a vote in the next term? Changes nothing there.
    PreVote,
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
    WrongReplica {
        /// The addressee the message named.
        wanted: ReplicaId,
        /// The replica that received it.
        have: ReplicaId,
    },
    /// The replica here is another incarnation (its storage was recreated).
    #[error("message for storage id {wanted:016x}, this replica has {have:016x}")]
    WrongStorage {
        /// The storage id the message named (from the sender's membership).
        wanted: u64,
        /// The storage id of the replica that received it.
        have: u64,
    },
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
    /// Bytes per snapshot chunk, and the deadline for each.
    pub chunk_bytes: usize,
    pub chunk_timeout: Duration,
    /// Deadline of an AppendEntries that carries entries (see `DbConfig::append_timeout`).
    pub append_timeout: Duration,
    /// Where the followers' free-space reports go (see [`crate::admission`]).
    pub reports: Arc<SpaceReports>,
    /// Which peers answer, shared by every connection of this replica.
    pub reach: Arc<Reachability>,
}

/// Whether each peer answered its last message, shared by all of a replica's connections, so
/// that a peer that stops answering is logged once when it stops and once when it is back.
///
/// NB: openraft logs a WARN for every failed heartbeat and replication attempt, about 40 lines a
/// second for one dead peer with the default timers; the engines' log filter keeps those
/// modules at ERROR, and this is the line an operator reads instead.
#[derive(Default)]
pub(crate) struct Reachability(Mutex<HashMap<NodeId, std::time::Instant>>);

impl Reachability {
    fn answered(&self, db: DbId, peer: NodeId) {
        let since = self.0.lock().expect("lock").remove(&peer);
        if let Some(since) = since {
            tracing::info!(db = %db, peer = %ReplicaId::from_node_id(peer),
                silent_ms = since.elapsed().as_millis() as u64, "peer answers again");
        }
    }

    fn failed(&self, db: DbId, peer: NodeId, cause: &dyn std::fmt::Display) {
        let mut m = self.0.lock().expect("lock");
        if let std::collections::hash_map::Entry::Vacant(v) = m.entry(peer) {
            v.insert(std::time::Instant::now());
            tracing::warn!(db = %db, peer = %ReplicaId::from_node_id(peer), %cause,
                "peer does not answer; retrying quietly until it does");
        }
    }
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
            chunk_bytes: self.chunk_bytes,
            chunk_timeout: self.chunk_timeout,
            append_timeout: self.append_timeout,
            reports: self.reports.clone(),
            reach: self.reach.clone(),
        }
    }
}

pub(crate) struct PeerConn {
    transport: Arc<dyn Transport>,
    db: DbId,
    me: ReplicaId,
    target: NodeId,
    member: Member,
    chunk_bytes: usize,
    chunk_timeout: Duration,
    append_timeout: Duration,
    reports: Arc<SpaceReports>,
    reach: Arc<Reachability>,
}

/// What a follower answers to AppendEntries: openraft's reply, and its free space for the
/// leader's admission check (`None` if it could not read it).
#[derive(Serialize, Deserialize)]
pub(crate) struct AppendReply {
    pub reply: Reply<AppendEntriesResponse<TypeConfig>>,
    pub space: Option<SpaceReport>,
}

/// What the receiving replica answers: openraft's reply, or why its raft could not produce one
/// (it stopped). A remote failure is reported to openraft as the peer being unreachable.
pub(crate) type Reply<T> = Result<T, String>;

impl PeerConn {
    /// Sends `req` and decodes the reply, openraft's answer or why there is none.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        kind: RpcKind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let res: Reply<Resp> = self.call_raw(kind, req, timeout).await?;
        self.answer(res)
    }

    /// The peer's answer: it answered (logged if it had not), or its raft could not.
    fn answer<T>(&self, res: Reply<T>) -> Result<T, RPCError<TypeConfig>> {
        match res {
            Ok(v) => {
                self.reach.answered(self.db, self.target);
                Ok(v)
            }
            Err(e) => Err(self.remote_failure(e)),
        }
    }

    /// A failure on the far side: reported to openraft as the peer being unreachable.
    fn remote_failure(&self, e: String) -> RPCError<TypeConfig> {
        self.reach.failed(self.db, self.target, &e);
        RPCError::Unreachable(Unreachable::from_string(format!("{}: {e}", self.member.replica)))
    }

    /// Sends `req` and decodes the reply payload as `R`.
    async fn call_raw<Req: Serialize, R: DeserializeOwned>(
        &self,
        kind: RpcKind,
        req: &Req,
        timeout: Duration,
    ) -> Result<R, RPCError<TypeConfig>> {
        let payload = codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let rpc = RaftRpc {
            db: self.db,
            from: self.me,
            to: ReplicaId::from_node_id(self.target),
            to_storage_id: self.member.storage_id,
            kind,
            payload,
        };
        let reply = match self.transport.call(&self.member.addr, rpc, timeout).await {
            Ok(r) => r,
            Err(e) => {
                self.reach.failed(self.db, self.target, &e);
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
        };
        codec::decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

/// One chunk of a snapshot transfer on the wire. The data is a byte string, so that postcard
/// copies it in one piece instead of visiting a megabyte one element at a time.
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotChunk {
    /// Random per transfer: a chunk of another transfer never continues this one.
    pub transfer: u64,
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// The last chunk: the receiver installs the snapshot and answers with its vote.
    pub done: bool,
}

/// Reads up to `n` bytes at `offset` of a snapshot file, off the async workers.
async fn read_chunk(file: Arc<std::fs::File>, offset: u64, n: usize) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            let k = file.read_at(&mut buf[got..], offset + got as u64)?;
            if k == 0 {
                break;
            }
            got += k;
        }
        buf.truncate(got);
        Ok(buf)
    })
    .await
    .map_err(std::io::Error::other)?
}

impl RaftNetworkV2<TypeConfig> for PeerConn {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let timeout = if rpc.entries.is_empty() {
            option.soft_ttl()
        } else {
            option.soft_ttl().max(self.append_timeout)
        };
        let AppendReply { reply, space } = self.call_raw(RpcKind::Append, &rpc, timeout).await?;
        if let Some(space) = space {
            self.reports.record(self.target, space);
        }
        self.answer(reply)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RpcKind::Vote, &rpc, option.soft_ttl()).await
    }

    // NB: openraft's default answer grants, which would let a replica that lost touch inflate
    // its term after all. rdb asks the peer.
    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RpcKind::PreVote, &rpc, option.soft_ttl()).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RpcKind::TransferLeader, &req, option.soft_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let transfer = rand::random::<u64>();
        let file = Arc::new(snapshot.snapshot.file);
        let len = file
            .metadata()
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?
            .len();
        let meta = snapshot.meta;
        let send_all = async {
            let mut offset = 0u64;
            loop {
                let data = read_chunk(file.clone(), offset, self.chunk_bytes)
                    .await
                    .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
                let n = data.len() as u64;
                let done = offset + n >= len;
                let chunk = SnapshotChunk {
                    transfer,
                    vote,
                    meta: meta.clone(),
                    offset,
                    data,
                    done,
                };
                let reply: Option<SnapshotResponse<TypeConfig>> = self
                    .call(RpcKind::Snapshot, &chunk, self.chunk_timeout)
                    .await
                    .map_err(|e| match e {
                        RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                        other => StreamingError::Network(NetworkError::new(&other)),
                    })?;
                offset += n;
                if done {
                    return reply.ok_or_else(|| {
                        StreamingError::Network(NetworkError::from_string("the last chunk got no answer"))
                    });
                }
            }
        };
        tokio::select! {
            r = send_all => r,
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
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
