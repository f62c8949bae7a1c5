//! Compaction: snapshots where they fit, and purging the log behind them.

use super::*;

impl Db {
    /// Builds a snapshot now and purges the log behind it, waiting at most `timeout` for the
    /// snapshot. Returns whether it was built and the log purged.
    /// Declines (returns false, and says why in the log) where the snapshot would not fit
    /// with the critical floor to spare: compaction must never be what fills the disk.
    pub async fn compact(&self, timeout: Duration) -> bool {
        if !self.snapshot_fits() {
            return false;
        }
        let raft = &self.inner.raft;
        let before = raft.metrics().borrow_watched().snapshot;
        if raft.trigger().snapshot().await.is_err() {
            return false;
        }
        let mut m = raft.metrics();
        let work = async {
            let snap = loop {
                let snap = m.borrow_and_update().snapshot;
                if snap.is_some() && snap != before {
                    break snap?;
                }
                m.changed().await.ok()?;
            };
            raft.trigger().purge_log(snap.index).await.ok()?;
            while m.borrow_and_update().purged.is_none_or(|p| p.index < snap.index) {
                m.changed().await.ok()?;
            }
            Some(snap.index)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Some(upto)) => {
                tracing::info!(upto, "compacted: snapshot built and log purged");
                true
            }
            _ => false,
        }
    }

    /// Whether a snapshot fits now (see [`admission`](crate::admission)).
    fn snapshot_fits(&self) -> bool {
        match self.inner.admission.snapshot_fits() {
            Ok(fits) => fits,
            Err(e) => {
                tracing::warn!(replica = %self.inner.ident.replica, cause = %e, "no snapshot");
                false
            }
        }
    }
}

/// How often a replica looks whether a snapshot is due.
const COMPACTOR_PERIOD: Duration = Duration::from_secs(1);

/// How long a background compaction after a refusal may wait for its snapshot.
pub(super) const COMPACT_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds a snapshot once `every` entries were applied since the last one, where it fits.
/// openraft's own snapshot policy is off: it would build one whether or not the disk can hold
/// it, and an ENOSPC while building stops the raft core for good.
pub(super) async fn run_compactor(inner: Weak<Inner>, every: u64, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(COMPACTOR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        let Some(inner) = inner.upgrade() else { break };
        let db = Db { inner };
        let due = {
            let m = db.inner.raft.metrics();
            let m = m.borrow_watched();
            let applied = m.last_applied.map_or(0, |l| l.index);
            let snap = m.snapshot.map_or(0, |l| l.index);
            applied.saturating_sub(snap) >= every
        };
        if due && db.snapshot_fits() {
            let _ = db.inner.raft.trigger().snapshot().await;
        }
    }
}
