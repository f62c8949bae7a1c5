//! Free-space admission control (DAOS semantics, with a threshold from what the replica needs).
//!
//! A leader checks free space before it appends a transaction, and refuses at once, with
//! `NoSpace` and before anything is appended, what a quorum could not keep. The threshold for an
//! ordinary transaction is its size, plus [`DbConfig::no_append_free_bytes`] (DAOS's 4 MiB),
//! plus the replica's **upkeep**: the space its own housekeeping will take, so that compaction
//! is never what fills the disk:
//!
//! - the next snapshot, which writes the live state out as a file: at most the size of
//!   `sm.redb`;
//! - redb's file growth: a redb file grows by up to its own size at once (it doubles), so
//!   `sm.redb` and `log.redb` may each need their size again.
//!
//! **The quorum decides, not the leader alone.** Every follower puts a [`SpaceReport`] (its
//! free bytes and its upkeep, from its own cached reading) on its AppendEntries replies, so the
//! leader learns each voter's space at the heartbeat rate at no extra RPC. The leader admits a
//! transaction only if enough voters, itself included, can hold it to form a majority: the
//! minimum over the best quorum. A voter with no report younger than
//! [`DbConfig::space_report_ttl`] (a new leader's first milliseconds, a follower down for long)
//! is given the benefit of the doubt; a follower that stopped on a storage error keeps its last,
//! low, report until it comes back. A follower whose own space runs short asks for a compaction
//! of its own, as a refusing leader does.
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
//! **Neighbours count too.** With [`SharedFsProbe`] (rsvc-server gives it to every replica of
//! an engine), the free space a replica sees is the filesystem's less its neighbours' upkeep,
//! so that the margin covers every replica of the engine, not each one alone.
//!
//! CAVEATS: other programs, and replicas of other engines on the same filesystem, are not
//! counted beyond what they already took; give each engine a filesystem of its own.
//! Reports are up to a heartbeat and a cache period old, so a disk filled from outside faster
//! than that is met as a real ENOSPC: followers cannot refuse entries the leader already
//! committed. A replica whose disk does fill stops on the storage error and is reopened by its
//! engine once space returns (see the crate docs), rather than diverging. The leader applies
//! its own thresholds to the followers' readings: the group is meant to share one config.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::DbConfig;
use crate::error::{Error, Result};
use crate::kv::Op;
use crate::types::NodeId;

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

/// `statvfs` less the upkeep of the *other* replicas under one root directory: an engine
/// hosting many replicas on one filesystem gives each this probe, so that a replica's margin
/// also covers what its neighbours' snapshots and file growth will take. The neighbours'
/// upkeep is summed over every directory holding a replica (`sm.redb`) up to three levels
/// under `root`, and the sum is reused for `cache_for`, however many replicas ask.
#[derive(Debug)]
pub struct SharedFsProbe {
    root: PathBuf,
    cache_for: Duration,
    upkeep: Mutex<Option<(Instant, HashMap<PathBuf, u64>)>>,
}

impl SharedFsProbe {
    /// A probe for the replicas under `root`, rescanning their files at most every
    /// `cache_for`.
    pub fn new(root: impl Into<PathBuf>, cache_for: Duration) -> Self {
        SharedFsProbe {
            root: root.into(),
            cache_for,
            upkeep: Mutex::new(None),
        }
    }

    /// The upkeep of every replica under the root, by directory.
    fn scan(root: &std::path::Path) -> HashMap<PathBuf, u64> {
        let mut found = HashMap::new();
        let mut dirs = vec![(root.to_path_buf(), 0)];
        while let Some((dir, depth)) = dirs.pop() {
            if dir.join(crate::storage::SM_FILE).exists() {
                found.insert(dir.clone(), Upkeep::of(&dir).total());
                continue;
            }
            if depth == 3 {
                continue;
            }
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push((e.path(), depth + 1));
                }
            }
        }
        found
    }

    /// What the replicas under the root other than the one in `dir` will need.
    pub fn others_upkeep(&self, dir: &std::path::Path) -> u64 {
        let mut c = self.upkeep.lock().expect("lock");
        if c.as_ref().is_none_or(|(at, _)| at.elapsed() >= self.cache_for) {
            *c = Some((Instant::now(), Self::scan(&self.root)));
        }
        let (_, all) = c.as_ref().expect("just filled");
        all.iter()
            .filter(|(d, _)| d.as_path() != dir)
            .map(|(_, u)| *u)
            .sum()
    }
}

impl SpaceProbe for SharedFsProbe {
    fn free_bytes(&self, dir: &std::path::Path) -> std::io::Result<u64> {
        let free = StatvfsProbe.free_bytes(dir)?;
        Ok(free.saturating_sub(self.others_upkeep(dir)))
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
    /// The upkeep of the replica whose files are in `dir`.
    fn of(dir: &std::path::Path) -> Upkeep {
        let len = |f: &str| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len());
        let (sm, log) = (len(crate::storage::SM_FILE), len(crate::storage::LOG_FILE));
        Upkeep {
            snapshot: sm,
            growth: sm.saturating_add(log),
        }
    }

    fn total(&self) -> u64 {
        self.snapshot.saturating_add(self.growth)
    }
}

/// One replica's free space as it reports it to its leader, on AppendEntries replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpaceReport {
    /// Free bytes in the filesystem holding the replica.
    pub free: u64,
    /// What the replica's own housekeeping will need (the next snapshot and redb's growth).
    pub upkeep: u64,
}

/// The latest [`SpaceReport`] of each follower, as received by this replica while it leads.
#[derive(Debug, Default)]
pub(crate) struct SpaceReports(Mutex<HashMap<NodeId, (Instant, SpaceReport)>>);

impl SpaceReports {
    pub(crate) fn record(&self, from: NodeId, report: SpaceReport) {
        self.0
            .lock()
            .expect("lock")
            .insert(from, (Instant::now(), report));
    }

    fn fresh(&self, from: NodeId, ttl: Duration) -> Option<SpaceReport> {
        let m = self.0.lock().expect("lock");
        m.get(&from).filter(|(at, _)| at.elapsed() < ttl).map(|(_, r)| *r)
    }
}

/// Who must be able to hold a transaction: the voters of the group and this replica's id.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quorum<'a> {
    pub me: NodeId,
    pub voters: &'a [NodeId],
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
    /// What the followers last reported (filled in by the network layer).
    pub reports: Arc<SpaceReports>,
    report_ttl: Duration,
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
            reports: Arc::new(SpaceReports::default()),
            report_ttl: cfg.space_report_ttl,
        }
    }

    /// Whether `ops` is a critical transaction.
    pub(crate) fn is_critical(&self, ops: &[Op]) -> bool {
        ops.len() <= self.max_critical_ops && ops.iter().all(Op::is_critical)
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
            upkeep: Upkeep::of(&self.dir),
        };
        *c = Some(r);
        Ok(r)
    }

    /// The free bytes a transaction of `size` bytes needs on a replica whose upkeep is `upkeep`.
    fn needed(&self, critical: bool, size: u64, upkeep: u64) -> u64 {
        if critical {
            self.critical.saturating_add(size)
        } else {
            self.no_append.saturating_add(upkeep).saturating_add(size)
        }
    }

    /// This replica's report for its leader, from the cached reading; `None` if the probe
    /// fails. Also asks for a compaction (at most once a second) when an ordinary transaction
    /// would no longer fit here: the leader will soon refuse on this replica's account, and a
    /// snapshot may give log space back.
    pub(crate) fn report(&self) -> Option<(SpaceReport, bool)> {
        let report = self.reading_for_status()?;
        let short = report.free < self.needed(false, 0, report.upkeep);
        Some((report, short && self.compaction_slot()))
    }

    /// The cached reading as a report, for [`crate::Status`]; never asks for a compaction.
    pub(crate) fn reading_for_status(&self) -> Option<SpaceReport> {
        let r = self.reading(false).ok()?;
        Some(SpaceReport {
            free: r.free,
            upkeep: r.upkeep.total(),
        })
    }

    /// Admits `ops` or refuses them for lack of space on a quorum of `quorum.voters`.
    pub(crate) fn check(&self, ops: &[Op], quorum: Quorum<'_>) -> Result<Verdict> {
        let size: u64 = ops.iter().map(|o| o.approx_size() as u64).sum();
        let critical = self.is_critical(ops);
        let r = self.reading(false)?;
        let own = SpaceReport {
            free: r.free,
            upkeep: r.upkeep.total(),
        };
        // (free, needed) of every voter that reported; the others are given the benefit of
        // the doubt (see the module docs).
        let mut known: Vec<(u64, u64)> = Vec::with_capacity(quorum.voters.len());
        let mut unknown = 0;
        for &v in quorum.voters {
            let report = if v == quorum.me {
                Some(own)
            } else {
                self.reports.fresh(v, self.report_ttl)
            };
            match report {
                Some(rep) => known.push((rep.free, self.needed(critical, size, rep.upkeep))),
                None => unknown += 1,
            }
        }
        let majority = quorum.voters.len() / 2 + 1;
        let fit = known.iter().filter(|(free, needed)| free >= needed).count();
        let own_fits = own.free >= self.needed(critical, size, own.upkeep);
        if own_fits && fit + unknown >= majority {
            return Ok(Verdict::Admit);
        }
        self.rejected.fetch_add(1, Ordering::Relaxed);
        // Report the tightest replica of the best quorum: the one that makes the difference.
        known.sort_by_key(|&(free, needed)| std::cmp::Reverse(free as i128 - needed as i128));
        let pick = if !own_fits {
            (own.free, self.needed(critical, size, own.upkeep))
        } else {
            known[(majority - unknown).saturating_sub(1).min(known.len() - 1)]
        };
        Ok(Verdict::Refuse {
            free: pick.0,
            needed: pick.1,
        })
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

    /// A group of one.
    const SOLO: Quorum<'static> = Quorum { me: 1, voters: &[1] };

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
        assert_eq!(a.check(&[upd(false)], SOLO).unwrap(), Verdict::Admit);

        probe.set(1 << 20); // below 4 MiB, above 16 KiB
        assert!(matches!(
            a.check(&[upd(false)], SOLO).unwrap(),
            Verdict::Refuse { .. }
        ));
        // Critical transactions pass.
        assert_eq!(a.check(&[upd(true)], SOLO).unwrap(), Verdict::Admit);
        let del = Op::Delete {
            kvs: Path::root(),
            key: b"k".to_vec(),
        };
        assert_eq!(a.check(&[del.clone(), upd(true)], SOLO).unwrap(), Verdict::Admit);
        // ...but not when they are big, nor when mixed with a plain update.
        assert!(matches!(
            a.check(&vec![del.clone(); 9], SOLO).unwrap(),
            Verdict::Refuse { .. }
        ));
        assert!(matches!(
            a.check(&[del, upd(false)], SOLO).unwrap(),
            Verdict::Refuse { .. }
        ));

        probe.set(8 << 10); // below 16 KiB: nothing passes
        assert!(matches!(
            a.check(&[upd(true)], SOLO).unwrap(),
            Verdict::Refuse { .. }
        ));

        probe.set(100 << 20); // space returns: admitted again
        assert_eq!(a.check(&[upd(false)], SOLO).unwrap(), Verdict::Admit);
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
        assert_eq!(a.check(&[upd(false)], SOLO).unwrap(), Verdict::Admit);
        probe.set(29 << 20);
        match a.check(&[upd(false)], SOLO).unwrap() {
            Verdict::Refuse { free, needed } => {
                assert_eq!(free, 29 << 20);
                assert_eq!(needed, (30 << 20) + upd(false).approx_size() as u64);
            }
            v => panic!("{v:?}"),
        }
        // Critical ones still pass, and so does a snapshot (10 MiB + the 16 KiB floor).
        assert_eq!(a.check(&[upd(true)], SOLO).unwrap(), Verdict::Admit);
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

    #[test]
    fn a_quorum_of_voters_must_hold_the_transaction() {
        let cfg = DbConfig {
            free_space_cache: Duration::ZERO,
            ..DbConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let a = Admission::new(
            Arc::new(FixedProbe::new(100 << 20)),
            dir.path().to_path_buf(),
            &cfg,
        );
        let three = Quorum {
            me: 1,
            voters: &[1, 2, 3],
        };
        let five = Quorum {
            me: 1,
            voters: &[1, 2, 3, 4, 5],
        };
        let full = SpaceReport {
            free: 1 << 20,
            upkeep: 0,
        };
        let roomy = SpaceReport {
            free: 100 << 20,
            upkeep: 0,
        };
        // No reports yet (a new leader): the followers get the benefit of the doubt.
        assert_eq!(a.check(&[upd(false)], three).unwrap(), Verdict::Admit);
        // One follower short: the other one and the leader form a quorum.
        a.reports.record(2, full);
        assert_eq!(a.check(&[upd(false)], three).unwrap(), Verdict::Admit);
        // Both short: refused, naming the tighter follower's reading of the best quorum.
        a.reports.record(
            3,
            SpaceReport {
                free: 2 << 20,
                upkeep: 0,
            },
        );
        match a.check(&[upd(false)], three).unwrap() {
            Verdict::Refuse { free, .. } => assert_eq!(free, 2 << 20),
            v => panic!("{v:?}"),
        }
        // A critical transaction needs only the critical floor on the quorum.
        assert_eq!(a.check(&[upd(true)], three).unwrap(), Verdict::Admit);
        // A follower's upkeep counts as its own does.
        a.reports.record(
            3,
            SpaceReport {
                free: 20 << 20,
                upkeep: 18 << 20,
            },
        );
        assert!(matches!(
            a.check(&[upd(false)], three).unwrap(),
            Verdict::Refuse { .. }
        ));
        a.reports.record(3, roomy);
        assert_eq!(a.check(&[upd(false)], three).unwrap(), Verdict::Admit);
        // Five voters: two short and two unknown still leave a possible quorum of three...
        assert_eq!(a.check(&[upd(false)], five).unwrap(), Verdict::Admit);
        // ...three short do not.
        a.reports.record(3, full);
        a.reports.record(4, full);
        assert!(matches!(
            a.check(&[upd(false)], five).unwrap(),
            Verdict::Refuse { .. }
        ));
        // Reports age out: after the TTL the followers are unknown again.
        let quick = Admission::new(
            Arc::new(FixedProbe::new(100 << 20)),
            dir.path().to_path_buf(),
            &DbConfig {
                space_report_ttl: Duration::ZERO,
                free_space_cache: Duration::ZERO,
                ..DbConfig::default()
            },
        );
        quick.reports.record(2, full);
        quick.reports.record(3, full);
        assert_eq!(quick.check(&[upd(false)], three).unwrap(), Verdict::Admit);
        // The leader's own disk always counts.
        let short_leader = Admission::new(Arc::new(FixedProbe::new(1 << 20)), dir.path().to_path_buf(), &cfg);
        short_leader.reports.record(2, roomy);
        short_leader.reports.record(3, roomy);
        match short_leader.check(&[upd(false)], three).unwrap() {
            Verdict::Refuse { free, .. } => assert_eq!(free, 1 << 20),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_shared_filesystem_probe_reserves_the_neighbours_upkeep() {
        let root = tempfile::tempdir().unwrap();
        let mk = |name: &str, sm: usize, log: usize| {
            let d = root.path().join("pool").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(crate::storage::SM_FILE), vec![0u8; sm]).unwrap();
            std::fs::write(d.join(crate::storage::LOG_FILE), vec![0u8; log]).unwrap();
            d
        };
        let a = mk("a", 1 << 20, 1 << 20);
        let b = mk("b", 2 << 20, 0);
        std::fs::create_dir_all(root.path().join("mgmt").join("empty")).unwrap();
        let probe = SharedFsProbe::new(root.path(), Duration::ZERO);
        // a's neighbour b needs 2 x 2 MiB; b's neighbour a needs 2 x 1 + 1 MiB.
        assert_eq!(probe.others_upkeep(&a), 4 << 20);
        assert_eq!(probe.others_upkeep(&b), 3 << 20);
        let free = StatvfsProbe.free_bytes(&a).unwrap();
        assert!(probe.free_bytes(&a).unwrap() <= free.saturating_sub(4 << 20));
    }
}
