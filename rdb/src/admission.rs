//! Free-space admission control (DAOS semantics, with a threshold from what the replica needs).
//!
//! A leader checks free space before it appends a transaction, and refuses at once, with
//! `NoSpace` and before anything is appended, what it could not keep. The threshold for an
//! ordinary transaction is its size, plus [`DbConfig::no_append_free_bytes`] (DAOS's 4 MiB),
//! plus the replica's **upkeep**: the space its own housekeeping will take, so that compaction
//! is never what fills the disk:
//!
//! - the next snapshot, which writes the live state out as a file: at most the size of
//!   `sm.redb`;
//! - redb's file growth: a redb file grows by up to its own size at once (it doubles), so
//!   `sm.redb` and `log.redb` may each need their size again.
//!
//! Critical transactions (only deletes, destroys, preconditions and `update_critical`, at most
//! [`DbConfig::max_critical_ops`] operations) need only their size above
//! [`DbConfig::critical_free_bytes`], so that an operator can always free space.
//!
//! A refusal asks for a compaction in the background (at most once per second), which builds a
//! snapshot and purges the log behind it so that redb reuses the freed pages; but only where the
//! snapshot fits with [`DbConfig::critical_free_bytes`] to spare. The same check guards every
//! snapshot rdb starts (openraft's own snapshot policy is off). Readings are cached for
//! [`DbConfig::free_space_cache`], so admission resumes by itself once space returns.
//!
//! CAVEATS: the upkeep counts this replica's files only. Replicas of other groups, or other
//! programs, on the same filesystem each keep their own margin; the sum is not reserved.
//! Followers cannot refuse entries the leader already committed; they rely on the leader's
//! check and on running with similar disks. A follower whose disk does fill stops on the
//! storage error (see the crate docs) rather than diverging.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::DbConfig;
use crate::error::{Error, Result};
use crate::kv::Op;

/// Where free-space readings come from. The default reads `statvfs` of the data directory;
/// tests inject their own.
pub trait SpaceProbe: Send + Sync + 'static {
    /// Bytes available to this process in the filesystem holding `dir`.
    fn free_bytes(&self, dir: &std::path::Path) -> std::io::Result<u64>;
}

/// `statvfs(dir)`: `f_bavail * f_frsize`.
#[derive(Debug, Default, Clone, Copy)]
pub struct StatvfsProbe;

impl SpaceProbe for StatvfsProbe {
    fn free_bytes(&self, dir: &std::path::Path) -> std::io::Result<u64> {
        let st = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// A probe whose reading is set by hand, for tests.
#[derive(Debug, Clone)]
pub struct FixedProbe(pub Arc<AtomicU64>);

impl FixedProbe {
    /// A probe reporting `bytes`.
    pub fn new(bytes: u64) -> Self {
        FixedProbe(Arc::new(AtomicU64::new(bytes)))
    }
    /// Changes the reading.
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::SeqCst);
    }
}

impl SpaceProbe for FixedProbe {
    fn free_bytes(&self, _dir: &std::path::Path) -> std::io::Result<u64> {
        Ok(self.0.load(Ordering::SeqCst))
    }
}

/// What the admission check decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Admit,
    Refuse { free: u64, needed: u64 },
}

/// One reading: free bytes in the filesystem and this replica's upkeep, when taken.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Instant,
    free: u64,
    upkeep: Upkeep,
}

/// What this replica's own housekeeping will need (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Upkeep {
    /// The next snapshot: at most the state file.
    pub snapshot: u64,
    /// redb growing each of its files by up to its size.
    pub growth: u64,
}

impl Upkeep {
    fn total(&self) -> u64 {
        self.snapshot.saturating_add(self.growth)
    }
}

pub(crate) struct Admission {
    probe: Arc<dyn SpaceProbe>,
    dir: PathBuf,
    no_append: u64,
    critical: u64,
    max_critical_ops: usize,
    cache_for: Duration,
    cache: Mutex<Option<Reading>>,
    last_compaction: Mutex<Option<Instant>>,
    /// Whether the last snapshot check found no room (for logging changes only).
    snapshot_blocked: AtomicBool,
    pub rejected: AtomicU64,
}

impl Admission {
    pub(crate) fn new(probe: Arc<dyn SpaceProbe>, dir: PathBuf, cfg: &DbConfig) -> Self {
        Admission {
            probe,
            dir,
            no_append: cfg.no_append_free_bytes,
            critical: cfg.critical_free_bytes,
            max_critical_ops: cfg.max_critical_ops,
            cache_for: cfg.free_space_cache,
            cache: Mutex::new(None),
            last_compaction: Mutex::new(None),
            snapshot_blocked: AtomicBool::new(false),
            rejected: AtomicU64::new(0),
        }
    }

    /// Whether `ops` is a critical transaction.
    pub(crate) fn is_critical(&self, ops: &[Op]) -> bool {
        ops.len() <= self.max_critical_ops && ops.iter().all(Op::is_critical)
    }

    fn upkeep_now(&self) -> Upkeep {
        let len = |f: &str| std::fs::metadata(self.dir.join(f)).map_or(0, |m| m.len());
        let (sm, log) = (len(crate::storage::SM_FILE), len(crate::storage::LOG_FILE));
        Upkeep {
            snapshot: sm,
            growth: sm.saturating_add(log),
        }
    }

    fn reading(&self, fresh: bool) -> Result<Reading> {
        let mut c = self.cache.lock().expect("lock");
        if let Some(r) = *c {
            if !fresh && r.at.elapsed() < self.cache_for {
                return Ok(r);
            }
        }
        let free = self
            .probe
            .free_bytes(&self.dir)
            .map_err(|e| Error::Storage(format!("free space of {}: {e}", self.dir.display())))?;
        let r = Reading {
            at: Instant::now(),
            free,
            upkeep: self.upkeep_now(),
        };
        *c = Some(r);
        Ok(r)
    }

    /// The free bytes an ordinary transaction of `size` bytes needs, given `upkeep`.
    fn needed(&self, critical: bool, size: u64, upkeep: Upkeep) -> u64 {
        if critical {
            self.critical.saturating_add(size)
        } else {
            self.no_append.saturating_add(upkeep.total()).saturating_add(size)
        }
    }

    /// Admits `ops` or refuses them for lack of space.
    pub(crate) fn check(&self, ops: &[Op]) -> Result<Verdict> {
        let size: u64 = ops.iter().map(|o| o.approx_size() as u64).sum();
        let r = self.reading(false)?;
        let needed = self.needed(self.is_critical(ops), size, r.upkeep);
        if r.free >= needed {
            return Ok(Verdict::Admit);
        }
        self.rejected.fetch_add(1, Ordering::Relaxed);
        Ok(Verdict::Refuse { free: r.free, needed })
    }

    /// Whether a snapshot may be built now: it fits with the critical floor to spare, so that
    /// building it cannot be what fills the disk. Reads the probe anew.
    /// Logs when that changes, not at every check.
    pub(crate) fn snapshot_fits(&self) -> Result<bool> {
        let r = self.reading(true)?;
        let needed = self.critical.saturating_add(r.upkeep.snapshot);
        let fits = r.free >= needed;
        let was_blocked = self.snapshot_blocked.swap(!fits, Ordering::Relaxed);
        if was_blocked == fits {
            if fits {
                tracing::info!(dir = %self.dir.display(), free = r.free, "snapshots fit again");
            } else {
                tracing::warn!(dir = %self.dir.display(), free = r.free, needed,
                    "no snapshot: it would not fit; the log grows until space returns");
            }
        }
        Ok(fits)
    }

    /// Takes the compaction slot if the last compaction asked for was a second ago or more.
    pub(crate) fn compaction_slot(&self) -> bool {
        let mut last = self.last_compaction.lock().expect("lock");
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Path;

    fn upd(critical: bool) -> Op {
        Op::Update {
            kvs: Path::root(),
            key: b"k".to_vec(),
            value: vec![0; 100],
            critical,
        }
    }

    #[test]
    fn thresholds_and_critical_ops() {
        let probe = FixedProbe::new(100 << 20);
        let cfg = DbConfig {
            free_space_cache: Duration::ZERO,
            ..DbConfig::default()
        };
        // An empty directory: no upkeep, so the thresholds are DAOS's constants.
        let dir = tempfile::tempdir().unwrap();
        let a = Admission::new(Arc::new(probe.clone()), dir.path().to_path_buf(), &cfg);
        assert_eq!(a.check(&[upd(false)]).unwrap(), Verdict::Admit);

        probe.set(1 << 20); // below 4 MiB, above 16 KiB
        assert!(matches!(a.check(&[upd(false)]).unwrap(), Verdict::Refuse { .. }));
        // Critical transactions pass.
        assert_eq!(a.check(&[upd(true)]).unwrap(), Verdict::Admit);
        let del = Op::Delete {
            kvs: Path::root(),
            key: b"k".to_vec(),
        };
        assert_eq!(a.check(&[del.clone(), upd(true)]).unwrap(), Verdict::Admit);
        // ...but not when they are big, nor when mixed with a plain update.
        assert!(matches!(
            a.check(&vec![del.clone(); 9]).unwrap(),
            Verdict::Refuse { .. }
        ));
        assert!(matches!(
            a.check(&[del, upd(false)]).unwrap(),
            Verdict::Refuse { .. }
        ));

        probe.set(8 << 10); // below 16 KiB: nothing passes
        assert!(matches!(a.check(&[upd(true)]).unwrap(), Verdict::Refuse { .. }));

        probe.set(100 << 20); // space returns: admitted again
        assert_eq!(a.check(&[upd(false)]).unwrap(), Verdict::Admit);
        assert_eq!(a.rejected.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn the_threshold_covers_the_next_snapshot_and_redb_growth() {
        let cfg = DbConfig {
            free_space_cache: Duration::ZERO,
            ..DbConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(crate::storage::SM_FILE), vec![0u8; 10 << 20]).unwrap();
        std::fs::write(dir.path().join(crate::storage::LOG_FILE), vec![0u8; 6 << 20]).unwrap();
        // Upkeep: a 10 MiB snapshot, and 10 + 6 MiB of growth; plus the 4 MiB floor = 30 MiB.
        let probe = FixedProbe::new(31 << 20);
        let a = Admission::new(Arc::new(probe.clone()), dir.path().to_path_buf(), &cfg);
        assert_eq!(a.check(&[upd(false)]).unwrap(), Verdict::Admit);
        probe.set(29 << 20);
        match a.check(&[upd(false)]).unwrap() {
            Verdict::Refuse { free, needed } => {
                assert_eq!(free, 29 << 20);
                assert_eq!(needed, (30 << 20) + upd(false).approx_size() as u64);
            }
            v => panic!("{v:?}"),
        }
        // Critical ones still pass, and so does a snapshot (10 MiB + the 16 KiB floor).
        assert_eq!(a.check(&[upd(true)]).unwrap(), Verdict::Admit);
        assert!(a.snapshot_fits().unwrap());
        probe.set(10 << 20);
        assert!(
            !a.snapshot_fits().unwrap(),
            "10 MiB cannot hold a 10 MiB snapshot and the floor"
        );
        // One compaction per second at most.
        assert!(a.compaction_slot());
        assert!(!a.compaction_slot());
    }
}
