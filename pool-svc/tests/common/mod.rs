//! A system of real `pool-svc serve` processes on loopback for the binaries' end-to-end tests.
//! Every engine is killed when its handle drops (`kill_on_drop`), and the data lives in a
//! temporary directory removed with the [`System`], so a failing test leaves nothing behind.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};

pub const POOL_SVC: &str = env!("CARGO_BIN_EXE_pool-svc");
pub const CONT_SVC: &str = env!("CARGO_BIN_EXE_cont-svc");
pub const DEADLINE: Duration = Duration::from_secs(30);
pub const POLL: Duration = Duration::from_millis(100);

/// One engine process.
pub struct Engine {
    pub rank: u32,
    pub addr: String,
    pub child: tokio::process::Child,
}

/// What became of a `serve` process: it printed its ready line, or it exited.
pub enum Started {
    Ready(Engine),
    Exited { code: Option<i32>, stderr: String },
}

/// Engine processes of one cluster, and their data.
pub struct System {
    pub tmp: TempDir,
    pub engines: Vec<Option<Engine>>,
    /// `rank@addr,...` of the access points.
    pub aps: String,
}

/// Starts `pool-svc serve` with `args`, waits for its ready line or its exit, and returns
/// which. Its stderr goes to `log`.
pub async fn serve(rank: u32, args: &[String], log: &Path, env: &[(&str, &str)]) -> Started {
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
    pub async fn start(n: u32) -> System {
        let tmp = TempDir::new().unwrap();
        let mut sys = System {
            tmp,
            engines: Vec::new(),
            aps: String::new(),
        };
        let mut aps: Vec<String> = Vec::new();
        for rank in 1..=n {
            let mut args = sys.args(rank, "127.0.0.1:0");
            for a in &aps {
                args.extend(["--access-point".to_string(), a.clone()]);
            }
            args.extend(["--access-point".to_string(), format!("{rank}@")]);
            let e = sys.start_engine(rank, &args).await;
            aps.push(format!("{rank}@{}", e.addr));
            sys.engines.push(Some(e));
        }
        sys.aps = aps.join(",");
        sys.wait_ranks(n as usize);
        sys
    }

    /// The `serve` flags of engine `rank` in this system, without access points.
    pub fn args(&self, rank: u32, listen: &str) -> Vec<String> {
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

    pub fn data_dir(&self, rank: u32) -> PathBuf {
        self.tmp.path().join(format!("e{rank}"))
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.tmp.path().join(format!("{name}.log"))
    }

    /// Starts an engine that must become ready.
    pub async fn start_engine(&self, rank: u32, args: &[String]) -> Engine {
        let log = self.log(&format!("engine{rank}-{}", rand_suffix()));
        match serve(rank, args, &log, &[]).await {
            Started::Ready(e) => e,
            Started::Exited { code, stderr } => panic!("engine {rank} exited ({code:?}): {stderr}"),
        }
    }

    /// The engine of `rank`.
    pub fn engine(&mut self, rank: u32) -> &mut Engine {
        self.engines[(rank - 1) as usize].as_mut().unwrap()
    }

    /// Runs a client command against this system, as a user would: no `RUST_LOG`.
    pub fn run(&self, bin: &str, args: &[&str]) -> Output {
        Command::new(bin)
            .args(args)
            .args(["--access-point", &self.aps])
            .env_remove("RUST_LOG")
            .env_remove("RSVC_ACCESS_POINTS")
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed, print nothing on stderr, and print JSON.
    pub fn json(&self, bin: &str, args: &[&str]) -> serde_json::Value {
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
    pub fn fails(&self, bin: &str, args: &[&str], code: i32) -> String {
        let out = self.run(bin, args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "{bin} {args:?}: {stderr}");
        stderr
    }

    /// Waits until `n` engines are up in the system map.
    pub fn wait_ranks(&self, n: usize) {
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
    pub fn wait_for<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            std::thread::sleep(POLL);
        }
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
