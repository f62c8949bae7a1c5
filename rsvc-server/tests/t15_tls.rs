//! Mutual TLS over real TCP: engines join and replicate over TLS; a client is known by its
//! certificate, and refused, with an error that says why, when the certificate is from another
//! CA, has expired, or is a client's where an engine's is needed, or when its principal may
//! not administer. A renewed certificate file is picked up without a restart.

use std::sync::Arc;
use std::time::Duration;

use rsvc_client::mgmt::{mgmt_client, MgmtError, MgmtLocator, MgmtRequest, MgmtResponse};
use rsvc_client::tls::{TlsFiles, TlsPaths};
use rsvc_client::{ClientConfig, ClientError, Connections, RsvcClient};
use rsvc_server::certs::{self, CertSpec};
use rsvc_server::counter::{Counter, CounterApi, CounterRequest, CounterResponse};
use rsvc_server::{FnFactory, ServiceFactory};
use rsvc_tests::kit::{self, EngineSystem};

fn factories() -> Vec<Arc<dyn ServiceFactory>> {
    vec![Arc::new(FnFactory::new(|_: &str| Counter))]
}

async fn tls_system(n: u32) -> EngineSystem {
    kit::init_tracing("rsvc_server=info,rsvc_client=info,rdb=warn,openraft=error");
    EngineSystem::builder(n)
        .access_points(n.min(3))
        .factories(|_| factories())
        .tls()
        .start()
        .await
}

/// A short deadline: refusals must come at once, not at the end of the deadline.
fn quick() -> ClientConfig {
    ClientConfig {
        deadline: Duration::from_secs(5),
        ..ClientConfig::default()
    }
}

fn counter(sys: &EngineSystem, conns: Connections, label: &str) -> RsvcClient<CounterApi> {
    let loc = Arc::new(MgmtLocator::new(sys.access_points(), conns.clone()));
    RsvcClient::new(label, loc, conns, quick())
}

/// Creates counter `label` with a replica on every engine.
async fn create(
    sys: &EngineSystem,
    conns: Connections,
    label: &str,
) -> Result<MgmtResponse, ClientError<MgmtError>> {
    mgmt_client(sys.access_points(), conns, quick())
        .call(&MgmtRequest::CreateInstance {
            class: "counter".into(),
            label: label.into(),
            replicas: sys.engines().count() as u32,
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_replicate_over_tls_and_only_admins_administer() {
    let sys = tls_system(3).await;
    // An admin creates; the instance replicates over TLS between the engines.
    create(&sys, sys.connections(), "c1")
        .await
        .expect("admin creates");
    let alice = sys.connections_as("alice");
    let c = counter(&sys, alice.clone(), "c1");
    let r = c
        .call(&CounterRequest::Add {
            name: "n".into(),
            delta: 2,
        })
        .await
        .expect("alice uses the instance");
    assert_eq!(r, CounterResponse::Value(2));
    // A non-admin may read the directory, not change it.
    let map = mgmt_client(sys.access_points(), alice.clone(), quick())
        .call(&MgmtRequest::SystemMap)
        .await;
    assert!(map.is_ok(), "{map:?}");
    match create(&sys, alice, "c2").await {
        Err(ClientError::Service(MgmtError::Denied(why))) => {
            assert!(why.contains("alice") && why.contains("admin"), "{why}")
        }
        other => panic!("alice created an instance: {other:?}"),
    }
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_cannot_speak_for_an_engine() {
    let sys = tls_system(1).await;
    let files = TlsFiles::load(sys.tls_paths("admin")).unwrap();
    let addr = sys.engine(1).addr().to_string();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(rsvc_client::tls::connector(
            files,
            addr,
            None,
            Duration::from_secs(5),
        ))
        .await
        .expect("the TLS handshake itself succeeds: the certificate is the cluster's");
    let mut peer = rsvc_server::wire::pb::peer_client::PeerClient::new(ch);
    let status = peer
        .identify(rsvc_server::wire::pb::IdentifyRequest::default())
        .await
        .expect_err("a client certificate may not make peer calls, even an admin's");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("engine certificate"), "{status:?}");
    assert_eq!(sys.engine(1).security_refusals().1, 1, "counted for the metrics");

    // An engine certificate speaks for its own rank only.
    let (cert, key) = rsvc_server::certs::engine_files(&sys.certs_dir(), 5);
    let paths = TlsPaths {
        ca: sys.certs_dir().join("ca.crt"),
        cert,
        key,
    };
    let addr = sys.engine(1).addr().to_string();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(rsvc_client::tls::connector(
            TlsFiles::load(paths).unwrap(),
            addr,
            None,
            Duration::from_secs(5),
        ))
        .await
        .unwrap();
    let mut peer = rsvc_server::wire::pb::peer_client::PeerClient::new(ch);
    let r = |rank| Some(rsvc_server::wire::pb::ReplicaRef { rank, gen: 1 });
    let status = peer
        .raft(rsvc_server::wire::pb::RaftMessage {
            cluster: sys.engine(1).cluster().to_string(),
            db: vec![0; 16],
            from: r(1),
            to: r(1),
            kind: 0,
            ..Default::default()
        })
        .await
        .expect_err("rank 5's certificate may not send rank 1's messages");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("names rank 5"), "{status:?}");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_another_ca_or_expired_ones_are_refused_with_the_reason() {
    let sys = tls_system(1).await;
    create(&sys, sys.connections(), "c").await.expect("admin creates");

    // Another CA: this client cannot verify the engine (and the engine would not take it).
    let foreign = sys.dir().join("foreign");
    certs::generate(&CertSpec::new(&foreign).user("mallory", &["admin"])).unwrap();
    let (cert, key) = certs::user_files(&foreign, "mallory");
    let paths = TlsPaths {
        ca: foreign.join("ca.crt"),
        cert,
        key,
    };
    let conns = Connections::default().with_tls(Some(TlsFiles::load(paths).unwrap()));
    let t = std::time::Instant::now();
    match counter(&sys, conns, "c")
        .call(&CounterRequest::Get { name: "n".into() })
        .await
    {
        Err(ClientError::Security(why)) => assert!(why.contains("not signed by this client's CA"), "{why}"),
        other => panic!("a foreign CA's client got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "a certificate error is final, not retried"
    );

    // The cluster's CA, but the client certificate has expired: the engine refuses it.
    certs::generate(&CertSpec {
        expired: true,
        ..CertSpec::new(sys.certs_dir()).user("old", &[])
    })
    .unwrap();
    let conns = Connections::default().with_tls(Some(TlsFiles::load(sys.tls_paths("old")).unwrap()));
    match counter(&sys, conns, "c")
        .call(&CounterRequest::Get { name: "n".into() })
        .await
    {
        Err(ClientError::Security(why)) => assert!(why.contains("expired"), "{why}"),
        other => panic!("an expired client certificate got {other:?}"),
    }

    // No TLS at all against a TLS engine: refused, and nothing leaks.
    let plain = counter(&sys, Connections::default(), "c")
        .call(&CounterRequest::Get { name: "n".into() })
        .await;
    assert!(plain.is_err(), "{plain:?}");
    let (handshakes, _) = sys.engine(1).security_refusals();
    assert!(handshakes >= 3, "refused handshakes are counted: {handshakes}");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_engine_certificate_is_picked_up_without_a_restart() {
    let sys = tls_system(1).await;
    create(&sys, sys.connections(), "c").await.expect("admin creates");
    // The engine's certificate is replaced by an expired one (a botched renewal): new
    // connections see it at once, though the engine never restarted.
    certs::generate(&CertSpec {
        expired: true,
        force: true,
        ..CertSpec::new(sys.certs_dir()).rank(1)
    })
    .unwrap();
    kit::wait_until(
        "new connections to see the expired engine certificate",
        || async {
            // A fresh pool, so a fresh connection.
            match counter(&sys, sys.connections(), "c")
                .call(&CounterRequest::Get { name: "n".into() })
                .await
            {
                Err(ClientError::Security(why)) if why.contains("expired") => Some(()),
                _ => None,
            }
        },
    )
    .await;
    // A good renewal: served again, still without a restart.
    certs::generate(&CertSpec {
        force: true,
        ..CertSpec::new(sys.certs_dir()).rank(1)
    })
    .unwrap();
    kit::wait_until(
        "new connections to see the renewed engine certificate",
        || async {
            counter(&sys, sys.connections(), "c")
                .call(&CounterRequest::Add {
                    name: "n".into(),
                    delta: 1,
                })
                .await
                .ok()
        },
    )
    .await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listener_without_tls_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = rsvc_server::EngineConfig::for_tests(1, dir.path().join("e"));
    cfg.listen = "0.0.0.0:0".parse().unwrap();
    let err = rsvc_server::Engine::start(cfg.clone(), factories())
        .await
        .err()
        .expect("plain TCP on every interface is refused");
    assert!(err.to_string().contains("--insecure"), "{err}");
    cfg.insecure = true;
    let e = rsvc_server::Engine::start(cfg, factories())
        .await
        .expect("--insecure allows it");
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_serving_a_certificate_without_the_engine_name_is_refused_by_clients() {
    kit::init_tracing("rsvc_server=info,rsvc_client=info,rdb=warn,openraft=error");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    certs::generate(
        &CertSpec::new(&certs)
            .user("alice", &["staff"])
            .user("admin", &["admin"]),
    )
    .unwrap();
    let files = |user: &str| {
        let (cert, key) = certs::user_files(&certs, user);
        TlsFiles::load(TlsPaths {
            ca: certs.join("ca.crt"),
            cert,
            key,
        })
        .unwrap()
    };
    // A misconfigured engine: alice's client certificate as its own.
    let mut cfg = rsvc_server::EngineConfig::for_tests(1, dir.path().join("e"));
    cfg.tls = Some(files("alice"));
    let e = rsvc_server::Engine::start(cfg, factories()).await.unwrap();
    let conns = Connections::default().with_tls(Some(files("admin")));
    let loc = Arc::new(rsvc_client::StaticLocator(vec![(1, e.addr().to_string())]));
    let c: RsvcClient<CounterApi> = RsvcClient::new("x", loc, conns, quick());
    match c.call(&CounterRequest::Get { name: "n".into() }).await {
        Err(ClientError::Security(why)) => {
            assert!(why.contains("not an engine certificate"), "{why}")
        }
        other => panic!("a client trusted an engine without the engine name: {other:?}"),
    }
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_whose_handshakes_keep_failing_is_cut_off_before_any_tls_work() {
    let sys = tls_system(1).await;
    create(&sys, sys.connections(), "c").await.expect("admin creates");
    let foreign = sys.dir().join("foreign");
    certs::generate(&CertSpec::new(&foreign).user("mallory", &[])).unwrap();
    let (cert, key) = certs::user_files(&foreign, "mallory");
    let mallory = TlsFiles::load(TlsPaths {
        ca: foreign.join("ca.crt"),
        cert,
        key,
    })
    .unwrap();
    let addr = sys.engine(1).addr().to_string();
    let limit = rsvc_server::EngineLimits::default().handshake_failures.0;
    // From 127.0.0.3: every attempt fails; once the limit is reached within the window, the
    // engine closes the connection before the handshake, so the client never sees a
    // certificate at all.
    let here = Some("127.0.0.3".parse().unwrap());
    let (mut handshakes, mut cut) = (0, 0);
    for _ in 0..(limit * 3) {
        match mallory.connect(&addr, here, Duration::from_secs(5)).await {
            Ok(_) => panic!("a foreign certificate got through"),
            Err(e) if rsvc_client::tls::certificate_problem(&e).is_some() => handshakes += 1,
            Err(_) => cut += 1,
        }
    }
    assert!(
        handshakes <= limit + 2,
        "{handshakes} handshakes were made, the limit is {limit}"
    );
    assert!(cut > 0, "nothing was cut off");

    // From 127.0.0.4: a ClientHello, the engine's flight read, then a reset instead of an
    // answer. That costs the engine as much, and is counted the same.
    let (mut flights, mut closed) = (0, 0);
    for _ in 0..(limit * 3) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let name = rustls_pki_types::ServerName::try_from("rsvc-engine").unwrap();
        let mut conn = rustls::ClientConnection::new(mallory.client_config(), name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.4:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(addr.parse().unwrap()).await.unwrap();
        if s.write_all(&hello).await.is_err() {
            closed += 1;
            continue;
        }
        let mut got = 0;
        let mut buf = [0u8; 4096];
        while got <= 64 {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got += n,
                _ => break,
            }
        }
        if got > 64 {
            flights += 1;
        } else {
            closed += 1;
        }
    }
    assert!(
        flights <= limit + 2,
        "the engine sent {flights} flights, the limit is {limit}"
    );
    assert!(closed > 0, "nothing was cut off");
    // Another address is served meanwhile.
    let conns = sys
        .connections_as("alice")
        .with_local_address(Some("127.0.0.2".parse().unwrap()));
    counter(&sys, conns, "c")
        .call(&CounterRequest::Add {
            name: "n".into(),
            delta: 1,
        })
        .await
        .expect("a client on another address is not affected");
    sys.shutdown().await;
}
