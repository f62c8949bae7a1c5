//! The raft log on redb (`log.redb`): openraft's [`RaftLogStorage`], with one fsync per group.
//!
//! THE COMMIT PATH. `append` does no I/O. It puts the entries into an in-memory tail, where
//! every reader sees them at once, and queues them for the log's writer thread; openraft
//! replicates them to the followers while the writer makes them durable. The writer takes
//! everything that queued up while it was busy (appends, truncations, purges, votes) and
//! applies it, in the order it was submitted, in one redb transaction with
//! `Durability::Immediate`: one fsync covers every append behind it. Only then does it complete
//! the appends' flush callbacks, and drop the entries from the tail. So the leader's own fsync
//! overlaps the followers' (openraft counts the leader in the quorum only once its flush is
//! done), and no fsync ever runs on openraft's core loop.
//!
//! INVARIANTS
//! - One queue, one writer: votes, truncations and purges stay ordered with appends (a vote
//!   persisted after an entry can never be lost while the entry survives, and the reverse).
//! - A flush callback completes only after the redb commit that holds its entries returned.
//! - `save_vote` returns only once the vote is durable (it waits for its own group commit).
//! - A reader sees the log as submitted: the redb file, minus entries that a queued truncation
//!   removes, overlaid with the in-memory tail. The writer drops entries from the tail only
//!   after its commit, and a reader takes its redb snapshot under the same lock as its copy of
//!   the tail, so an entry is never in neither.
//! - The committed index is a hint (any older value is still true): it rides along with the
//!   next group commit and never costs a transaction of its own.
//! - After a failed commit the writer fails everything after it: openraft stops on the first
//!   storage error, and nothing that was not durable is ever reported as such.
//! - Entries are stored as `FORMAT_V1 ++ postcard(openraft Entry)` keyed by index.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec;
use crate::types::{Entry, LogId, TypeConfig, Vote};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
pub(crate) const KEY_STORAGE_ID: &str = "storage_id";

/// One submitted write, in submission order.
enum Op {
    Append {
        seq: u64,
        entries: Vec<Entry>,
        done: IOFlushed<TypeConfig>,
    },
    /// Remove every entry at `from` and after.
    Truncate {
        seq: u64,
        from: u64,
    },
    Purge {
        seq: u64,
        upto: LogId,
    },
    Vote {
        seq: u64,
        bytes: Vec<u8>,
        done: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
}

impl Op {
    fn seq(&self) -> u64 {
        match self {
            Op::Append { seq, .. }
            | Op::Truncate { seq, .. }
            | Op::Purge { seq, .. }
            | Op::Vote { seq, .. } => *seq,
        }
    }
}

/// What is submitted but not yet in the redb file.
#[derive(Default)]
struct Mem {
    /// Next submission number.
    seq: u64,
    /// Entries appended but not yet committed by the writer: index -> (seq, entry).
    tail: BTreeMap<u64, (u64, Entry)>,
    /// Queued truncations: (seq, from). Entries of the file at or after the smallest `from`
    /// are invisible until the writer has committed them away.
    truncations: Vec<(u64, u64)>,
    /// The newest purge point submitted.
    purged: Option<LogId>,
    /// The newest committed log id openraft reported, not yet written (see the module docs).
    committed: Option<Vec<u8>>,
    /// Set once a commit failed; every later write fails with it.
    failed: Option<String>,
}

impl Mem {
    fn hide_from(&self) -> Option<u64> {
        self.truncations.iter().map(|&(_, from)| from).min()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

struct Shared {
    db: Arc<Database>,
    mem: Mutex<Mem>,
    /// Group commits so far.
    flushes: std::sync::atomic::AtomicU64,
}

/// The log store of one replica. Cheap to clone: clones share the file, the in-memory tail and
/// the writer thread, which ends when the last clone is dropped.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Op>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogStore")
    }
}

fn to_io(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl LogStore {
    /// Opens (or creates the tables of) a log file and starts its writer thread.
    pub(crate) fn new(db: Database) -> Result<Self, redb::Error> {
        let tx = db.begin_write()?;
        {
            tx.open_table(LOG)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        let shared = Arc::new(Shared {
            db: Arc::new(db),
            mem: Mutex::default(),
            flushes: Default::default(),
        });
        let (writer, rx) = mpsc::channel();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("rdb-log-writer".into())
            .spawn(move || run_writer(s, rx))
            .map_err(redb::Error::Io)?;
        Ok(LogStore { shared, writer })
    }

    fn db(&self) -> &Database {
        &self.shared.db
    }

    /// A weak handle on the redb file, to see when every user let go of it.
    pub(crate) fn weak(&self) -> std::sync::Weak<Database> {
        Arc::downgrade(&self.shared.db)
    }

    pub(crate) fn get_meta_raw(&self, key: &str) -> Result<Option<Vec<u8>>, redb::Error> {
        let tx = self.db().begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Writes a metadata key at once, outside the queue; only while openraft does not run.
    pub(crate) fn put_meta_raw(&self, key: &str, value: &[u8]) -> Result<(), redb::Error> {
        let tx = self.db().begin_write()?;
        tx.open_table(META)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let raw = self.get_meta_raw(key).map_err(to_io)?;
        raw.map(|b| codec::decode(&b)).transpose().map_err(to_io)
    }

    /// Durably rewrites the vote; used by `dictate` while the replica is stopped.
    pub(crate) fn write_vote_offline(&self, vote: &Vote) -> Result<(), redb::Error> {
        let bytes = codec::encode(vote).map_err(|e| redb::Error::Io(to_io(e)))?;
        self.put_meta_raw(KEY_VOTE, &bytes)
    }

    /// Durably appends entries; used by `dictate` while the replica is stopped.
    pub(crate) fn append_offline(&self, entries: Vec<Entry>) -> Result<(), redb::Error> {
        let tx = self.db().begin_write()?;
        {
            let mut t = tx.open_table(LOG)?;
            for e in entries {
                let bytes = codec::encode(&e).map_err(|e| redb::Error::Io(to_io(e)))?;
                t.insert(e.log_id.index, bytes.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn read_vote_offline(&self) -> io::Result<Option<Vote>> {
        self.get_meta(KEY_VOTE)
    }

    pub(crate) fn last_log_id_offline(&self) -> io::Result<Option<LogId>> {
        Ok(self.log_state()?.1)
    }

    /// Every entry of the log, as submitted (see the module docs).
    fn read_range(&self, lo: Bound<u64>, hi: Bound<u64>) -> io::Result<Vec<Entry>> {
        let (tail, hide_from, rtx) = {
            let mem = self.shared.mem.lock().expect("lock");
            let tail: Vec<Entry> = mem.tail.range((lo, hi)).map(|(_, (_, e))| e.clone()).collect();
            // NB: the read snapshot is taken under the lock, so the writer cannot have dropped
            // from the tail anything this snapshot lacks.
            let rtx = self.db().begin_read().map_err(to_io)?;
            (tail, mem.hide_from(), rtx)
        };
        let t = rtx.open_table(LOG).map_err(to_io)?;
        let mut out: BTreeMap<u64, Entry> = BTreeMap::new();
        for item in t.range::<u64>((lo, hi)).map_err(to_io)? {
            let (k, v) = item.map_err(to_io)?;
            if hide_from.is_some_and(|h| k.value() >= h) {
                break;
            }
            let entry: Entry = codec::decode(v.value()).map_err(to_io)?;
            assert_eq!(
                k.value(),
                entry.log_id.index,
                "log entry stored under the wrong index"
            );
            out.insert(k.value(), entry);
        }
        for e in tail {
            out.insert(e.log_id.index, e);
        }
        Ok(out.into_values().collect())
    }

    /// (last purged, last log id) as submitted.
    fn log_state(&self) -> io::Result<(Option<LogId>, Option<LogId>)> {
        let (tail_last, hide_from, mem_purged, rtx) = {
            let mem = self.shared.mem.lock().expect("lock");
            let rtx = self.db().begin_read().map_err(to_io)?;
            (
                mem.tail.last_key_value().map(|(_, (_, e))| e.log_id),
                mem.hide_from(),
                mem.purged,
                rtx,
            )
        };
        let meta = rtx.open_table(META).map_err(to_io)?;
        let file_purged: Option<LogId> = match meta.get(KEY_PURGED).map_err(to_io)? {
            Some(v) => Some(codec::decode(v.value()).map_err(to_io)?),
            None => None,
        };
        let purged = file_purged.max(mem_purged);
        let t = rtx.open_table(LOG).map_err(to_io)?;
        let file_last = match hide_from {
            Some(h) => t.range::<u64>(..h).map_err(to_io)?.next_back(),
            None => t.last().map_err(to_io)?.map(Ok),
        };
        let file_last = match file_last {
            Some(item) => {
                let (_, v) = item.map_err(to_io)?;
                Some(codec::decode::<Entry>(v.value()).map_err(to_io)?.log_id)
            }
            None => None,
        };
        let last = tail_last.or(file_last).max(purged);
        Ok((purged, last))
    }

    fn submit(&self, op: Op) -> io::Result<()> {
        self.writer
            .send(op)
            .map_err(|_| io::Error::other("the log writer has stopped"))
    }

    fn failed(mem: &Mem) -> io::Result<()> {
        match &mem.failed {
            Some(why) => Err(io::Error::other(format!("the raft log failed earlier: {why}"))),
            None => Ok(()),
        }
    }
}

/// The writer thread: group commits, in submission order (see the module docs).
fn run_writer(shared: Arc<Shared>, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let (committed, failed) = {
            let mut mem = shared.mem.lock().expect("lock");
            (mem.committed.take(), mem.failed.clone())
        };
        let res = match failed {
            Some(why) => Err(format!("the raft log failed earlier: {why}")),
            None => commit_batch(&shared.db, &batch, committed).map_err(|e| e.to_string()),
        };
        shared.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let last_seq = batch.last().map_or(0, Op::seq);
        {
            let mut mem = shared.mem.lock().expect("lock");
            match &res {
                Ok(()) => {
                    mem.tail.retain(|_, (seq, _)| *seq > last_seq);
                    mem.truncations.retain(|&(seq, _)| seq > last_seq);
                }
                Err(why) => {
                    if mem.failed.is_none() {
                        tracing::error!(cause = %why, "raft log write failed; the replica stops");
                        mem.failed = Some(why.clone());
                    }
                }
            }
        }
        for op in batch {
            match op {
                Op::Append { done, .. } => done.io_completed(res.clone().map_err(io::Error::other)),
                Op::Vote { done, .. } => {
                    let _ = done.send(res.clone().map_err(io::Error::other));
                }
                Op::Truncate { .. } | Op::Purge { .. } => {}
            }
        }
    }
}

fn commit_batch(db: &Database, batch: &[Op], committed: Option<Vec<u8>>) -> Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    {
        let mut log = tx.open_table(LOG)?;
        let mut meta = tx.open_table(META)?;
        if let Some(c) = committed {
            meta.insert(KEY_COMMITTED, c.as_slice())?;
        }
        for op in batch {
            match op {
                Op::Append { entries, .. } => {
                    for e in entries {
                        let bytes = codec::encode(e).map_err(|e| redb::Error::Io(to_io(e)))?;
                        log.insert(e.log_id.index, bytes.as_slice())?;
                    }
                }
                Op::Truncate { from, .. } => {
                    log.retain_in(*from.., |_, _| false)?;
                }
                Op::Purge { upto, .. } => {
                    let bytes = codec::encode(upto).map_err(|e| redb::Error::Io(to_io(e)))?;
                    meta.insert(KEY_PURGED, bytes.as_slice())?;
                    log.retain_in(..=upto.index, |_, _| false)?;
                }
                Op::Vote { bytes, .. } => {
                    meta.insert(KEY_VOTE, bytes.as_slice())?;
                }
            }
        }
    }
    // The fault suite stalls or fails the log's fsync here (builds with `failpoints` only).
    fail::fail_point!("rdb::log::commit", |arg| {
        let why = arg.unwrap_or_else(|| "injected".into());
        Err(redb::Error::Io(io::Error::other(format!(
            "failpoint rdb::log::commit: {why}"
        ))))
    });
    tx.commit()?;
    Ok(())
}

fn bounds<RB: RangeBounds<u64>>(range: &RB) -> (Bound<u64>, Bound<u64>) {
    let map = |b: Bound<&u64>| match b {
        Bound::Included(&x) => Bound::Included(x),
        Bound::Excluded(&x) => Bound::Excluded(x),
        Bound::Unbounded => Bound::Unbounded,
    };
    (map(range.start_bound()), map(range.end_bound()))
}

/// Runs blocking redb work off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, redb::Error> + Send + 'static,
) -> Result<T, redb::Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(redb::Error::Io(io::Error::other(format!(
            "storage task failed: {e}"
        )))),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let (lo, hi) = bounds(&range);
        self.read_range(lo, hi)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.get_meta(KEY_VOTE).map_err(|e| {
            // NB: openraft 0.9 encoded the vote's leader id differently; such a replica must
            // not be resumed by 0.10 (see docs/design.md, upgrading).
            io::Error::other(format!(
                "the raft vote in log.redb does not decode ({e}); a replica written by rsvc on \
                 openraft 0.9 cannot be opened by this version"
            ))
        })
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let (last_purged_log_id, last_log_id) = self.log_state()?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let bytes = codec::encode(vote).map_err(to_io)?;
        let (done, rx) = tokio::sync::oneshot::channel();
        {
            let mut mem = self.shared.mem.lock().expect("lock");
            Self::failed(&mem)?;
            let seq = mem.next_seq();
            self.submit(Op::Vote { seq, bytes, done })?;
        }
        rx.await
            .map_err(|_| io::Error::other("the log writer has stopped"))?
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        let bytes = codec::encode(&committed).map_err(to_io)?;
        self.shared.mem.lock().expect("lock").committed = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut mem = self.shared.mem.lock().expect("lock");
        Self::failed(&mem)?;
        let seq = mem.next_seq();
        for e in &entries {
            mem.tail.insert(e.log_id.index, (seq, e.clone()));
        }
        // NB: submitted under the lock, so that queue order is seq order.
        self.submit(Op::Append {
            seq,
            entries,
            done: callback,
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        tracing::debug!(from, "truncate log");
        let mut mem = self.shared.mem.lock().expect("lock");
        Self::failed(&mem)?;
        let seq = mem.next_seq();
        mem.tail.retain(|&i, _| i < from);
        mem.truncations.push((seq, from));
        self.submit(Op::Truncate { seq, from })
    }

    async fn purge(&mut self, upto: LogId) -> io::Result<()> {
        tracing::debug!(upto = upto.index, "purge log");
        let mut mem = self.shared.mem.lock().expect("lock");
        Self::failed(&mem)?;
        let seq = mem.next_seq();
        mem.tail.retain(|&i, _| i > upto.index);
        mem.purged = mem.purged.max(Some(upto));
        self.submit(Op::Purge { seq, upto })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;
    use openraft::type_config::TypeConfigExt;
    use openraft::{EntryPayload, LogId as RaftLogId};

    use super::*;
    use crate::storage::DiskFaults;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: RaftLogId::new(
                openraft::impls::leader_id_adv::LeaderId { term, node_id: 1 },
                index,
            ),
            payload: EntryPayload::Blank,
        }
    }

    fn store(dir: &std::path::Path, faults: &DiskFaults) -> LogStore {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("log.redb"))
            .expect("open");
        let db = crate::storage::retry_open(|| {
            redb::Builder::new().create_with_backend(faults.backend(file.try_clone()?)?)
        })
        .expect("redb");
        LogStore::new(db).expect("log store")
    }

    fn indexes(s: &LogStore) -> Vec<u64> {
        s.read_range(Bound::Unbounded, Bound::Unbounded)
            .expect("read")
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    /// The property the commit path rests on: an appended entry is readable (so openraft can
    /// replicate it) while its fsync is still running, and its flush is reported only after.
    #[tokio::test(flavor = "multi_thread")]
    async fn entries_are_readable_before_their_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let faults = DiskFaults::new();
        let mut s = store(dir.path(), &faults);
        faults.set_sync_delay(Duration::from_millis(400));
        let (tx, mut flushed) = TypeConfig::oneshot();
        s.append(vec![entry(1, 1), entry(1, 2)], IOFlushed::signal(tx))
            .await
            .expect("append");
        assert_eq!(indexes(&s), vec![1, 2], "readable at once");
        assert!(
            (&mut flushed).now_or_never().is_none(),
            "flush reported before its fsync finished"
        );
        let (_, last) = s.log_state().expect("state");
        assert_eq!(last.map(|l| l.index), Some(2));
        tokio::time::timeout(Duration::from_secs(10), flushed)
            .await
            .expect("flush completes")
            .expect("callback sent")
            .expect("flush succeeded");
        faults.set_sync_delay(Duration::ZERO);
        assert_eq!(indexes(&s), vec![1, 2], "still there after the flush");
    }

    /// Appends queued behind a slow flush share the next one, and a truncation between them
    /// applies in order: the reader sees exactly what was submitted, at every step.
    #[tokio::test(flavor = "multi_thread")]
    async fn queued_writes_share_a_flush_and_keep_their_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let faults = DiskFaults::new();
        let mut s = store(dir.path(), &faults);
        s.append(vec![entry(1, 1), entry(1, 2), entry(1, 3)], IOFlushed::noop())
            .await
            .expect("append");
        faults.set_sync_delay(Duration::from_millis(300));
        let flushes_before = s.shared.flushes.load(std::sync::atomic::Ordering::Relaxed);
        let mut waits = Vec::new();
        for i in 4..=8 {
            let (tx, rx) = TypeConfig::oneshot();
            s.append(vec![entry(1, i)], IOFlushed::signal(tx))
                .await
                .expect("append");
            waits.push(rx);
        }
        // Replace 6.. with a newer term's entries.
        s.truncate_after(Some(entry(1, 5).log_id))
            .await
            .expect("truncate");
        assert_eq!(indexes(&s), vec![1, 2, 3, 4, 5]);
        let (tx, rx) = TypeConfig::oneshot();
        s.append(vec![entry(2, 6)], IOFlushed::signal(tx))
            .await
            .expect("append");
        waits.push(rx);
        s.save_vote(&Vote::new_committed(2, 1)).await.expect("vote");
        for rx in waits {
            rx.await.expect("sent").expect("flushed");
        }
        let got = s.read_range(Bound::Unbounded, Bound::Unbounded).expect("read");
        let ids: Vec<(u64, u64)> = got
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect();
        assert_eq!(ids, vec![(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 6)]);
        let flushes = s.shared.flushes.load(std::sync::atomic::Ordering::Relaxed) - flushes_before;
        assert!(
            flushes < 7,
            "8 writes took {flushes} flushes; queued writes must share one"
        );
        faults.set_sync_delay(Duration::ZERO);
        // And the file says the same after a reopen (once the writer thread let go of it).
        let file = s.weak();
        drop(s);
        while file.strong_count() > 0 {
            tokio::task::yield_now().await;
        }
        let s = store(dir.path(), &DiskFaults::new());
        assert_eq!(indexes(&s), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(
            s.read_vote_offline().expect("vote"),
            Some(Vote::new_committed(2, 1))
        );
    }
}
