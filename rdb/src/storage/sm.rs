//! The state machine on redb (`sm.redb`) and its snapshots (files): openraft's
//! [`RaftStateMachine`].
//!
//! DURABILITY. Applies commit with `Durability::None`: the log already holds every applied
//! entry durably, so after a crash the state machine may be behind and openraft re-applies
//! from the log. The one thing that must hold is that the log is never purged past what the
//! state machine has made durable. Purges follow snapshots, and building a snapshot first
//! makes the state machine durable (one empty `Immediate` commit) up to the snapshot's point,
//! so that holds. Installing a snapshot commits with `Immediate`.
//!
//! SNAPSHOTS are files under `snapshots/`, written from one MVCC read transaction so they never
//! block applies. rdb's network layer streams them to peers in chunks straight from the file
//! (see `network.rs`), and the receiver writes the chunks into a `.part` file in its own
//! `snapshots/` that is then renamed into place, so a state of hundreds of MB never has to fit
//! in one message or in memory, and is never copied twice. The file format:
//!
//! ```text
//!   "RDBSNAP1"
//!   record*:  0x01 kvs:u64 klen:u32 key vlen:u32 value      an entries row
//!             0x02 id:u64  len:u32  info                      a kvs row
//!             0x03 next_kvs_id:u64
//!   0xFF count:u64                                            end; number of records before it
//! ```
//!
//! `snapshots/current` names the newest complete snapshot file and its metadata; it is replaced
//! atomically (write, fsync, rename, fsync directory).

use std::fs;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::kv::{self, apply_tx, ApplyError, KeyClass, KvsInfo, WriteTables, ENTRIES, KVS, ROOT_ID};
use crate::storage::log::blocking;
use crate::types::{CommandResult, Entry, LogId, SnapshotMeta, StoredMembership, TypeConfig};

/// A snapshot as openraft passes it around: a complete snapshot file, open for reading.
///
/// The handle stays readable even after a newer snapshot replaced (and unlinked) the file, so
/// a transfer in progress never loses its source.
#[derive(Debug)]
pub struct SnapshotFile {
    /// Where the file was when it was opened.
    pub path: PathBuf,
    /// The open file.
    pub file: fs::File,
}

impl SnapshotFile {
    /// Opens the snapshot file at `path`.
    pub fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = fs::File::open(&path)?;
        Ok(SnapshotFile { path, file })
    }
}

pub(crate) type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>;

pub(crate) const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
const KEY_APPLIED: &str = "applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_NEXT_ID: &str = "next_kvs_id";

const SNAP_MAGIC: &[u8; 8] = b"RDBSNAP1";
const REC_ENTRY: u8 = 1;
const REC_KVS: u8 = 2;
const REC_NEXT_ID: u8 = 3;
const REC_END: u8 = 0xFF;

/// What `snapshots/current` holds.
#[derive(Serialize, Deserialize)]
pub(crate) struct CurrentSnapshot {
    pub(crate) meta: SnapshotMeta,
    pub(crate) file: String,
}

/// The state machine of one replica. Clones share everything.
#[derive(Clone, Debug)]
pub struct SmStore {
    db: Arc<Database>,
    snap_dir: PathBuf,
}

fn io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn other(e: impl std::fmt::Display) -> redb::Error {
    redb::Error::Io(std::io::Error::other(e.to_string()))
}

impl SmStore {
    /// Opens the state-machine file, creating the root KVS on first use.
    pub(crate) fn new(db: Database, snap_dir: PathBuf) -> Result<Self, redb::Error> {
        fs::create_dir_all(&snap_dir)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(ENTRIES)?;
            let mut kvs = tx.open_table(KVS)?;
            if kvs.get(ROOT_ID)?.is_none() {
                kvs.insert(
                    ROOT_ID,
                    KvsInfo {
                        class: KeyClass::Lexical,
                        child_kvs: 0,
                    }
                    .encode()
                    .as_slice(),
                )?;
            }
            let mut meta = tx.open_table(SM_META)?;
            if meta.get(KEY_NEXT_ID)?.is_none() {
                meta.insert(KEY_NEXT_ID, (ROOT_ID + 1).to_be_bytes().as_slice())?;
            }
        }
        tx.commit()?;
        // Leftovers of an interrupted snapshot build or receive.
        for e in fs::read_dir(&snap_dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "tmp" || x == "part") {
                let _ = fs::remove_file(p);
            }
        }
        Ok(SmStore {
            db: Arc::new(db),
            snap_dir,
        })
    }

    /// The redb handle, for queries.
    pub(crate) fn database(&self) -> &Arc<Database> {
        &self.db
    }

    /// A weak handle on the redb file, to see when every user let go of it.
    pub(crate) fn weak(&self) -> std::sync::Weak<Database> {
        Arc::downgrade(&self.db)
    }

    /// A fresh path for a snapshot being received; leftovers are removed at the next open.
    pub(crate) fn incoming_path(&self) -> PathBuf {
        self.snap_dir
            .join(format!("incoming-{:016x}.part", rand::random::<u64>()))
    }

    pub(crate) fn get_meta_raw(&self, key: &str) -> Result<Option<Vec<u8>>, redb::Error> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SM_META)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    pub(crate) fn put_meta_raw(&self, key: &str, value: &[u8]) -> Result<(), redb::Error> {
        let tx = self.db.begin_write()?;
        tx.open_table(SM_META)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    /// Makes every applied entry durable (one fsync).
    pub(crate) fn sync(&self) -> Result<(), redb::Error> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.commit()?;
        Ok(())
    }

    fn read_applied(&self) -> Result<(Option<LogId>, StoredMembership), redb::Error> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SM_META)?;
        let applied = match t.get(KEY_APPLIED)? {
            Some(v) => codec::decode(v.value()).map_err(other)?,
            None => None,
        };
        let membership = match t.get(KEY_MEMBERSHIP)? {
            Some(v) => codec::decode(v.value()).map_err(other)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    fn current_path(&self) -> PathBuf {
        self.snap_dir.join("current")
    }

    fn read_current(&self) -> Result<Option<CurrentSnapshot>, redb::Error> {
        match fs::read(self.current_path()) {
            Ok(b) => Ok(Some(codec::decode(&b).map_err(other)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Points `current` at `file` and removes every other snapshot file.
    fn set_current(&self, meta: &SnapshotMeta, file: &str) -> Result<(), redb::Error> {
        let rec = CurrentSnapshot {
            meta: meta.clone(),
            file: file.to_string(),
        };
        let bytes = codec::encode(&rec).map_err(other)?;
        write_atomic(&self.current_path(), &bytes)?;
        for e in fs::read_dir(&self.snap_dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "snap") && p.file_name().is_some_and(|n| n != file) {
                let _ = fs::remove_file(p);
            }
        }
        Ok(())
    }

    /// At open, before openraft runs: if the state machine applied entries past the end of
    /// the durable log and past its snapshot, writes a snapshot of the state as it is. Returns
    /// the point it covers, if it wrote one.
    ///
    /// Entries are applied once committed, which can be before this replica's own log write of
    /// them is durable (they are committed on other replicas). When that write then fails (EIO,
    /// ENOSPC) the replica stops, and closing `sm.redb` makes the applied state durable. The
    /// log then ends before what was applied, and openraft takes the log as purged up to the
    /// applied point, which only a snapshot at least that new may cover: without one it
    /// refuses to start. The state is a committed prefix, so it is a valid snapshot.
    pub(crate) fn cover_applied_beyond(&self, log_last: Option<LogId>) -> Result<Option<LogId>, redb::Error> {
        let (applied, _) = self.read_applied()?;
        let snap = self.read_current()?.and_then(|c| c.meta.last_log_id);
        let beyond = |x: Option<LogId>| applied.map(|a| a.index) > x.map(|l| l.index);
        if applied.is_none() || !beyond(log_last) || !beyond(snap) {
            return Ok(None);
        }
        let (meta, _) = self.build_blocking()?;
        Ok(meta.last_log_id)
    }

    /// Writes a snapshot of the current state; returns its metadata and file name.
    fn build_blocking(&self) -> Result<(SnapshotMeta, String), redb::Error> {
        // Make the state durable up to here before the log behind it may be purged.
        self.sync()?;
        let rtx = self.db.begin_read()?;
        let meta_t = rtx.open_table(SM_META)?;
        let applied: Option<LogId> = match meta_t.get(KEY_APPLIED)? {
            Some(v) => codec::decode(v.value()).map_err(other)?,
            None => None,
        };
        let membership: StoredMembership = match meta_t.get(KEY_MEMBERSHIP)? {
            Some(v) => codec::decode(v.value()).map_err(other)?,
            None => StoredMembership::default(),
        };
        let next_id = read_next_id(&meta_t)?;
        let name = snapshot_name(applied);
        let file = format!("{name}.snap");
        let tmp = self.snap_dir.join(format!("{name}.tmp"));
        {
            let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(&tmp)?);
            w.write_all(SNAP_MAGIC)?;
            let mut count = 0u64;
            for item in rtx.open_table(ENTRIES)?.iter()? {
                let (k, v) = item?;
                let (id, key) = k.value();
                w.write_all(&[REC_ENTRY])?;
                w.write_all(&id.to_le_bytes())?;
                write_bytes(&mut w, key)?;
                write_bytes(&mut w, v.value())?;
                count += 1;
            }
            for item in rtx.open_table(KVS)?.iter()? {
                let (k, v) = item?;
                w.write_all(&[REC_KVS])?;
                w.write_all(&k.value().to_le_bytes())?;
                write_bytes(&mut w, v.value())?;
                count += 1;
            }
            w.write_all(&[REC_NEXT_ID])?;
            w.write_all(&next_id.to_le_bytes())?;
            count += 1;
            w.write_all(&[REC_END])?;
            w.write_all(&count.to_le_bytes())?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.snap_dir.join(&file))?;
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
        };
        self.set_current(&meta, &file)?;
        Ok((meta, file))
    }

    /// Replaces the whole state with the snapshot in `path`.
    fn install_blocking(&self, meta: &SnapshotMeta, path: &FsPath) -> Result<(), redb::Error> {
        let mut r = BufReader::with_capacity(1 << 20, fs::File::open(path)?);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != SNAP_MAGIC {
            return Err(other("not an rdb snapshot (bad magic)"));
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.delete_table(ENTRIES)?;
        tx.delete_table(KVS)?;
        {
            let mut entries = tx.open_table(ENTRIES)?;
            let mut kvs = tx.open_table(KVS)?;
            let mut meta_t = tx.open_table(SM_META)?;
            let mut count = 0u64;
            loop {
                let mut tag = [0u8; 1];
                r.read_exact(&mut tag)?;
                match tag[0] {
                    REC_ENTRY => {
                        let id = read_u64(&mut r)?;
                        let key = read_bytes(&mut r)?;
                        let val = read_bytes(&mut r)?;
                        entries.insert((id, key.as_slice()), val.as_slice())?;
                    }
                    REC_KVS => {
                        let id = read_u64(&mut r)?;
                        let info = read_bytes(&mut r)?;
                        kvs.insert(id, info.as_slice())?;
                    }
                    REC_NEXT_ID => {
                        let n = read_u64(&mut r)?;
                        meta_t.insert(KEY_NEXT_ID, n.to_be_bytes().as_slice())?;
                    }
                    REC_END => {
                        let n = read_u64(&mut r)?;
                        if n != count {
                            return Err(other(format!(
                                "snapshot truncated: {count} records, trailer says {n}"
                            )));
                        }
                        break;
                    }
                    t => return Err(other(format!("snapshot corrupt: record tag {t}"))),
                }
                count += 1;
            }
            meta_t.insert(
                KEY_APPLIED,
                codec::encode(&meta.last_log_id).map_err(other)?.as_slice(),
            )?;
            meta_t.insert(
                KEY_MEMBERSHIP,
                codec::encode(&meta.last_membership).map_err(other)?.as_slice(),
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn apply_blocking(&self, entries: Vec<Entry>) -> Result<Vec<CommandResult>, redb::Error> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::None)?;
        let mut out = Vec::with_capacity(entries.len());
        {
            let mut meta_t = tx.open_table(SM_META)?;
            let mut next_id = read_next_id(&meta_t)?;
            let mut tables = WriteTables {
                entries: tx.open_table(ENTRIES)?,
                kvs: tx.open_table(KVS)?,
            };
            let mut last = None;
            for entry in entries {
                last = Some(entry.log_id);
                let entry_term = entry.log_id.leader_id.term;
                match entry.payload {
                    EntryPayload::Blank => out.push(CommandResult::default()),
                    EntryPayload::Normal(cmd) => {
                        let mut results = Vec::with_capacity(cmd.txs.len());
                        for tx_rec in cmd.txs {
                            if tx_rec.term != entry_term {
                                results.push(Err(ApplyError::StaleTerm {
                                    tx_term: tx_rec.term,
                                    entry_term,
                                }));
                                continue;
                            }
                            results.push(apply_tx(&mut tables, &mut next_id, &tx_rec.ops)?);
                        }
                        out.push(CommandResult { results });
                    }
                    EntryPayload::Membership(m) => {
                        let sm = StoredMembership::new(Some(entry.log_id), m);
                        meta_t.insert(KEY_MEMBERSHIP, codec::encode(&sm).map_err(other)?.as_slice())?;
                        out.push(CommandResult::default());
                    }
                }
            }
            meta_t.insert(KEY_NEXT_ID, next_id.to_be_bytes().as_slice())?;
            if let Some(l) = last {
                meta_t.insert(KEY_APPLIED, codec::encode(&Some(l)).map_err(other)?.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(out)
    }
}

fn read_next_id(t: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<u64, redb::Error> {
    match t.get(KEY_NEXT_ID)? {
        Some(v) => Ok(kv::int_of_key(v.value()).ok_or_else(|| other("bad next_kvs_id"))?),
        None => Ok(ROOT_ID + 1),
    }
}

fn write_bytes(w: &mut impl Write, b: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(b.len()).map_err(|_| std::io::Error::other("record over 4 GiB"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(b)
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_bytes(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    let mut v = vec![0u8; u32::from_le_bytes(b) as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// Replaces `path` with `bytes` atomically and durably.
pub(crate) fn write_atomic(path: &FsPath, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `<term>-<index>-<random>`: unique, and sorted by what it covers.
fn snapshot_name(applied: Option<LogId>) -> String {
    match applied {
        Some(l) => format!("{}-{}-{:08x}", l.leader_id.term, l.index, rand::random::<u32>()),
        None => format!("0-0-{:08x}", rand::random::<u32>()),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SmStore {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> std::io::Result<Snapshot> {
        let this = self.clone();
        let (meta, file) = blocking(move || this.build_blocking()).await.map_err(io)?;
        tracing::info!(upto = ?meta.last_log_id, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: SnapshotFile::open(self.snap_dir.join(file))?,
        })
    }
}

impl RaftStateMachine<TypeConfig> for SmStore {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> std::io::Result<(Option<LogId>, StoredMembership)> {
        self.read_applied().map_err(io)
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> std::io::Result<()>
    where
        Strm: futures::Stream<Item = std::io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        // NB: applied inline, not on the blocking pool: an apply is a non-durable redb commit
        // (CPU and page-cache writes, no fsync), and the thread hop cost more than the work.
        // Everything this call is given is applied in one redb transaction, and answered after
        // it committed.
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch.push(entry);
            responders.push(responder);
        }
        let results = self.apply_blocking(batch).map_err(|e| {
            tracing::error!(cause = %e, "state machine apply failed; the replica stops");
            io(e)
        })?;
        for (responder, result) in responders.into_iter().zip(results) {
            if let Some(r) = responder {
                r.send(result);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> std::io::Result<()> {
        let this = self.clone();
        let m = meta.clone();
        blocking(move || {
            let file = format!("{}.snap", snapshot_name(m.last_log_id));
            let path = this.snap_dir.join(&file);
            // A file received into our own directory is renamed into place; one from elsewhere
            // (openraft's storage suite hands over another store's) is copied.
            if snapshot.path.parent() == Some(this.snap_dir.as_path())
                && snapshot.path.extension().is_some_and(|x| x == "part")
            {
                snapshot.file.sync_all()?;
                drop(snapshot.file);
                fs::rename(&snapshot.path, &path)?;
            } else {
                let tmp = path.with_extension("tmp");
                let mut src = snapshot.file;
                src.seek(SeekFrom::Start(0))?;
                let mut dst = fs::File::create(&tmp)?;
                std::io::copy(&mut src, &mut dst)?;
                dst.sync_all()?;
                fs::rename(&tmp, &path)?;
            }
            this.install_blocking(&m, &path)?;
            this.set_current(&m, &file)
        })
        .await
        .map_err(io)?;
        tracing::info!(upto = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> std::io::Result<Option<Snapshot>> {
        let Some(cur) = self.read_current().map_err(io)? else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta: cur.meta,
            snapshot: SnapshotFile::open(self.snap_dir.join(&cur.file))?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{EntryPayload, LogId as RaftLogId};

    use super::*;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: RaftLogId::new(
                openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 },
                index,
            ),
            payload: EntryPayload::Blank,
        }
    }

    /// The state machine applied to 10, its snapshot is older and the durable log ends at 5
    /// (a log write failed after the entries were applied): at open, a snapshot at 10 covers
    /// the gap, once. Without it openraft refuses to start (`purge_upto <= snapshot`).
    #[test]
    fn a_state_machine_ahead_of_the_durable_log_gets_a_snapshot_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("sm.redb")).unwrap();
        let sm = SmStore::new(db, dir.path().join("snapshots")).unwrap();
        sm.apply_blocking((1..=3).map(entry).collect()).unwrap();
        sm.build_blocking().unwrap();
        sm.apply_blocking((4..=10).map(entry).collect()).unwrap();
        let log_last = Some(entry(5).log_id);
        let snapshot_at = || {
            sm.read_current()
                .unwrap()
                .unwrap()
                .meta
                .last_log_id
                .map(|l| l.index)
        };
        assert_eq!(snapshot_at(), Some(3));

        let at = sm.cover_applied_beyond(log_last).unwrap();
        assert_eq!(at.map(|l| l.index), Some(10));
        assert_eq!(snapshot_at(), Some(10));
        // Covered now; and a log that reaches the applied point needs nothing.
        assert_eq!(sm.cover_applied_beyond(log_last).unwrap(), None);
        sm.apply_blocking(vec![entry(11)]).unwrap();
        assert_eq!(sm.cover_applied_beyond(Some(entry(11).log_id)).unwrap(), None);
    }
}
