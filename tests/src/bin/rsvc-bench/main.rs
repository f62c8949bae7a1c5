//! `rsvc-bench`: rsvc measured against etcd and against the physical floor, side by side, in
//! one run, on one machine. See docs/benchmarks.md for the figures and how to read them.
//!
//! ```sh
//! cargo run --release -p rsvc-tests --bin rsvc-bench             # the full run (~10 min)
//! cargo run --release -p rsvc-tests --bin rsvc-bench -- --quick  # CI's smoke run
//! ```
//!
//! The rsvc side is a 3-engine system of the very engine `pool-svc serve` runs (this binary
//! links pool-svc and re-executes itself as `rsvc-bench engine serve ...`, so that the engine
//! under test is always the one built with the bench). The etcd side is a 3-member cluster of
//! Debian's `etcd-server`. Both listen on 127.0.0.1, keep their data in the same directory, and
//! fsync as they do in production. The clients run in this process.

mod lease;
mod report;
mod scale;
mod snapshot;
mod tls;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "rsvc-bench",
    about = "rsvc against etcd and the physical floor, in one run"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs an engine (what `pool-svc serve` runs); the bench starts its systems this way.
    #[command(hide = true)]
    Engine {
        #[command(subcommand)]
        cmd: rsvc_tests::EngineSubcommand,
    },
    /// A participant of the etcd lease-election pattern (see the `lease` workload).
    #[command(hide = true)]
    Campaign(lease::CampaignArgs),
}

/// What to run and how long.
#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// A smoke run for CI: seconds, small N, the same code paths.
    #[arg(long)]
    pub quick: bool,
    /// Print the results as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Where both systems keep their data (default: a temporary directory under the current
    /// one, so that both sit on the filesystem the floor is measured on).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seconds per throughput measurement.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Failover and hand-over trials per system and timer setting.
    #[arg(long)]
    pub trials: Option<usize>,
    /// Concurrent clients for the write and read workloads (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub clients: Option<Vec<usize>>,
    /// Size of the state a new replica joins, in MiB.
    #[arg(long)]
    pub snapshot_mib: Option<usize>,
    /// Idle instance counts of the scale workload (comma-separated, ascending).
    #[arg(long, value_delimiter = ',')]
    pub instances: Option<Vec<usize>>,
    /// Seconds of the quiet window in which the scale workload measures idle CPU.
    #[arg(long)]
    pub idle_seconds: Option<f64>,
    /// Keep the data directories and engine logs after the run (default: removed).
    #[arg(long)]
    pub keep: bool,
    /// Run only these parts (comma-separated; default: all). The floors are always measured.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub only: Vec<Part>,
}

/// The parts of a run, as `--only` names them.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Durable writes at each concurrency.
    Writes,
    /// Linearizable reads at each concurrency.
    Reads,
    /// kill -9 of the leader, production default timers.
    Failover,
    /// SIGTERM of the leader (graceful hand-over), production default timers.
    Handover,
    /// kill -9 of the leader, matched fast timers (300/50 ms).
    Fast,
    /// The etcd lease-election pattern (a leader key on a 5 s lease) against rsvc's failover.
    Lease,
    /// A new replica joining a large state.
    Snapshot,
    /// Many idle service instances.
    Scale,
    /// The cost of mutual TLS: the same system with and without it.
    Tls,
}

impl Opts {
    /// Whether this run includes `part`.
    pub fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }

    /// Seconds per throughput point.
    pub fn seconds(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.unwrap_or(if self.quick { 1.0 } else { 10.0 }))
    }

    /// Trials per failover setting.
    pub fn trials(&self) -> usize {
        self.trials.unwrap_or(if self.quick { 1 } else { 10 })
    }

    /// State size of the snapshot workload.
    pub fn snapshot_mib(&self) -> usize {
        self.snapshot_mib.unwrap_or(if self.quick { 16 } else { 256 })
    }

    /// Instance counts of the scale workload.
    pub fn instances(&self) -> Vec<usize> {
        self.instances
            .clone()
            .unwrap_or_else(|| if self.quick { vec![10] } else { vec![10, 100, 1000] })
    }

    /// The idle window of the scale workload.
    pub fn idle(&self) -> Duration {
        Duration::from_secs_f64(self.idle_seconds.unwrap_or(if self.quick { 3.0 } else { 30.0 }))
    }

    /// Client counts.
    pub fn clients(&self) -> Vec<usize> {
        self.clients.clone().unwrap_or_else(|| {
            if self.quick {
                vec![1, 16]
            } else {
                vec![1, 16, 64, 256]
            }
        })
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Engine { cmd }) = cli.cmd {
        return cmd.run("rsvc-bench engine");
    }
    if let Some(Cmd::Campaign(args)) = cli.cmd {
        return rsvc_server::cli::run_main(
            "rsvc-bench campaign",
            rsvc_server::cli::Logging::Command,
            async { lease::campaign(args).await.map_err(|e| (2, e)) },
        );
    }
    rsvc_server::cli::run_main("rsvc-bench", rsvc_server::cli::Logging::Command, async {
        workloads::run(cli.opts).await.map_err(|e| (1, e))
    })
}
