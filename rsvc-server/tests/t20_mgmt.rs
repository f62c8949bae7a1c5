//! The management service: engines join through access points, instances are created on N
//! engines, clients find them through the directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rsvc_client::mgmt::{
    mgmt_client, MgmtError, MgmtLocator, MgmtRequest, MgmtResponse, MGMT_CLASS, MGMT_INSTANCE,
};
use rsvc_client::{ClientConfig, ClientError, Connections, RsvcClient};
use rsvc_server::counter::{Counter, CounterApi, CounterRequest, CounterResponse};
use rsvc_server::{FnFactory, ServiceFactory};
use rsvc_tests::kit::{self, EngineSystem, DEADLINE, POLL};

fn factories() -> Vec<Arc<dyn ServiceFactory>> {
    vec![Arc::new(FnFactory::new(|_: &str| Counter))]
}

/// `n` engines hosting the counter, the first three of them access points, every one up in
/// the system map.
async fn system(n: u32, reconf_after: Option<Duration>) -> EngineSystem {
    kit::init_tracing("rsvc_server=info,rdb=warn,openraft=error");
    EngineSystem::builder(n)
        .access_points(3)
        .factories(|_| factories())
        .config(move |c| c.reconf_after = reconf_after)
        .start()
        .await
}

/// What creating `class/label` with `replicas` replicas answers.
async fn create(
    mgmt: &RsvcClient<rsvc_client::mgmt::MgmtApi>,
    class: &str,
    label: &str,
    replicas: u32,
) -> Result<MgmtResponse, ClientError<MgmtError>> {
    mgmt.call(&MgmtRequest::CreateInstance {
        class: class.into(),
        label: label.into(),
        replicas,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_access_point_gets_a_management_replica() {
    let sys = system(5, None).await;
    kit::wait_until("three voters in the management service", || async {
        let voters = sys
            .engine(1)
            .host(MGMT_CLASS, MGMT_INSTANCE)
            .map(|h| h.db.status().voters.len());
        (voters == Some(3)).then_some(())
    })
    .await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_a_duplicate_too_many_replicas_and_an_unknown_class() {
    let sys = system(5, None).await;
    let mgmt = sys.mgmt();
    let info = instance(create(&mgmt, "counter", "alpha", 3).await.unwrap());
    assert_eq!(info.replicas.len(), 3);
    let dup = create(&mgmt, "counter", "alpha", 3).await;
    assert!(
        matches!(dup, Err(ClientError::Service(MgmtError::Exists(_)))),
        "{dup:?}"
    );
    let too_many = create(&mgmt, "counter", "big", 7).await;
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
    let unknown = create(&mgmt, "nope", "x", 1).await;
    assert!(
        matches!(unknown, Err(ClientError::Service(MgmtError::StartFailed(_)))),
        "{unknown:?}"
    );
    sys.shutdown().await;
}

/// A client that knows only the access points finds the instance through the directory, and
/// rides over the loss of the engine that led it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_is_found_through_the_directory_and_survives_its_leaders_engine() {
    let mut sys = system(5, None).await;
    let (_, _, c) = counter_instance(&sys.access_points(), "alpha").await;
    let add = CounterRequest::Add {
        name: "n".into(),
        delta: 1,
    };
    for i in 1..=5 {
        assert_eq!(c.call(&add).await.unwrap(), CounterResponse::Value(i));
    }
    let (leader, _) = c.cached_leader().unwrap();
    sys.stop(leader).await;
    assert_eq!(c.call(&add).await.unwrap(), CounterResponse::Value(6));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_forgets_an_instance_and_removes_its_replicas() {
    let sys = system(5, None).await;
    let (mgmt, _, _) = counter_instance(&sys.access_points(), "alpha").await;
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
    for e in sys.engines() {
        assert!(
            e.host("counter", "alpha").is_none(),
            "rank {} still hosts a destroyed replica",
            e.rank()
        );
    }
    sys.shutdown().await;
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
    let mut sys = system(5, None).await;
    let aps = sys.access_points();
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
    let e = sys.take(wiped);
    let addr = e.addr().to_string();
    e.shutdown().await;
    std::fs::remove_dir_all(sys.data_dir(wiped).join("counter/beta")).unwrap();
    sys.restart(wiped, &addr).await;
    assert!(sys.engine(wiped).host("counter", "beta").is_none());

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
    let host = sys.engine(wiped).host("counter", "beta").expect("hosted again");
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
        < sys
            .engine(leader)
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
    sys.stop(dead).await;
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
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_move_off_a_dead_engine_by_themselves() {
    let mut sys = system(5, Some(Duration::from_secs(2))).await;
    let aps = sys.access_points();
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
    sys.stop(dead).await;

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
    sys.shutdown().await;
}
