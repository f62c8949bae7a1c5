//! RPC intake: checking who a raft message is for, the startup vote window, and receiving
//! snapshot transfers chunk by chunk.

use super::*;

/// A snapshot transfer in progress: chunks are written to `path` in order.
pub(super) struct Incoming {
    pub(super) transfer: u64,
    pub(super) path: PathBuf,
    pub(super) file: Option<std::fs::File>,
    pub(super) offset: u64,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // An abandoned or failed transfer leaves no file behind; a finished one was renamed.
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Db {
    /// Processes a raft message from a peer.
    pub async fn handle_rpc(&self, rpc: RaftRpc) -> std::result::Result<Vec<u8>, Refusal> {
        let me = &self.inner.ident;
        if rpc.db != me.db {
            return Err(Refusal::NoSuchDb(rpc.db));
        }
        if rpc.to != me.replica {
            return Err(Refusal::WrongReplica {
                wanted: rpc.to,
                have: me.replica,
            });
        }
        if rpc.to_storage_id != me.storage_id {
            return Err(Refusal::WrongStorage {
                wanted: rpc.to_storage_id,
                have: me.storage_id,
            });
        }
        if *self.inner.shutdown.borrow() {
            return Err(Refusal::Stopped);
        }
        // NB: a replica that just started does not remember which leader it promised, by
        // following it, not to replace: it grants no vote (nor pre-vote) for a maximum election
        // timeout. That keeps the old leader's read lease safe across a follower restart.
        if matches!(rpc.kind, RpcKind::Vote | RpcKind::PreVote) && Instant::now() < self.inner.votes_from {
            return Err(Refusal::Starting);
        }
        let raft = &self.inner.raft;
        let bad = |e: codec::CodecError| Refusal::Malformed(e.to_string());
        fn reply<T: serde::Serialize, E: std::fmt::Display>(r: std::result::Result<T, E>) -> Reply<T> {
            r.map_err(|e| e.to_string())
        }
        let encoded = match rpc.kind {
            RpcKind::Append => {
                let res = reply(
                    raft.append_entries(codec::decode(&rpc.payload).map_err(bad)?)
                        .await,
                );
                codec::encode(&AppendReply {
                    reply: res,
                    space: self.space_report(),
                })
            }
            RpcKind::Vote => {
                codec::encode(&reply(raft.vote(codec::decode(&rpc.payload).map_err(bad)?).await))
            }
            RpcKind::PreVote => codec::encode(&reply(
                raft.pre_vote(codec::decode(&rpc.payload).map_err(bad)?).await,
            )),
            RpcKind::TransferLeader => {
                tracing::info!(replica = %me.replica, from = %rpc.from, "leadership transfer");
                self.leader_cmd(LeaderCmd::Unresign);
                let req = codec::decode(&rpc.payload).map_err(bad)?;
                codec::encode(&reply(raft.handle_transfer_leader(req).await))
            }
            RpcKind::Snapshot => {
                let chunk: SnapshotChunk = codec::decode(&rpc.payload).map_err(bad)?;
                codec::encode(&self.receive_snapshot(chunk).await)
            }
        };
        encoded.map_err(|e| Refusal::Malformed(e.to_string()))
    }

    /// This replica's free space for its leader; asks for a compaction here when it runs short.
    fn space_report(&self) -> Option<crate::admission::SpaceReport> {
        let (report, compact) = self.inner.admission.report()?;
        if compact {
            let db = self.clone();
            tokio::spawn(async move { db.compact(COMPACT_TIMEOUT).await });
        }
        Some(report)
    }

    /// Takes one chunk of a snapshot transfer; installs the snapshot after the last one.
    async fn receive_snapshot(
        &self,
        chunk: SnapshotChunk,
    ) -> Reply<Option<openraft::raft::SnapshotResponse<TypeConfig>>> {
        let mut slot = self.inner.incoming.lock().await;
        if chunk.offset == 0 {
            let path = {
                let sm = self.inner.sm.lock().expect("lock");
                sm.as_ref().ok_or("replica stopped")?.incoming_path()
            };
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| format!("cannot receive a snapshot: {e}"))?;
            // Replacing an older transfer removes its file (see `Incoming`).
            *slot = Some(Incoming {
                transfer: chunk.transfer,
                path,
                file: Some(file),
                offset: 0,
            });
        }
        let Some(inc) = slot.as_mut().filter(|i| i.transfer == chunk.transfer) else {
            return Err("no such snapshot transfer here; start again from offset 0".into());
        };
        if inc.offset != chunk.offset {
            return Err(format!(
                "snapshot chunk at {} but {} expected",
                chunk.offset, inc.offset
            ));
        }
        let mut file = inc.file.take().ok_or("snapshot transfer failed earlier")?;
        let data = chunk.data;
        let n = data.len() as u64;
        let done = chunk.done;
        let res = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            file.write_all(&data)?;
            if done {
                file.sync_all()?;
            }
            Ok::<_, std::io::Error>(file)
        })
        .await
        .map_err(|e| e.to_string())?;
        let file = match res {
            Ok(f) => f,
            Err(e) => {
                let path = inc.path.clone();
                *slot = None;
                let _ = std::fs::remove_file(path);
                return Err(format!("cannot write the snapshot: {e}"));
            }
        };
        inc.offset += n;
        if !done {
            inc.file = Some(file);
            return Ok(None);
        }
        let inc = slot.take().expect("checked above");
        drop(file);
        let snapshot = crate::storage::sm::SnapshotFile::open(inc.path.clone())
            .map_err(|e| format!("cannot reopen the snapshot: {e}"))?;
        let snapshot = crate::storage::sm::Snapshot {
            meta: chunk.meta,
            snapshot,
        };
        let res = self.inner.raft.install_full_snapshot(chunk.vote, snapshot).await;
        // Installed snapshots were renamed into place; anything else goes.
        let _ = std::fs::remove_file(&inc.path);
        res.map(Some).map_err(|e| e.to_string())
    }
}

#[async_trait]
impl RpcHandler for Db {
    async fn handle_rpc(&self, rpc: RaftRpc) -> std::result::Result<Vec<u8>, Refusal> {
        Db::handle_rpc(self, rpc).await
    }
}
