//! Snapshot install: a new replica joins an instance whose state is `mib` MiB, and the bench
//! times it until the newcomer has caught up. Both systems keep only a short log (rsvc: a
//! snapshot every 1,000 entries; etcd: `--snapshot-count 1000`, plus the 5,000 entries etcd
//! keeps for catch-up), so that most of the state arrives as a snapshot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rsvc_tests::etcd::EtcdCluster;
use rsvc_tests::rsvc::{EngineCmd, RsvcSystem, Spec, Timers};
use rsvc_tests::{wait_for, DEADLINE};

use crate::report::{Better, Report};

/// Value size of the loaded state.
const VALUE_BYTES: usize = 16 << 10;
/// Concurrent loaders.
const LOADERS: usize = 16;

/// Loads `n` values with `put(i)` from [`LOADERS`] tasks.
async fn load<F, Fut>(n: usize, put: F) -> Result<(), String>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let put = Arc::new(put);
    let tasks: Vec<_> = (0..LOADERS)
        .map(|t| {
            let put = put.clone();
            tokio::spawn(async move {
                for i in (t..n).step_by(LOADERS) {
                    put(i).await?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Runs the workload on both systems and fills the report's rows.
pub(crate) async fn run(
    rep: &mut Report,
    dir: &std::path::Path,
    cmd: EngineCmd,
    mib: usize,
    floor_mib_s: f64,
) -> Result<(), String> {
    let n = (mib << 20) / VALUE_BYTES;
    let value = vec![b's'; VALUE_BYTES];

    // rsvc: a pool on ranks 1 and 2 of a 3-engine system; rank 3 joins it.
    let spec = Spec {
        raft_extra: "snapshot_every_entries = 1000\nkeep_log_behind_snapshot = 1000".into(),
        ..Spec::new(3, Timers::defaults())
    };
    let sys = RsvcSystem::start_spec(&dir.join("rsvc-snapshot"), cmd, spec).await?;
    sys.create_pool("snap", 2).await?;
    sys.leader("pool", "snap", DEADLINE).await?;
    let ranks = sys
        .mgmt(Default::default())
        .call(&rsvc_client::mgmt::MgmtRequest::Locate {
            class: "pool".into(),
            label: "snap".into(),
        })
        .await
        .map_err(|e| e.to_string())?;
    let rsvc_client::mgmt::MgmtResponse::Instance(info) = ranks else {
        return Err("unexpected answer to Locate".into());
    };
    let joiner = (1..=3u32)
        .find(|r| !info.replicas.iter().any(|(x, _)| x == r))
        .ok_or("no spare rank")?;
    let client = Arc::new(sys.pool("snap", Default::default()));
    let v = value.clone();
    let t = Instant::now();
    load(n, move |i| {
        let (client, v) = (client.clone(), v.clone());
        async move {
            client
                .call(&pool_svc::PoolRequest::AttrSet {
                    name: format!("s{i:06}"),
                    value: v,
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    let rsvc_load = t.elapsed();
    let t = Instant::now();
    sys.add_pool_replica("snap", joiner).await?;
    let rsvc_join = t.elapsed();
    drop(sys);

    // etcd: 3 members hold the state; a 4th is added and catches up.
    let mut etcd = EtcdCluster::start_with(
        &dir.join("etcd-snapshot"),
        3,
        100,
        1000,
        vec!["--snapshot-count".into(), "1000".into()],
    )
    .await?;
    let client = etcd.client().await?;
    let v = value.clone();
    let t = Instant::now();
    load(n, move |i| {
        let (mut client, v) = (client.clone(), v.clone());
        async move {
            client
                .put(format!("s{i:06}"), v, None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    let etcd_load = t.elapsed();
    let leader = etcd.leader(DEADLINE).await?;
    let target = etcd
        .applied_index(leader)
        .await
        .ok_or("etcd leader gave no status")?;
    let t = Instant::now();
    let new = etcd.add_member().await?;
    wait_for(
        "the new etcd member to catch up",
        Duration::from_secs(600),
        Duration::from_millis(20),
        || async { etcd.applied_index(new).await.filter(|i| *i >= target).map(|_| ()) },
    )
    .await?;
    let etcd_join = t.elapsed();
    drop(etcd);

    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    let r = rep.row(
        format!("new replica joins a {mib} MiB state"),
        "MiB/s",
        Better::Higher,
    );
    r.rsvc = Some(rate(rsvc_join));
    r.etcd = Some(rate(etcd_join));
    r.floor = Some(floor_mib_s);
    let r = rep.row(
        format!("loading the {mib} MiB state (16 KiB values, 16 clients)"),
        "MiB/s",
        Better::Higher,
    );
    r.rsvc = Some(rate(rsvc_load));
    r.etcd = Some(rate(etcd_load));
    Ok(())
}

/// The floor for moving state: sequential 1 MiB writes with an fsync at the end, in MiB/s.
pub(crate) fn write_floor(dir: &std::path::Path, mib: usize) -> Result<f64, String> {
    use std::io::Write;
    let path = dir.join("floor-seq.dat");
    let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let buf = vec![9u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        f.write_all(&buf).map_err(|e| e.to_string())?;
    }
    rustix::fs::fsync(&f).map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok(mib as f64 / secs)
}
