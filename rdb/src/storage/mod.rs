//! A replica's directory: identity file, the two redb files, snapshots.
//!
//! ```text
//!   <dir>/replica.id     FORMAT_V1 ++ postcard(Identity)   written once, at create
//!   <dir>/log.redb       raft log, vote, commit index, storage id
//!   <dir>/sm.redb        KVS tree, applied index, membership, storage id
//!   <dir>/snapshots/     <term>-<index>-<rand>.snap, current
//! ```
//!
//! IDENTITY. `create` draws a random storage id and writes it into all three files. `open`
//! refuses to start unless all three agree. A directory that lost any of them (a wiped or
//! replaced disk, a botched restore) is reported as [`Error::IdentityLost`]: the replica must
//! be destroyed and re-added under a new generation, never resumed as the voter it was.

pub(crate) mod faults;
pub(crate) mod log;
pub(crate) mod sm;

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, Result};
use crate::types::{DbId, ReplicaId};
pub use faults::DiskFaults;
use log::LogStore;
use sm::SmStore;

/// Who a replica directory belongs to. Persisted in `replica.id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The database (raft group).
    pub db: DbId,
    /// This replica.
    pub replica: ReplicaId,
    /// Random, drawn at create; see the module docs.
    pub storage_id: u64,
}

const ID_FILE: &str = "replica.id";
pub(crate) const LOG_FILE: &str = "log.redb";
pub(crate) const SM_FILE: &str = "sm.redb";
const SNAP_DIR: &str = "snapshots";

pub(crate) struct Files {
    pub ident: Identity,
    pub log: LogStore,
    pub sm: SmStore,
}

/// Opens a redb file, waiting briefly while this process still closes an earlier handle.
///
/// NB: a replica that was just stopped may still be dropping its `Database` on another thread:
/// its last reference is gone, but the destructor that releases the file lock has not finished.
/// Another process cannot hold the file (the engine locks its data directory), so a lock
/// conflict that outlasts the wait is a real error.
pub(crate) fn retry_open(
    mut open: impl FnMut() -> std::result::Result<redb::Database, redb::DatabaseError>,
) -> std::result::Result<redb::Database, redb::DatabaseError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match open() {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

fn open_redb(path: &Path, faults: Option<&DiskFaults>, create: bool) -> Result<redb::Database> {
    if !create && !path.exists() {
        return Err(Error::IdentityLost(format!("{} is missing", path.display())));
    }
    let db = match faults {
        Some(f) => {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(path)?;
            retry_open(|| redb::Builder::new().create_with_backend(f.backend(file.try_clone()?)?))?
        }
        None => retry_open(|| redb::Builder::new().create(path))?,
    };
    Ok(db)
}

/// Creates a new replica directory. Fails with `Exists` if one is already there.
pub(crate) fn create(
    dir: &Path,
    db: DbId,
    replica: ReplicaId,
    faults: Option<&DiskFaults>,
) -> Result<Identity> {
    if dir.join(ID_FILE).exists() || dir.join(LOG_FILE).exists() || dir.join(SM_FILE).exists() {
        return Err(Error::Exists(format!(
            "a replica already lives in {}",
            dir.display()
        )));
    }
    fs::create_dir_all(dir)?;
    let ident = Identity {
        db,
        replica,
        storage_id: rand::random::<u64>() | 1,
    };
    let id_bytes = ident.storage_id.to_be_bytes();
    let log = LogStore::new(open_redb(&dir.join(LOG_FILE), faults, true)?)?;
    log.put_meta_raw(log::KEY_STORAGE_ID, &id_bytes)?;
    let sm = SmStore::new(open_redb(&dir.join(SM_FILE), faults, true)?, dir.join(SNAP_DIR))?;
    sm.put_meta_raw(log::KEY_STORAGE_ID, &id_bytes)?;
    sm.sync()?;
    drop((log, sm));
    // The identity file goes last: a directory with it is complete.
    sm::write_atomic(&dir.join(ID_FILE), &codec::encode(&ident)?)?;
    Ok(ident)
}

/// Reads the identity of the replica in `dir` without opening its databases.
pub(crate) fn read_identity(dir: &Path) -> Result<Identity> {
    let path = dir.join(ID_FILE);
    match fs::read(&path) {
        Ok(b) => Ok(codec::decode(&b)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join(LOG_FILE).exists() || dir.join(SM_FILE).exists() {
                Err(Error::IdentityLost(format!(
                    "{} is missing but data files remain",
                    path.display()
                )))
            } else {
                Err(Error::NotFound(format!("no replica in {}", dir.display())))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens an existing replica directory, checking that all its files belong together.
pub(crate) fn open(dir: &Path, faults: Option<&DiskFaults>) -> Result<Files> {
    let ident = read_identity(dir)?;
    let log = LogStore::new(open_redb(&dir.join(LOG_FILE), faults, false)?)?;
    let sm = SmStore::new(open_redb(&dir.join(SM_FILE), faults, false)?, dir.join(SNAP_DIR))?;
    let want = ident.storage_id.to_be_bytes().to_vec();
    for (what, got) in [
        ("log.redb", log.get_meta_raw(log::KEY_STORAGE_ID)?),
        ("sm.redb", sm.get_meta_raw(log::KEY_STORAGE_ID)?),
    ] {
        if got.as_deref() != Some(want.as_slice()) {
            return Err(Error::IdentityLost(format!(
                "{what} in {} does not belong to replica {} (storage id {:016x}): it was replaced or recreated",
                dir.display(),
                ident.replica,
                ident.storage_id
            )));
        }
    }
    let log_last = log
        .last_log_id_offline()
        .map_err(|e| Error::Storage(e.to_string()))?;
    if let Some(at) = sm.cover_applied_beyond(log_last)? {
        tracing::warn!(
            replica = %ident.replica,
            applied = at.index,
            log_last = log_last.map(|l| l.index),
            "the state machine applied past the durable log (a log write failed); a snapshot of it now covers the gap"
        );
    }
    Ok(Files { ident, log, sm })
}
