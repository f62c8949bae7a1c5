//! Snapshot install rate: how fast a new replica receives a large state.
//!
//! Builds a one-replica group holding `--mb` MiB of 4 KiB values, forces a snapshot and purges
//! the log, then adds a fresh replica. That replica can only catch up through a snapshot,
//! streamed in `--chunk-kb` chunks. Reports MiB/s against a sequential write + fsync of the same
//! size on the same disk, measured in the same run.
//!
//! ```sh
//! cargo run --release -p rdb --example snapshot                  # 256 MiB
//! cargo run --release -p rdb --example snapshot -- --mb 32      # quicker
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rdb::{int_key, Db, DbConfig, DbId, KeyClass, LocalNet, Path, ReplicaId, StartOptions};

#[derive(Parser, Debug)]
#[command(about = "rdb snapshot install rate")]
struct Args {
    /// State size in MiB.
    #[arg(long, default_value_t = 256)]
    mb: u64,
    /// Snapshot chunk size in KiB.
    #[arg(long, default_value_t = 1024)]
    chunk_kb: u64,
    /// Directory for the files (default: a temp dir under the current directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const VALUE: usize = 4096;
/// How often the catch-up is checked.
const POLL: Duration = Duration::from_millis(10);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.mb == 0 || args.chunk_kb == 0 {
        return Err("--mb and --chunk-kb must be positive".into());
    }
    let tmp = match &args.dir {
        Some(d) => tempfile::Builder::new().prefix("rdb-snap-").tempdir_in(d)?,
        None => tempfile::Builder::new().prefix("rdb-snap-").tempdir_in(".")?,
    };
    let bytes = args.mb << 20;

    // Floor: write the same amount sequentially and fsync it.
    let floor_path = tmp.path().join("floor.dat");
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&floor_path)?;
        let buf = vec![0x5A; 1 << 20];
        for _ in 0..args.mb {
            f.write_all(&buf)?;
        }
        f.sync_all()?;
    }
    let floor_secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&floor_path)?;
    let floor_rate = args.mb as f64 / floor_secs;
    println!(
        "sequential write + fsync floor: {floor_rate:.0} MiB/s ({} MiB in {floor_secs:.2} s)",
        args.mb
    );

    let net = LocalNet::new();
    let id = DbId::random();
    let config = DbConfig {
        snapshot_chunk_bytes: args.chunk_kb << 10,
        snapshot_every_entries: u64::MAX / 2,
        keep_log_behind_snapshot: 0,
        ..DbConfig::default()
    };
    let start = |rank: u32| {
        let net = net.clone();
        let config = config.clone();
        let dir = tmp.path().join(format!("r{rank}"));
        async move {
            Db::create(&dir, id, ReplicaId::new(rank, 1), None)?;
            let addr = format!("local:{rank}");
            let mut opts = StartOptions::new(Arc::new(net.clone()), addr.clone());
            opts.config = config;
            let db = Db::start(&dir, opts).await?;
            net.register(&addr, Arc::new(db.clone()));
            Ok::<_, rdb::Error>(db)
        }
    };
    let leader = start(1).await?;
    leader.initialize(vec![leader.member()]).await?;
    leader.wait_up(Duration::from_secs(30)).await?;

    let data = Path::root().child("data");
    let mut tx = leader.begin(None)?;
    tx.create_kvs(&Path::root(), "data", KeyClass::Integer);
    tx.commit().await?;
    let values = bytes / VALUE as u64;
    let per_tx = 256u64;
    let t = Instant::now();
    let mut i = 0;
    while i < values {
        let mut tx = leader.begin(None)?;
        for j in i..(i + per_tx).min(values) {
            tx.update(&data, int_key(j), vec![(j % 251) as u8; VALUE]);
        }
        tx.commit().await?;
        i += per_tx;
    }
    println!(
        "loaded {} MiB ({values} values) in {:.1} s",
        args.mb,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    if !leader.compact(Duration::from_secs(600)).await {
        return Err("compaction did not finish".into());
    }
    println!(
        "snapshot built and log purged in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let st = leader.status();
    assert!(
        st.purged_index.is_some(),
        "the log was purged, so the new replica needs the snapshot"
    );

    let target = st.last_log_index;
    let follower = start(2).await?;
    let t = Instant::now();
    leader.add_replica(follower.member()).await?;
    loop {
        if follower.status().applied_index >= target {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err("the new replica did not catch up within 10 minutes".into());
        }
        tokio::time::sleep(POLL).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let rate = args.mb as f64 / secs;
    println!();
    println!("| state MiB | chunk KiB | install s | MiB/s | x floor |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {secs:.2} | {rate:.0} | {:.2} |",
        args.mb,
        args.chunk_kb,
        rate / floor_rate
    );
    leader.stop().await?;
    follower.stop().await?;
    Ok(())
}
