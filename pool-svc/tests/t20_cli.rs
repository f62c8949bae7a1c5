//! The binaries end to end: real engine processes, commands parsed from `--json`, exit codes,
//! and the demo in its short mode.

use std::process::Command;

mod common;
use common::{System, CONT_SVC, POOL_SVC};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_and_container_commands() {
    let sys = System::start(3).await;
    let created = sys.create_pool("tank", 3);
    assert_eq!(created["replicas"].as_array().unwrap().len(), 3);
    let list = sys.json(POOL_SVC, &["pool", "list", "--json"]);
    assert_eq!(list[0]["label"], "tank");
    let q = sys.json(POOL_SVC, &["pool", "query", "--label", "tank", "--json"]);
    let leader = q["leader"].as_u64().unwrap();
    // Replicas are objects in every command (rank and address, here with their state too).
    let reps = q["replicas"].as_array().unwrap();
    assert!(reps.iter().any(|r| r["rank"].as_u64() == Some(leader)), "{q}");
    assert!(
        reps.iter().all(|r| r["state"] == "up" && r["addr"].is_string()),
        "{q}"
    );
    assert!(list[0]["replicas"][0]["rank"].is_u64(), "{list}");

    let c = sys.json(POOL_SVC, &["pool", "connect", "--label", "tank", "--json"]);
    assert_eq!(c["disconnected"], true);
    assert_eq!(c["handle"].as_str().unwrap().len(), 32);

    sys.json(
        CONT_SVC,
        &["--pool", "tank", "create", "c1", "--prop", "layout=ec", "--json"],
    );
    let conts = sys.json(CONT_SVC, &["--pool", "tank", "list", "--json"]);
    assert_eq!(conts.as_array().unwrap().len(), 1);
    // One encoding for a 16-byte id: 32 hex digits, like a pool handle.
    assert_eq!(conts[0]["uuid"].as_str().map(str::len), Some(32), "{conts}");
    let oids = sys.json(CONT_SVC, &["--pool", "tank", "alloc-oids", "c1", "10", "--json"]);
    assert_eq!(
        (oids["start"].as_u64(), oids["count"].as_u64()),
        (Some(1), Some(10))
    );
    let snap = sys.json(CONT_SVC, &["--pool", "tank", "snapshot", "c1", "--json"]);
    assert!(snap["epoch"].as_u64().unwrap() > 0);
    let status = sys.json(POOL_SVC, &["system", "status", "--json"]);
    assert!(status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["label"] == "tank"));
    // The management service is listed first, with its replicas, leader and term.
    let m = &status["instances"][0];
    assert_eq!(m["class"], "mgmt", "{status}");
    assert_eq!(m["replicas"].as_array().unwrap().len(), 3, "{m}");
    assert!(
        m["leader"].as_u64().is_some() && m["term"].as_u64().is_some(),
        "{m}"
    );

    // Clear errors and exit codes.
    let unknown = sys.run(POOL_SVC, &["pool", "query", "--label", "nope"]);
    assert_eq!(unknown.status.code(), Some(5), "unknown pool exits 5");
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let dup = sys.run(POOL_SVC, &["pool", "create", "--label", "tank"]);
    assert_eq!(dup.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists"));
    let usage = Command::new(POOL_SVC).args(["pool", "create"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2), "missing flags exit 2");
    let bad_ap = Command::new(POOL_SVC)
        .args(["pool", "list", "--access-point", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(bad_ap.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_ap.stderr).contains("rank@host:port"));
    let nothing = Command::new(POOL_SVC)
        .args([
            "pool",
            "list",
            "--access-point",
            "1@127.0.0.1:1",
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(nothing.status.code(), Some(3), "no quorum reachable exits 3");

    let destroyed = sys.json(POOL_SVC, &["pool", "destroy", "--label", "tank", "--json"]);
    assert_eq!(destroyed["destroyed"], "tank");
}

/// With `--json`, a failed command prints its error as JSON on stdout, names it by code, and
/// exits with the code the docs list: 1 refused, 2 usage, 3 unreachable, 5 not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_out_as_json_with_their_exit_codes() {
    let sys = System::start(3).await;
    sys.create_pool("tank", 3);
    sys.json(CONT_SVC, &["--pool", "tank", "create", "c1", "--json"]);
    let error = |out: std::process::Output, exit: i32, code: &str| {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(exit), "{stdout}");
        assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        assert_eq!(v["error"]["code"], code, "{v}");
        assert_eq!(v["error"]["exit"], exit, "{v}");
        v["error"]["message"].as_str().unwrap().to_string()
    };
    let m = error(
        sys.run(POOL_SVC, &["pool", "query", "--label", "nope", "--json"]),
        5,
        "not_found",
    );
    assert!(m.contains("pool \"nope\" does not exist"), "{m}");
    let m = error(
        sys.run(
            POOL_SVC,
            &["pool", "get-attr", "--label", "tank", "nosuch", "--json"],
        ),
        5,
        "not_found",
    );
    assert!(m.contains("no attribute \"nosuch\""), "{m}");
    error(
        sys.run(CONT_SVC, &["--pool", "tank", "query", "nosuch", "--json"]),
        5,
        "not_found",
    );
    let m = error(
        sys.run(POOL_SVC, &["pool", "create", "--label", "tank", "--json"]),
        1,
        "refused",
    );
    assert!(m.contains("exists"), "{m}");
    // A usage error found by the parser, before anything is sent.
    let m = error(
        Command::new(POOL_SVC)
            .args(["pool", "create", "--json"])
            .output()
            .unwrap(),
        2,
        "usage",
    );
    assert!(m.contains("--label"), "{m}");
    error(
        Command::new(POOL_SVC)
            .args([
                "pool",
                "list",
                "--access-point",
                "1@127.0.0.1:1",
                "--timeout",
                "0.5",
                "--json",
            ])
            .env_remove("RSVC_ACCESS_POINTS")
            .output()
            .unwrap(),
        3,
        "unreachable",
    );
}

#[test]
fn the_demo_runs_in_short_mode_and_tells_one_story() {
    let out = Command::new(POOL_SVC)
        .args(["demo", "--quick"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stdout}\n{stderr}");
    assert!(stdout.contains("| acknowledged writes lost | 0 |"), "{stdout}");
    assert!(stdout.contains("demo finished"), "{stdout}");
    // Regression: library log lines, with colour codes, were interleaved with the story.
    assert!(stderr.is_empty(), "the demo wrote on stderr: {stderr}");
    for noise in ["\x1b[", " INFO ", " WARN ", " ERROR ", "rsvc_client::"] {
        assert!(
            !stdout.contains(noise),
            "log noise {noise:?} in the story: {stdout}"
        );
    }
    eprintln!("{stdout}");
}

/// One convention for both binaries: the pool is `--pool` in cont-svc and `--label` or `--pool`
/// in pool-svc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_is_named_the_same_way_in_both_binaries() {
    let sys = System::start(3).await;
    sys.json(
        POOL_SVC,
        &["pool", "create", "--pool", "tank", "--replicas", "3", "--json"],
    );
    let q = sys.json(POOL_SVC, &["pool", "query", "--pool", "tank", "--json"]);
    assert_eq!(q["label"], "tank");
    sys.json(CONT_SVC, &["--pool", "tank", "create", "c1", "--json"]);
    let help = Command::new(POOL_SVC)
        .args(["pool", "query", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--pool"));
}
