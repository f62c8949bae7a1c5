//! Free-space admission control (DAOS semantics).
//!
//! A leader checks free space before it appends a transaction. Below
//! [`DbConfig::no_append_free_bytes`] it refuses ordinary transactions with `NoSpace`; critical
//! ones (only deletes, destroys, preconditions and `update_critical`, at most
//! [`DbConfig::max_critical_ops`] operations) still pass until [`DbConfig::critical_free_bytes`],
//! so that an operator can always free space. Before refusing, the leader compacts (builds a
//! snapshot and purges the log behind it; redb reuses the freed pages, so the files stop
//! growing) at most once per second, and checks again.
//!
//! Nothing is appended for a refused transaction, so a refusal never leaves a half-written
//! state, and admission resumes by itself once space returns: every check reads the probe anew
//! once the cached reading is older than [`DbConfig::free_space_cache`].
//!
//! CAVEAT: followers cannot refuse entries the leader already committed; they rely on the
//! leader's check and on running with similar disks. A follower whose disk does fill stops on
//! the storage error (see the crate docs) rather than diverging.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Low on space: compact, then ask again with a fresh reading.
    CompactAndRetry,
    Refuse {
        free: u64,
        needed: u64,
    },
}

pub(crate) struct Admission {
    probe: Arc<dyn SpaceProbe>,
    dir: PathBuf,
    no_append: u64,
    critical: u64,
    max_critical_ops: usize,
    cache_for: Duration,
    cache: Mutex<Option<(Instant, u64)>>,
    last_compaction: Mutex<Option<Instant>>,
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
            rejected: AtomicU64::new(0),
        }
    }

    /// Whether `ops` is a critical transaction.
    pub(crate) fn is_critical(&self, ops: &[Op]) -> bool {
        ops.len() <= self.max_critical_ops && ops.iter().all(Op::is_critical)
    }

    fn free(&self, fresh: bool) -> Result<u64> {
        let mut c = self.cache.lock().expect("lock");
        if !fresh {
            if let Some((at, v)) = *c {
                if at.elapsed() < self.cache_for {
                    return Ok(v);
                }
            }
        }
        let v = self
            .probe
            .free_bytes(&self.dir)
            .map_err(|e| Error::Storage(format!("free space of {}: {e}", self.dir.display())))?;
        *c = Some((Instant::now(), v));
        Ok(v)
    }

    /// First check of a transaction.
    pub(crate) fn check(&self, ops: &[Op], fresh: bool) -> Result<Verdict> {
        let size: u64 = ops.iter().map(|o| o.approx_size() as u64).sum();
        let floor = if self.is_critical(ops) {
            self.critical
        } else {
            self.no_append
        };
        let needed = floor.saturating_add(size);
        let free = self.free(fresh)?;
        if free >= needed {
            return Ok(Verdict::Admit);
        }
        if !fresh {
            let mut last = self.last_compaction.lock().expect("lock");
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                *last = Some(Instant::now());
                return Ok(Verdict::CompactAndRetry);
            }
        }
        self.rejected.fetch_add(1, Ordering::Relaxed);
        Ok(Verdict::Refuse { free, needed })
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
        let a = Admission::new(Arc::new(probe.clone()), PathBuf::from("."), &cfg);
        assert_eq!(a.check(&[upd(false)], false).unwrap(), Verdict::Admit);

        probe.set(1 << 20); // below 4 MiB, above 16 KiB
        assert_eq!(a.check(&[upd(false)], false).unwrap(), Verdict::CompactAndRetry);
        // Compaction was just tried: the fresh re-check refuses, and within a second so does
        // the next transaction.
        assert!(matches!(
            a.check(&[upd(false)], true).unwrap(),
            Verdict::Refuse { .. }
        ));
        assert!(matches!(
            a.check(&[upd(false)], false).unwrap(),
            Verdict::Refuse { .. }
        ));
        // Critical transactions pass.
        assert_eq!(a.check(&[upd(true)], false).unwrap(), Verdict::Admit);
        let del = Op::Delete {
            kvs: Path::root(),
            key: b"k".to_vec(),
        };
        assert_eq!(a.check(&[del.clone(), upd(true)], false).unwrap(), Verdict::Admit);
        // ...but not when they are big, nor when mixed with a plain update.
        assert!(matches!(
            a.check(&vec![del.clone(); 9], false).unwrap(),
            Verdict::Refuse { .. }
        ));
        assert!(matches!(
            a.check(&[del, upd(false)], false).unwrap(),
            Verdict::Refuse { .. }
        ));

        probe.set(8 << 10); // below 16 KiB: nothing passes
        assert!(matches!(
            a.check(&[upd(true)], false).unwrap(),
            Verdict::Refuse { .. }
        ));

        probe.set(100 << 20); // space returns: admitted again
        assert_eq!(a.check(&[upd(false)], false).unwrap(), Verdict::Admit);
        assert_eq!(a.rejected.load(Ordering::Relaxed), 5);
    }
}
