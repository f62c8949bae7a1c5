//! The management service: engines join through access points, instances are created on N
//! engines, clients find them through the directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdb::DbConfig;
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

async fn engine(tmp: &TempDir, rank: u32, aps: Vec<(u32, String)>) -> Engine {
    let cfg = EngineConfig {
        rank,
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        data_dir: tmp.path().join(format!("engine{rank}")),
        cluster: "mgmt-test".into(),
        db: DbConfig::fast(),
        access_points: aps,
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
    // Three access points, each started knowing the ones before it, then two plain engines.
    let mut engines: Vec<Option<Engine>> = Vec::new();
    let mut aps: Vec<(u32, String)> = Vec::new();
    for rank in 1..=3 {
        let mut mine = aps.clone();
        mine.push((rank, String::new()));
        let e = engine(&tmp, rank, mine).await;
        aps.push((rank, e.addr().to_string()));
        engines.push(Some(e));
    }
    for rank in 4..=5 {
        engines.push(Some(engine(&tmp, rank, aps.clone()).await));
    }
    let cfg = ClientConfig {
        deadline: DEADLINE,
        ..ClientConfig::default()
    };
    let mgmt = mgmt_client(aps.clone(), Connections::default(), cfg.clone());

    // Everyone joins; every access point gets a management replica.
    let start = Instant::now();
    loop {
        if let Ok(MgmtResponse::Map(m)) = mgmt.call(&MgmtRequest::SystemMap).await {
            let voters = engines[0]
                .as_ref()
                .unwrap()
                .host(MGMT_CLASS, MGMT_INSTANCE)
                .map(|h| h.db.status().voters.len());
            if m.len() == 5 && voters == Some(3) {
                break;
            }
        }
        assert!(start.elapsed() < DEADLINE, "the system did not form");
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
