//! # rsvc-tests: the system-level harness
//!
//! Real processes on loopback, driven from outside, the way an operator or a fault would meet
//! them. [`proc`] runs one child process that cannot outlive the harness: `kill_on_drop`, and
//! `PR_SET_PDEATHSIG` so that even a harness killed by SIGKILL takes its children with it.
//! [`rsvc`] starts a system of `pool-svc serve` engines, each with its own data directory and
//! timers, finds who leads what, and kills, pauses, stops and restarts engines by signal.
//! [`etcd`] does the same for a real etcd cluster (Debian's `etcd-server`), so that a benchmark
//! can compare the two side by side, in one run, on one machine. [`kit`] is what every crate's
//! integration tests share: the deadlines, the wait, and a system of in-process engines.
//!
//! Everything waits on conditions with deadlines ([`wait_for`]); nothing sleeps for a fixed
//! time to let something happen. Every port comes from the OS.
//!
//! ## CAVEATS
//!
//! - A port is found by binding port 0 and closing it before the child binds it. Another
//!   process could take it in between; a start that fails that way is reported, not retried.
//! - Pauses are SIGSTOP/SIGCONT of the whole process: they stop its clock-driven work too,
//!   which is what a stalled VM looks like, not what a slow disk looks like.

pub mod elle;
pub mod etcd;
pub mod faultnet;
pub mod fuzz;
pub mod kit;
pub mod lincheck;
pub mod nemesis;
pub mod proc;
pub mod rsvc;

use std::time::{Duration, Instant};

/// The hidden `engine serve` subcommand of the harness binaries (rsvc-bench, rsvc-fault,
/// rsvc-fuzz): each re-executes itself as `<binary> engine serve ...` for its engines.
#[derive(clap::Subcommand, Debug)]
pub enum EngineSubcommand {
    /// See `pool-svc serve`.
    Serve(Box<rsvc_server::cli::ServeArgs>),
}

impl EngineSubcommand {
    /// Runs it; `name` names the process in its logs and errors (`rsvc-bench engine`).
    pub fn run(self, name: &'static str) -> std::process::ExitCode {
        match self {
            EngineSubcommand::Serve(args) => serve_engine(name, *args),
        }
    }
}

/// Runs a `pool-svc serve` engine inside a harness binary (rsvc-bench, rsvc-fault), which
/// re-executes itself as `<name> engine serve ...`, so that the engine under test is always the
/// one built with the harness.
pub fn serve_engine(name: &'static str, args: rsvc_server::cli::ServeArgs) -> std::process::ExitCode {
    rsvc_server::cli::run_main(name, rsvc_server::cli::Logging::Serve, async {
        rsvc_server::cli::serve("pool-svc", args, pool_svc::factories())
            .await
            .map_err(|e| (2, e))
    })
}

/// How long a harness waits for a condition unless told otherwise.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `f` every `every` until it returns `Some`, or fails after `deadline` naming `what`.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut f: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            return Err(format!("timed out after {deadline:?} waiting for {what}"));
        }
        tokio::time::sleep(every).await;
    }
}

/// A free TCP port on 127.0.0.1, as the OS hands it out (see the caveat above).
pub fn free_port() -> Result<u16, String> {
    free_port_on(std::net::Ipv4Addr::LOCALHOST.into())
}

/// A free TCP port on `ip`, as the OS hands it out (see the caveat above).
pub fn free_port_on(ip: std::net::IpAddr) -> Result<u16, String> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on {ip}: {e}"))
}
