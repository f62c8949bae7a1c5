//! Pool and container ACLs over real mutual TLS: the principal of the client's certificate is
//! checked at connect, the handle carries what it was granted and whose it is, an ACL change
//! re-checks open handles, and a container is checked against its own ACL.

use std::sync::Arc;

use cont_svc::{ContRequest, ContResponse};
use pool_svc::{PoolApi, PoolError, PoolRequest, PoolResponse};
use rsvc_client::mgmt::{MgmtLocator, MgmtRequest};
use rsvc_client::{ClientError, RsvcClient};
use rsvc_tests::kit::{self, EngineSystem};

type Handle = [u8; 16];

async fn system() -> EngineSystem {
    kit::init_tracing("pool_svc=info,rsvc_server=warn,rdb=warn,openraft=error");
    let sys = EngineSystem::builder(3)
        .access_points(3)
        .factories(|_| pool_svc::factories())
        .tls()
        .start()
        .await;
    sys.mgmt()
        .call(&MgmtRequest::CreateInstance {
            class: "pool".into(),
            label: "p".into(),
            replicas: 3,
        })
        .await
        .expect("admin creates the pool");
    sys
}

/// A pool client that is `user` (one of `kit::TLS_USERS`).
fn pool_as(sys: &EngineSystem, user: &str) -> RsvcClient<PoolApi> {
    let conns = sys.connections_as(user);
    let loc = Arc::new(MgmtLocator::new(sys.access_points(), conns.clone()));
    RsvcClient::new("p", loc, conns, EngineSystem::client_config())
}

async fn connect(c: &RsvcClient<PoolApi>) -> Result<Handle, ClientError<PoolError>> {
    match c
        .call(&PoolRequest::Connect {
            client: "t".into(),
            ttl_ms: 60_000,
        })
        .await?
    {
        PoolResponse::Connected { handle, .. } => Ok(handle),
        other => panic!("connect answered {other:?}"),
    }
}

fn denied<T: std::fmt::Debug>(r: Result<T, ClientError<PoolError>>, what: &str) -> String {
    match r {
        Err(ClientError::Service(PoolError::Denied(why))) => why,
        other => panic!("{what}: expected permission denied, got {other:?}"),
    }
}

async fn set_acl(c: &RsvcClient<PoolApi>, acl: &str) -> Result<PoolResponse, ClientError<PoolError>> {
    c.call(&PoolRequest::PropSet {
        name: "acl".into(),
        value: acl.into(),
    })
    .await
}

async fn cont(
    c: &RsvcClient<PoolApi>,
    handle: Handle,
    req: ContRequest,
) -> Result<PoolResponse, ClientError<PoolError>> {
    c.call(&PoolRequest::Cont { handle, req }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_acl_is_checked_at_connect_and_carried_by_the_handle() {
    let sys = system().await;
    let (admin, alice, bob) = (
        pool_as(&sys, "admin"),
        pool_as(&sys, "alice"),
        pool_as(&sys, "bob"),
    );

    // The default ACL: the owner (root) and the owner group (admin) only.
    connect(&admin).await.expect("the admin group may connect");
    let why = denied(connect(&alice).await, "alice before any grant");
    assert!(why.contains("alice") && why.contains("connect"), "{why}");

    // A bad ACL is refused and changes nothing; only the owner or an admin may set one.
    match set_acl(&admin, "A::alice@:rx").await {
        Err(ClientError::Service(PoolError::Invalid(why))) => assert!(why.contains("ACL"), "{why}"),
        other => panic!("a bad ACL was taken: {other:?}"),
    }
    denied(set_acl(&alice, "A::alice@:rw").await, "alice setting the ACL");

    set_acl(&admin, "A::OWNER@:rw,A:G:GROUP@:rw,A::alice@:r,A:G:staff@:r")
        .await
        .unwrap();
    let h = connect(&alice).await.expect("alice may read now");
    denied(connect(&bob).await, "bob, in no group the ACL names");

    // A read-only handle reads, and cannot write or create containers.
    alice.call(&PoolRequest::AttrList).await.expect("read");
    denied(
        alice
            .call(&PoolRequest::AttrSet {
                name: "a".into(),
                value: b"v".to_vec(),
            })
            .await,
        "alice writing with read rights",
    );
    let create = |label: &str| ContRequest::Create {
        label: label.into(),
        props: vec![],
    };
    denied(
        cont(&alice, h, create("c1")).await,
        "a container from a read-only handle",
    );

    // The handle is alice's alone: bob holding its bytes has no handle.
    match cont(&bob, h, ContRequest::List).await {
        Err(ClientError::Service(PoolError::NoHandle)) => {}
        other => panic!("bob used alice's handle: {other:?}"),
    }

    // Granting write reaches the open handle at once.
    set_acl(&admin, "A::OWNER@:rw,A:G:GROUP@:rw,A::alice@:rw")
        .await
        .unwrap();
    cont(&alice, h, create("c1"))
        .await
        .expect("alice's handle gained write");

    // Revoking read closes alice's handle, and she cannot connect again.
    set_acl(&admin, "A::OWNER@:rw,A:G:GROUP@:rw").await.unwrap();
    match cont(&alice, h, ContRequest::List).await {
        Err(ClientError::Service(PoolError::NoHandle)) => {}
        other => panic!("a revoked handle still works: {other:?}"),
    }
    denied(connect(&alice).await, "alice after the revocation");

    // Eviction is system administration.
    denied(bob.call(&PoolRequest::Evict).await, "bob evicting");
    admin.call(&PoolRequest::Evict).await.expect("the admin evicts");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_is_checked_against_its_own_acl() {
    let sys = system().await;
    let (admin, alice, bob) = (
        pool_as(&sys, "admin"),
        pool_as(&sys, "alice"),
        pool_as(&sys, "bob"),
    );
    set_acl(&admin, "A::OWNER@:rw,A:G:GROUP@:rw,A::EVERYONE@:rw")
        .await
        .unwrap();
    let ha = connect(&alice).await.unwrap();
    let hb = connect(&bob).await.unwrap();
    cont(
        &alice,
        ha,
        ContRequest::Create {
            label: "mine".into(),
            props: vec![],
        },
    )
    .await
    .expect("alice creates a container");
    // Alice owns it; bob is neither its owner nor in its group (alice's first, staff).
    match cont(&alice, ha, ContRequest::PropGet { label: "mine".into() }).await {
        Ok(PoolResponse::Cont(ContResponse::Props(p))) => {
            assert!(p.contains(&("owner".into(), "alice".into())), "{p:?}");
            assert!(p.contains(&("owner_group".into(), "staff".into())), "{p:?}");
        }
        other => panic!("{other:?}"),
    }
    let open = |label: &str| ContRequest::Open { label: label.into() };
    // Bob's list leaves out what he may not read; alice's shows it.
    let labels = |r: Result<PoolResponse, ClientError<PoolError>>| match r {
        Ok(PoolResponse::Cont(ContResponse::List(l))) => l.into_iter().map(|i| i.label).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert!(labels(cont(&bob, hb, ContRequest::List).await).is_empty());
    assert_eq!(labels(cont(&alice, ha, ContRequest::List).await), ["mine"]);
    // A container handle works under its own pool handle only.
    let ch = match cont(&alice, ha, open("mine")).await {
        Ok(PoolResponse::Cont(ContResponse::Opened { cont_handle })) => cont_handle,
        other => panic!("{other:?}"),
    };
    match cont(&bob, hb, ContRequest::Close { cont_handle: ch }).await {
        Err(ClientError::Service(PoolError::Cont(cont_svc::ContError::NoHandle))) => {}
        other => panic!("bob closed alice's container handle: {other:?}"),
    }
    // Handles are capabilities: bob lists his own, an admin every one.
    let handles = |r: Result<PoolResponse, ClientError<PoolError>>| match r {
        Ok(PoolResponse::Handles(h)) => h.into_iter().map(|i| i.handle).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(handles(bob.call(&PoolRequest::ListHandles).await), [hb]);
    assert_eq!(handles(admin.call(&PoolRequest::ListHandles).await).len(), 2);
    let why = denied(
        cont(&bob, hb, open("mine")).await,
        "bob opening alice's container",
    );
    assert!(why.contains("open the container"), "{why}");
    // Only the owner (or an admin) may change who may use it.
    let grant = |acl: &str| ContRequest::PropSet {
        label: "mine".into(),
        name: "acl".into(),
        value: acl.into(),
    };
    denied(cont(&bob, hb, grant("A::bob@:rw")).await, "bob granting himself");
    cont(&alice, ha, grant("A::OWNER@:rw,A::bob@:r"))
        .await
        .expect("the owner grants");
    cont(&bob, hb, open("mine")).await.expect("bob may read now");
    denied(
        cont(
            &bob,
            hb,
            ContRequest::AttrSet {
                label: "mine".into(),
                name: "a".into(),
                value: vec![1],
            },
        )
        .await,
        "bob writing a container he may only read",
    );
    sys.shutdown().await;
}
