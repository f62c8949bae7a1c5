//! `rsvc-fault`: the fault suite from the command line. Real engines, a checked workload and
//! nemeses (see `rsvc_tests::nemesis`); prints a line per run and a table at the end.
//!
//! ```sh
//! cargo run --release -p rsvc-tests --bin rsvc-fault -- --quick         # CI's fixed seeds
//! cargo run --release -p rsvc-tests --bin rsvc-fault -- --runs 200      # random seeds
//! cargo run --release -p rsvc-tests --bin rsvc-fault -- --seed 7 --faults kill,isolate
//! ```
//!
//! The engines are this binary, re-executed as `rsvc-fault engine serve ...` (what
//! `pool-svc serve` runs), so the engine under test is the one built with the suite. A failing
//! run keeps its directory (engine logs, `history.txt`) and its seed replays the same faults.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// How many times a seed runs before a harness error skips it.
const HARNESS_ATTEMPTS: u32 = 3;
use rsvc_tests::nemesis::{self, FaultKind, RunConfig};
use rsvc_tests::rsvc::{EngineCmd as Program, Timers};

#[derive(Parser, Debug)]
#[command(
    name = "rsvc-fault",
    about = "The fault suite: real engines, nemeses, a linearizability checker"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// CI's quick profile: fixed seeds, every nemesis, about two minutes.
    #[arg(long, conflicts_with_all = ["runs", "seed"])]
    quick: bool,
    /// How many runs (random seeds unless --seed is given: then seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// The first seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Engines per run (3 or 5; the pool has 3 replicas).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..=9))]
    engines: u32,
    /// Seconds of workload and faults per run.
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// Registers.
    #[arg(long, default_value_t = 16)]
    keys: u32,
    /// Faults to choose from, comma-separated (default: all that can run here).
    #[arg(long, value_delimiter = ',', value_parser = FaultKind::parse)]
    faults: Option<Vec<FaultKind>>,
    /// The engines' production timers instead of --fast-timers.
    #[arg(long)]
    default_timers: bool,
    /// Where runs keep their files (a failing run's stay).
    #[arg(long, default_value = "rsvc-fault-runs")]
    dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs an engine (what `pool-svc serve` runs); the suite starts its systems this way.
    #[command(hide = true)]
    Engine {
        #[command(subcommand)]
        cmd: rsvc_tests::EngineSubcommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Engine { cmd }) = cli.cmd {
        return cmd.run("rsvc-fault engine");
    }
    rsvc_server::cli::run_main("rsvc-fault", rsvc_server::cli::Logging::Command, async {
        suite(cli).await.map_err(|e| (1, e))
    })
}

async fn suite(cli: Cli) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let program = Program {
        program: exe,
        prefix: vec!["engine".into(), "serve".into()],
    };
    let dir = std::path::absolute(&cli.dir).map_err(|e| e.to_string())?;
    let runs: Vec<RunConfig> = if cli.quick {
        nemesis::quick_profile(program, &dir)
    } else {
        let first = cli.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
        (0..cli.runs)
            .map(|i| {
                let mut c = RunConfig::new(
                    first + i,
                    cli.engines,
                    Duration::from_secs(cli.secs),
                    program.clone(),
                    &dir,
                );
                c.clients = cli.clients;
                c.keys = cli.keys;
                if let Some(f) = &cli.faults {
                    c.faults = f.clone();
                }
                if cli.default_timers {
                    c.timers = Timers::defaults();
                }
                c
            })
            .collect()
    };
    let mut reports = Vec::new();
    let mut harness_errors = Vec::new();
    for cfg in runs {
        let (seed, engines) = (cfg.seed, cfg.engines);
        // A harness error (a system that would not start: a port taken between the harness
        // choosing it and the engine binding it) is not a finding: try the seed again, and
        // go on with the batch if it keeps failing.
        let mut attempt = 0;
        let r = loop {
            attempt += 1;
            match nemesis::run(cfg.clone()).await {
                Ok(r) => break Some(r),
                Err(nemesis::RunError::Start(e)) if attempt < HARNESS_ATTEMPTS => {
                    println!("seed {seed}: harness error ({e}); running it again");
                }
                Err(nemesis::RunError::Start(e)) => {
                    println!("seed {seed}: harness error ({e}); skipped");
                    harness_errors.push(seed);
                    break None;
                }
                // A run that failed after its system started is a finding, not noise.
                Err(e) => {
                    return Err(format!(
                        "seed {seed}: {e}; its files are in {}",
                        cfg.dir.display()
                    ))
                }
            }
        };
        let Some(r) = r else { continue };
        println!(
            "seed {seed} ({engines} engines): {} ops, {} txns, {} faults, {} violations, {} txn anomalies, {} lost, {} stuck{}",
            r.ops,
            r.txns,
            r.faults.len(),
            r.violations.len(),
            r.txn_anomalies.len(),
            r.lost.len(),
            r.stuck.len(),
            if r.passed() {
                String::new()
            } else {
                format!("  FAILED, kept in {}", r.dir.display())
            }
        );
        for v in r
            .violations
            .iter()
            .chain(&r.txn_anomalies)
            .chain(&r.lost)
            .chain(&r.stuck)
        {
            println!("  {v}");
        }
        for f in r.faults.iter().filter(|f| f.deposed == Some(true)) {
            println!("  a pause of {} deposed the healthy leader", f.target);
        }
        reports.push(r);
    }
    println!("\n{}", nemesis::table(&reports));
    let failed: Vec<u64> = reports.iter().filter(|r| !r.passed()).map(|r| r.seed).collect();
    if !harness_errors.is_empty() {
        println!("seeds skipped after harness errors: {harness_errors:?}");
    }
    if failed.is_empty() && harness_errors.is_empty() {
        Ok(())
    } else if failed.is_empty() {
        Err(format!("harness errors on seeds {harness_errors:?}"))
    } else {
        Err(format!("failing seeds: {failed:?}"))
    }
}
