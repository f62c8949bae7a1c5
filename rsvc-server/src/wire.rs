//! Engine-to-engine protobuf types and their conversions to rdb's.

use rdb::{DbId, Member, RaftRpc, ReplicaId, RpcKind};

/// Generated protobuf types and the tonic client/server of `rsvc.peer.v1.Peer`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("rsvc.peer.v1");
}

pub(crate) fn replica_to(r: ReplicaId) -> pb::ReplicaRef {
    pb::ReplicaRef {
        rank: r.rank,
        gen: r.gen,
    }
}

pub(crate) fn replica_from(r: Option<&pb::ReplicaRef>) -> Result<ReplicaId, String> {
    let r = r.ok_or("missing replica")?;
    Ok(ReplicaId::new(r.rank, r.gen))
}

/// A database id from its 16 big-endian bytes.
pub fn db_from(b: &[u8]) -> Result<DbId, String> {
    let a: [u8; 16] = b
        .try_into()
        .map_err(|_| format!("db id must be 16 bytes, got {}", b.len()))?;
    Ok(DbId(u128::from_be_bytes(a)))
}

pub(crate) fn member_to(m: &Member) -> pb::Member {
    pb::Member {
        replica: Some(replica_to(m.replica)),
        addr: m.addr.clone(),
        storage_id: m.storage_id,
    }
}

/// A member from its protobuf form.
pub fn member_from(m: &pb::Member) -> Result<Member, String> {
    Ok(Member {
        replica: replica_from(m.replica.as_ref())?,
        addr: m.addr.clone(),
        storage_id: m.storage_id,
    })
}

pub(crate) fn rpc_to(cluster: &str, rpc: RaftRpc) -> pb::RaftMessage {
    pb::RaftMessage {
        cluster: cluster.to_string(),
        db: rpc.db.0.to_be_bytes().to_vec(),
        from: Some(replica_to(rpc.from)),
        to: Some(replica_to(rpc.to)),
        to_storage_id: rpc.to_storage_id,
        kind: match rpc.kind {
            RpcKind::Append => 0,
            RpcKind::Vote => 1,
            RpcKind::Snapshot => 2,
            RpcKind::TransferLeader => 3,
            RpcKind::PreVote => 4,
        },
        payload: rpc.payload,
    }
}

/// The raft message a peer sent, as rdb takes it; refused if malformed.
pub fn rpc_from(m: pb::RaftMessage) -> Result<RaftRpc, String> {
    Ok(RaftRpc {
        db: db_from(&m.db)?,
        from: replica_from(m.from.as_ref())?,
        to: replica_from(m.to.as_ref())?,
        to_storage_id: m.to_storage_id,
        kind: match m.kind {
            0 => RpcKind::Append,
            1 => RpcKind::Vote,
            2 => RpcKind::Snapshot,
            3 => RpcKind::TransferLeader,
            4 => RpcKind::PreVote,
            k => return Err(format!("unknown raft message kind {k}")),
        },
        payload: m.payload,
    })
}
