//! Entry points for fuzzing every decoder rdb runs on bytes that come from the network or the
//! disk: the raft messages a peer sends and the replies it gives, the snapshot chunks, and the
//! records rdb reads back from its files. A [`Target`] decodes a byte string the way rdb does
//! and says whether it was accepted; it must never panic, hang or allocate without bound,
//! whatever the bytes. [`Target::samples`] gives valid encodings to start mutating from.
//!
//! The driver (`rsvc-fuzz` in the rsvc-tests crate) runs millions of inputs per target; a
//! quick replay of its corpus runs in CI.
//!
//! CAVEAT: these are the decoders only. What a decoded message then does to a replica (an
//! AppendEntries with a forged history) is the peer authentication's business (TLS between
//! engines), not the decoder's.

use std::collections::{BTreeMap, BTreeSet};

use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest, VoteResponse};
use openraft::{EntryPayload, Membership};

use crate::codec;
use crate::kv::{KeyClass, KvsInfo, Op, Path};
use crate::network::{AppendReply, Reply, SnapshotChunk};
use crate::storage::sm::CurrentSnapshot;
use crate::storage::Identity;
use crate::types::{
    Command, DbId, Entry, LogId, Member, ReplicaId, SnapshotMeta, StoredMembership, TxRecord, TypeConfig,
    Vote,
};

/// One decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// An AppendEntries request from a peer (log entries with transactions inside).
    Append,
    /// A vote request, and a pre-vote request (the same type).
    Vote,
    /// A leadership transfer from the leader.
    TransferLeader,
    /// One chunk of a snapshot transfer.
    SnapshotChunk,
    /// A peer's reply to AppendEntries (with its free-space report).
    AppendReply,
    /// A peer's reply to a vote.
    VoteReply,
    /// A log entry as the log file keeps it.
    LogEntry,
    /// The vote as the log file keeps it.
    StoredVote,
    /// The last applied log id and the membership, as the state machine file keeps them.
    Applied,
    /// `snapshots/current`: which snapshot file is the current one.
    CurrentSnapshot,
    /// The replica's identity file.
    Identity,
    /// A KVS's row in the state machine.
    KvsInfo,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target::Append,
    Target::Vote,
    Target::TransferLeader,
    Target::SnapshotChunk,
    Target::AppendReply,
    Target::VoteReply,
    Target::LogEntry,
    Target::StoredVote,
    Target::Applied,
    Target::CurrentSnapshot,
    Target::Identity,
    Target::KvsInfo,
];

fn vote() -> Vote {
    Vote::new_committed(7, ReplicaId::new(2, 1).node_id())
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(
        openraft::impls::leader_id_adv::LeaderId {
            term,
            node_id: ReplicaId::new(2, 1).node_id(),
        },
        index,
    )
}

fn membership() -> Membership<u64, Member> {
    let nodes: BTreeMap<u64, Member> = (1..=3)
        .map(|r| {
            let replica = ReplicaId::new(r, 1);
            let m = Member {
                replica,
                addr: format!("127.0.0.{r}:7001"),
                storage_id: 0x5eed + u64::from(r),
            };
            (replica.node_id(), m)
        })
        .collect();
    let voters: BTreeSet<u64> = nodes.keys().copied().collect();
    Membership::new(vec![voters], nodes).expect("a valid membership")
}

fn entries() -> Vec<Entry> {
    let root = Path::root();
    let ops = vec![
        Op::CreateKvs {
            parent: root.clone(),
            key: b"attrs".to_vec(),
            class: KeyClass::Lexical,
        },
        Op::Update {
            kvs: root.child("attrs"),
            key: b"color".to_vec(),
            value: b"red".to_vec(),
            critical: false,
        },
        Op::Expect {
            kvs: root.child("attrs"),
            key: b"size".to_vec(),
            value: None,
        },
        Op::Delete {
            kvs: root.child("attrs"),
            key: b"old".to_vec(),
        },
    ];
    vec![
        Entry {
            log_id: log_id(7, 10),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(7, 11),
            payload: EntryPayload::Normal(Command {
                txs: vec![TxRecord { term: 7, ops }],
            }),
        },
        Entry {
            log_id: log_id(7, 12),
            payload: EntryPayload::Membership(membership()),
        },
    ]
}

fn snapshot_meta() -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: Some(log_id(7, 12)),
        last_membership: StoredMembership::new(Some(log_id(7, 12)), membership()),
    }
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v).expect("a sample encodes")
}

impl Target {
    /// A short name, for file names and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Target::Append => "append",
            Target::Vote => "vote",
            Target::TransferLeader => "transfer-leader",
            Target::SnapshotChunk => "snapshot-chunk",
            Target::AppendReply => "append-reply",
            Target::VoteReply => "vote-reply",
            Target::LogEntry => "log-entry",
            Target::StoredVote => "stored-vote",
            Target::Applied => "applied",
            Target::CurrentSnapshot => "current-snapshot",
            Target::Identity => "identity",
            Target::KvsInfo => "kvs-info",
        }
    }

    /// Decodes `bytes` as rdb does for this target: `true` if it was accepted. Never panics.
    pub fn decode(&self, bytes: &[u8]) -> bool {
        match self {
            Target::Append => codec::decode::<AppendEntriesRequest<TypeConfig>>(bytes).is_ok(),
            Target::Vote => codec::decode::<VoteRequest<TypeConfig>>(bytes).is_ok(),
            Target::TransferLeader => codec::decode::<TransferLeaderRequest<TypeConfig>>(bytes).is_ok(),
            Target::SnapshotChunk => codec::decode::<SnapshotChunk>(bytes).is_ok(),
            Target::AppendReply => codec::decode::<AppendReply>(bytes).is_ok(),
            Target::VoteReply => codec::decode::<Reply<VoteResponse<TypeConfig>>>(bytes).is_ok(),
            Target::LogEntry => codec::decode::<Entry>(bytes).is_ok(),
            Target::StoredVote => codec::decode::<Vote>(bytes).is_ok(),
            Target::Applied => {
                codec::decode::<Option<LogId>>(bytes).is_ok()
                    | codec::decode::<StoredMembership>(bytes).is_ok()
            }
            Target::CurrentSnapshot => codec::decode::<CurrentSnapshot>(bytes).is_ok(),
            Target::Identity => codec::decode::<Identity>(bytes).is_ok(),
            Target::KvsInfo => KvsInfo::decode(bytes).is_ok(),
        }
    }

    /// Valid encodings of typical values, to mutate from.
    pub fn samples(&self) -> Vec<Vec<u8>> {
        match self {
            Target::Append => vec![
                enc(&AppendEntriesRequest::<TypeConfig> {
                    vote: vote(),
                    prev_log_id: Some(log_id(7, 9)),
                    entries: entries(),
                    leader_commit: Some(log_id(7, 9)),
                }),
                enc(&AppendEntriesRequest::<TypeConfig> {
                    vote: vote(),
                    prev_log_id: None,
                    entries: vec![],
                    leader_commit: None,
                }),
            ],
            Target::Vote => vec![
                enc(&VoteRequest::<TypeConfig>::new(vote(), Some(log_id(7, 12)))),
                enc(&VoteRequest::<TypeConfig>::new(vote(), None)),
            ],
            Target::TransferLeader => vec![enc(&TransferLeaderRequest::<TypeConfig>::new(
                vote(),
                ReplicaId::new(3, 1).node_id(),
                Some(log_id(7, 12)),
            ))],
            Target::SnapshotChunk => vec![enc(&SnapshotChunk {
                transfer: 42,
                vote: vote(),
                meta: snapshot_meta(),
                offset: 0,
                data: vec![0xab; 64],
                done: true,
            })],
            Target::AppendReply => vec![enc(&AppendReply {
                reply: Ok(openraft::raft::AppendEntriesResponse::Success),
                space: Some(crate::admission::SpaceReport {
                    free: 1 << 30,
                    upkeep: 1 << 20,
                }),
            })],
            Target::VoteReply => vec![
                enc(&Reply::Ok(VoteResponse::<TypeConfig>::new(
                    vote(),
                    Some(log_id(7, 12)),
                    true,
                ))),
                enc(&Reply::<VoteResponse<TypeConfig>>::Err("stopped".into())),
            ],
            Target::LogEntry => entries().iter().map(enc).collect(),
            Target::StoredVote => vec![enc(&vote())],
            Target::Applied => vec![
                enc(&Some(log_id(7, 12))),
                enc(&StoredMembership::new(Some(log_id(7, 12)), membership())),
            ],
            Target::CurrentSnapshot => vec![enc(&CurrentSnapshot {
                meta: snapshot_meta(),
                file: "7-12-1.snap".into(),
            })],
            Target::Identity => vec![enc(&Identity {
                db: DbId(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
                replica: ReplicaId::new(2, 3),
                storage_id: 0x5eed,
            })],
            Target::KvsInfo => vec![KvsInfo {
                class: KeyClass::Integer,
                child_kvs: 3,
            }
            .encode()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_decodes_and_garbage_does_not() {
        for t in TARGETS {
            let samples = t.samples();
            assert!(!samples.is_empty(), "{t:?}");
            for s in samples {
                assert!(t.decode(&s), "{t:?}: a sample does not decode");
            }
            assert!(!t.decode(&[]), "{t:?}: the empty string decodes");
            assert!(!t.decode(&[0xff; 3]), "{t:?}: an unknown format byte decodes");
        }
    }
}
