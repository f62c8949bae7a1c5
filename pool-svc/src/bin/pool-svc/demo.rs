//! `pool-svc demo`: a local 3-engine system, a pool under load, kill -9 of its leader, restart.
//!
//! Every engine is a child process of the demo, killed when the demo ends, even on Ctrl-C or
//! error (`kill_on_drop` plus a Ctrl-C branch that drops them).
//!
//! The engines speak mutual TLS, as a production system would: the demo makes a CA and
//! certificates in its directory (`certs/`, as `pool-svc certs` does), starts every engine with
//! its own certificate (`--tls-ca`, `--tls-cert`, `--tls-key`), and its client is the `admin`
//! user. `--insecure` runs it in plain TCP instead.
//!
//! Stdout tells the story and nothing else. Log lines go to files in the demo's directory:
//! `demo.log` for the demo's own client, `engineN.log` for each engine. A temporary directory is
//! removed when the demo succeeds and kept (and named) when it fails.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pool_svc::{ContClient, PoolClient};
use rsvc_client::mgmt::{mgmt_client, MgmtLocator, MgmtRequest, MgmtResponse};
use rsvc_client::tls::{TlsFiles, TlsPaths};
use rsvc_client::{ClientConfig, Connections};
use rsvc_server::certs::{self, CertSpec};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// Options of the demo.
#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// A short run (about 10 s), as CI runs it.
    #[arg(long)]
    quick: bool,
    /// Keep the engines' data here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Plain TCP between the engines and to the client, instead of mutual TLS with
    /// certificates the demo makes.
    #[arg(long)]
    insecure: bool,
}

const POLL: Duration = Duration::from_millis(50);
/// Finer polling while measuring the failover gap.
const GAP_POLL: Duration = Duration::from_millis(5);
const DEADLINE: Duration = Duration::from_secs(60);

/// One engine process.
struct Engine {
    rank: u32,
    addr: String,
    metrics: String,
    args: Vec<String>,
    child: Child,
}

async fn spawn(
    exe: &std::path::Path,
    dir: &std::path::Path,
    rank: u32,
    args: Vec<String>,
) -> Result<Engine, String> {
    let log_path = dir.join(format!("engine{rank}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut child = Command::new(exe)
        .arg("serve")
        .args(&args)
        // The demo names the engines' TLS files itself (none with --insecure): a client's
        // RSVC_TLS_* in the environment must not become the engines'.
        .env_remove("RSVC_TLS_CA")
        .env_remove("RSVC_TLS_CERT")
        .env_remove("RSVC_TLS_KEY")
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start engine {rank}: {e}"))?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .map_err(|_| format!("engine {rank} did not come up"))?
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("engine {rank} exited at start"))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
    };
    let addr = field("addr=").ok_or_else(|| format!("engine {rank}: bad ready line {line:?}"))?;
    let metrics = field("metrics=").unwrap_or_default();
    Ok(Engine {
        rank,
        addr,
        metrics,
        args,
        child,
    })
}

/// Reads one gauge of the pool replica from an engine's Prometheus endpoint.
async fn gauge(metrics: &str, name: &str) -> Option<u64> {
    let mut s = tokio::net::TcpStream::connect(metrics).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    let prefix = format!("{name}{{class=\"pool\",instance=\"demo\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

pub(crate) async fn run(args: DemoArgs) -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix("pool-svc-demo-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    rsvc_server::cli::init_file_logging(&dir.join("demo.log"))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let res = tokio::select! {
        r = demo(args, &dir) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted; engines stopped".into()),
    };
    res.map_err(|e| {
        // Keep the logs of a failed run.
        let kept = tmp.keep();
        format!(
            "{e} (logs in {})",
            if dir.starts_with(&kept) {
                kept.display().to_string()
            } else {
                dir.display().to_string()
            }
        )
    })
}

async fn demo(args: DemoArgs, dir: &std::path::Path) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (warmup, after) = if args.quick {
        (Duration::from_secs(1), Duration::from_secs(1))
    } else {
        (Duration::from_secs(3), Duration::from_secs(3))
    };

    println!(
        "== starting 3 engines on loopback, data and logs in {}",
        dir.display()
    );
    // Mutual TLS: a CA, a certificate per engine and one for the demo's client, `admin`.
    let tls = if args.insecure {
        println!("   plain TCP (--insecure): no authentication");
        None
    } else {
        let certs_dir = dir.join("certs");
        // `force`: a --dir used before keeps its CA and gets new certificates from it.
        let spec = CertSpec {
            force: true,
            ..CertSpec::new(&certs_dir)
                .rank(1)
                .rank(2)
                .rank(3)
                .user("admin", &["admin"])
        };
        certs::generate(&spec).map_err(|e| format!("certificates: {e}"))?;
        println!(
            "   mutual TLS: CA and certificates in {}, the client connects as user admin (--insecure: plain TCP)",
            certs_dir.display()
        );
        Some(certs_dir)
    };
    let mut engines: Vec<Option<Engine>> = Vec::new();
    let mut aps: Vec<String> = Vec::new();
    for rank in 1..=3u32 {
        let mut a = vec![
            "--rank".to_string(),
            rank.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.join(format!("engine{rank}")).display().to_string(),
            "--cluster".into(),
            "demo".into(),
            "--fast-timers".into(),
        ];
        if let Some(certs_dir) = &tls {
            let (cert, key) = certs::engine_files(certs_dir, rank);
            let ca = certs_dir.join(certs::CA_CERT);
            a.extend(rsvc_client::tls::TlsPaths { ca, cert, key }.flags());
        }
        for ap in &aps {
            a.push("--access-point".into());
            a.push(ap.clone());
        }
        a.push("--access-point".into());
        a.push(format!("{rank}@"));
        let e = spawn(&exe, dir, rank, a).await?;
        println!(
            "   rank {} listening on {} (metrics {})",
            e.rank, e.addr, e.metrics
        );
        aps.push(format!("{rank}@{}", e.addr));
        engines.push(Some(e));
    }
    let ap_list: Vec<(u32, String)> = engines
        .iter()
        .flatten()
        .map(|e| (e.rank, e.addr.clone()))
        .collect();
    let conns = match &tls {
        Some(certs_dir) => {
            let (cert, key) = certs::user_files(certs_dir, "admin");
            let paths = TlsPaths {
                ca: certs_dir.join(certs::CA_CERT),
                cert,
                key,
            };
            let files = TlsFiles::load(paths).map_err(|e| format!("TLS: {e}"))?;
            Connections::default().with_tls(Some(files))
        }
        None => Connections::default(),
    };
    let cfg = ClientConfig {
        deadline: Duration::from_secs(20),
        ..ClientConfig::default()
    };
    let mgmt = mgmt_client(ap_list.clone(), conns.clone(), cfg.clone());
    let start = Instant::now();
    loop {
        if let Ok(MgmtResponse::Map(m)) = mgmt.call(&MgmtRequest::SystemMap).await {
            if m.len() == 3 {
                break;
            }
        }
        if start.elapsed() > DEADLINE {
            return Err("the engines did not form a system".into());
        }
        tokio::time::sleep(POLL).await;
    }

    println!("== creating pool 'demo' with 3 replicas and 3 containers");
    mgmt.call(&MgmtRequest::CreateInstance {
        class: "pool".into(),
        label: "demo".into(),
        replicas: 3,
    })
    .await
    .map_err(|e| e.to_string())?;
    let loc = Arc::new(MgmtLocator::new(ap_list.clone(), conns.clone()));
    let pool = Arc::new(
        PoolClient::connect(
            "demo",
            loc,
            conns.clone(),
            cfg.clone(),
            "demo-client",
            Duration::from_secs(3),
        )
        .await
        .map_err(|e| e.to_string())?,
    );
    for c in ["c0", "c1", "c2"] {
        ContClient::new(&pool)
            .create(c, vec![])
            .await
            .map_err(|e| e.to_string())?;
    }

    // The client: a writer setting attributes, a reader checking the newest acknowledged one.
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let writer = {
        let (pool, acked, stop) = (pool.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = format!("k{i:07}");
                match pool.attr_set(&key, format!("value {i}").as_bytes()).await {
                    Ok(()) => acked.lock().expect("lock").push((key, Instant::now())),
                    Err(e) => return Err(format!("write {key} failed: {e}")),
                }
            }
            Ok(())
        })
    };
    let reader = {
        let (pool, acked, stop, reads) = (pool.clone(), acked.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let last = acked.lock().expect("lock").last().map(|(k, _)| k.clone());
                if let Some(k) = last {
                    match pool.attr_get(&k).await {
                        Ok(Some(_)) => {
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) => return Err(format!("read of acknowledged {k} found nothing")),
                        Err(e) => return Err(format!("read {k} failed: {e}")),
                    }
                }
                tokio::time::sleep(POLL).await;
            }
            Ok(())
        })
    };
    tokio::time::sleep(warmup).await;

    let before = pool.query().await.map_err(|e| e.to_string())?;
    let victim = before.leader;
    let retries_before = pool.rpc().stats.retries.load(Ordering::Relaxed);
    println!(
        "== {} writes so far; pool 'demo' is led by rank {} in term {}",
        acked.lock().expect("lock").len(),
        victim,
        before.term
    );
    println!("== kill -9 rank {victim}");
    let killed = engines[(victim - 1) as usize].take().ok_or("no such engine")?;
    let (kargs, kaddr) = (killed.args.clone(), killed.addr.clone());
    let kill_at = Instant::now();
    drop(killed); // kill_on_drop: SIGKILL
    let gap = loop {
        let first_after = acked
            .lock()
            .expect("lock")
            .iter()
            .find(|(_, t)| *t > kill_at)
            .map(|(_, t)| *t);
        if let Some(t) = first_after {
            break t - kill_at;
        }
        if kill_at.elapsed() > DEADLINE || writer.is_finished() {
            return Err("no write succeeded after the kill".into());
        }
        tokio::time::sleep(GAP_POLL).await;
    };
    let after_kill = pool.query().await.map_err(|e| e.to_string())?;
    println!(
        "   the client rode over it: first write acknowledged {} ms after the kill, by rank {} in term {}",
        gap.as_millis(),
        after_kill.leader,
        after_kill.term
    );
    tokio::time::sleep(after).await;

    println!("== restarting rank {victim} on {kaddr}");
    let mut rargs = kargs.clone();
    if let Some(i) = rargs.iter().position(|a| a == "--listen") {
        rargs[i + 1] = kaddr.clone();
    }
    let restarted = spawn(&exe, dir, victim, rargs).await?;
    let leader_metrics = engines
        .iter()
        .flatten()
        .find(|e| e.rank == after_kill.leader)
        .map(|e| e.metrics.clone());
    let target = match &leader_metrics {
        Some(m) => gauge(m, "rsvc_replica_applied_index").await.unwrap_or(0),
        None => 0,
    };
    let rs = Instant::now();
    loop {
        if gauge(&restarted.metrics, "rsvc_replica_applied_index")
            .await
            .unwrap_or(0)
            >= target
        {
            break;
        }
        if rs.elapsed() > DEADLINE {
            return Err(format!("rank {victim} did not catch up"));
        }
        tokio::time::sleep(POLL).await;
    }
    let caught_up = rs.elapsed();
    println!(
        "   rank {victim} is a follower again and caught up to index {target} in {} ms",
        caught_up.as_millis()
    );
    engines[(victim - 1) as usize] = Some(restarted);

    stop.store(true, Ordering::Relaxed);
    writer.await.map_err(|e| e.to_string())??;
    reader.await.map_err(|e| e.to_string())??;
    let acked: Vec<String> = acked
        .lock()
        .expect("lock")
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    let present: HashSet<String> = pool
        .attr_list()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let lost = acked.iter().filter(|k| !present.contains(*k)).count();
    let final_info = pool.query().await.map_err(|e| e.to_string())?;
    let retries = pool.rpc().stats.retries.load(Ordering::Relaxed) - retries_before;

    println!();
    println!("| what | result |");
    println!("|---|---|");
    println!("| writes acknowledged | {} |", acked.len());
    println!("| acknowledged writes lost | {lost} |");
    println!(
        "| reads of the newest acknowledged write | {} (all found) |",
        reads.load(Ordering::Relaxed)
    );
    println!(
        "| leader before the kill | rank {} (term {}) |",
        before.leader, before.term
    );
    println!(
        "| leader after the kill | rank {} (term {}) |",
        after_kill.leader, after_kill.term
    );
    println!("| client-observed failover gap | {} ms |", gap.as_millis());
    println!("| client retries during the failover | {retries} |");
    println!("| pool handle reconnects | {} |", pool.reconnects());
    println!(
        "| rank {victim} catch-up after restart | {} ms |",
        caught_up.as_millis()
    );
    println!(
        "| replicas / containers at the end | {:?} / {} |",
        final_info.replicas, final_info.containers
    );
    if lost > 0 {
        return Err(format!("{lost} acknowledged writes were lost"));
    }

    // Stop the engines gracefully; kill_on_drop covers any that do not exit.
    for e in engines.iter_mut().flatten() {
        if let Some(pid) = e.child.id() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).ok_or("bad pid")?,
                rustix::process::Signal::TERM,
            );
        }
    }
    for e in engines.iter_mut().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(10), e.child.wait()).await;
    }
    println!("\ndemo finished: the pool service survived the loss of its leader");
    Ok(())
}
