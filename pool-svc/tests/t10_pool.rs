//! Pool and container semantics on three in-process engines talking gRPC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cont_svc::ContError;
use pool_svc::client::is_cont_error;
use pool_svc::{ContClient, PoolClient, PoolError, PoolRequest, PoolResponse};
use rsvc_client::mgmt::{MgmtLocator, MgmtRequest};
use rsvc_client::{ClientConfig, ClientError, Connections, RsvcClient};
use rsvc_tests::kit::{self, EngineSystem, DEADLINE, POLL};

struct Sys(EngineSystem);

async fn system() -> Sys {
    kit::init_tracing("pool_svc=info,rsvc_server=warn,rdb=warn,openraft=error");
    Sys(EngineSystem::builder(3)
        .access_points(3)
        .factories(|_| pool_svc::factories())
        .start()
        .await)
}

impl Sys {
    async fn create_pool(&self, label: &str) {
        self.0
            .mgmt()
            .call(&MgmtRequest::CreateInstance {
                class: "pool".into(),
                label: label.into(),
                replicas: 3,
            })
            .await
            .unwrap();
    }

    fn locator(&self) -> Arc<MgmtLocator> {
        Arc::new(MgmtLocator::new(self.0.access_points(), Connections::default()))
    }

    async fn connect(&self, label: &str, ttl: Duration) -> PoolClient {
        let cfg = EngineSystem::client_config();
        PoolClient::connect(label, self.locator(), Connections::default(), cfg, "test", ttl)
            .await
            .unwrap()
    }

    fn raw(&self, label: &str) -> RsvcClient<pool_svc::PoolApi> {
        RsvcClient::new(
            label,
            self.locator(),
            Connections::default(),
            EngineSystem::client_config(),
        )
    }

    async fn shutdown(self) {
        self.0.shutdown().await;
    }
}

async fn handles(raw: &RsvcClient<pool_svc::PoolApi>) -> usize {
    match raw.call(&PoolRequest::ListHandles).await.unwrap() {
        PoolResponse::Handles(h) => h.len(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_evict_silent_clients_and_clients_reconnect_by_themselves() {
    let sys = system().await;
    sys.create_pool("p1").await;
    let raw = sys.raw("p1");

    // A client that stops renewing loses its handle once the lease runs out.
    let silent = sys.connect("p1", Duration::from_millis(300)).await;
    assert_eq!(handles(&raw).await, 1);
    drop(silent); // stops the renewer; the handle stays until the lease expires
    let start = Instant::now();
    while handles(&raw).await != 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "the silent client's handle was never evicted"
        );
        tokio::time::sleep(POLL).await;
    }

    // A live client keeps its handle well past its TTL.
    let live = sys.connect("p1", Duration::from_millis(300)).await;
    let h = live.handle();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(live.handle(), h, "renewals kept the handle");
    assert_eq!(live.reconnects(), 0);

    // Evicted from under it, the client reconnects by itself on its next call.
    match raw.call(&PoolRequest::Evict).await.unwrap() {
        PoolResponse::Evicted(n) => assert!(n >= 1),
        other => panic!("{other:?}"),
    }
    ContClient::new(&live).create("c0", vec![]).await.unwrap();
    assert!(live.reconnects() >= 1, "the client reconnected after NoHandle");
    assert_ne!(live.handle(), h);

    // A stale handle is refused with NoHandle.
    let stale = raw
        .call(&PoolRequest::Cont {
            handle: h,
            req: cont_svc::ContRequest::List,
        })
        .await;
    assert!(
        matches!(stale, Err(ClientError::Service(PoolError::NoHandle))),
        "{stale:?}"
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_evicts_nobody() {
    let mut sys = system().await;
    sys.create_pool("p2").await;
    let pool = sys.connect("p2", Duration::from_secs(3)).await;
    let h = pool.handle();
    pool.attr_set("before", b"1").await.unwrap();
    let info = pool.query().await.unwrap();
    let old_leader = info.leader;
    sys.0.stop(old_leader).await;
    pool.attr_set("after", b"2").await.unwrap();
    let info2 = pool.query().await.unwrap();
    assert_ne!(info2.leader, old_leader);
    assert!(info2.term > info.term);
    assert_eq!(pool.handle(), h, "the handle survived the failover");
    assert_eq!(pool.reconnects(), 0);
    ContClient::new(&pool)
        .create("after-failover", vec![])
        .await
        .unwrap();
    assert_eq!(
        pool.reconnects(),
        0,
        "the new leader knew the handle and gave it a fresh lease"
    );
    assert_eq!(pool.attr_get("before").await.unwrap(), Some(b"1".to_vec()));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_props_attrs_snapshots_oids_and_two_phase_destroy() {
    let sys = system().await;
    sys.create_pool("p3").await;
    let pool = sys.connect("p3", Duration::from_secs(5)).await;
    let conts = ContClient::new(&pool);

    // Pool properties and attributes.
    let v0 = pool.query().await.unwrap().map_version;
    pool.prop_set("owner", "alice").await.unwrap();
    assert!(pool
        .props()
        .await
        .unwrap()
        .contains(&("owner".into(), "alice".into())));
    assert_eq!(pool.query().await.unwrap().map_version, v0 + 1);
    pool.attr_set("a", b"x").await.unwrap();
    pool.attr_set("b", b"y").await.unwrap();
    assert_eq!(
        pool.attr_list().await.unwrap(),
        vec!["a".to_string(), "b".to_string()]
    );
    // Compare-and-set: swaps only from the expected value, and says what was there if not.
    assert_eq!(pool.attr_cas("a", Some(b"x"), b"x2").await.unwrap(), (true, None));
    assert_eq!(
        pool.attr_cas("a", Some(b"x"), b"x3").await.unwrap(),
        (false, Some(b"x2".to_vec()))
    );
    assert_eq!(pool.attr_cas("new", None, b"n").await.unwrap(), (true, None));
    assert_eq!(
        pool.attr_cas("new", None, b"m").await.unwrap(),
        (false, Some(b"n".to_vec()))
    );
    assert_eq!(pool.attr_get("a").await.unwrap(), Some(b"x2".to_vec()));

    conts
        .create("c1", vec![("layout".into(), "ec".into())])
        .await
        .unwrap();
    let dup = conts.create("c1", vec![]).await;
    assert!(
        dup.as_ref()
            .is_err_and(|e| is_cont_error(e, &ContError::Exists("c1".into()))),
        "{dup:?}"
    );
    let bad = conts.create("no/slash", vec![]).await;
    assert!(
        matches!(
            bad,
            Err(ClientError::Service(PoolError::Cont(ContError::Invalid(_))))
        ),
        "{bad:?}"
    );

    let ch = conts.open("c1").await.unwrap();
    // OID ranges never overlap.
    let (a, n) = conts.alloc_oids(ch, 100).await.unwrap();
    let (b, _) = conts.alloc_oids(ch, 50).await.unwrap();
    assert_eq!((a, n), (1, 100));
    assert_eq!(b, 101);
    // Snapshot epochs increase.
    let e1 = conts.snapshot(ch).await.unwrap();
    let e2 = conts.snapshot(ch).await.unwrap();
    assert!(e2 > e1);
    let q = conts.query("c1").await.unwrap();
    assert_eq!((q.handles, q.snapshots, q.next_oid), (1, 2, 151));

    // Destroy refuses an open container unless forced; forced destroy closes its handles.
    let busy = conts.destroy("c1", false).await;
    assert!(
        matches!(
            busy,
            Err(ClientError::Service(PoolError::Cont(ContError::Busy(_, 1))))
        ),
        "{busy:?}"
    );
    conts.destroy("c1", true).await.unwrap();
    let gone = conts.open("c1").await;
    assert!(gone.is_err_and(|e| is_cont_error(&e, &ContError::NotFound("c1".into()))));
    let closed = conts.alloc_oids(ch, 1).await;
    assert!(closed.is_err_and(|e| is_cont_error(&e, &ContError::NoHandle)));

    // Evicting the pool handle closes its container handles in the same transaction.
    conts.create("c2", vec![]).await.unwrap();
    conts.open("c2").await.unwrap();
    assert_eq!(conts.query("c2").await.unwrap().handles, 1);
    sys.raw("p3").call(&PoolRequest::Evict).await.unwrap();
    assert_eq!(
        conts.query("c2").await.unwrap().handles,
        0,
        "eviction closed the container handle"
    );
    assert_eq!(conts.list().await.unwrap().len(), 1);
    sys.shutdown().await;
}

/// `AttrTxn`: ops see the transaction's own writes, a failed expectation writes nothing, and
/// concurrent read-modify-write transactions on shared attributes lose no update (each one's
/// reads are validated when its entry applies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_transactions_are_atomic_and_serializable() {
    use pool_svc::AttrOp;
    let sys = system().await;
    sys.create_pool("tx").await;
    let raw = Arc::new(sys.raw("tx"));
    let get = |n: &str| AttrOp::Get { name: n.into() };
    let append = |n: &str, v: &str| AttrOp::Append {
        name: n.into(),
        value: v.as_bytes().to_vec(),
    };
    let txn = move |ops: Vec<AttrOp>| {
        let raw = raw.clone();
        async move {
            match raw.call(&PoolRequest::AttrTxn { ops }).await.unwrap() {
                PoolResponse::Txn { ok, values } => (ok, values),
                other => panic!("{other:?}"),
            }
        }
    };
    let (ok, values) = txn(vec![get("a"), append("a", "1,"), get("a"), append("b", "2,")]).await;
    assert!(ok);
    assert_eq!(values, vec![None, Some(b"1,".to_vec())]);
    // A failed expectation writes nothing, not even the ops before it.
    let (ok, values) = txn(vec![
        append("a", "3,"),
        AttrOp::Expect {
            name: "b".into(),
            value: None,
        },
    ])
    .await;
    assert_eq!((ok, values), (false, vec![]));
    let (ok, values) = txn(vec![get("a"), get("b")]).await;
    assert!(ok);
    assert_eq!(values, vec![Some(b"1,".to_vec()), Some(b"2,".to_vec())]);

    // Concurrent transactions that each read both lists and append to both: with validation
    // at apply, no append is lost and both lists end up equal.
    let mut tasks = Vec::new();
    for t in 0..8 {
        let txn = txn.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..8 {
                let v = format!("t{t}i{i},");
                let (ok, _) = txn(vec![get("x"), get("y"), append("x", &v), append("y", &v)]).await;
                assert!(ok);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, values) = txn(vec![get("x"), get("y")]).await;
    assert_eq!(
        values[0], values[1],
        "both lists took the same appends in the same order"
    );
    let list = String::from_utf8(values[0].clone().unwrap()).unwrap();
    let mut items: Vec<&str> = list.split_terminator(',').collect();
    assert_eq!(items.len(), 64, "{list}");
    items.sort_unstable();
    items.dedup();
    assert_eq!(items.len(), 64, "no append applied twice: {list}");
    sys.shutdown().await;
}

/// Queries and attributes need no handle: a `Pool` opens none (no replicated write, no renewal
/// task); `Pool::connect` opens one when a program needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_without_a_handle_opens_none() {
    let sys = system().await;
    sys.create_pool("bare").await;
    let loc = Arc::new(MgmtLocator::new(sys.0.access_points(), Connections::default()));
    let cfg = ClientConfig {
        deadline: DEADLINE,
        ..Default::default()
    };
    let pool = pool_svc::Pool::new("bare", loc, Connections::default(), cfg);
    pool.attr_set("a", b"1").await.unwrap();
    assert_eq!(pool.attr_get("a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(pool.query().await.unwrap().handles, 0);
    let raw = sys.raw("bare");
    assert_eq!(handles(&raw).await, 0, "no handle for queries and attributes");
    let conn = pool.connect("test", Duration::from_secs(5)).await.unwrap();
    assert_eq!(handles(&raw).await, 1);
    // The connection shares the pool's client: what needs no handle goes through it as well.
    assert_eq!(conn.attr_get("a").await.unwrap(), Some(b"1".to_vec()));
    conn.disconnect().await.unwrap();
    assert_eq!(handles(&raw).await, 0);
    sys.shutdown().await;
}
