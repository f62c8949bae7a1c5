//! Cluster harness for rdb's tests: replicas on real redb files in a temp dir, talking over the
//! in-process `LocalNet`, with conditions awaited under deadlines.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdb::{
    Db, DbConfig, DbId, DiskFaults, Error, FixedProbe, LocalNet, Member, Path, ReplicaId, StartOptions,
};
use tempfile::TempDir;

pub(crate) const DEADLINE: Duration = Duration::from_secs(20);
/// How often conditions are re-checked.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it yields `Some`, or panics with `what` after `timeout`.
pub(crate) async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "rdb=info,openraft=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// One replica slot of a cluster.
pub(crate) struct Node {
    pub replica: ReplicaId,
    pub dir: PathBuf,
    pub addr: String,
    pub db: Option<Db>,
    pub probe: FixedProbe,
    pub faults: DiskFaults,
}

pub(crate) struct Cluster {
    pub tmp: TempDir,
    pub net: LocalNet,
    pub id: DbId,
    pub config: DbConfig,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Creates `n` replicas (ranks 1..=n), starts them, bootstraps the group from the first,
    /// and waits until one of them serves as leader.
    pub(crate) async fn new(n: u32, config: DbConfig) -> Cluster {
        init_tracing();
        let mut c = Cluster {
            tmp: TempDir::new().expect("tempdir"),
            net: LocalNet::new(),
            id: DbId::random(),
            config,
            nodes: Vec::new(),
        };
        for rank in 1..=n {
            c.add_node(ReplicaId::new(rank, 1)).await;
        }
        let members: Vec<Member> = c.nodes.iter().map(|n| n.db.as_ref().unwrap().member()).collect();
        c.db(0).initialize(members).await.expect("initialize");
        c.leader().await;
        c
    }

    /// Creates and starts a new, empty replica (not yet a member).
    pub(crate) async fn add_node(&mut self, replica: ReplicaId) -> usize {
        let dir = self
            .tmp
            .path()
            .join(format!("r{}-g{}", replica.rank, replica.gen));
        let faults = DiskFaults::new();
        Db::create(&dir, self.id, replica, Some(&faults)).expect("create replica");
        let node = Node {
            replica,
            dir,
            addr: format!("local:{}", replica.rank),
            db: None,
            probe: FixedProbe::new(u64::MAX / 2),
            faults,
        };
        self.nodes.push(node);
        let i = self.nodes.len() - 1;
        self.start(i).await.expect("start replica");
        i
    }

    pub(crate) fn options(&self, i: usize) -> StartOptions {
        let n = &self.nodes[i];
        StartOptions {
            config: self.config.clone(),
            transport: Arc::new(self.net.clone()),
            addr: n.addr.clone(),
            probe: Arc::new(n.probe.clone()),
            faults: Some(n.faults.clone()),
        }
    }

    pub(crate) async fn start(&mut self, i: usize) -> Result<(), Error> {
        let db = Db::start(&self.nodes[i].dir, self.options(i)).await?;
        self.net.register(&self.nodes[i].addr, Arc::new(db.clone()));
        self.nodes[i].db = Some(db);
        Ok(())
    }

    /// Stops replica `i` and makes it unreachable.
    pub(crate) async fn stop(&mut self, i: usize) {
        self.net.unregister(&self.nodes[i].addr);
        if let Some(db) = self.nodes[i].db.take() {
            db.stop().await.expect("stop");
        }
    }

    /// Stops replica `i` after an injected storage error, as the engine's reopen loop does: the
    /// final sync of the state machine may fail then (redb wants a reopen after a failed
    /// commit), which loses nothing, since the log holds every applied entry. Any other error
    /// still fails the test.
    pub(crate) async fn stop_after_storage_error(&mut self, i: usize) {
        self.net.unregister(&self.nodes[i].addr);
        if let Some(db) = self.nodes[i].db.take() {
            match db.stop().await {
                Ok(()) | Err(rdb::Error::Storage(_)) => {}
                Err(e) => panic!("stop: {e:?}"),
            }
        }
    }

    pub(crate) fn db(&self, i: usize) -> &Db {
        self.nodes[i].db.as_ref().expect("replica running")
    }

    pub(crate) fn running(&self) -> impl Iterator<Item = (usize, &Db)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.db.as_ref().map(|d| (i, d)))
    }

    /// Waits until exactly one running replica serves as leader; returns its index and term.
    pub(crate) async fn leader(&self) -> (usize, u64) {
        self.leader_among(&(0..self.nodes.len()).collect::<Vec<_>>())
            .await
    }

    /// Like [`Cluster::leader`], considering only the given replicas.
    pub(crate) async fn leader_among(&self, idx: &[usize]) -> (usize, u64) {
        wait_for(DEADLINE, "a leader", || async {
            let ups: Vec<(usize, u64)> = self
                .running()
                .filter(|(i, _)| idx.contains(i))
                .filter_map(|(i, d)| d.up_term().map(|t| (i, t)))
                .collect();
            ups.into_iter().max_by_key(|&(_, t)| t)
        })
        .await
    }

    /// Writes `key = value` in the root KVS through whichever replica leads, retrying
    /// NotLeader until the deadline.
    pub(crate) async fn put(&self, key: &str, value: &str) {
        wait_for(DEADLINE, &format!("put {key}"), || async {
            for (_, db) in self.running() {
                if let Ok(mut tx) = db.begin(None) {
                    tx.update(&Path::root(), key, value);
                    match tx.commit().await {
                        Ok(_) => return Some(()),
                        Err(e) if e.is_retryable() || matches!(e, Error::Stopped(_)) => {}
                        Err(e) => panic!("put {key}: {e}"),
                    }
                }
            }
            None
        })
        .await
    }

    /// Reads `key` from the root KVS through whichever replica leads.
    pub(crate) async fn get(&self, key: &str) -> Option<String> {
        wait_for(DEADLINE, &format!("get {key}"), || async {
            for (_, db) in self.running() {
                if let Ok(mut tx) = db.begin(None) {
                    match tx.lookup(&Path::root(), key.as_bytes()).await {
                        Ok(v) => return Some(v.map(|b| String::from_utf8(b).unwrap())),
                        Err(e) if e.is_retryable() => {}
                        Err(e) => panic!("get {key}: {e}"),
                    }
                }
            }
            None
        })
        .await
    }

    /// Waits until every running replica has applied at least `index`.
    pub(crate) async fn wait_applied(&self, index: u64) {
        wait_for(
            DEADLINE,
            &format!("all running replicas apply {index}"),
            || async {
                self.running()
                    .all(|(_, d)| d.status().applied_index >= Some(index))
                    .then_some(())
            },
        )
        .await
    }

    pub(crate) async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
    }
}
