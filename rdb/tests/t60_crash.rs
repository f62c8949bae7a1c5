//! kill -9 at a random moment loses nothing that was acknowledged.
//!
//! The test re-runs its own binary as a child process that hosts a 3-replica group (all three
//! replicas in the child, as if the whole cluster lost power at once) and commits from eight
//! writers, printing each acknowledged key. The parent SIGKILLs the child mid-stream, reopens
//! the replicas from disk in-process and checks that every acknowledged key is there. Three
//! rounds, each on the files the previous one left behind.

mod common;

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rdb::{Db, DbConfig, DbId, LocalNet, Member, Path, ReplicaId, StartOptions};
use tokio::io::{AsyncBufReadExt, BufReader};

const CHILD_ENV: &str = "RDB_CRASH_CHILD_DIR";

async fn start_group(dir: &FsPath, fresh: bool) -> (Vec<Db>, LocalNet) {
    let net = LocalNet::new();
    let id = DbId(42);
    let mut dbs = Vec::new();
    for rank in 1..=3u32 {
        let d = dir.join(format!("r{rank}"));
        if fresh {
            Db::create(&d, id, ReplicaId::new(rank, 1), None).unwrap();
        }
        let addr = format!("local:{rank}");
        let mut opts = StartOptions::new(Arc::new(net.clone()), addr.clone());
        opts.config = DbConfig::fast();
        let db = Db::start(&d, opts).await.unwrap();
        net.register(&addr, Arc::new(db.clone()));
        dbs.push(db);
    }
    if fresh {
        let members: Vec<Member> = dbs.iter().map(Db::member).collect();
        dbs[0].initialize(members).await.unwrap();
    }
    (dbs, net)
}

async fn leader(dbs: &[Db]) -> Db {
    common::wait_for(common::DEADLINE, "a leader", || async {
        dbs.iter().find(|d| d.up_term().is_some()).cloned()
    })
    .await
}

/// The child: commit forever, print every acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let round: u64 = std::env::var("RDB_CRASH_ROUND").unwrap().parse().unwrap();
    let (dbs, _net) = start_group(FsPath::new(&dir), round == 0).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for w in 0..8u64 {
        let dbs = dbs.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let key = format!("r{round}-w{w}-{i}");
                loop {
                    let db = leader(&dbs).await;
                    let mut t = db.begin(None).unwrap();
                    t.update(&Path::root(), key.clone(), vec![7u8; 128]);
                    if t.commit().await.is_ok() {
                        break;
                    }
                }
                tx.send(key).unwrap();
            }
        });
    }
    use std::io::Write;
    let mut out = std::io::stdout();
    while let Some(k) = rx.recv().await {
        writeln!(out, "ACK {k}").unwrap();
        out.flush().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_commit() {
    common::init_tracing();
    let tmp = tempfile::TempDir::new().unwrap();
    let dir: PathBuf = tmp.path().to_path_buf();
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<String> = Vec::new();
    for round in 0..3u64 {
        let mut child = tokio::process::Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, &dir)
            .env("RDB_CRASH_ROUND", round.to_string())
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let want = 200 + (rand::random::<u64>() % 300) as usize;
        let mut got = 0;
        let read = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(k) = line.strip_prefix("ACK ") {
                    acked.push(k.to_string());
                    got += 1;
                    if got >= want {
                        return;
                    }
                }
            }
            panic!("child exited early");
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .expect("child made progress");
        // Kill at a random point in the stream, mid-commit for some writers.
        let jitter = Duration::from_micros(rand::random::<u64>() % 20_000);
        tokio::time::sleep(jitter).await;
        child.start_kill().unwrap();
        // Acknowledgements already in the pipe count too.
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(k) = line.strip_prefix("ACK ") {
                acked.push(k.to_string());
            }
        }
        child.wait().await.unwrap();

        // Reopen from disk and check every acknowledged key (through whichever replica leads
        // once the restarted group has settled).
        let (dbs, _net) = start_group(&dir, false).await;
        let present: std::collections::HashSet<Vec<u8>> =
            common::wait_for(common::DEADLINE, "a full read", || async {
                let l = leader(&dbs).await;
                let mut tx = l.begin(None).ok()?;
                let all = tx.iterate(&Path::root(), .., usize::MAX).await.ok()?;
                Some(all.into_iter().map(|(k, _)| k).collect())
            })
            .await;
        let lost: Vec<&String> = acked.iter().filter(|k| !present.contains(k.as_bytes())).collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} acknowledged commits lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        for db in dbs {
            db.stop().await.unwrap();
        }
    }
    assert!(acked.len() >= 600);
}

/// The state machine is written without fsync; after a power loss it may be older than the
/// log. Simulate exactly that and check that the replica re-applies from its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_machine_behind_its_log_is_replayed() {
    let mut c = common::Cluster::new(1, DbConfig::fast()).await;
    for i in 0..10 {
        c.put(&format!("early{i}"), "v").await;
    }
    c.stop(0).await;
    let dir = c.nodes[0].dir.clone();
    let old_sm = std::fs::read(dir.join("sm.redb")).unwrap();
    c.start(0).await.unwrap();
    for i in 0..10 {
        c.put(&format!("late{i}"), "v").await;
    }
    c.stop(0).await;
    std::fs::write(dir.join("sm.redb"), old_sm).unwrap();
    c.start(0).await.unwrap();
    for i in 0..10 {
        assert_eq!(c.get(&format!("early{i}")).await.as_deref(), Some("v"));
        assert_eq!(
            c.get(&format!("late{i}")).await.as_deref(),
            Some("v"),
            "late{i} replayed from the log"
        );
    }
    c.shutdown().await;
}
