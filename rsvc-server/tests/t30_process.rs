//! Real engine processes on loopback: kill -9, SIGSTOP/SIGCONT, restart, and SIGTERM handover,
//! with a client riding over each fault.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rsvc_client::mgmt::{mgmt_client, MgmtLocator, MgmtRequest, MgmtResponse};
use rsvc_client::{ClientConfig, Connections, RsvcClient};
use rsvc_server::counter::{CounterApi, CounterRequest, CounterResponse};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// An engine process; killed when dropped, even if the test fails.
struct Proc {
    rank: u32,
    addr: String,
    child: Child,
}

impl Proc {
    async fn start(tmp: &TempDir, rank: u32, listen: &str, aps: &[String]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rsvc-engine"));
        cmd.arg("serve")
            .arg("--rank")
            .arg(rank.to_string())
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(tmp.path().join(format!("engine{rank}")))
            .arg("--cluster")
            .arg("proc-test")
            .arg("--fast-timers")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for a in aps {
            cmd.arg("--access-point").arg(a);
        }
        let mut child = cmd.spawn().expect("spawn rsvc-engine");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("engine ready in time")
            .unwrap()
            .unwrap();
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .expect("ready line has addr")
            .to_string();
        Proc { rank, addr, child }
    }

    fn pid(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_raw(self.child.id().unwrap() as i32).unwrap()
    }

    fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(self.pid(), sig).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rides_over_kill_pause_restart_and_graceful_stop() {
    let tmp = TempDir::new().unwrap();
    // Three access points, each knowing the ones before it, and two plain engines.
    let mut procs: Vec<Option<Proc>> = Vec::new();
    let mut aps: Vec<String> = Vec::new();
    for rank in 1..=3u32 {
        let mut mine = aps.clone();
        mine.push(format!("{rank}@"));
        let p = Proc::start(&tmp, rank, "127.0.0.1:0", &mine).await;
        aps.push(format!("{rank}@{}", p.addr));
        procs.push(Some(p));
    }
    for rank in 4..=5u32 {
        procs.push(Some(Proc::start(&tmp, rank, "127.0.0.1:0", &aps).await));
    }
    let ap_list: Vec<(u32, String)> = procs
        .iter()
        .flatten()
        .take(3)
        .map(|p| (p.rank, p.addr.clone()))
        .collect();
    let cfg = ClientConfig {
        deadline: DEADLINE,
        ..ClientConfig::default()
    };
    let mgmt = mgmt_client(ap_list.clone(), Connections::default(), cfg.clone());
    let start = Instant::now();
    loop {
        if let Ok(MgmtResponse::Map(m)) = mgmt.call(&MgmtRequest::SystemMap).await {
            if m.len() == 5 {
                break;
            }
        }
        assert!(start.elapsed() < DEADLINE, "the system did not form");
        tokio::time::sleep(POLL).await;
    }
    let created = mgmt
        .call(&MgmtRequest::CreateInstance {
            class: "counter".into(),
            label: "hits".into(),
            replicas: 3,
        })
        .await
        .unwrap();
    let MgmtResponse::Instance(info) = created else {
        panic!("{created:?}")
    };
    let c: RsvcClient<CounterApi> = RsvcClient::new(
        "hits",
        Arc::new(MgmtLocator::new(ap_list, Connections::default())),
        Connections::default(),
        cfg,
    );
    let mut expect = 0;
    for _ in 0..10 {
        expect += 1;
        assert_eq!(add(&c).await, expect);
    }

    // kill -9 the instance's leader engine.
    let (leader, _) = c.cached_leader().unwrap();
    let killed = procs[(leader - 1) as usize].take().unwrap();
    let killed_addr = killed.addr.clone();
    let t = Instant::now();
    drop(killed); // SIGKILL
    expect += 1;
    assert_eq!(
        add(&c).await,
        expect,
        "no acknowledged add lost, none applied twice"
    );
    let (l2, term2) = c.cached_leader().unwrap();
    eprintln!(
        "kill -9 of rank {leader}: client-observed gap {:?}, new leader rank {l2} term {term2}",
        t.elapsed()
    );

    // Restart it on the same address and data; it catches up as a follower.
    procs[(leader - 1) as usize] = Some(Proc::start(&tmp, leader, &killed_addr, &aps).await);
    for _ in 0..5 {
        expect += 1;
        assert_eq!(add(&c).await, expect);
    }

    // SIGSTOP the current leader: the others elect a new one and the client follows.
    let (l3, _) = c.cached_leader().unwrap();
    let paused = procs[(l3 - 1) as usize].as_ref().unwrap();
    paused.signal(rustix::process::Signal::STOP);
    let t = Instant::now();
    expect += 1;
    assert_eq!(add(&c).await, expect);
    eprintln!(
        "SIGSTOP of rank {l3}: client-observed gap {:?}, new leader {:?}",
        t.elapsed(),
        c.cached_leader()
    );
    paused.signal(rustix::process::Signal::CONT);
    for _ in 0..5 {
        expect += 1;
        assert_eq!(
            add(&c).await,
            expect,
            "the resumed ex-leader must not serve stale state"
        );
    }

    // SIGTERM the leader: it hands over and exits cleanly.
    let (l4, _) = c.cached_leader().unwrap();
    let mut p = procs[(l4 - 1) as usize].take().unwrap();
    let t = Instant::now();
    p.signal(rustix::process::Signal::TERM);
    expect += 1;
    assert_eq!(add(&c).await, expect);
    eprintln!(
        "SIGTERM of rank {l4}: client-observed gap {:?}, new leader {:?}",
        t.elapsed(),
        c.cached_leader()
    );
    let status = tokio::time::timeout(DEADLINE, p.child.wait())
        .await
        .expect("engine exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "graceful stop exits 0: {status:?}");
    assert_eq!(info.replicas.len(), 3);
}

async fn add(c: &RsvcClient<CounterApi>) -> i64 {
    match c
        .call(&CounterRequest::Add {
            name: "n".into(),
            delta: 1,
        })
        .await
        .unwrap()
    {
        CounterResponse::Value(v) => v,
        other => panic!("{other:?}"),
    }
}
