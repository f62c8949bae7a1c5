//! Group commit above openraft: waiting transactions leave together as one log entry.

use super::*;

pub(super) struct Pending {
    pub(super) record: TxRecord,
    pub(super) size: usize,
    pub(super) reply: oneshot::Sender<Result<Committed>>,
}

/// Packs waiting transactions into log entries, with at most `max_inflight_batches` entries in
/// flight: while they are, newcomers queue up and leave together as the next entry.
pub(super) async fn run_batcher(
    raft: Raft,
    cfg: DbConfig,
    mut rx: mpsc::Receiver<Pending>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(cfg.max_inflight_batches));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closes"),
            _ = shutdown.changed() => break,
        };
        let first = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => break },
            _ = shutdown.changed() => break,
        };
        let mut bytes = first.size;
        let mut batch = vec![first];
        while batch.len() < cfg.max_batch_txs && bytes < cfg.max_batch_bytes {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.size;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (records, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.record, p.reply)).unzip();
            let res = raft.client_write(Command { txs: records }).await;
            drop(permit);
            match res {
                Ok(resp) => {
                    let term = resp.log_id.leader_id.term;
                    let index = resp.log_id.index;
                    for (reply, r) in replies.into_iter().zip(resp.data.results) {
                        let _ = reply.send(r.map(|()| Committed { term, index }).map_err(Error::Apply));
                    }
                }
                Err(e) => {
                    let err = match e {
                        // NB: a discarded entry was replaced in the log by another leader's, so it
                        // cannot commit; like a refusal, it is a NotLeader.
                        RaftError::APIError(
                            ClientWriteError::ForwardToLeader(_) | ClientWriteError::LogEntryDiscarded(_),
                        ) => Error::NotLeader {
                            leader: None,
                            term: 0,
                        },
                        RaftError::APIError(other) => Error::Raft(other.to_string()),
                        RaftError::Fatal(f) => fatal(f),
                    };
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}
