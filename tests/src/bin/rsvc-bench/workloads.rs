//! The workloads, each run against rsvc and etcd in turn with the same clients, keys and
//! values.

use std::collections::HashSet;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use pool_svc::{PoolRequest, PoolResponse};
use rsvc_client::ClientConfig;
use rsvc_tests::etcd::EtcdCluster;
use rsvc_tests::rsvc::{EngineCmd, Pinger, RsvcSystem, Timers};
use rsvc_tests::{wait_for, DEADLINE};

use crate::report::{Better, Pcts, Report};
use crate::{Opts, Part};

pub(crate) const LABEL: &str = "bench";
pub(crate) const VALUE: [u8; 256] = [b'v'; 256];
const READ_KEYS: usize = 1000;

pub(crate) fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds")
}

pub(crate) fn bar(msg: String) -> ProgressBar {
    let b = ProgressBar::new_spinner();
    b.set_style(ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("template"));
    b.set_message(msg);
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

/// The result of a closed-loop run.
pub(crate) struct Run {
    ops: u64,
    errors: u64,
    secs: f64,
    pub(crate) hist: Histogram<u64>,
}

impl Run {
    pub(crate) fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

/// Runs `clients` closed-loop clients for `dur`; client `c`'s `k`th operation is `op(c, k)`.
pub(crate) async fn closed_loop<F, Fut>(what: String, clients: usize, dur: Duration, op: F) -> Run
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let pb = bar(what);
    let op = Arc::new(op);
    let start = Instant::now();
    let end = start + dur;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let op = op.clone();
            tokio::spawn(async move {
                let (mut h, mut ok, mut err) = (hist(), 0u64, 0u64);
                let mut k = 0u64;
                while Instant::now() < end {
                    let t = Instant::now();
                    match op(c, k).await {
                        Ok(()) => {
                            ok += 1;
                            let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => err += 1,
                    }
                    k += 1;
                }
                (h, ok, err)
            })
        })
        .collect();
    let mut run = Run {
        ops: 0,
        errors: 0,
        secs: 0.0,
        hist: hist(),
    };
    for t in tasks {
        if let Ok((h, ok, err)) = t.await {
            run.hist.add(&h).expect("same bounds");
            run.ops += ok;
            run.errors += err;
        }
    }
    run.secs = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    run
}

/// The floors, measured on `dir`: fdatasync of a 4 KiB write, and an empty gRPC round trip.
fn fsync_floor(dir: &Path, n: usize) -> Result<Pcts, String> {
    let path = dir.join("floor.dat");
    let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let buf = [7u8; 4096];
    let mut h = hist();
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&buf).map_err(|e| e.to_string())?;
        rustix::fs::fdatasync(&f).map_err(|e| e.to_string())?;
        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
    }
    let _ = std::fs::remove_file(&path);
    Ok(Pcts::of(&h))
}

async fn rtt_floor(sys: &RsvcSystem, n: usize) -> Result<Pcts, String> {
    let addr = &sys.engines.values().next().ok_or("no engine")?.addr;
    let mut p = Pinger::connect(addr).await?;
    let mut h = hist();
    for _ in 0..n {
        let t = Instant::now();
        p.ping().await?;
        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
    }
    Ok(Pcts::of(&h))
}

pub(crate) fn cfg() -> ClientConfig {
    ClientConfig {
        deadline: Duration::from_secs(30),
        ..ClientConfig::default()
    }
}

/// The per-attempt timeout of the failover writers, the same on both systems. A request that
/// hangs on a dead member costs this much before the client tries elsewhere, so it is part of
/// every client-observed gap; the server-side column does not depend on it.
pub(crate) const FAILOVER_RPC_TIMEOUT: Duration = Duration::from_millis(500);

fn failover_cfg() -> ClientConfig {
    ClientConfig {
        rpc_timeout: FAILOVER_RPC_TIMEOUT,
        ..cfg()
    }
}

pub(crate) async fn rsvc_put(
    c: &rsvc_client::RsvcClient<pool_svc::PoolApi>,
    key: String,
) -> Result<(), String> {
    c.call(&PoolRequest::AttrSet {
        name: key,
        value: VALUE.to_vec(),
    })
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Writes of 256-byte values under distinct keys.
/// The highest raft term any running engine knows for the pool and the management service
/// together: the number of elections since start, up to a constant.
async fn rsvc_terms(sys: &RsvcSystem) -> u64 {
    let mut by_instance = std::collections::BTreeMap::new();
    for rank in sys.running() {
        for (k, t) in sys.terms(rank).await.unwrap_or_default() {
            let e = by_instance.entry(k).or_insert(0);
            *e = t.max(*e);
        }
    }
    by_instance.values().sum()
}

/// The raft term of the etcd cluster, as its members report it.
async fn etcd_term(etcd: &EtcdCluster) -> Option<u64> {
    let mut c = etcd.client().await.ok()?;
    Some(c.status().await.ok()?.raft_term())
}

async fn writes(
    rep: &mut Report,
    o: &Opts,
    sys: &RsvcSystem,
    etcd: &EtcdCluster,
    floor_ms: f64,
) -> Result<(), String> {
    for n in o.clients() {
        let clients: Vec<_> = (0..n).map(|_| sys.pool(LABEL, cfg())).collect();
        let clients = Arc::new(clients);
        let terms_before = rsvc_terms(sys).await;
        let r = closed_loop(
            format!("rsvc: writes, {n} clients"),
            n,
            o.seconds(),
            move |c, k| {
                let clients = clients.clone();
                async move { rsvc_put(&clients[c], format!("w{n}-{c}-{k}")).await }
            },
        )
        .await;
        let rsvc_elections = rsvc_terms(sys).await.saturating_sub(terms_before);
        let client = etcd.client().await?;
        let etcd_before = etcd_term(etcd).await;
        let e = closed_loop(
            format!("etcd: writes, {n} clients"),
            n,
            o.seconds(),
            move |c, k| {
                let mut client = client.clone();
                async move {
                    client
                        .put(format!("w{n}-{c}-{k}"), VALUE.to_vec(), None)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            },
        )
        .await;
        if r.errors > 0 || e.errors > 0 {
            eprintln!(
                "writes, {n} clients: {} rsvc and {} etcd errors",
                r.errors, e.errors
            );
        }
        let etcd_elections = match (etcd_before, etcd_term(etcd).await) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64),
            _ => None,
        };
        // Elections under load show whether the timers are too tight for the machine.
        let row = rep.row(
            format!("elections during writes, {n} clients"),
            "count",
            Better::Lower,
        );
        row.rsvc = Some(rsvc_elections as f64);
        row.etcd = etcd_elections;
        let row = rep.row(format!("write, {n} clients"), "ops/s", Better::Higher);
        row.rsvc = Some(r.rate());
        row.etcd = Some(e.rate());
        if n == 1 {
            row.floor = Some(1000.0 / floor_ms);
        }
        let (rp, ep) = (Pcts::of(&r.hist), Pcts::of(&e.hist));
        for (name, a, b) in [("p50", rp.p50, ep.p50), ("p99", rp.p99, ep.p99)] {
            let row = rep.row(format!("write, {n} clients, {name}"), "ms", Better::Lower);
            row.rsvc = Some(a);
            row.etcd = Some(b);
            if n == 1 && name == "p50" {
                row.floor = Some(floor_ms);
            }
        }
    }
    Ok(())
}

/// Linearizable reads of preloaded keys.
async fn reads(
    rep: &mut Report,
    o: &Opts,
    sys: &RsvcSystem,
    etcd: &EtcdCluster,
    rtt_ms: f64,
) -> Result<(), String> {
    let pb = bar(format!("preloading {READ_KEYS} keys"));
    let loader = sys.pool(LABEL, cfg());
    let mut ec = etcd.client().await?;
    for k in 0..READ_KEYS {
        rsvc_put(&loader, format!("r{k}")).await?;
        ec.put(format!("r{k}"), VALUE.to_vec(), None)
            .await
            .map_err(|e| e.to_string())?;
    }
    pb.finish_and_clear();
    let leader = etcd.leader(DEADLINE).await?;
    for n in o.clients() {
        let clients: Arc<Vec<_>> = Arc::new((0..n).map(|_| sys.pool(LABEL, cfg())).collect());
        let r = closed_loop(
            format!("rsvc: reads, {n} clients"),
            n,
            o.seconds(),
            move |c, k| {
                let clients = clients.clone();
                async move {
                    let key = format!("r{}", (c as u64 * 7919 + k) % READ_KEYS as u64);
                    match clients[c].call(&PoolRequest::AttrGet { name: key }).await {
                        Ok(PoolResponse::Attr(Some(_))) => Ok(()),
                        Ok(other) => Err(format!("unexpected {other:?}")),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await;
        let mut cols = vec![("rsvc", r)];
        for (name, client) in [
            ("etcd, all members", etcd.client().await?),
            ("etcd, leader only", etcd.client_of(leader).await?),
        ] {
            let e = closed_loop(
                format!("{name}: reads, {n} clients"),
                n,
                o.seconds(),
                move |c, k| {
                    let mut client = client.clone();
                    async move {
                        let key = format!("r{}", (c as u64 * 7919 + k) % READ_KEYS as u64);
                        match client.get(key, None).await {
                            Ok(r) if !r.kvs().is_empty() => Ok(()),
                            Ok(_) => Err("missing".into()),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                },
            )
            .await;
            cols.push((name, e));
        }
        let rsvc = cols[0].1.rate();
        for (name, run) in &cols[1..] {
            let row = rep.row(format!("read, {n} clients ({name})"), "ops/s", Better::Higher);
            row.rsvc = Some(rsvc);
            row.etcd = Some(run.rate());
            if n == 1 {
                row.floor = Some(1000.0 / rtt_ms);
            }
        }
        let row = rep.row(format!("read, {n} clients, p50"), "ms", Better::Lower);
        row.rsvc = Some(Pcts::of(&cols[0].1.hist).p50);
        row.etcd = Some(Pcts::of(&cols[1].1.hist).p50);
        if n == 1 {
            row.floor = Some(rtt_ms);
        }
    }
    Ok(())
}

/// A writer that writes one key after another and records when each was acknowledged.
pub(crate) struct Writer {
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub(crate) fn start<F, Fut>(prefix: String, put: F) -> Writer
    where
        F: Fn(String) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acked.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let key = format!("{prefix}{i:08}");
                if put(key.clone()).await.is_ok() {
                    a.lock().expect("lock").push((key, Instant::now()));
                    i += 1;
                } else {
                    // A failed write is retried under a new key: it may or may not have landed.
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        Writer { acked, stop, task }
    }

    fn last_ack(&self) -> Option<Instant> {
        self.acked.lock().expect("lock").last().map(|(_, t)| *t)
    }

    /// The client-observed outage around a fault injected at `at`, once a new leader was
    /// seen serving at `served`: the longest interval between consecutive acknowledgements from
    /// the last one before `at` to the first one after `served`. (The first ack after `at`
    /// alone would be wrong: a write already committed when the fault hit may be acknowledged
    /// a moment later.)
    pub(crate) async fn outage(&self, at: Instant, served: Instant) -> Result<Duration, String> {
        wait_for(
            "a write acknowledged after the new leader served",
            DEADLINE,
            Duration::from_millis(2),
            || async { self.last_ack().filter(|t| *t > served).map(|_| ()) },
        )
        .await?;
        let acked = self.acked.lock().expect("lock");
        let start = acked.iter().rposition(|(_, t)| *t <= at).unwrap_or(0);
        let end = acked
            .iter()
            .position(|(_, t)| *t > served)
            .ok_or("no ack after the new leader served")?;
        Ok(acked[start..=end]
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default())
    }

    pub(crate) async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let acked = self.acked.lock().expect("lock");
        acked.iter().map(|(k, _)| k.clone()).collect()
    }
}

/// Waits until the writer has acknowledged writes again after `since`.
pub(crate) async fn flowing(w: &Writer, since: Instant) -> Result<(), String> {
    wait_for("writes to flow", DEADLINE, Duration::from_millis(5), || async {
        w.last_ack().filter(|t| *t > since).map(|_| ())
    })
    .await
}

/// Gaps (ms) seen by a continuous writer when rsvc's pool leader is killed (`graceful`:
/// SIGTERMed) `trials` times, and the times until a new leader served (server side).
async fn rsvc_failover(
    sys: &mut RsvcSystem,
    trials: usize,
    graceful: bool,
    tag: &str,
) -> Result<(Vec<f64>, Vec<f64>, u64), String> {
    let c = Arc::new(sys.pool(LABEL, failover_cfg()));
    let w = {
        let c = c.clone();
        Writer::start(format!("fo-{tag}-"), move |k| {
            let c = c.clone();
            async move { rsvc_put(&c, k).await }
        })
    };
    flowing(&w, Instant::now()).await?;
    let (mut gaps, mut elected) = (Vec::new(), Vec::new());
    for t in 0..trials {
        let pb = bar(format!("rsvc {tag}: trial {}/{trials}", t + 1));
        let leader = sys.leader("pool", LABEL, DEADLINE).await?;
        flowing(&w, Instant::now()).await?;
        let at = Instant::now();
        if graceful {
            sys.stop(leader).await?;
        } else {
            sys.kill(leader).await?;
        }
        let new = sys.leader("pool", LABEL, DEADLINE).await?;
        let served = Instant::now();
        elected.push((served - at).as_secs_f64() * 1000.0);
        let gap = w.outage(at, served).await?;
        gaps.push(gap.as_secs_f64() * 1000.0);
        debug_assert_ne!(new, leader);
        sys.restart(leader).await?;
        // NB: a restarted rdb replica grants no vote for election_timeout_max (it does not
        // remember which leader's read lease it promised to respect). Until then the group
        // would not survive the next kill, so the next trial waits for that window to pass:
        // the recovery an operator must allow between two failures, which etcd does not need.
        let hold = Duration::from_millis(sys.timers.election_max_ms);
        let restarted = Instant::now();
        wait_for(
            "the restarted replica's no-vote window",
            DEADLINE,
            Duration::from_millis(50),
            || async { (restarted.elapsed() >= hold).then_some(()) },
        )
        .await?;
        pb.finish_and_clear();
    }
    let acked = w.finish().await;
    let lost = rsvc_lost(sys, &acked).await?;
    Ok((gaps, elected, lost))
}

async fn rsvc_lost(sys: &RsvcSystem, acked: &[String]) -> Result<u64, String> {
    let c = sys.pool(LABEL, cfg());
    let PoolResponse::Names(names) = c.call(&PoolRequest::AttrList).await.map_err(|e| e.to_string())? else {
        return Err("unexpected answer to AttrList".into());
    };
    let present: HashSet<String> = names.into_iter().collect();
    Ok(acked.iter().filter(|k| !present.contains(*k)).count() as u64)
}

async fn etcd_failover(
    etcd: &mut EtcdCluster,
    trials: usize,
    graceful: bool,
    tag: &str,
) -> Result<(Vec<f64>, Vec<f64>, u64), String> {
    let client = etcd.client_with_timeout(FAILOVER_RPC_TIMEOUT).await?;
    let w = {
        let client = client.clone();
        Writer::start(format!("fo-{tag}-"), move |k| {
            let mut client = client.clone();
            async move {
                client
                    .put(k, VALUE.to_vec(), None)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
    };
    flowing(&w, Instant::now()).await?;
    let (mut gaps, mut elected) = (Vec::new(), Vec::new());
    for t in 0..trials {
        let pb = bar(format!("etcd {tag}: trial {}/{trials}", t + 1));
        let leader = etcd.leader(DEADLINE).await?;
        flowing(&w, Instant::now()).await?;
        let at = Instant::now();
        if graceful {
            let to = *etcd.members.keys().find(|i| **i != leader).ok_or("one member")?;
            etcd.move_leader(leader, to).await?;
            etcd.stop(leader).await?;
        } else {
            etcd.kill(leader).await?;
        }
        etcd.leader(DEADLINE).await?;
        let served = Instant::now();
        elected.push((served - at).as_secs_f64() * 1000.0);
        let gap = w.outage(at, served).await?;
        gaps.push(gap.as_secs_f64() * 1000.0);
        etcd.restart(leader).await?;
        pb.finish_and_clear();
    }
    let acked = w.finish().await;
    let mut c = etcd.client().await?;
    let mut lost = 0u64;
    for k in &acked {
        let r = c.get(k.as_str(), None).await.map_err(|e| e.to_string())?;
        if r.kvs().is_empty() {
            lost += 1;
        }
    }
    Ok((gaps, elected, lost))
}

fn median(v: &[f64]) -> Option<f64> {
    quantile(v, 0.5)
}

fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some(s[((s.len() - 1) as f64 * q).round() as usize])
}

async fn failovers(
    rep: &mut Report,
    o: &Opts,
    sys: &mut RsvcSystem,
    etcd: &mut EtcdCluster,
    setting: &str,
    graceful: bool,
) -> Result<Vec<f64>, String> {
    let kind = if graceful {
        "hand-over (SIGTERM)"
    } else {
        "failover (kill -9)"
    };
    let tag = format!("{}{}", if graceful { "g" } else { "k" }, setting.len());
    let (rg, re, rl) = rsvc_failover(sys, o.trials(), graceful, &tag).await?;
    let (eg, ee, el) = etcd_failover(etcd, o.trials(), graceful, &tag).await?;
    for (what, r, e) in [
        ("client gap p50", median(&rg), median(&eg)),
        ("client gap max", quantile(&rg, 1.0), quantile(&eg, 1.0)),
        ("new leader seen server-side p50", median(&re), median(&ee)),
    ] {
        let row = rep.row(format!("{kind}, {setting}: {what}"), "ms", Better::Lower);
        row.rsvc = r;
        row.etcd = e;
    }
    rep.lost_writes.push((format!("rsvc, {kind}, {setting}"), rl));
    rep.lost_writes.push((format!("etcd, {kind}, {setting}"), el));
    Ok(rg)
}

/// Creates the bench's pool and waits until it serves a write, so that no measurement
/// includes the first election.
pub(crate) async fn ready_pool(sys: &RsvcSystem) -> Result<(), String> {
    sys.create_pool(LABEL, 3).await?;
    sys.leader("pool", LABEL, DEADLINE).await?;
    rsvc_put(&sys.pool(LABEL, cfg()), "warm-up".into()).await
}

/// The whole run.
pub(crate) async fn run(o: Opts) -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix("rsvc-bench-")
        .tempdir_in(o.dir.clone().unwrap_or_else(|| PathBuf::from(".")))
        .map_err(|e| e.to_string())?;
    let dir = tmp.path().to_path_buf();
    let r = run_in(&o, &dir).await;
    if o.keep {
        let kept = tmp.keep();
        eprintln!("rsvc-bench: data and logs kept in {}", kept.display());
    }
    r
}

async fn run_in(o: &Opts, dir: &Path) -> Result<(), String> {
    let o = o.clone();
    let dir = dir.to_path_buf();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let cmd = EngineCmd {
        program: exe,
        prefix: vec!["engine".into(), "serve".into()],
    };
    let mut rep = Report {
        machine: machine(),
        ..Report::default()
    };
    eprintln!("rsvc-bench: data in {} ({})", dir.display(), rep.machine);

    // Each part runs on its own systems; a part that fails is reported in the table and the
    // run goes on, so that one failure does not cost the figures of the others.
    let fsync = fsync_floor(&dir, if o.quick { 200 } else { 2000 })?;
    let r = rep.row("floor: fdatasync of 4 KiB, p50", "ms", Better::Lower);
    r.floor = Some(fsync.p50);
    let mut rsvc_kill_gaps = None;
    match defaults_part(&mut rep, &o, &dir, &cmd, fsync.p50).await {
        Ok(gaps) => rsvc_kill_gaps = gaps,
        Err(e) => rep.failures.push(format!(
            "writes, reads, failover and hand-over with defaults: {e}"
        )),
    }
    if o.runs(Part::Fast) {
        if let Err(e) = fast_part(&mut rep, &o, &dir, &cmd).await {
            rep.failures.push(format!("failover with matched timers: {e}"));
        }
    }
    if o.runs(Part::Lease) {
        if let Err(e) = lease_part(&mut rep, &o, &dir, rsvc_kill_gaps.as_deref()).await {
            rep.failures.push(format!("lease-election pattern: {e}"));
        }
    }
    if o.runs(Part::Tls) {
        if let Err(e) = crate::tls::run(&mut rep, &o, &dir, &cmd).await {
            rep.failures.push(format!("the cost of TLS: {e}"));
        }
    }
    if o.runs(Part::Snapshot) {
        let mib = o.snapshot_mib();
        let floor = crate::snapshot::write_floor(&dir, mib)?;
        if let Err(e) = crate::snapshot::run(&mut rep, &dir, cmd.clone(), mib, floor).await {
            rep.failures.push(format!("snapshot install: {e}"));
        }
    }
    if o.runs(Part::Scale) {
        if let Err(e) = crate::scale::run(&mut rep, &dir, cmd, &o.instances(), o.idle()).await {
            rep.failures.push(format!("scale: {e}"));
        }
    }

    let table = rep.table();
    if o.json {
        eprintln!("{table}");
        println!(
            "{}",
            serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?
        );
    } else {
        println!("{table}");
    }
    let lost: u64 = rep.lost_writes.iter().map(|(_, n)| n).sum();
    if lost > 0 {
        return Err(format!("{lost} acknowledged writes were lost"));
    }
    if !rep.failures.is_empty() {
        return Err(format!(
            "{} part(s) failed: {}",
            rep.failures.len(),
            rep.failures.join("; ")
        ));
    }
    Ok(())
}

/// Production defaults on both sides (rsvc 150-300 ms / 50 ms, etcd 1000 / 100): writes,
/// reads, kill -9 failover and SIGTERM hand-over, as far as `o` asks for them. Returns rsvc's
/// kill -9 gaps, if measured, for the lease-election row.
async fn defaults_part(
    rep: &mut Report,
    o: &Opts,
    dir: &Path,
    cmd: &EngineCmd,
    fsync_ms: f64,
) -> Result<Option<Vec<f64>>, String> {
    if ![Part::Writes, Part::Reads, Part::Failover, Part::Handover]
        .iter()
        .any(|p| o.runs(*p))
    {
        return Ok(None);
    }
    let d = Timers::defaults();
    let mut sys = RsvcSystem::start(&dir.join("rsvc-defaults"), cmd.clone(), 3, d).await?;
    ready_pool(&sys).await?;
    let mut etcd = EtcdCluster::start(&dir.join("etcd-defaults"), 3, 100, 1000).await?;
    let rtt = rtt_floor(&sys, if o.quick { 200 } else { 2000 }).await?;
    let r = rep.row("floor: empty gRPC round trip, p50", "ms", Better::Lower);
    r.floor = Some(rtt.p50);
    if o.runs(Part::Writes) {
        writes(rep, o, &sys, &etcd, fsync_ms + rtt.p50).await?;
    }
    if o.runs(Part::Reads) {
        reads(rep, o, &sys, &etcd, rtt.p50).await?;
    }
    let setting = format!(
        "defaults (rsvc {}-{}/{} ms, etcd 1000/100)",
        d.election_min_ms, d.election_max_ms, d.heartbeat_ms
    );
    let mut gaps = None;
    if o.runs(Part::Failover) {
        gaps = Some(failovers(rep, o, &mut sys, &mut etcd, &setting, false).await?);
    }
    if o.runs(Part::Handover) {
        failovers(rep, o, &mut sys, &mut etcd, &setting, true).await?;
    }
    Ok(gaps)
}

/// The etcd lease-election pattern (a 5 s lease) against rsvc's kill -9 failover with
/// production defaults (`rsvc_gaps`, if that part ran).
async fn lease_part(rep: &mut Report, o: &Opts, dir: &Path, rsvc_gaps: Option<&[f64]>) -> Result<(), String> {
    let (eg, ee, el) = crate::lease::run(dir, o.trials()).await?;
    let kind = "failover (kill -9), rsvc defaults vs etcd lease-election pattern (5 s lease)";
    for (what, r, e) in [
        ("client gap p50", rsvc_gaps.and_then(median), median(&eg)),
        (
            "client gap max",
            rsvc_gaps.and_then(|g| quantile(g, 1.0)),
            quantile(&eg, 1.0),
        ),
        ("standby elected p50", None, median(&ee)),
    ] {
        let row = rep.row(format!("{kind}: {what}"), "ms", Better::Lower);
        row.rsvc = r;
        row.etcd = e;
    }
    rep.lost_writes.push(("etcd lease-election pattern".into(), el));
    Ok(())
}

/// Matched fast timers, an election timeout of 300 ms and a heartbeat of 50 ms on both:
/// kill -9 failover.
async fn fast_part(rep: &mut Report, o: &Opts, dir: &Path, cmd: &EngineCmd) -> Result<(), String> {
    let f = Timers::matched(300, 50);
    let mut sys = RsvcSystem::start(&dir.join("rsvc-fast"), cmd.clone(), 3, f).await?;
    ready_pool(&sys).await?;
    let mut etcd = EtcdCluster::start(&dir.join("etcd-fast"), 3, 50, 300).await?;
    failovers(rep, o, &mut sys, &mut etcd, "matched timers (300/50 ms)", false).await?;
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs, Linux {}", kernel.trim())
}
