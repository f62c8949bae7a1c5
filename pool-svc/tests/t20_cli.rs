//! The binaries end to end: real engine processes, commands parsed from `--json`, exit codes,
//! and the demo in its short mode.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};

const POOL_SVC: &str = env!("CARGO_BIN_EXE_pool-svc");
const CONT_SVC: &str = env!("CARGO_BIN_EXE_cont-svc");
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// Engine processes, killed when dropped.
struct System {
    _tmp: TempDir,
    _children: Vec<tokio::process::Child>,
    aps: String,
}

async fn system() -> System {
    let tmp = TempDir::new().unwrap();
    let mut children = Vec::new();
    let mut aps: Vec<String> = Vec::new();
    for rank in 1..=3u32 {
        let mut cmd = tokio::process::Command::new(POOL_SVC);
        cmd.args([
            "serve",
            "--rank",
            &rank.to_string(),
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            "cli",
            "--fast-timers",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join(format!("e{rank}")))
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
        for a in &aps {
            cmd.args(["--access-point", a]);
        }
        cmd.args(["--access-point", &format!("{rank}@")]);
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap()
            .to_string();
        aps.push(format!("{rank}@{addr}"));
        children.push(child);
    }
    let sys = System {
        _tmp: tmp,
        _children: children,
        aps: aps.join(","),
    };
    let start = Instant::now();
    loop {
        let out = sys.run(POOL_SVC, &["system", "status", "--json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["ranks"].as_array().map(Vec::len) == Some(3) {
                break;
            }
        }
        assert!(start.elapsed() < DEADLINE, "system did not form");
        std::thread::sleep(POLL);
    }
    sys
}

impl System {
    fn run(&self, bin: &str, args: &[&str]) -> Output {
        Command::new(bin)
            .args(args)
            .args(["--access-point", &self.aps])
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    }

    fn json(&self, bin: &str, args: &[&str]) -> serde_json::Value {
        let out = self.run(bin, args);
        assert!(
            out.status.success(),
            "{bin} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{bin} {args:?}: bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_and_container_commands() {
    let sys = system().await;
    let created = sys.json(
        POOL_SVC,
        &["pool", "create", "--label", "tank", "--replicas", "3", "--json"],
    );
    assert_eq!(created["replicas"].as_array().unwrap().len(), 3);
    let list = sys.json(POOL_SVC, &["pool", "list", "--json"]);
    assert_eq!(list[0]["label"], "tank");
    let q = sys.json(POOL_SVC, &["pool", "query", "--label", "tank", "--json"]);
    let leader = q["leader"].as_u64().unwrap();
    assert!(q["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r.as_u64() == Some(leader)));

    let c = sys.json(POOL_SVC, &["pool", "connect", "--label", "tank", "--json"]);
    assert_eq!(c["disconnected"], true);
    assert_eq!(c["handle"].as_str().unwrap().len(), 32);

    sys.json(
        CONT_SVC,
        &["--pool", "tank", "create", "c1", "--prop", "layout=ec", "--json"],
    );
    let conts = sys.json(CONT_SVC, &["--pool", "tank", "list", "--json"]);
    assert_eq!(conts.as_array().unwrap().len(), 1);
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

    // Clear errors and exit codes.
    let unknown = sys.run(POOL_SVC, &["pool", "query", "--label", "nope"]);
    assert_eq!(unknown.status.code(), Some(1), "unknown pool exits 1");
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

#[test]
fn the_demo_runs_in_short_mode() {
    let out = Command::new(POOL_SVC)
        .args(["demo", "--quick"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| acknowledged writes lost | 0 |"), "{stdout}");
    assert!(stdout.contains("demo finished"), "{stdout}");
    eprintln!("{stdout}");
}
