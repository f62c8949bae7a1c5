//! Mutual TLS with real processes: three `pool-svc serve` engines configured with a `[tls]`
//! section (rsvc-tests' [`RsvcSystem`] with [`Spec::tls`]), and the `pool-svc` client command
//! run as a user runs it, with `--tls-ca/--tls-cert/--tls-key`. An admin administers; a user
//! outside the admin group is refused with exit 6 and a message that says why; a client
//! without TLS gets nowhere; a client certificate of another CA is refused with exit 6 and a
//! message that names the CA problem, whichever side finds it.

use std::path::Path;
use std::process::Output;

use rsvc_client::tls::TlsPaths;
use rsvc_server::certs::{self, CertSpec};
use rsvc_tests::kit::DEADLINE;
use rsvc_tests::rsvc::{EngineCmd, RsvcSystem, Spec, Timers};
use tempfile::TempDir;

const POOL_SVC: &str = env!("CARGO_BIN_EXE_pool-svc");

/// The exit code of a permission or certificate refusal (`exit::DENIED`).
const DENIED: i32 = 6;

async fn tls_system(dir: &Path) -> RsvcSystem {
    let spec = Spec {
        cluster: "tls".into(),
        tls: true,
        ..Spec::new(3, Timers::fast())
    };
    RsvcSystem::start_spec(dir, EngineCmd::pool_svc(POOL_SVC), spec)
        .await
        .unwrap()
}

/// Runs `pool-svc ARGS --access-point ... TLS` as a user would: nothing of this process's
/// environment that would choose the engines or the certificates for it.
async fn pool_svc(sys: &RsvcSystem, args: &[&str], tls: &[String]) -> Output {
    pool_svc_env(sys, args, tls, &[]).await
}

/// [`pool_svc`] with `env` set.
async fn pool_svc_env(sys: &RsvcSystem, args: &[&str], tls: &[String], env: &[(&str, String)]) -> Output {
    let mut cmd = tokio::process::Command::new(POOL_SVC);
    cmd.args(args)
        .args(["--access-point", &sys.access_point_flag()])
        .args(tls)
        .env_remove("RUST_LOG")
        .env_remove("RSVC_ACCESS_POINTS")
        .env_remove("RSVC_TLS_CA")
        .env_remove("RSVC_TLS_CERT")
        .env_remove("RSVC_TLS_KEY")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("pool-svc {args:?} ran past {DEADLINE:?}"))
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_over_tls_admin_administers_others_are_refused_with_the_reason() {
    let tmp = TempDir::new().unwrap();
    let sys = tls_system(tmp.path()).await;
    assert!(sys.tls_flags("admin").len() == 6 && sys.certs_dir().is_some());

    // The admin creates a pool: the engines replicate it among themselves over TLS.
    let out = pool_svc(
        &sys,
        &["pool", "create", "--label", "tank", "--replicas", "3", "--json"],
        &sys.tls_flags("admin"),
    )
    .await;
    assert!(out.status.success(), "admin's pool create: {}", stderr(&out));
    assert!(
        stderr(&out).is_empty(),
        "a healthy call printed on stderr: {}",
        stderr(&out)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["label"], "tank", "{created}");
    assert_eq!(created["replicas"].as_array().unwrap().len(), 3, "{created}");
    // The harness's own clients are the admin over TLS too.
    let leader = sys.leader("pool", "tank", DEADLINE).await.unwrap();
    sys.pinger(leader).await.unwrap().ping().await.unwrap();

    // alice (group staff) may read the directory (her files given in the environment this
    // time), not administer it.
    let out = pool_svc_env(&sys, &["pool", "list", "--json"], &[], &sys.tls_env("alice")).await;
    assert!(out.status.success(), "alice's pool list: {}", stderr(&out));
    assert!(stdout(&out).contains("\"tank\""), "{}", stdout(&out));
    let out = pool_svc(
        &sys,
        &["pool", "create", "--label", "alices", "--replicas", "3"],
        &sys.tls_flags("alice"),
    )
    .await;
    let why = stderr(&out);
    assert_eq!(out.status.code(), Some(DENIED), "alice's pool create: {why}");
    assert!(
        why.contains("permission denied") && why.contains("alice") && why.contains("admin group"),
        "{why}"
    );
    // The same as JSON, for scripts: code "denied".
    let out = pool_svc(
        &sys,
        &["pool", "create", "--label", "alices", "--replicas", "3", "--json"],
        &sys.tls_flags("bob"),
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(DENIED),
        "bob's pool create: {}",
        stdout(&out)
    );
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["error"]["code"], "denied", "{err}");
    assert_eq!(err["error"]["exit"], DENIED, "{err}");

    // No TLS at all: the engines speak nothing else. The command fails within its timeout.
    let out = pool_svc(&sys, &["pool", "list", "--timeout", "3"], &[]).await;
    let why = stderr(&out);
    println!("without TLS: exit {:?}: {why}", out.status.code());
    assert!(
        !out.status.success(),
        "a plain client listed pools: {}",
        stdout(&out)
    );
    assert!(why.contains("give this client --tls-ca"), "no hint at TLS: {why}");

    // A client certificate of another CA, with that CA: the client cannot verify the engines.
    let foreign = tmp.path().join("foreign");
    certs::generate(&CertSpec::new(&foreign).user("mallory", &["admin"])).unwrap();
    let (cert, key) = certs::user_files(&foreign, "mallory");
    let mallory = TlsPaths {
        ca: foreign.join(certs::CA_CERT),
        cert,
        key,
    };
    let out = pool_svc(
        &sys,
        &["pool", "create", "--label", "mallorys", "--replicas", "3"],
        &TlsPaths::flags(&mallory),
    )
    .await;
    let why = stderr(&out);
    assert_eq!(out.status.code(), Some(DENIED), "mallory's pool create: {why}");
    assert!(why.contains("not signed by this client's CA"), "{why}");

    // The same certificate with the cluster's CA file: now the engines refuse the client.
    let with_cluster_ca = TlsPaths {
        ca: sys.tls_paths("admin").unwrap().ca,
        ..mallory
    };
    let out = pool_svc(
        &sys,
        &["pool", "create", "--label", "mallorys", "--replicas", "3"],
        &TlsPaths::flags(&with_cluster_ca),
    )
    .await;
    let why = stderr(&out);
    assert_eq!(out.status.code(), Some(DENIED), "mallory's pool create: {why}");
    assert!(
        why.contains("the engine rejected this client's certificate"),
        "{why}"
    );

    // Nothing of theirs was created.
    let out = pool_svc(&sys, &["pool", "list", "--json"], &sys.tls_flags("admin")).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let pools: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let labels: Vec<&str> = pools
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["tank"], "{pools}");
}
