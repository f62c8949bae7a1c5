//! Disk fault injection for tests: a redb storage backend that fails writes with ENOSPC on
//! demand, exactly as a full filesystem would, and that can make every fsync stall.

use std::fs::File;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// A switch shared by every redb file of the replicas opened with it.
///
/// While [`DiskFaults::set_full`] is on, every write, resize and sync fails with ENOSPC.
#[derive(Clone, Debug, Default)]
pub struct DiskFaults {
    full: Arc<AtomicBool>,
    failed_writes: Arc<AtomicU64>,
    sync_delay_us: Arc<AtomicU64>,
}

impl DiskFaults {
    /// A switch that starts off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns the simulated full disk on or off.
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    /// Makes every fsync take `delay` longer (zero: no delay), as a slow or busy disk does.
    pub fn set_sync_delay(&self, delay: std::time::Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.sync_delay_us.store(us, Ordering::SeqCst);
    }

    /// How many writes failed because of the switch.
    pub fn failed_writes(&self) -> u64 {
        self.failed_writes.load(Ordering::SeqCst)
    }

    pub(crate) fn backend(&self, file: File) -> Result<FaultyBackend, redb::DatabaseError> {
        Ok(FaultyBackend {
            inner: FileBackend::new(file)?,
            faults: self.clone(),
        })
    }

    fn check(&self) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            self.failed_writes.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(
                rustix::io::Errno::NOSPC.raw_os_error(),
            ));
        }
        Ok(())
    }
}

/// A [`FileBackend`] behind a [`DiskFaults`] switch.
#[derive(Debug)]
pub(crate) struct FaultyBackend {
    inner: FileBackend,
    faults: DiskFaults,
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > self.inner.len()? {
            self.faults.check()?;
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.faults.check()?;
        let us = self.faults.sync_delay_us.load(Ordering::SeqCst);
        if us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.faults.check()?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }
}
