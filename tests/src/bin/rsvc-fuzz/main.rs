//! rsvc-fuzz: runs every decoder that reads bytes from the network or the disk on millions of
//! structured random inputs (see `rsvc_tests::fuzz`), and reports per target the inputs tried,
//! how many decoded, the slowest input and the largest single allocation. A panic or an input
//! slower than the budget is written under `--crashes` and fails the run.
//!
//! `rsvc-fuzz port` attacks a running system's gRPC port instead (see `port.rs`).
//!
//! ```sh
//! cargo run --release -p rsvc-tests --bin rsvc-fuzz -- --inputs 10000000
//! cargo run --release -p rsvc-tests --bin rsvc-fuzz -- --target raft-message --seed 7
//! cargo run --release -p rsvc-tests --bin rsvc-fuzz -- port
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::{Parser, Subcommand};
use rsvc_tests::fuzz;

mod port;

/// The system allocator, noting the largest single allocation: a decoder that trusts a length
/// prefix shows up here as a huge request long before the machine runs out of memory.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on unchanged to the system allocator, which upholds the
// contract; the only addition is a relaxed atomic maximum.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout is valid for `alloc`, as `GlobalAlloc::alloc` requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with this layout (through `alloc` above).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The largest single allocation a decoder may make on inputs of at most a few KiB.
const ALLOCATION_BOUND: usize = 16 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "rsvc-fuzz",
    about = "Fuzzes every decoder of network and disk bytes with structured random inputs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Inputs per target.
    #[arg(long, default_value_t = 10_000_000)]
    inputs: u64,
    /// Only these targets (repeatable; default: all).
    #[arg(long)]
    target: Vec<String>,
    /// The random seed (each target derives its own from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The corpus to start from (`<dir>/<target>/*`).
    #[arg(long, default_value_os_t = fuzz::corpus_dir())]
    corpus: PathBuf,
    /// Where failing inputs go (`<dir>/<target>/<n>`).
    #[arg(long, default_value = "fuzz-crashes")]
    crashes: PathBuf,
    /// Writes each target's samples and a few accepted mutations into the corpus, then stops.
    #[arg(long)]
    write_corpus: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The gRPC port under garbage, half-open TLS handshakes, slowloris clients and a flood
    /// of connections, while a client writes: its throughput against an undisturbed baseline.
    Port(port::PortArgs),
    /// Runs an engine (what `pool-svc serve` runs); `port` starts its system this way.
    #[command(hide = true)]
    Engine {
        #[command(subcommand)]
        cmd: rsvc_tests::EngineSubcommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Engine { cmd }) => return cmd.run("rsvc-fuzz engine"),
        Some(Cmd::Port(args)) => {
            return rsvc_server::cli::run_main("rsvc-fuzz port", rsvc_server::cli::Logging::Command, async {
                port::run(args).await.map_err(|e| (1, e))
            })
        }
        None => {}
    }
    let targets: Vec<fuzz::Target> = fuzz::targets()
        .into_iter()
        .filter(|t| cli.target.is_empty() || cli.target.iter().any(|n| n == t.name))
        .collect();
    if targets.is_empty() {
        let names: Vec<&str> = fuzz::targets().iter().map(|t| t.name).collect();
        eprintln!("rsvc-fuzz: no such target; the targets are {}", names.join(", "));
        return ExitCode::from(2);
    }
    // Panics are findings, reported below, not noise on stderr.
    std::panic::set_hook(Box::new(|_| {}));
    if cli.write_corpus {
        return write_corpus(&cli, &targets);
    }
    println!(
        "{:<18} {:>12} {:>10} {:>12} {:>10} {:>12} {:>7} {:>5}",
        "TARGET", "INPUTS", "DECODED", "INPUTS/S", "SLOWEST", "LARGEST", "PANICS", "SLOW"
    );
    let mut failed = false;
    for (i, t) in targets.iter().enumerate() {
        LARGEST.store(0, Ordering::Relaxed);
        let corpus = fuzz::load_corpus(&cli.corpus, t);
        let r = fuzz::run(t, &corpus, cli.inputs, cli.seed.wrapping_add(i as u64));
        let largest = LARGEST.load(Ordering::Relaxed);
        println!(
            "{:<18} {:>12} {:>10} {:>12.0} {:>8.2}ms {:>10}KiB {:>7} {:>5}",
            t.name,
            r.inputs,
            r.accepted,
            r.inputs as f64 / r.elapsed.as_secs_f64(),
            r.max_time.as_secs_f64() * 1e3,
            largest / 1024,
            r.panics.len(),
            r.slow.len()
        );
        let dir = cli.crashes.join(t.name);
        for (n, (input, msg)) in r.panics.iter().enumerate().take(20) {
            save(&dir, &format!("panic-{n}"), input);
            eprintln!("{}: panic: {msg}", t.name);
        }
        for (n, (input, took)) in r.slow.iter().enumerate().take(20) {
            save(&dir, &format!("slow-{n}"), input);
            eprintln!("{}: an input took {took:?}", t.name);
        }
        if largest > ALLOCATION_BOUND {
            eprintln!("{}: a single allocation of {largest} bytes", t.name);
            failed = true;
        }
        failed |= !r.panics.is_empty() || !r.slow.is_empty();
    }
    if failed {
        eprintln!("rsvc-fuzz: findings saved under {}", cli.crashes.display());
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn save(dir: &std::path::Path, name: &str, input: &[u8]) {
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join(name), input);
}

/// Samples plus up to 8 accepted mutations of each target: inputs that reach past the first
/// check, so that the CI replay starts deep.
fn write_corpus(cli: &Cli, targets: &[fuzz::Target]) -> ExitCode {
    use rand::SeedableRng;
    for t in targets {
        let dir = cli.corpus.join(t.name);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("rsvc-fuzz: {}: {e}", dir.display());
            return ExitCode::from(2);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(cli.seed);
        let mut kept: Vec<Vec<u8>> = t.samples.clone();
        let mut tries = 0;
        while kept.len() < t.samples.len() + 8 && tries < 1_000_000 {
            tries += 1;
            let a = &t.samples[tries % t.samples.len()];
            let m = fuzz::mutate(&mut rng, a, a);
            if m != *a && (t.decode)(&m) && !kept.contains(&m) {
                kept.push(m);
            }
        }
        for (n, input) in kept.iter().enumerate() {
            save(&dir, &format!("{n:03}"), input);
        }
        println!("{}: {} inputs in {}", t.name, kept.len(), dir.display());
    }
    ExitCode::SUCCESS
}
