//! The raft log on redb (`log.redb`): openraft's [`RaftLogStorage`].
//!
//! INVARIANTS
//! - An append, a truncation and a vote are durable (`Durability::Immediate`, one fsync)
//!   before openraft is told they are done. All entries of one `append` call share one redb
//!   commit, so a follower receiving 64 entries pays one fsync, not 64.
//! - Purges are written with `Durability::None`: losing one in a crash only means purging
//!   again, and the next durable commit makes it durable anyway.
//! - The committed index is kept in memory and written along with the next append, truncation
//!   or purge, never in a transaction of its own: it is a hint that speeds up re-applying after a
//!   restart, and any older value is still true. This keeps a redb commit off the commit path.
//! - Entries are stored as `FORMAT_V1 ++ postcard(openraft Entry)` keyed by index.
//!
//! Writes run on tokio's blocking pool so that an fsync never stalls the async worker that
//! also serves other replicas and the network.

// NB: openraft's trait methods return its own (large) StorageError; the helpers here
// return it too rather than convert back and forth.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec;
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
pub(crate) const KEY_STORAGE_ID: &str = "storage_id";

/// The log store of one replica. Cheap to clone: clones share the redb handle.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<Database>,
    /// The newest committed log id openraft reported, not yet written (see the module docs).
    committed: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn read_logs(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_logs(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

impl LogStore {
    /// Opens (or creates the tables of) a log file.
    pub(crate) fn new(db: Database) -> Result<Self, redb::Error> {
        let tx = db.begin_write()?;
        {
            tx.open_table(LOG)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        Ok(LogStore {
            db: Arc::new(db),
            committed: Arc::default(),
        })
    }

    /// A weak handle on the redb file, to see when every user let go of it.
    pub(crate) fn weak(&self) -> std::sync::Weak<Database> {
        Arc::downgrade(&self.db)
    }

    pub(crate) fn get_meta_raw(&self, key: &str) -> Result<Option<Vec<u8>>, redb::Error> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    pub(crate) fn put_meta_raw(&self, key: &str, value: &[u8], durable: bool) -> Result<(), redb::Error> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        tx.open_table(META)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let raw = self
            .get_meta_raw(key)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        raw.map(|b| codec::decode(&b))
            .transpose()
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))
    }

    async fn put_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
        durable: bool,
        subject: ErrorSubject<NodeId>,
    ) -> Result<(), StorageError> {
        let bytes = codec::encode(value).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        let this = self.clone();
        blocking(move || this.put_meta_raw(key, &bytes, durable))
            .await
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))
    }

    /// Durably rewrites the vote; used by `dictate` while the replica is stopped.
    pub(crate) fn write_vote_offline(&self, vote: &Vote) -> Result<(), redb::Error> {
        let bytes = codec::encode(vote).map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
        self.put_meta_raw(KEY_VOTE, &bytes, true)
    }

    /// Durably appends entries; used by `dictate` while the replica is stopped.
    pub(crate) fn append_offline(&self, entries: Vec<Entry>) -> Result<(), redb::Error> {
        write_entries(&self.db, entries, None)
    }

    pub(crate) fn read_vote_offline(&self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE)
    }

    pub(crate) fn last_log_id_offline(&self) -> Result<Option<LogId>, StorageError> {
        let tx = self.db.begin_read().map_err(read_logs)?;
        let t = tx.open_table(LOG).map_err(read_logs)?;
        let last = t.last().map_err(read_logs)?;
        match last {
            Some((_, v)) => Ok(Some(codec::decode::<Entry>(v.value()).map_err(read_logs)?.log_id)),
            None => self.get_meta(KEY_PURGED),
        }
    }
}

fn write_entries(db: &Database, entries: Vec<Entry>, committed: Option<Vec<u8>>) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    {
        if let Some(c) = committed {
            tx.open_table(META)?.insert(KEY_COMMITTED, c.as_slice())?;
        }
        let mut t = tx.open_table(LOG)?;
        for e in entries {
            let bytes = codec::encode(&e).map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
            t.insert(e.log_id.index, bytes.as_slice())?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Runs blocking redb work off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, redb::Error> + Send + 'static,
) -> Result<T, redb::Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(redb::Error::Io(std::io::Error::other(format!(
            "storage task failed: {e}"
        )))),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let lo = match range.start_bound() {
            Bound::Included(&x) => Bound::Included(x),
            Bound::Excluded(&x) => Bound::Excluded(x),
            Bound::Unbounded => Bound::Unbounded,
        };
        let hi = match range.end_bound() {
            Bound::Included(&x) => Bound::Included(x),
            Bound::Excluded(&x) => Bound::Excluded(x),
            Bound::Unbounded => Bound::Unbounded,
        };
        let tx = self.db.begin_read().map_err(read_logs)?;
        let t = tx.open_table(LOG).map_err(read_logs)?;
        let mut out = Vec::new();
        for item in t.range::<u64>((lo, hi)).map_err(read_logs)? {
            let (k, v) = item.map_err(read_logs)?;
            let entry: Entry = codec::decode(v.value()).map_err(read_logs)?;
            assert_eq!(
                k.value(),
                entry.log_id.index,
                "log entry stored under the wrong index"
            );
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_PURGED)?;
        let tx = self.db.begin_read().map_err(read_logs)?;
        let t = tx.open_table(LOG).map_err(read_logs)?;
        let last = match t.last().map_err(read_logs)? {
            Some((_, v)) => Some(codec::decode::<Entry>(v.value()).map_err(read_logs)?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote, true, ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta(KEY_COMMITTED, &committed, false, ErrorSubject::Store)
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let db = self.db.clone();
        let committed = self.committed.lock().expect("lock").take();
        // One redb commit (one fsync) for the whole batch.
        let res = blocking(move || write_entries(&db, entries, committed)).await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                tracing::error!(cause = %e, "raft log append failed; the replica stops");
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_logs(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(from = log_id.index, "truncate log");
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write()?;
            tx.open_table(LOG)?.retain_in(log_id.index.., |_, _| false)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(write_logs)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(upto = log_id.index, "purge log");
        let bytes = codec::encode(&log_id).map_err(write_logs)?;
        let db = self.db.clone();
        let committed = self.committed.lock().expect("lock").take();
        blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::None)?;
            // Record the purge point and drop the entries in one transaction.
            let mut meta = tx.open_table(META)?;
            meta.insert(KEY_PURGED, bytes.as_slice())?;
            if let Some(c) = committed {
                meta.insert(KEY_COMMITTED, c.as_slice())?;
            }
            drop(meta);
            tx.open_table(LOG)?.retain_in(..=log_id.index, |_, _| false)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(write_logs)
    }
}
