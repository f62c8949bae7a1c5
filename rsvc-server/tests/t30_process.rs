//! Real engine processes on loopback: kill -9, SIGSTOP/SIGCONT, restart, and SIGTERM handover,
//! with a client riding over each fault.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rsvc_client::mgmt::{MgmtLocator, MgmtRequest, MgmtResponse};
use rsvc_client::{ClientConfig, Connections, RsvcClient};
use rsvc_server::counter::{CounterApi, CounterRequest, CounterResponse};
use rsvc_tests::rsvc::{EngineCmd, RsvcSystem, Spec, Timers};
use tempfile::TempDir;

use rsvc_tests::kit::{DEADLINE, POLL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rides_over_kill_pause_restart_and_graceful_stop() {
    let tmp = TempDir::new().unwrap();
    // Three access points and two plain engines.
    let spec = Spec {
        access_points: 3,
        cluster: "proc-test".into(),
        ..Spec::new(5, Timers::fast())
    };
    let cmd = EngineCmd {
        program: env!("CARGO_BIN_EXE_rsvc-engine").into(),
        prefix: vec!["serve".into()],
    };
    let mut sys = RsvcSystem::start_spec(tmp.path(), cmd, spec).await.unwrap();
    let ap_list = sys.access_points();
    let cfg = ClientConfig {
        deadline: DEADLINE,
        ..ClientConfig::default()
    };
    let mgmt = sys.mgmt(cfg.clone());
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
    let t = Instant::now();
    sys.kill(leader).await.unwrap();
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
    sys.restart(leader).await.unwrap();
    for _ in 0..5 {
        expect += 1;
        assert_eq!(add(&c).await, expect);
    }

    // SIGSTOP the current leader: the others elect a new one and the client follows.
    let (l3, _) = c.cached_leader().unwrap();
    sys.pause(l3, true).unwrap();
    let t = Instant::now();
    expect += 1;
    assert_eq!(add(&c).await, expect);
    eprintln!(
        "SIGSTOP of rank {l3}: client-observed gap {:?}, new leader {:?}",
        t.elapsed(),
        c.cached_leader()
    );
    sys.pause(l3, false).unwrap();
    for _ in 0..5 {
        expect += 1;
        assert_eq!(
            add(&c).await,
            expect,
            "the resumed ex-leader must not serve stale state"
        );
    }

    // SIGTERM the leader: it hands over and exits cleanly (0), while a client call rides over.
    let (l4, _) = c.cached_leader().unwrap();
    let t = Instant::now();
    expect += 1;
    let (stopped, value) = tokio::join!(sys.stop(l4), add(&c));
    stopped.expect("graceful stop exits 0");
    assert_eq!(value, expect);
    eprintln!(
        "SIGTERM of rank {l4}: client-observed gap {:?}, new leader {:?}",
        t.elapsed(),
        c.cached_leader()
    );
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

/// One client shared by 64 tasks, each adding 1 twenty times, while the instance's leader is
/// killed -9 in the middle: every add is acknowledged, and applied exactly once. Before client
/// sessions, exactly-once kept one result per client, and concurrent calls of one client came
/// back `Stale` or could apply twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_shared_by_64_tasks_applies_every_add_once_across_a_kill() {
    let tmp = TempDir::new().unwrap();
    let spec = Spec {
        cluster: "sessions".into(),
        ..Spec::new(3, Timers::fast())
    };
    let cmd = EngineCmd {
        program: env!("CARGO_BIN_EXE_rsvc-engine").into(),
        prefix: vec!["serve".into()],
    };
    let mut sys = RsvcSystem::start_spec(tmp.path(), cmd, spec).await.unwrap();
    let cfg = ClientConfig {
        deadline: DEADLINE,
        ..ClientConfig::default()
    };
    sys.mgmt(cfg.clone())
        .call(&MgmtRequest::CreateInstance {
            class: "counter".into(),
            label: "shared".into(),
            replicas: 3,
        })
        .await
        .unwrap();
    let c: Arc<RsvcClient<CounterApi>> = Arc::new(RsvcClient::new(
        "shared",
        Arc::new(MgmtLocator::new(sys.access_points(), Connections::default())),
        Connections::default(),
        cfg,
    ));
    let get = |c: Arc<RsvcClient<CounterApi>>, name: String| async move {
        match c.call(&CounterRequest::Get { name }).await.unwrap() {
            CounterResponse::Value(v) => v,
            other => panic!("{other:?}"),
        }
    };
    // One add first: the counter exists, and the client knows the leader.
    c.call(&CounterRequest::Add {
        name: "n".into(),
        delta: 1,
    })
    .await
    .unwrap();
    let (leader, _) = c.cached_leader().unwrap();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    // Each task its own counter: the contention under test is the client's, not a hot key's.
    for task in 0..64 {
        let (c, done) = (c.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let r = c
                    .call(&CounterRequest::Add {
                        name: format!("n{task}"),
                        delta: 1,
                    })
                    .await;
                assert!(r.is_ok(), "an add failed: {r:?}");
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }));
    }
    // Kill the leader once a third of the adds are in.
    rsvc_tests::wait_for(
        "a third of the adds",
        DEADLINE,
        Duration::from_millis(5),
        || async { (done.load(std::sync::atomic::Ordering::SeqCst) >= 64 * 20 / 3).then_some(()) },
    )
    .await
    .unwrap();
    sys.kill(leader).await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    for task in 0..64 {
        assert_eq!(
            get(c.clone(), format!("n{task}")).await,
            20,
            "task {task}: every acknowledged add applied exactly once"
        );
    }
    assert!(c.cached_leader().unwrap().0 != leader);
}
