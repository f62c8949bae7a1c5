//! Background work that runs only while a replica leads: the pool service's evictor, the
//! management service's monitor, and whatever a service author needs (DAOS runs such work as
//! leader-only ULTs, started on step-up and stopped on step-down).
//!
//! The host owns these tasks, not the service. After a `step_up` that answers `Up`, it hands
//! [`ReplicatedService::leader_tasks`](crate::ReplicatedService::leader_tasks) a fresh
//! [`LeaderTasks`] for that term. When leadership ends, it cancels every task and waits until
//! each has stopped, before it calls `drain`. So no task of an old term runs beside the hooks
//! or the tasks of a newer one, and a service needs no handles or flags of its own.
//!
//! A task is stopped at its next `.await` once cancelled, whether or not it watches the token
//! it is given; the token is for tasks that want to finish a step cleanly first.
//!
//! CAVEAT: a task that blocks its thread (no `.await`) cannot be stopped; the host gives up
//! waiting after [`JOIN_TIMEOUT`] and logs it.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
pub use tokio_util::sync::CancellationToken;

/// How long the host waits for a cancelled task to stop.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The background tasks of one term of one led replica. See the module docs.
pub struct LeaderTasks {
    term: u64,
    stop: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl LeaderTasks {
    /// Tasks for `term` of a replica.
    pub(crate) fn new(term: u64) -> Self {
        LeaderTasks {
            term,
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// The term this replica leads.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Runs `task` until it returns or leadership of this term ends. `task` gets a token that
    /// is cancelled when leadership ends.
    pub fn spawn<F, Fut>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        let fut = task(stop.clone());
        let handle = tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = fut => {}
            }
        });
        self.tasks.push((name, handle));
    }

    /// Runs `step` at once and then `period` after each run ends, while this term lasts.
    pub fn every<F, Fut>(&mut self, name: &'static str, period: Duration, mut step: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, move |_| async move {
            loop {
                step().await;
                tokio::time::sleep(period).await;
            }
        });
    }

    /// How many tasks were started.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task was started.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Cancels every task and waits until each has stopped (at most [`JOIN_TIMEOUT`] each).
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        for (name, handle) in std::mem::take(&mut self.tasks) {
            let abort = handle.abort_handle();
            match tokio::time::timeout(JOIN_TIMEOUT, handle).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_panic() => {
                    tracing::error!(task = name, term = self.term, "a leader task panicked")
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    tracing::error!(
                        task = name,
                        term = self.term,
                        "a leader task did not stop; aborted"
                    );
                    abort.abort();
                }
            }
        }
    }
}

impl Drop for LeaderTasks {
    /// A host dropped without a step-down (its engine stops) still stops its tasks.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn stop_cancels_every_task_and_waits_for_it() {
        let mut t = LeaderTasks::new(3);
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        t.every("tick", Duration::from_millis(5), move || {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        // A task that ignores its token is stopped at its next await all the same.
        let done = Arc::new(AtomicU32::new(0));
        let d = done.clone();
        t.spawn("deaf", move |_| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            d.fetch_add(1, Ordering::SeqCst);
        });
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(t.len(), 2);
        t.stop().await;
        let after = runs.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            after,
            "a task ran after stop returned"
        );
        assert_eq!(done.load(Ordering::SeqCst), 0);
    }
}
