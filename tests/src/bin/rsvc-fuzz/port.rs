//! The gRPC port under abuse: while one client writes to a pool (each write crosses the
//! leader's port and its peers'), the leader's port gets garbage, half-open TLS handshakes,
//! slowloris HTTP/2 prefaces, and a flood of idle connections. Each phase reports the client's
//! throughput as a ratio to the undisturbed baseline of the same run, its latency and its
//! errors. With `--tls` the engines run mutual TLS, the half-open handshakes hit a real TLS
//! listener, and one more phase floods the port with complete handshakes from a certificate of
//! another CA (each costs the engine a key exchange and a signature before it refuses).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pool_svc::{PoolApi, PoolRequest, PoolResponse};
use rsvc_client::{ClientConfig, RsvcClient};
use rsvc_tests::rsvc::{EngineCmd, RsvcSystem, Spec, Timers};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What `port` takes.
#[derive(clap::Args, Debug)]
pub(crate) struct PortArgs {
    /// Seconds per phase.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Connections each holding attack keeps open.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Where the engines keep their data (a temporary directory under it).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// Run the engines with mutual TLS, and add the handshake flood.
    #[arg(long)]
    tls: bool,
}

/// One phase's figures.
struct Phase {
    name: &'static str,
    ops: u64,
    errors: u64,
    hist: Histogram<u64>,
    /// Attack connections the engine still kept open at the end of the phase.
    held: usize,
    /// The leader engine's CPU use during the phase, in percent of one core: what the attack
    /// cost the engine itself, apart from the attacker's own use of the shared cores.
    cpu: Option<f64>,
}

/// A process's user and system CPU time so far, in seconds (Linux `/proc/<pid>/stat`).
fn cpu_seconds(pid: Option<rustix::process::Pid>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?.as_raw_nonzero())).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / rustix::param::clock_ticks_per_second() as f64)
}

/// A TLS 1.2 ClientHello's first bytes: a record header and the start of a handshake, then
/// nothing more.
const CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];

/// The HTTP/2 client preface that a slowloris client sends one byte at a time.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub(crate) async fn run(args: PortArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let program = EngineCmd {
        program: exe,
        prefix: vec!["engine".into(), "serve".into()],
    };
    let tmp = tempfile::Builder::new()
        .prefix("rsvc-fuzz-port-")
        .tempdir_in(&args.dir)
        .map_err(|e| e.to_string())?;
    let spec = Spec {
        tls: args.tls,
        ..Spec::new(3, Timers::defaults())
    };
    let sys = RsvcSystem::start_spec(tmp.path(), program, spec).await?;
    // A client of another CA, for the handshake flood.
    let foreign = if args.tls {
        let dir = tmp.path().join("foreign");
        rsvc_server::certs::generate(&rsvc_server::certs::CertSpec::new(&dir).user("mallory", &["admin"]))?;
        let (cert, key) = rsvc_server::certs::user_files(&dir, "mallory");
        let paths = rsvc_client::tls::TlsPaths {
            ca: dir.join("ca.crt"),
            cert,
            key,
        };
        Some(rsvc_client::tls::TlsFiles::load(paths).map_err(|e| e.to_string())?)
    } else {
        None
    };
    sys.create_pool("abuse", 3).await?;
    let cfg = ClientConfig {
        deadline: Duration::from_secs(10),
        ..ClientConfig::default()
    };
    let client = sys.pool("abuse", cfg);
    // Warm up, and find the leader: the attacks go to its port.
    write(&client, 0).await.map_err(|e| format!("first write: {e}"))?;
    let leader = client.cached_leader().ok_or("no leader known")?.0;
    let target = sys.engines[&leader].addr.clone();
    let secs = Duration::from_secs_f64(args.seconds);
    eprintln!("== pool 'abuse' led by rank {leader} at {target}; {secs:?} per phase");
    let mut phases = Vec::new();
    let mut names = vec!["baseline", "garbage", "half-open TLS", "slowloris", "idle flood"];
    if args.tls {
        names.push("handshake flood");
    }
    for name in names {
        let stop = stop_signal();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let attack = {
            let (target, stop, n, foreign) =
                (target.clone(), stop.clone(), args.connections, foreign.clone());
            tokio::spawn(async move { attack(name, &target, n, stop, ready_tx, foreign).await })
        };
        // The holding attacks open all their connections before the measurement starts.
        let _ = ready.await;
        let cpu_before = cpu_seconds(sys.pid(leader));
        let (ops, errors, hist) = workload(&client, secs).await;
        let cpu = cpu_before
            .zip(cpu_seconds(sys.pid(leader)))
            .map(|(a, b)| (b - a) * 100.0 / secs.as_secs_f64());
        stop.send_replace(true);
        let held = attack.await.unwrap_or(0);
        phases.push(Phase {
            name,
            ops,
            errors,
            hist,
            held,
            cpu,
        });
    }
    let base = phases[0].ops.max(1) as f64;
    println!(
        "{:<16} {:>8} {:>8} {:>9} {:>9} {:>7} {:>6} {:>10}",
        "PHASE", "WRITES/S", "RATIO", "P50 MS", "P99 MS", "ERRORS", "OPEN", "LEADER CPU"
    );
    for p in &phases {
        println!(
            "{:<16} {:>8.0} {:>8.2} {:>9.2} {:>9.2} {:>7} {:>6} {:>9.0}%",
            p.name,
            p.ops as f64 / args.seconds,
            p.ops as f64 / base,
            p.hist.value_at_quantile(0.5) as f64 / 1e3,
            p.hist.value_at_quantile(0.99) as f64 / 1e3,
            p.errors,
            p.held,
            p.cpu.unwrap_or(f64::NAN)
        );
    }
    // The engine still serves a fresh client after all of it.
    let fresh = sys.pool("abuse", ClientConfig::default());
    write(&fresh, 1)
        .await
        .map_err(|e| format!("a fresh client after the attacks: {e}"))?;
    println!("a fresh client's write after the attacks: ok");
    Ok(())
}

fn stop_signal() -> std::sync::Arc<tokio::sync::watch::Sender<bool>> {
    std::sync::Arc::new(tokio::sync::watch::channel(false).0)
}

async fn write(c: &RsvcClient<PoolApi>, i: u64) -> Result<(), String> {
    let req = PoolRequest::AttrSet {
        name: format!("k{}", i % 64),
        value: i.to_be_bytes().to_vec(),
    };
    match c.call(&req).await {
        Ok(PoolResponse::Ok) => Ok(()),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// One client writing for `secs`: ops, errors, latency in microseconds.
async fn workload(c: &RsvcClient<PoolApi>, secs: Duration) -> (u64, u64, Histogram<u64>) {
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let (mut ops, mut errors) = (0, 0);
    let end = Instant::now() + secs;
    let mut i = 0;
    while Instant::now() < end {
        let t = Instant::now();
        match write(c, i).await {
            Ok(()) => {
                ops += 1;
                let _ = hist.record(t.elapsed().as_micros() as u64);
            }
            Err(_) => errors += 1,
        }
        i += 1;
    }
    (ops, errors, hist)
}

/// Runs attack `name` on `target` until `stop`; answers how many of its connections the
/// engine still kept open at the end.
async fn attack(
    name: &'static str,
    target: &str,
    n: usize,
    stop: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    ready: tokio::sync::oneshot::Sender<()>,
    foreign: Option<std::sync::Arc<rsvc_client::tls::TlsFiles>>,
) -> usize {
    let mut stopped = stop.subscribe();
    match name {
        "handshake flood" => {
            // Complete handshakes with another CA's certificate, as fast as four tasks can;
            // the engine refuses each after its share of the work.
            let Some(files) = foreign else {
                let _ = ready.send(());
                return 0;
            };
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let (target, stop, files) = (target.to_string(), stop.subscribe(), files.clone());
                    tokio::spawn(async move {
                        while !*stop.borrow() {
                            let _ = files.connect(&target, None, Duration::from_secs(5)).await;
                        }
                    })
                })
                .collect();
            let _ = ready.send(());
            let _ = stopped.wait_for(|s| *s).await;
            for t in tasks {
                let _ = t.await;
            }
            0
        }
        "garbage" => {
            // Connect, write junk, close: as fast as four tasks can.
            let tasks: Vec<_> = (0..4)
                .map(|k| {
                    let (target, stop) = (target.to_string(), stop.subscribe());
                    tokio::spawn(async move {
                        let mut i: u64 = k;
                        while !*stop.borrow() {
                            if let Ok(mut s) = TcpStream::connect(&target).await {
                                let junk: Vec<u8> =
                                    (0..512).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
                                let _ = s.write_all(&junk).await;
                            }
                            i += 1;
                        }
                    })
                })
                .collect();
            let _ = ready.send(());
            let _ = stopped.wait_for(|s| *s).await;
            for t in tasks {
                let _ = t.await;
            }
            0
        }
        "half-open TLS" | "slowloris" | "idle flood" => {
            use futures::StreamExt;
            let mut held: Vec<TcpStream> = futures::stream::iter(0..n)
                .map(|_| async move {
                    let mut s = TcpStream::connect(target).await.ok()?;
                    if name == "half-open TLS" {
                        s.write_all(CLIENT_HELLO).await.ok()?;
                    }
                    Some(s)
                })
                .buffer_unordered(64)
                .filter_map(|s| async move { s })
                .collect()
                .await;
            let _ = ready.send(());
            // Slowloris: one more preface byte on every connection each half second.
            let mut at = 0;
            while !*stopped.borrow() {
                if name == "slowloris" && at < PREFACE.len() {
                    for s in &mut held {
                        let _ = s.write_all(&PREFACE[at..=at]).await;
                    }
                    at += 1;
                }
                let _ = tokio::time::timeout(Duration::from_millis(500), stopped.changed()).await;
            }
            // How many the engine still keeps open: once what it sent (its SETTINGS) is read,
            // a read would block rather than see the end of the stream.
            held.iter().filter(|s| still_open(s)).count()
        }
        _ => {
            let _ = ready.send(());
            let _ = stopped.wait_for(|s| *s).await;
            0
        }
    }
}

/// Whether the other end still keeps `s` open: reads drain what it sent until one would block
/// (open) or sees the end of the stream or an error (closed).
fn still_open(s: &TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match s.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}
