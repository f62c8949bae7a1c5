//! The binaries' end-to-end tests: a system of real `pool-svc serve` processes on loopback
//! (rsvc-tests' [`RsvcSystem`]: every engine dies with its handle and with the test process),
//! its data in a temporary directory removed with the [`System`], and the client commands run
//! as a user runs them. A failing test leaves nothing behind.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rsvc_tests::rsvc::{EngineCmd, RsvcSystem, Spec, Timers};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};

pub(crate) const POOL_SVC: &str = env!("CARGO_BIN_EXE_pool-svc");
pub(crate) const CONT_SVC: &str = env!("CARGO_BIN_EXE_cont-svc");
pub(crate) use rsvc_tests::kit::DEADLINE;

/// One engine process.
pub(crate) struct Engine {
    pub rank: u32,
    pub addr: String,
    pub child: tokio::process::Child,
}

/// What became of a `serve` process: it printed its ready line, or it exited.
pub(crate) enum Started {
    Ready(Engine),
    Exited { code: Option<i32>, stderr: String },
}

/// A system of `pool-svc serve` engines (rsvc-tests' harness), and the client commands a user
/// would run against it.
pub(crate) struct System {
    /// The engines; dropped (killed) before their data directory.
    pub rsvc: RsvcSystem,
    /// `rank@addr,...` of the access points.
    pub aps: String,
    pub tmp: TempDir,
}

/// Starts `pool-svc serve` with `args`, waits for its ready line or its exit, and returns
/// which. Its stderr goes to `log`.
pub(crate) async fn serve(rank: u32, args: &[String], log: &Path, env: &[(&str, &str)]) -> Started {
    let stderr = std::fs::File::create(log).unwrap();
    let mut cmd = tokio::process::Command::new(POOL_SVC);
    cmd.arg("serve")
        .args(args)
        .env_remove("RSVC_ACCESS_POINTS")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("engine {rank} neither became ready nor exited"))
        .unwrap();
    match line {
        Some(line) if line.contains(" ready ") => {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .unwrap()
                .to_string();
            Started::Ready(Engine { rank, addr, child })
        }
        other => {
            let status = tokio::time::timeout(DEADLINE, child.wait())
                .await
                .unwrap()
                .unwrap();
            let mut stderr = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(l) = other {
                stderr = format!("stdout: {l}\n{stderr}");
            }
            Started::Exited {
                code: status.code(),
                stderr,
            }
        }
    }
}

impl System {
    /// `n` engines, all access points, of cluster `cli`, with fast timers.
    pub(crate) async fn start(n: u32) -> System {
        Self::start_in(n, TempDir::new().unwrap()).await
    }

    /// [`start`](Self::start) with the engines' data directories under `data` (a filesystem
    /// of the test's choosing); configs and logs stay in a temporary directory.
    pub(crate) async fn start_with_data(n: u32, data: &Path) -> System {
        Self::start_with_data_of(n, |rank| Some(data.join(format!("engine{rank}")))).await
    }

    /// [`start`](Self::start) with the data directory of each rank where `data` says (`None`:
    /// the temporary directory), e.g. one engine on a filesystem of its own.
    pub(crate) async fn start_with_data_of(n: u32, data: impl Fn(u32) -> Option<PathBuf>) -> System {
        let tmp = TempDir::new().unwrap();
        for rank in 1..=n {
            if let Some(on) = data(rank) {
                std::fs::create_dir_all(&on).unwrap();
                std::os::unix::fs::symlink(&on, tmp.path().join(format!("engine{rank}"))).unwrap();
            }
        }
        Self::start_in(n, tmp).await
    }

    async fn start_in(n: u32, tmp: TempDir) -> System {
        let spec = Spec {
            cluster: "cli".into(),
            ..Spec::new(n, Timers::fast())
        };
        let rsvc = RsvcSystem::start_spec(tmp.path(), EngineCmd::pool_svc(POOL_SVC), spec)
            .await
            .unwrap();
        let aps = rsvc.access_point_flag();
        let sys = System { rsvc, aps, tmp };
        sys.wait_ranks(n as usize);
        sys
    }

    /// The `serve` flags of engine `rank` in this system, without access points.
    pub(crate) fn args(&self, rank: u32, listen: &str) -> Vec<String> {
        let mut a: Vec<String> = [
            "--rank",
            &rank.to_string(),
            "--listen",
            listen,
            "--cluster",
            "cli",
            "--fast-timers",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push("--data-dir".into());
        a.push(self.data_dir(rank).display().to_string());
        a
    }

    pub(crate) fn data_dir(&self, rank: u32) -> PathBuf {
        self.rsvc.data_dir(rank)
    }

    pub(crate) fn log(&self, name: &str) -> PathBuf {
        self.tmp.path().join(format!("{name}.log"))
    }

    /// Runs a client command against this system, as a user would: no `RUST_LOG`.
    pub(crate) fn run(&self, bin: &str, args: &[&str]) -> Output {
        Command::new(bin)
            .args(args)
            .args(["--access-point", &self.aps])
            .env_remove("RUST_LOG")
            .env_remove("RSVC_ACCESS_POINTS")
            .output()
            .unwrap()
    }

    /// Creates pool `label` with `replicas` replicas (`pool create`); its JSON answer.
    pub(crate) fn create_pool(&self, label: &str, replicas: u32) -> serde_json::Value {
        let n = replicas.to_string();
        self.json(
            POOL_SVC,
            &["pool", "create", "--label", label, "--replicas", &n, "--json"],
        )
    }

    /// Sets attribute `key` of pool `label` to `value` (`pool set-attr`); its JSON answer.
    pub(crate) fn set_attr(&self, label: &str, key: &str, value: &str) -> serde_json::Value {
        self.json(
            POOL_SVC,
            &["pool", "set-attr", "--label", label, key, value, "--json"],
        )
    }

    /// The rank leading pool `label` (`pool query`).
    pub(crate) fn pool_leader(&self, label: &str) -> u64 {
        self.json(POOL_SVC, &["pool", "query", "--label", label, "--json"])["leader"]
            .as_u64()
            .unwrap()
    }

    /// Hands the leadership of pool `label` to `to` (`pool transfer-leader`); its JSON answer.
    pub(crate) fn transfer_leader(&self, label: &str, to: u64) -> serde_json::Value {
        self.json(
            POOL_SVC,
            &[
                "pool",
                "transfer-leader",
                "--label",
                label,
                "--to",
                &to.to_string(),
                "--json",
            ],
        )
    }

    /// Runs a command that must succeed, print nothing on stderr, and print JSON.
    pub(crate) fn json(&self, bin: &str, args: &[&str]) -> serde_json::Value {
        let out = self.run(bin, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{bin} {args:?} failed: {stderr}");
        assert!(
            stderr.is_empty(),
            "{bin} {args:?}: a healthy call printed on stderr: {stderr}"
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{bin} {args:?}: bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs a command that must fail with `code`; returns its stderr.
    pub(crate) fn fails(&self, bin: &str, args: &[&str], code: i32) -> String {
        let out = self.run(bin, args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "{bin} {args:?}: {stderr}");
        stderr
    }

    /// Waits until `n` engines are up in the system map.
    pub(crate) fn wait_ranks(&self, n: usize) {
        let out = self.run(
            POOL_SVC,
            &["system", "wait", "--ranks", &n.to_string(), "--timeout", "30"],
        );
        assert!(
            out.status.success(),
            "system did not form: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Polls `f` until it returns `Some`, or panics with `what` after the deadline.
    pub(crate) fn wait_for<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        rsvc_tests::kit::wait_until_blocking(what, f)
    }
}
