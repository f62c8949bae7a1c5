//! Durable-commit benchmark: a 3-replica rdb group on real files (in-process transport), 256-byte
//! values, 1/16/64 concurrent writers, against the fdatasync floor measured in the same run on
//! the same directory.
//!
//! ```sh
//! cargo run --release -p rdb --example bench                 # full run (~30 s)
//! cargo run --release -p rdb --example bench -- --quick      # smoke run (CI)
//! cargo run --release -p rdb --example bench -- --dir /mnt/nvme/tmp --seconds 10
//! cargo run --release -p rdb --example bench -- --sync-delay-ms 200 --seconds 60  # a slow disk
//! ```
//!
//! Every run also reports the elections it saw: with the default timers (150-300 ms) there
//! should be none, even when every fsync stalls for 200 ms, because no fsync runs on
//! openraft's core loop.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use rdb::{Db, DbConfig, DbId, LocalNet, Member, Path, ReplicaId, StartOptions};

#[derive(Parser, Debug)]
#[command(about = "rdb durable commit benchmark")]
struct Args {
    /// Directory for the replicas' files (default: a temp dir under the current directory, so
    /// that the disk measured is the one the project lives on, not a tmpfs).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds per writer count.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Writer counts to run.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    writers: Vec<usize>,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Log entries the leader keeps in flight (`DbConfig::max_inflight_batches`).
    #[arg(long)]
    inflight: Option<usize>,
    /// Replicas in the group.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Run everything on one tokio thread (fewer cross-thread wake-ups; blocking I/O still
    /// runs on tokio's blocking pool).
    #[arg(long)]
    single_thread: bool,
    /// Serve reads with a ReadIndex round each instead of the leader lease.
    #[arg(long)]
    no_lease_reads: bool,
    /// Concurrent readers in the read phase (0 skips it).
    #[arg(long, default_value_t = 16)]
    readers: usize,
    /// Make every fsync of every replica take this much longer (a slow or busy disk).
    #[arg(long, default_value_t = 0)]
    sync_delay_ms: u64,
    /// A short smoke run.
    #[arg(long)]
    quick: bool,
}

struct Floor {
    per_sec: f64,
    p50_us: u64,
}

/// Runs `op` back to back for `dur`, timing each call.
fn timed<E>(dur: Duration, mut op: impl FnMut(u64) -> Result<(), E>) -> Result<Floor, E> {
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        let t = Instant::now();
        op(n)?;
        h.record(t.elapsed().as_micros() as u64).ok();
        n += 1;
    }
    Ok(Floor {
        per_sec: n as f64 / start.elapsed().as_secs_f64(),
        p50_us: h.value_at_quantile(0.5),
    })
}

/// Sequential 256-byte write + fdatasync on one file: the rate one durable commit at a time can
/// never beat.
fn fsync_floor(dir: &std::path::Path, dur: Duration, bytes: usize) -> std::io::Result<Floor> {
    let path = dir.join("fsync-floor.dat");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let buf = vec![0xAB; bytes];
    let floor = timed(dur, |_| {
        f.write_all(&buf)?;
        f.sync_data()
    })?;
    std::fs::remove_file(&path)?;
    Ok(floor)
}

/// Sequential durable redb commits of one 256-byte insert each: the storage engine's floor.
fn redb_floor(dir: &std::path::Path, dur: Duration, bytes: usize) -> Result<Floor, redb::Error> {
    const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
    let path = dir.join("redb-floor.redb");
    let db = redb::Database::create(&path)?;
    let buf = vec![0xAB; bytes];
    let floor = timed(dur, |n| -> Result<(), redb::Error> {
        let tx = db.begin_write()?;
        tx.open_table(T)?.insert(n, buf.as_slice())?;
        tx.commit()?;
        Ok(())
    })?;
    drop(db);
    std::fs::remove_file(&path)?;
    Ok(floor)
}

struct Run {
    /// Concurrent clients.
    clients: usize,
    /// Operations completed.
    ops: u64,
    per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    /// Log entries the operations took (writes only).
    entries: u64,
}

/// Runs `clients` tasks for `dur`, each calling `op(client, i)` back to back, and merges their
/// latency histograms.
async fn concurrent<F, Fut>(clients: usize, dur: Duration, op: F) -> Run
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            let mut i = 0u64;
            while start.elapsed() < dur {
                let t = Instant::now();
                op(c, i).await;
                h.record(t.elapsed().as_micros() as u64).ok();
                i += 1;
            }
            h
        }));
    }
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        all.add(t.await.expect("client task")).ok();
    }
    Run {
        clients,
        ops: all.len(),
        per_sec: all.len() as f64 / start.elapsed().as_secs_f64(),
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
        entries: 0,
    }
}

/// Readers looking up keys the writers wrote, each in its own transaction.
async fn run_readers(db: &Db, readers: usize, dur: Duration) -> Run {
    let db = db.clone();
    concurrent(readers, dur, move |w, i| {
        let db = db.clone();
        async move {
            let mut tx = db.begin(None).expect("leader");
            let key = format!("w{}-{}", w % 16, i % 100);
            tx.lookup(&Path::root(), key.as_bytes()).await.expect("read");
        }
    })
    .await
}

/// Writers committing one 256-byte update each per transaction.
async fn run_writers(db: &Db, writers: usize, dur: Duration, value_bytes: usize) -> Run {
    let before = db.status().last_log_index.unwrap_or(0);
    let dbc = db.clone();
    let mut run = concurrent(writers, dur, move |w, i| {
        let db = dbc.clone();
        async move {
            let mut tx = db.begin(None).expect("leader");
            tx.update(&Path::root(), format!("w{w}-{i}"), vec![w as u8; value_bytes]);
            tx.commit().await.expect("commit");
        }
    })
    .await;
    run.entries = db.status().last_log_index.unwrap_or(0) - before;
    run
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let rt = if args.single_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?
    };
    rt.block_on(bench(args))
}

async fn bench(mut args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.quick {
        args.seconds = args.seconds.min(1.0);
    }
    if args.writers.is_empty() || args.writers.contains(&0) {
        return Err("--writers needs positive counts, e.g. 1,16,64".into());
    }
    let tmp = match &args.dir {
        Some(d) => tempfile::Builder::new().prefix("rdb-bench-").tempdir_in(d)?,
        None => tempfile::Builder::new().prefix("rdb-bench-").tempdir_in(".")?,
    };
    let dur = Duration::from_secs_f64(args.seconds);
    println!(
        "rdb bench: {} replicas, in-process transport, {} tokio runtime, files in {}",
        args.replicas,
        if args.single_thread {
            "single-thread"
        } else {
            "multi-thread"
        },
        tmp.path().display()
    );

    let floor = fsync_floor(tmp.path(), dur.min(Duration::from_secs(3)), args.value_bytes)?;
    println!(
        "fdatasync floor: {:.0} writes/s, p50 {} us (sequential {}-byte write + fdatasync)",
        floor.per_sec, floor.p50_us, args.value_bytes
    );

    let rf = redb_floor(tmp.path(), dur.min(Duration::from_secs(3)), args.value_bytes)?;
    println!(
        "redb floor:      {:.0} commits/s, p50 {} us (sequential durable commits of one {}-byte insert)",
        rf.per_sec, rf.p50_us, args.value_bytes
    );

    let net = LocalNet::new();
    let id = DbId::random();
    let mut config = DbConfig::default();
    if let Some(n) = args.inflight {
        config.max_inflight_batches = n;
    }
    config.lease_reads = !args.no_lease_reads;
    let faults = rdb::DiskFaults::new();
    let mut dbs = Vec::new();
    for rank in 1..=args.replicas {
        let dir = tmp.path().join(format!("r{rank}"));
        Db::create(&dir, id, ReplicaId::new(rank, 1), None)?;
        let addr = format!("local:{rank}");
        let mut opts = StartOptions::new(Arc::new(net.clone()), addr.clone());
        opts.config = config.clone();
        opts.faults = Some(faults.clone());
        let db = Db::start(&dir, opts).await?;
        net.register(&addr, Arc::new(db.clone()));
        dbs.push(db);
    }
    let members: Vec<Member> = dbs.iter().map(Db::member).collect();
    dbs[0].initialize(members).await?;
    let term = dbs[0].wait_up(Duration::from_secs(30)).await?;
    println!("replica 1.1 leads term {term}\n");
    if args.sync_delay_ms > 0 {
        faults.set_sync_delay(Duration::from_millis(args.sync_delay_ms));
        println!("every fsync now stalls {} ms longer\n", args.sync_delay_ms);
    }

    let mut runs = Vec::new();
    for &w in &args.writers {
        let r = run_writers(&dbs[0], w, dur, args.value_bytes).await;
        runs.push(r);
    }
    println!(
        "| writers | commits | commits/s | x floor | p50 ms | p99 ms | p50 / floor p50 | txs per entry |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} |",
            r.clients,
            r.ops,
            r.per_sec,
            r.per_sec / floor.per_sec,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.p50_us as f64 / floor.p50_us.max(1) as f64,
            r.ops as f64 / r.entries.max(1) as f64,
        );
    }
    if args.readers > 0 {
        let r = run_readers(&dbs[0], args.readers, dur).await;
        println!();
        println!(
            "reads ({}): {} readers, {:.0} reads/s, p50 {:.3} ms, p99 {:.3} ms",
            if args.no_lease_reads {
                "ReadIndex per read"
            } else {
                "leader lease"
            },
            args.readers,
            r.per_sec,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0
        );
    }
    let terms_after = dbs.iter().map(|d| d.status().term).max().unwrap_or(term);
    println!();
    println!(
        "elections during the run: {} (term {term} to {terms_after}; timers {:?}, heartbeat {:?})",
        terms_after - term,
        config.election_timeout,
        config.heartbeat
    );
    faults.set_sync_delay(Duration::ZERO);
    for db in &dbs {
        db.stop().await?;
    }
    Ok(())
}
