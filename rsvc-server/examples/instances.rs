//! Many service instances per engine: what idle raft groups cost.
//!
//! Starts three engines in this process (real gRPC on loopback, real redb files), creates
//! `--count` counter instances with three replicas each, waits until every one has a leader,
//! then measures CPU time and resident memory over an idle window.
//!
//! ```sh
//! cargo run --release -p rsvc-server --example instances -- --count 100
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rdb::DbId;
use rsvc_server::counter::Counter;
use rsvc_server::{Engine, EngineConfig, FnFactory, ServiceFactory, State};

/// How often leadership of all instances is checked.
const POLL: Duration = Duration::from_millis(100);

#[derive(Parser, Debug)]
struct Args {
    /// Instances to create (each has a replica on every engine).
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Seconds of idle measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

/// (user + system CPU seconds, resident bytes) of this process, from /proc.
fn usage() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let cpu = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let rss_pages = fields.get(21).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (cpu / tick, rss_pages * 4096)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let tmp = tempfile::Builder::new()
        .prefix("rsvc-instances-")
        .tempdir_in(".")?;
    let (_, rss0) = usage();
    let mut engines = Vec::new();
    for rank in 1..=3u32 {
        let cfg = EngineConfig {
            rank,
            data_dir: tmp.path().join(format!("e{rank}")),
            reconf_after: None,
            ..EngineConfig::default()
        };
        let f: Vec<Arc<dyn ServiceFactory>> = vec![Arc::new(FnFactory::new(|_: &str| Counter))];
        engines.push(Engine::start(cfg, f).await?);
    }
    let t = Instant::now();
    for i in 0..args.count {
        let name = format!("i{i}");
        let db = DbId::random();
        let mut members = Vec::new();
        for e in &engines[1..] {
            members.push(e.start_replica("counter", &name, db, 1, vec![]).await?);
        }
        let first = engines[0].start_replica("counter", &name, db, 1, vec![]).await?;
        members.insert(0, first);
        engines[0].start_replica("counter", &name, db, 1, members).await?;
    }
    loop {
        let up = engines
            .iter()
            .flat_map(|e| e.hosts())
            .filter(|h| h.state().0 == State::Up)
            .count();
        if up == args.count {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            return Err(format!("only {up} of {} instances have a leader", args.count).into());
        }
        tokio::time::sleep(POLL).await;
    }
    println!(
        "{} instances x 3 replicas created and led in {:.1} s",
        args.count,
        t.elapsed().as_secs_f64()
    );
    let (cpu0, _) = usage();
    let w = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let (cpu1, rss1) = usage();
    let secs = w.elapsed().as_secs_f64();
    let cores = (cpu1 - cpu0) / secs;
    println!();
    println!(
        "| instances | replicas | idle CPU (cores) | CPU per 100 replicas | RSS MiB | RSS per replica KiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let replicas = args.count * 3;
    println!(
        "| {} | {} | {:.3} | {:.3} | {:.0} | {:.0} |",
        args.count,
        replicas,
        cores,
        cores * 100.0 / replicas as f64,
        rss1 as f64 / (1 << 20) as f64,
        (rss1.saturating_sub(rss0)) as f64 / 1024.0 / replicas as f64
    );
    for e in engines {
        e.shutdown().await;
    }
    Ok(())
}
