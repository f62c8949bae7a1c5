//! The management service: engines join through access points, instances are created on N
//! engines, clients find them through the directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rsvc_client::mgmt::{
    mgmt_client, MgmtError, MgmtLocator, MgmtRequest, MgmtResponse, MGMT_CLASS, MGMT_INSTANCE,
};
use rsvc_client::{ClientConfig, ClientError, Connections, RsvcClient};
use rsvc_server::counter::{Counter, CounterApi, CounterRequest, CounterResponse};
use rsvc_server::{Engine, EngineConfig, FnFactory, ServiceFactory};
use tempfile::TempDir;

const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

fn factories() -> Vec<Arc<dyn ServiceFactory>> {
    vec![Arc::new(FnFactory::new(|_: &str| Counter))]
}

async fn engine_at(tmp: &TempDir, rank: u32, aps: Vec<(u32, String)>, listen: &str) -> Engine {
    engine_with(tmp, rank, aps, listen, None).await
}

async fn engine_with(
    tmp: &TempDir,
    rank: u32,
    aps: Vec<(u32, String)>,
    listen: &str,
    reconf_after: Option<Duration>,
) -> Engine {
    let cfg = EngineConfig {
        listen: listen.parse().unwrap(),
        access_points: aps,
        reconf_after,
        ..EngineConfig::for_tests(rank, tmp.path().join(format!("engine{rank}")))
    };
    Engine::start(cfg, factories()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_locate_fail_over_and_destroy() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("rsvc_server=info,rdb=warn,openraft=error")
        .with_test_writer()
        .try_init();
    let tmp = TempDir::new().unwrap();
    let (mut engines, aps) = system(&tmp, 5).await;
    let cfg = ClientConfig {
        deadline: DEADLINE,
        ..ClientConfig::default()
    };
    let mgmt = mgmt_client(aps.clone(), Connections::default(), cfg.clone());
    // Every access point got a management replica.
    let start = Instant::now();
    while engines[0]
        .as_ref()
        .unwrap()
        .host(MGMT_CLASS, MGMT_INSTANCE)
        .map(|h| h.db.status().voters.len())
        != Some(3)
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the access points did not all join the management service"
        );
        tokio::time::sleep(POLL).await;
    }

    // Create an instance on 3 of 5 engines and use it through the directory.
    let created = mgmt
        .call(&MgmtRequest::CreateInstance {
            class: "counter".into(),
            label: "alpha".into(),
            replicas: 3,
        })
        .await
        .unwrap();
    let MgmtResponse::Instance(info) = created else {
        panic!("{created:?}")
    };
    assert_eq!(info.replicas.len(), 3);
    let dup = mgmt
        .call(&MgmtRequest::CreateInstance {
            class: "counter".into(),
            label: "alpha".into(),
            replicas: 3,
        })
        .await;
    assert!(
        matches!(dup, Err(ClientError::Service(MgmtError::Exists(_)))),
        "{dup:?}"
    );
    let too_many = mgmt
        .call(&MgmtRequest::CreateInstance {
            class: "counter".into(),
            label: "big".into(),
            replicas: 7,
        })
        .await;
    assert!(
        matches!(
            too_many,
            Err(ClientError::Service(MgmtError::NotEnoughRanks {
                want: 7,
                have: 5
            }))
        ),
        "{too_many:?}"
    );
    let unknown = mgmt
        .call(&MgmtRequest::CreateInstance {
            class: "nope".into(),
            label: "x".into(),
            replicas: 1,
        })
        .await;
    assert!(
        matches!(unknown, Err(ClientError::Service(MgmtError::StartFailed(_)))),
        "{unknown:?}"
    );

    let locator = Arc::new(MgmtLocator::new(aps.clone(), Connections::default()));
    let c: RsvcClient<CounterApi> = RsvcClient::new("alpha", locator, Connections::default(), cfg.clone());
    for i in 1..=5 {
        assert_eq!(
            c.call(&CounterRequest::Add {
                name: "n".into(),
                delta: 1
            })
            .await
            .unwrap(),
            CounterResponse::Value(i)
        );
    }

    // Lose the instance's leader engine (unless it is the only mgmt... any engine may go).
    let (leader, _) = c.cached_leader().unwrap();
    engines[(leader - 1) as usize].take().unwrap().shutdown().await;
    assert_eq!(
        c.call(&CounterRequest::Add {
            name: "n".into(),
            delta: 1
        })
        .await
        .unwrap(),
        CounterResponse::Value(6)
    );

    // Destroy: the directory forgets it and its replicas are gone.
    let alive: Vec<(u32, String)> = aps.iter().filter(|(r, _)| *r != leader).cloned().collect();
    let mgmt = mgmt_client(alive, Connections::default(), cfg);
    mgmt.call(&MgmtRequest::DestroyInstance {
        class: "counter".into(),
        label: "alpha".into(),
    })
    .await
    .unwrap();
    let gone = mgmt
        .call(&MgmtRequest::Locate {
            class: "counter".into(),
            label: "alpha".into(),
        })
        .await;
    assert!(
        matches!(gone, Err(ClientError::Service(MgmtError::NotFound(_)))),
        "{gone:?}"
    );
    for e in engines.iter().flatten() {
        assert!(
            e.host("counter", "alpha").is_none(),
            "rank {} still hosts a destroyed replica",
            e.rank()
        );
    }
    for e in engines.into_iter().flatten() {
        e.shutdown().await;
    }
}

/// Starts `n` engines, the first three of them access points (each started knowing the ones
/// before it), and waits until all have joined.
async fn system(tmp: &TempDir, n: u32) -> (Vec<Option<Engine>>, Vec<(u32, String)>) {
    system_with(tmp, n, None).await
}

async fn system_with(
    tmp: &TempDir,
    n: u32,
    reconf_after: Option<Duration>,
) -> (Vec<Option<Engine>>, Vec<(u32, String)>) {
    let mut engines: Vec<Option<Engine>> = Vec::new();
    let mut aps: Vec<(u32, String)> = Vec::new();
    for rank in 1..=n {
        if rank <= 3 {
            let mut mine = aps.clone();
            mine.push((rank, String::new()));
            let e = engine_with(tmp, rank, mine, "127.0.0.1:0", reconf_after).await;
            aps.push((rank, e.addr().to_string()));
            engines.push(Some(e));
        } else {
            engines.push(Some(
                engine_with(tmp, rank, aps.clone(), "127.0.0.1:0", reconf_after).await,
            ));
        }
    }
    let mgmt = mgmt_client(
        aps.clone(),
        Connections::default(),
        ClientConfig {
            deadline: DEADLINE,
            ..Default::default()
        },
    );
    let start = Instant::now();
    loop {
        if let Ok(MgmtResponse::Map(m)) = mgmt.call(&MgmtRequest::SystemMap).await {
            if m.len() == n as usize {
                break;
            }
        }
        assert!(start.elapsed() < DEADLINE, "the system did not form");
        tokio::time::sleep(POLL).await;
    }
    (engines, aps)
}

/// Creates counter instance `label` with 3 replicas; returns a management client, the
/// instance, and a client of it that finds it through the directory.
async fn counter_instance(
    aps: &[(u32, String)],
    label: &str,
) -> (
    RsvcClient<rsvc_client::mgmt::MgmtApi>,
    rsvc_client::mgmt::InstanceInfo,
    RsvcClient<CounterApi>,
) {
    let cfg = ClientConfig {
        deadline: DEADLINE,
        ..ClientConfig::default()
    };
    let mgmt = mgmt_client(aps.to_vec(), Connections::default(), cfg.clone());
    let req = MgmtRequest::CreateInstance {
        class: "counter".into(),
        label: label.into(),
        replicas: 3,
    };
    let info = instance(mgmt.call(&req).await.unwrap());
    let locator = Arc::new(MgmtLocator::new(aps.to_vec(), Connections::default()));
    let c = RsvcClient::new(label, locator, Connections::default(), cfg);
    (mgmt, info, c)
}

fn instance(r: MgmtResponse) -> rsvc_client::mgmt::InstanceInfo {
    match r {
        MgmtResponse::Instance(i) => i,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_replica_rejoins_under_a_new_generation_and_dead_engines_are_replaced() {
    let tmp = TempDir::new().unwrap();
    let (mut engines, aps) = system(&tmp, 5).await;
    let (mgmt, info, c) = counter_instance(&aps, "beta").await;
    for _ in 0..5 {
        c.call(&CounterRequest::Add {
            name: "n".into(),
            delta: 1,
        })
        .await
        .unwrap();
    }
    let (leader, _) = c.cached_leader().unwrap();
    let wiped = info
        .replicas
        .iter()
        .map(|(r, _)| *r)
        .find(|r| *r != leader)
        .unwrap();

    // Wipe that replica's disk while its engine is down, and bring the engine back.
    let e = engines[(wiped - 1) as usize].take().unwrap();
    let addr = e.addr().to_string();
    e.shutdown().await;
    std::fs::remove_dir_all(tmp.path().join(format!("engine{wiped}/counter/beta"))).unwrap();
    engines[(wiped - 1) as usize] = Some(engine_at(&tmp, wiped, aps.clone(), &addr).await);
    assert!(engines[(wiped - 1) as usize]
        .as_ref()
        .unwrap()
        .host("counter", "beta")
        .is_none());

    // It is no replica any more; an engine that hosts no replica answers NotReplica.
    use rsvc_client::wire::pb;
    let mut raw = Connections::default().get(&addr).unwrap();
    let reply = raw
        .call(pb::CallRequest {
            class: "counter".into(),
            instance: "beta".into(),
            probe: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match reply.result {
        Some(pb::call_reply::Result::Error(e)) => assert_eq!(e.kind, pb::ErrorKind::NotReplica as i32),
        other => panic!("{other:?}"),
    }

    // Replace it: remove the old identity, add the rank again under a new generation.
    let rm = MgmtRequest::RemoveReplica {
        class: "counter".into(),
        label: "beta".into(),
        rank: wiped,
    };
    mgmt.call(&rm).await.unwrap();
    let add = MgmtRequest::AddReplica {
        class: "counter".into(),
        label: "beta".into(),
        rank: wiped,
    };
    let info = instance(mgmt.call(&add).await.unwrap());
    assert_eq!(
        info.gens.iter().find(|(r, _)| *r == wiped),
        Some(&(wiped, 2)),
        "a new generation"
    );
    let host = engines[(wiped - 1) as usize]
        .as_ref()
        .unwrap()
        .host("counter", "beta")
        .expect("hosted again");
    assert_eq!(host.db.ident().replica.gen, 2);
    assert_eq!(
        c.call(&CounterRequest::Add {
            name: "n".into(),
            delta: 1
        })
        .await
        .unwrap(),
        CounterResponse::Value(6)
    );
    let start = Instant::now();
    while host.db.status().applied_index
        < engines[(leader - 1) as usize]
            .as_ref()
            .unwrap()
            .host("counter", "beta")
            .unwrap()
            .db
            .status()
            .applied_index
    {
        assert!(start.elapsed() < DEADLINE, "the new generation catches up");
        tokio::time::sleep(POLL).await;
    }

    // An engine dies for good: move its replica to an engine that has none.
    let dead = info
        .replicas
        .iter()
        .map(|(r, _)| *r)
        .find(|r| *r != leader && *r != wiped)
        .unwrap();
    engines[(dead - 1) as usize].take().unwrap().shutdown().await;
    let spare = (1..=5u32)
        .find(|r| !info.replicas.iter().any(|(x, _)| x == r))
        .unwrap();
    mgmt.call(&MgmtRequest::RemoveReplica {
        class: "counter".into(),
        label: "beta".into(),
        rank: dead,
    })
    .await
    .unwrap();
    let info = instance(
        mgmt.call(&MgmtRequest::AddReplica {
            class: "counter".into(),
            label: "beta".into(),
            rank: spare,
        })
        .await
        .unwrap(),
    );
    assert_eq!(info.replicas.len(), 3);
    assert!(info.replicas.iter().any(|(r, _)| *r == spare));
    assert_eq!(
        c.call(&CounterRequest::Add {
            name: "n".into(),
            delta: 1
        })
        .await
        .unwrap(),
        CounterResponse::Value(7)
    );
    let bad = mgmt
        .call(&MgmtRequest::AddReplica {
            class: "counter".into(),
            label: "beta".into(),
            rank: spare,
        })
        .await;
    assert!(
        matches!(bad, Err(ClientError::Service(MgmtError::Invalid(_)))),
        "{bad:?}"
    );
    for e in engines.into_iter().flatten() {
        e.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_move_off_a_dead_engine_by_themselves() {
    let tmp = TempDir::new().unwrap();
    let (mut engines, aps) = system_with(&tmp, 5, Some(Duration::from_secs(2))).await;
    let (mgmt, info, c) = counter_instance(&aps, "gamma").await;
    c.call(&CounterRequest::Add {
        name: "n".into(),
        delta: 1,
    })
    .await
    .unwrap();
    // Kill an engine that hosts a replica but neither leads it nor is an access point, if
    // possible; otherwise any non-leader replica.
    let (leader, _) = c.cached_leader().unwrap();
    let candidates: Vec<u32> = info
        .replicas
        .iter()
        .map(|(r, _)| *r)
        .filter(|r| *r != leader)
        .collect();
    let dead = candidates
        .iter()
        .copied()
        .find(|r| *r > 3)
        .unwrap_or(candidates[0]);
    engines[(dead - 1) as usize].take().unwrap().shutdown().await;

    let start = Instant::now();
    let moved = loop {
        let i = instance(
            mgmt.call(&MgmtRequest::Locate {
                class: "counter".into(),
                label: "gamma".into(),
            })
            .await
            .unwrap(),
        );
        if i.replicas.len() == 3 && !i.replicas.iter().any(|(r, _)| *r == dead) {
            break i;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the replica was not moved off dead rank {dead}"
        );
        tokio::time::sleep(POLL).await;
    };
    eprintln!(
        "replica moved off dead rank {dead} after {:?}: now on {:?}",
        start.elapsed(),
        moved.replicas
    );
    loop {
        let MgmtResponse::Map(map) = mgmt.call(&MgmtRequest::SystemMap).await.unwrap() else {
            panic!()
        };
        let st = map.iter().find(|r| r.rank == dead).unwrap().state;
        if st == rsvc_client::mgmt::RankState::Down {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the dead engine is never reported down"
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(
        c.call(&CounterRequest::Add {
            name: "n".into(),
            delta: 1
        })
        .await
        .unwrap(),
        CounterResponse::Value(2)
    );
    for e in engines.into_iter().flatten() {
        e.shutdown().await;
    }
}
