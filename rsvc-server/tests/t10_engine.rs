//! Engines on loopback talking real gRPC: instance creation, leader location, failover,
//! exactly-once, NotReplica, and garbage on the port.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdb::{DbId, Member};
use rsvc_client::{ClientConfig, ClientError, Connections, RsvcClient, StaticLocator, WireError};
use rsvc_server::counter::{Counter, CounterApi, CounterError, CounterRequest, CounterResponse};
use rsvc_server::{FnFactory, ServiceFactory};

use rsvc_tests::kit::{self, EngineSystem, DEADLINE, POLL};

fn init_tracing() {
    kit::init_tracing("rsvc_server=info,rsvc_client=info,rdb=info,openraft=warn");
}

fn factories() -> Vec<Arc<dyn ServiceFactory>> {
    vec![Arc::new(FnFactory::new(|_: &str| Counter))]
}

/// The kit's in-process system, with the instance creation these tests do by hand.
struct System(EngineSystem);

impl std::ops::Deref for System {
    type Target = EngineSystem;
    fn deref(&self) -> &EngineSystem {
        &self.0
    }
}

impl std::ops::DerefMut for System {
    fn deref_mut(&mut self) -> &mut EngineSystem {
        &mut self.0
    }
}

impl System {
    async fn new(n: u32) -> System {
        Self::with(n, |_| factories()).await
    }

    /// `n` engines, engine `r` hosting the services of `factories(r)`.
    async fn with(
        n: u32,
        factories: impl Fn(u32) -> Vec<Arc<dyn ServiceFactory>> + Send + Sync + 'static,
    ) -> System {
        init_tracing();
        System(EngineSystem::builder(n).factories(factories).start().await)
    }

    /// Creates `instance` on the given ranks: empty replicas first, then the first bootstraps.
    async fn create(&self, instance: &str, ranks: &[u32]) -> Vec<(u32, String)> {
        let db = DbId::random();
        let mut members: Vec<Member> = Vec::new();
        for &r in &ranks[1..] {
            members.push(
                self.engine(r)
                    .start_replica("counter", instance, db, 1, vec![])
                    .await
                    .unwrap(),
            );
        }
        let first = self.engine(ranks[0]);
        let mut all = vec![first
            .start_replica("counter", instance, db, 1, vec![])
            .await
            .unwrap()];
        all.extend(members);
        first
            .start_replica("counter", instance, db, 1, all)
            .await
            .unwrap();
        ranks
            .iter()
            .map(|&r| (r, self.engine(r).addr().to_string()))
            .collect()
    }

    async fn shutdown(self) {
        self.0.shutdown().await;
    }
}

fn client(replicas: Vec<(u32, String)>, instance: &str) -> RsvcClient<CounterApi> {
    let cfg = ClientConfig {
        deadline: DEADLINE,
        rpc_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    RsvcClient::new(
        instance,
        Arc::new(StaticLocator(replicas)),
        Connections::default(),
        cfg,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_on_three_of_five_survives_leader_loss() {
    let mut sys = System::new(5).await;
    let replicas = sys.create("c1", &[2, 3, 5]).await;
    let c = client(replicas.clone(), "c1");
    let (leader, term) = c.locate_leader().await.unwrap();
    assert!([2, 3, 5].contains(&leader));
    // A new client that knows only a follower: its first call is a leader search (the
    // follower's hint), not a retry.
    let follower = replicas.iter().find(|(r, _)| *r != leader).cloned().unwrap();
    let fresh = client(vec![follower], "c1");
    fresh
        .call(&CounterRequest::Add {
            name: "y".into(),
            delta: 1,
        })
        .await
        .unwrap();
    assert_eq!(fresh.stats.searches.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(fresh.stats.retries.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(fresh.stats.lookups.load(std::sync::atomic::Ordering::Relaxed), 1);
    for i in 1..=10 {
        let r = c
            .call(&CounterRequest::Add {
                name: "x".into(),
                delta: 1,
            })
            .await
            .unwrap();
        assert_eq!(r, CounterResponse::Value(i));
    }
    assert_eq!(
        c.call(&CounterRequest::Get { name: "nope".into() })
            .await
            .unwrap_err()
            .to_string(),
        ClientError::<CounterError>::Service(CounterError::NoSuchCounter("nope".into())).to_string()
    );

    // Stop the leader's engine; the client finds the new leader by itself.
    let t = Instant::now();
    sys.stop(leader).await;
    let r = c
        .call(&CounterRequest::Add {
            name: "x".into(),
            delta: 1,
        })
        .await
        .unwrap();
    let gap = t.elapsed();
    assert_eq!(
        r,
        CounterResponse::Value(11),
        "no acknowledged add was lost or applied twice"
    );
    let (new_leader, new_term) = c.cached_leader().unwrap();
    assert_ne!(new_leader, leader);
    assert!(new_term > term);
    // The failover cost real retries, and every call's latency is in the histogram.
    use std::sync::atomic::Ordering::Relaxed;
    assert!(c.stats.retries.load(Relaxed) > 0);
    assert!(c.stats.calls.load(Relaxed) >= 12);
    assert!(c.stats.latency(1.0).unwrap() >= c.stats.latency(0.5).unwrap());
    eprintln!("failover gap seen by the client: {gap:?} (old leader {leader}, new leader {new_leader}, term {new_term})");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_failover() {
    let mut sys = System::new(3).await;
    let replicas = sys.create("c2", &[1, 2, 3]).await;
    let c = client(replicas.clone(), "c2");
    c.call(&CounterRequest::Add {
        name: "n".into(),
        delta: 5,
    })
    .await
    .unwrap();
    let (leader, _) = c.cached_leader().unwrap();

    // Replay a mutating request with the same client id and sequence number against the new
    // leader after a failover, as a client whose reply was lost would.
    use rsvc_client::wire::pb;
    let req = pb::CallRequest {
        class: "counter".into(),
        instance: "c2".into(),
        client_id: vec![7; 16],
        seq: 1,
        payload: rsvc_client::wire::encode(&CounterRequest::Add {
            name: "n".into(),
            delta: 100,
        })
        .unwrap(),
        probe: false,
        acked: 0,
    };
    let send = |addr: String, req: pb::CallRequest| async move {
        let mut cl = Connections::default().get(&addr).unwrap();
        cl.call(req).await.unwrap().into_inner()
    };
    let leader_addr = replicas.iter().find(|(r, _)| *r == leader).unwrap().1.clone();
    let first = send(leader_addr, req.clone()).await;
    assert!(matches!(first.result, Some(pb::call_reply::Result::Ok(_))));
    sys.stop(leader).await;

    let start = Instant::now();
    let second = loop {
        let mut got = None;
        for (r, a) in &replicas {
            if *r == leader {
                continue;
            }
            let reply = send(a.clone(), req.clone()).await;
            if matches!(reply.result, Some(pb::call_reply::Result::Ok(_))) {
                got = Some(reply);
                break;
            }
        }
        if let Some(g) = got {
            break g;
        }
        assert!(start.elapsed() < DEADLINE, "no new leader answered");
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(first.result, second.result, "the retry returned the first result");
    let v = c.call(&CounterRequest::Get { name: "n".into() }).await.unwrap();
    assert_eq!(v, CounterResponse::Value(105), "the add was applied exactly once");

    // Once the client acknowledged it (a newer request says every seq up to 80 has ended,
    // past the floor's step), replaying the older one is refused as stale rather than applied
    // again.
    let (_, addr) = replicas.iter().find(|(r, _)| *r != leader).unwrap();
    let mut newer = req.clone();
    newer.seq = 100;
    newer.acked = 80;
    assert!(newer.acked >= rsvc_server::host::FLOOR_STEP);
    newer.payload = rsvc_client::wire::encode(&CounterRequest::Add {
        name: "n".into(),
        delta: 1,
    })
    .unwrap();
    let mut reply = send(addr.clone(), newer.clone()).await;
    if !matches!(reply.result, Some(pb::call_reply::Result::Ok(_))) {
        // That replica is not the leader: the other one is.
        let (_, other) = replicas.iter().find(|(r, a)| *r != leader && a != addr).unwrap();
        reply = send(other.clone(), newer).await;
    }
    assert!(
        matches!(reply.result, Some(pb::call_reply::Result::Ok(_))),
        "{reply:?}"
    );
    let leader_now = rsvc_client::wire::hint_of(reply.hint.as_ref())
        .unwrap()
        .addr
        .unwrap();
    let stale = send(leader_now, req.clone()).await;
    match stale.result {
        Some(pb::call_reply::Result::Error(e)) => assert_eq!(e.kind, pb::ErrorKind::Stale as i32),
        other => panic!("expected Stale, got {other:?}"),
    }
    let v = c.call(&CounterRequest::Get { name: "n".into() }).await.unwrap();
    assert_eq!(v, CounterResponse::Value(106));
    sys.shutdown().await;
}

/// Instance `c3` on ranks 1 and 2 of 3 engines, and a client that believes rank 3 hosts it
/// too and has added 1 to counter `a` five times.
async fn c3_with_a_wrong_replica() -> (System, Vec<(u32, String)>, RsvcClient<CounterApi>) {
    let sys = System::new(3).await;
    let replicas = sys.create("c3", &[1, 2]).await;
    let mut wrong = replicas.clone();
    wrong.push((3, sys.engine(3).addr().to_string()));
    let c = client(wrong, "c3");
    for _ in 0..5 {
        c.call(&CounterRequest::Add {
            name: "a".into(),
            delta: 1,
        })
        .await
        .unwrap();
    }
    (sys, replicas, c)
}

/// A client told that rank 3 hosts the instance learns otherwise and still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_told_of_a_wrong_replica_gets_through() {
    let (sys, _, c) = c3_with_a_wrong_replica().await;
    let v = c.call(&CounterRequest::Get { name: "a".into() }).await.unwrap();
    assert_eq!(v, CounterResponse::Value(5));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_nobody_hosts_ends_in_a_deadline_error_that_says_what_was_tried() {
    let (sys, replicas, _) = c3_with_a_wrong_replica().await;
    // An instance nobody hosts: NotReplica everywhere, then a clear deadline error.
    let cfg = ClientConfig {
        deadline: Duration::from_millis(500),
        ..ClientConfig::default()
    };
    let ghost: RsvcClient<CounterApi> = RsvcClient::new(
        "ghost",
        Arc::new(StaticLocator(replicas.clone())),
        Connections::default(),
        cfg,
    );
    match ghost.call(&CounterRequest::List).await {
        Err(ClientError::Deadline { attempts, last, .. }) => {
            assert!(attempts >= 2, "{attempts}");
            assert!(!last.is_empty());
        }
        other => panic!("expected a deadline error, got {other:?}"),
    }
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_class_and_an_undecodable_request_are_invalid_requests() {
    let (sys, _, c) = c3_with_a_wrong_replica().await;
    // Unknown class and undecodable payloads get errors, not crashes.
    use rsvc_client::wire::pb;
    let mut raw = Connections::default().get(sys.engine(1).addr()).unwrap();
    let reply = raw
        .call(pb::CallRequest {
            class: "nope".into(),
            instance: "c3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match reply.result {
        Some(pb::call_reply::Result::Error(e)) => assert_eq!(e.kind, pb::ErrorKind::Invalid as i32),
        other => panic!("{other:?}"),
    }
    let (leader, _) = c.cached_leader().unwrap();
    let mut raw = Connections::default().get(sys.engine(leader).addr()).unwrap();
    let reply = raw
        .call(pb::CallRequest {
            class: "counter".into(),
            instance: "c3".into(),
            client_id: vec![1; 16],
            seq: 9,
            payload: vec![0xff, 0xfe, 0xfd],
            probe: false,
            acked: 0,
        })
        .await
        .unwrap()
        .into_inner();
    match reply.result {
        Some(pb::call_reply::Result::Error(e)) => {
            assert_eq!(WireError::from(&e), WireError::Invalid(e.message.clone()));
            assert!(e.message.contains("undecodable"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    sys.shutdown().await;
}

/// Raft traffic from another system, or for a database nobody hosts, is refused unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_raft_messages_are_refused_unread() {
    let (sys, _, _) = c3_with_a_wrong_replica().await;
    use rsvc_server::wire::pb as peer;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", sys.engine(1).addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut p = peer::peer_client::PeerClient::new(ch);
    for (cluster, db) in [
        ("other-system", vec![0u8; 16]),
        ("test", vec![9u8; 16]),
        ("test", vec![1u8; 3]),
    ] {
        let msg = peer::RaftMessage {
            cluster: cluster.into(),
            db,
            kind: 0,
            payload: vec![1, 2, 3],
            ..Default::default()
        };
        match p.raft(msg).await.unwrap().into_inner().result {
            Some(peer::raft_reply::Result::Refused(why)) => assert!(!why.is_empty()),
            other => panic!("a foreign raft message was not refused: {other:?}"),
        }
    }
    sys.shutdown().await;
}

/// Raw garbage bytes on the port: the engine shrugs and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_leaves_the_engine_serving() {
    let (sys, _, c) = c3_with_a_wrong_replica().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0u8; 4096][..],
        &b"\x16\x03\x01\x02\x00"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(sys.engine(1).addr())
            .await
            .unwrap();
        let _ = s.write_all(junk).await;
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    }
    c.call(&CounterRequest::Add {
        name: "a".into(),
        delta: 1,
    })
    .await
    .unwrap();
    let v = c.call(&CounterRequest::Get { name: "a".into() }).await.unwrap();
    assert_eq!(v, CounterResponse::Value(6));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_are_not_lost() {
    let sys = System::new(3).await;
    let replicas = sys.create("c4", &[1, 2, 3]).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = client(replicas.clone(), "c4");
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                c.call(&CounterRequest::Add {
                    name: "hot".into(),
                    delta: 1,
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = client(replicas, "c4");
    assert_eq!(
        c.call(&CounterRequest::Get { name: "hot".into() }).await.unwrap(),
        CounterResponse::Value(80)
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_restart_recovers_its_replicas() {
    let mut sys = System::new(3).await;
    let replicas = sys.create("c5", &[1, 2, 3]).await;
    let c = client(replicas.clone(), "c5");
    c.call(&CounterRequest::Add {
        name: "k".into(),
        delta: 3,
    })
    .await
    .unwrap();
    for rank in 1..=3u32 {
        sys.stop(rank).await;
    }
    // Same data directories and addresses: the group comes back and still holds the data.
    for (rank, addr) in &replicas {
        sys.restart(*rank, addr).await;
    }
    for rank in 1..=3u32 {
        assert!(
            sys.engine(rank).host("counter", "c5").is_some(),
            "rank {rank} recovered its replica"
        );
    }
    let c = client(replicas, "c5");
    assert_eq!(
        c.call(&CounterRequest::Get { name: "k".into() }).await.unwrap(),
        CounterResponse::Value(3)
    );
    drop(c);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_oversized_messages() {
    let sys = System::new(3).await;
    let replicas = sys.create("c6", &[1, 2, 3]).await;
    let c = client(replicas, "c6");
    c.call(&CounterRequest::Add {
        name: "m".into(),
        delta: 1,
    })
    .await
    .unwrap();
    let (leader, _) = c.cached_leader().unwrap();
    let e = sys.engine(leader);

    // Standard gRPC health.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", e.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let st = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        st.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Prometheus text.
    let maddr = rsvc_server::metrics::serve(e.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(maddr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(
        body.contains("rsvc_replica_serving{class=\"counter\",instance=\"c6\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("rsvc_requests_ok_total{class=\"counter\",instance=\"c6\"}"),
        "{body}"
    );

    // A message over the 16 MiB bound is refused with an error status; the engine goes on.
    use rsvc_client::wire::pb;
    let mut big = pb::rsvc_client::RsvcClient::new(ch).max_encoding_message_size(64 << 20);
    let res = big
        .call(pb::CallRequest {
            class: "counter".into(),
            instance: "c6".into(),
            client_id: vec![3; 16],
            seq: 1,
            payload: vec![0u8; 17 << 20],
            probe: false,
            acked: 0,
        })
        .await;
    let status = res.expect_err("oversized message accepted");
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal
        ),
        "{status:?}"
    );
    assert_eq!(
        c.call(&CounterRequest::Add {
            name: "m".into(),
            delta: 1
        })
        .await
        .unwrap(),
        CounterResponse::Value(2)
    );
    sys.shutdown().await;
}

/// A counter whose step-up always fails on one engine.
struct Grumpy(Counter);

#[async_trait::async_trait]
impl rsvc_server::ReplicatedService for Grumpy {
    type Api = CounterApi;
    async fn bootstrap(&self, tx: &mut rdb::Tx) -> Result<(), rsvc_server::ServiceError> {
        self.0.bootstrap(tx).await
    }
    async fn step_up(
        &self,
        _db: &rdb::Db,
        _term: u64,
    ) -> Result<rsvc_server::StepUp, rsvc_server::ServiceError> {
        Err("cannot load caches here".into())
    }
    async fn handle(
        &self,
        ctx: &mut rsvc_server::Ctx,
        req: CounterRequest,
    ) -> Result<CounterResponse, CounterError> {
        self.0.handle(ctx, req).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_up_gives_leadership_away() {
    let sys = System::with(3, |rank| {
        let f: Arc<dyn ServiceFactory> = if rank == 1 {
            Arc::new(FnFactory::new(|_: &str| Grumpy(Counter)))
        } else {
            Arc::new(FnFactory::new(|_: &str| Counter))
        };
        vec![f]
    })
    .await;
    // Rank 1 bootstraps the group (the first rank given), so it is likely the first leader,
    // and its step-up fails.
    let replicas = sys.create("g", &[1, 2, 3]).await;
    let c = client(replicas, "g");
    assert_eq!(
        c.call(&CounterRequest::Add {
            name: "x".into(),
            delta: 1
        })
        .await
        .unwrap(),
        CounterResponse::Value(1)
    );
    let (leader, _) = c.cached_leader().unwrap();
    assert_ne!(leader, 1, "the replica that cannot step up never serves");
    assert_eq!(
        sys.engine(1).host("counter", "g").unwrap().state().0,
        rsvc_server::State::Down
    );
    sys.shutdown().await;
}

/// `start_replica` is idempotent for the generation asked for, replaces an orphan of an older
/// generation of the same group (left by a repair that failed half-way), and refuses to go
/// back to an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_replica_replaces_an_orphan_of_an_older_generation() {
    let sys = System::new(1).await;
    let e = sys.engine(1);
    let db = DbId::random();
    let g1 = e.start_replica("counter", "o", db, 1, vec![]).await.unwrap();
    assert_eq!(g1.replica.gen, 1);
    let again = e.start_replica("counter", "o", db, 1, vec![]).await.unwrap();
    assert_eq!(again, g1, "the same generation again is the same replica");
    let g2 = e.start_replica("counter", "o", db, 2, vec![]).await.unwrap();
    assert_eq!(g2.replica.gen, 2, "an older generation is replaced");
    assert_ne!(g2.storage_id, g1.storage_id, "by a new incarnation");
    assert!(e.start_replica("counter", "o", db, 1, vec![]).await.is_err());
    e.shutdown().await;
}

/// What the [`Ticker`]s of all engines saw.
#[derive(Default)]
struct Ticks {
    /// The term whose leader task runs on each rank, if one does.
    running: std::sync::Mutex<std::collections::HashMap<u32, u64>>,
    /// Every (rank, term) whose leader task started.
    started: std::sync::Mutex<Vec<(u32, u64)>>,
    /// `drain` calls that found a leader task still running.
    overlaps: std::sync::atomic::AtomicU32,
}

/// A counter with a leader task that records when it runs.
struct Ticker {
    rank: u32,
    ticks: Arc<Ticks>,
}

/// Marks a rank's leader task stopped when the task's future is dropped.
struct Running(u32, Arc<Ticks>);

impl Drop for Running {
    fn drop(&mut self) {
        self.1.running.lock().unwrap().remove(&self.0);
    }
}

#[async_trait::async_trait]
impl rsvc_server::ReplicatedService for Ticker {
    type Api = CounterApi;
    async fn bootstrap(&self, tx: &mut rdb::Tx) -> Result<(), rsvc_server::ServiceError> {
        Counter.bootstrap(tx).await
    }
    fn leader_tasks(&self, _db: &rdb::Db, term: u64, tasks: &mut rsvc_server::LeaderTasks) {
        let (rank, ticks) = (self.rank, self.ticks.clone());
        tasks.spawn("ticker", move |_| async move {
            ticks.running.lock().unwrap().insert(rank, term);
            ticks.started.lock().unwrap().push((rank, term));
            let _running = Running(rank, ticks);
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    async fn drain(&self) {
        if self.ticks.running.lock().unwrap().contains_key(&self.rank) {
            self.ticks
                .overlaps
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    async fn handle(
        &self,
        ctx: &mut rsvc_server::Ctx,
        req: CounterRequest,
    ) -> Result<CounterResponse, CounterError> {
        Counter.handle(ctx, req).await
    }
}

/// Leader tasks are the framework's (issue 14): they start when a replica steps up, are
/// cancelled and joined before its `drain`, and the next leader starts its own for its term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_tasks_run_only_while_their_replica_leads() {
    let ticks = Arc::new(Ticks::default());
    let t = ticks.clone();
    let mut sys = System::with(3, move |rank| {
        let ticks = t.clone();
        vec![Arc::new(FnFactory::new(move |_: &str| Ticker {
            rank,
            ticks: ticks.clone(),
        })) as Arc<dyn ServiceFactory>]
    })
    .await;
    let replicas = sys.create("t", &[1, 2, 3]).await;
    let c = client(replicas, "t");
    let add = CounterRequest::Add {
        name: "x".into(),
        delta: 1,
    };
    c.call(&add).await.unwrap();
    let (first, _) = c.cached_leader().unwrap();
    let wait_started = |rank: u32| {
        let ticks = ticks.clone();
        async move {
            let start = Instant::now();
            loop {
                let got = ticks
                    .started
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .find(|(r, _)| *r == rank)
                    .map(|(_, t)| *t);
                if let Some(term) = got {
                    return term;
                }
                assert!(start.elapsed() < DEADLINE, "rank {rank} never started its task");
                tokio::time::sleep(POLL).await;
            }
        }
    };
    let term = wait_started(first).await;
    // A graceful stop of the leader's engine hands leadership over: the old leader's task
    // stops before its drain, and the new leader starts one for its own term.
    sys.stop(first).await;
    c.call(&add).await.unwrap();
    let (next, _) = c.cached_leader().unwrap();
    assert_ne!(next, first);
    let next_term = wait_started(next).await;
    assert!(next_term > term, "{next_term} after {term}");
    assert!(!ticks.running.lock().unwrap().contains_key(&first));
    assert_eq!(
        ticks.overlaps.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a drain ran while its leader task still ran"
    );
    sys.shutdown().await;
}

/// Whether the peer closed `s` (a read sees end of file or an error) within `within`; what
/// it sends before (an HTTP/2 server's SETTINGS) is read and dropped.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    let until_closed = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, until_closed).await.is_ok()
}

/// Found by `rsvc-fuzz port`: connections that never send the HTTP/2 preface (an idle flood,
/// a slowloris) held a file descriptor each for as long as they liked. Now one beyond
/// `max_pending_connections` is closed at once, and the others after `preface_timeout`, while
/// real clients go on being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_preface_are_closed_and_cannot_crowd_out_clients() {
    init_tracing();
    let sys = System(
        EngineSystem::builder(3)
            .factories(|_| factories())
            .config(|c| {
                c.limits.preface_timeout = Duration::from_millis(500);
                c.limits.max_pending_connections = 8;
            })
            .start()
            .await,
    );
    let replicas = sys.create("p", &[1, 2, 3]).await;
    let addr = sys.engine(1).addr().to_string();
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // 12 of the 20 are over the limit: closed at once, and the other 8 are kept until their
    // preface is overdue.
    let checks = idle
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(100)));
    let closed_at_once = futures::future::join_all(checks)
        .await
        .into_iter()
        .filter(|c| *c)
        .count();
    assert_eq!(closed_at_once, 12, "closed at once");
    // Clients are served meanwhile, through the same engine among others.
    let c = client(replicas, "p");
    let add = CounterRequest::Add {
        name: "a".into(),
        delta: 1,
    };
    assert_eq!(c.call(&add).await.unwrap(), CounterResponse::Value(1));
    // The rest are closed once their preface is overdue.
    for s in &mut idle {
        assert!(closed_within(s, DEADLINE).await, "an idle connection stayed open");
    }
    assert_eq!(c.call(&add).await.unwrap(), CounterResponse::Value(2));
    sys.shutdown().await;
}
