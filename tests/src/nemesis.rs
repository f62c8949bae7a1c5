//! The fault suite: real engine processes, a checked concurrent workload, and nemeses.
//!
//! One run starts a system of engines behind [`FaultNet`](crate::faultnet::FaultNet) proxies, creates a pool, and lets
//! `clients` tasks run reads, writes and compare-and-sets on `keys` registers (pool attributes),
//! and `txn_clients` tasks run multi-key transactions that read and append to `lists` lists
//! (pool attributes too, through `AttrTxn`), each call with its own deadline, recording every
//! invocation and every return. Meanwhile a
//! nemesis, driven by the run's seed, injects one fault at a time (leader-biased or random
//! target), holds it, heals it, and waits for the service to serve a write again (the bound is
//! [`RunConfig::liveness`]). At the end everything heals, every replica in turn leads and reads
//! every register back (those reads join the history), and the history is checked:
//!
//! - linearizability of every register ([`crate::lincheck`]), failed mutations counting as
//!   indeterminate;
//! - strict serializability of the list-append transactions ([`crate::elle`]): no dependency
//!   cycle, no lost append, no read that disagrees with another;
//! - no acknowledged write lost: each register's final value is its last acknowledged write or
//!   a mutation that may have landed after it;
//! - liveness: how long clients saw no acknowledged write around each fault, by fault type;
//! - pauses of a follower must not depose a healthy leader (pre-vote): the pool's term stays.
//!
//! The nemesis sleeps only to give a fault (or a calm stretch between faults) its length: that
//! length is the experiment, drawn from the seed. Everything that waits for the system to do
//! something (a leader, a write after a heal, a replica catching up) waits on a condition with
//! a deadline.
//!
//! A failing run keeps its directory (engine logs and `history.txt`) and prints its seed; the
//! same seed replays the same schedule of faults (the interleaving of real processes differs).
//!
//! CAVEATS: faults are sequential, not overlapping; the disk nemesis needs root (a tmpfs per
//! engine) and is skipped without it, the fsync nemeses an engine built with the `failpoints`
//! feature (rsvc-fault's own are); clock skew is injected only as the 8x slow clock that the
//! checker must catch.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pool_svc::{AttrOp, PoolRequest, PoolResponse};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rsvc_client::mgmt::{MgmtRequest, MgmtResponse};
use rsvc_client::ClientConfig;

use crate::elle::{self, Mop, Txn};
use crate::lincheck::{self, Event, Op, Outcome};
use crate::rsvc::{EngineCmd, RsvcSystem, Spec, Timers};
use crate::{wait_for, DEADLINE};

/// The kinds of fault the nemesis injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// kill -9 of an engine, restarted at heal.
    Kill,
    /// SIGSTOP shorter than an election timeout.
    PauseShort,
    /// SIGSTOP of several election timeouts.
    PauseLong,
    /// One engine cut off from the others, both ways (clients still reach it).
    Isolate,
    /// What one engine sends to another is lost; the other way works.
    OneWay,
    /// Two engines cannot reach each other; a third reaches both.
    Bridge,
    /// An engine's links go down and up every few hundred ms.
    Flap,
    /// Every link of an engine is slow.
    Delay,
    /// The pool's leadership moves to another replica.
    Transfer,
    /// A replica is removed and another added on a spare engine (needs more engines than
    /// replicas).
    Move,
    /// An engine's filesystem fills up from outside (needs root).
    DiskFull,
    /// Every log commit (fsync) of an engine takes hundreds of ms longer (a failpoint).
    FsyncStall,
    /// Every log commit of an engine fails, as an fsync returning EIO (a failpoint); its
    /// replicas stop, and the engine reopens them once the disk works again.
    FsyncFail,
    /// kill -9 of an engine, its data directory wiped, and a restart: the engine comes back
    /// with no replicas, and the management service must re-create them under a new
    /// generation (the lost identities never vote again).
    Wipe,
    /// The leader's clock runs 8 times slow (a failpoint on its lease timers) while it is
    /// isolated: it keeps serving reads alone after the others elected a new leader. Not in
    /// [`FaultKind::ALL`]: it breaks the lease's assumption of bounded clock drift on purpose,
    /// and the checker must then find stale reads.
    ClockSlow,
}

impl FaultKind {
    /// Every kind, in table order.
    pub const ALL: [FaultKind; 14] = [
        FaultKind::Kill,
        FaultKind::Wipe,
        FaultKind::PauseShort,
        FaultKind::PauseLong,
        FaultKind::Isolate,
        FaultKind::OneWay,
        FaultKind::Bridge,
        FaultKind::Flap,
        FaultKind::Delay,
        FaultKind::Transfer,
        FaultKind::Move,
        FaultKind::DiskFull,
        FaultKind::FsyncStall,
        FaultKind::FsyncFail,
    ];

    /// Its name on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Wipe => "wipe",
            FaultKind::PauseShort => "pause-short",
            FaultKind::PauseLong => "pause-long",
            FaultKind::Isolate => "isolate",
            FaultKind::OneWay => "one-way",
            FaultKind::Bridge => "bridge",
            FaultKind::Flap => "flap",
            FaultKind::Delay => "delay",
            FaultKind::Transfer => "transfer",
            FaultKind::Move => "move",
            FaultKind::DiskFull => "disk-full",
            FaultKind::FsyncStall => "fsync-stall",
            FaultKind::FsyncFail => "fsync-eio",
            FaultKind::ClockSlow => "clock-slow",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Result<FaultKind, String> {
        let all = || Self::ALL.into_iter().chain([FaultKind::ClockSlow]);
        all().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<_> = all().map(|k| k.name()).collect();
            format!("unknown fault {s:?}; known: {}", names.join(", "))
        })
    }
}

/// One run's shape.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The seed of the fault schedule and the workload's choices.
    pub seed: u64,
    /// Engines (3 or 5); the pool has 3 replicas.
    pub engines: u32,
    /// Concurrent clients.
    pub clients: u32,
    /// Registers.
    pub keys: u32,
    /// Concurrent clients running list-append transactions.
    pub txn_clients: u32,
    /// Lists those transactions read and append to at a time (each takes a bounded number of
    /// appends, then a fresh one replaces it).
    pub lists: u32,
    /// How long the workload and the nemesis run.
    pub duration: Duration,
    /// The faults to choose from.
    pub faults: Vec<FaultKind>,
    /// Each client call's deadline.
    pub op_timeout: Duration,
    /// After a fault heals, a write must be acknowledged within this.
    pub liveness: Duration,
    /// Raft timers of the engines.
    pub timers: Timers,
    /// The engine program.
    pub cmd: EngineCmd,
    /// Where the run's data and logs go (a directory of its own is made inside).
    pub dir: PathBuf,
}

impl RunConfig {
    /// A run of `engines` engines with every fault that can run here, for `duration`: 8
    /// clients on 16 registers, 4 transaction clients on 8 lists, 1 s per call,
    /// `--fast-timers`, a write within 15 s of a heal.
    pub fn new(seed: u64, engines: u32, duration: Duration, cmd: EngineCmd, dir: &Path) -> Self {
        RunConfig {
            seed,
            engines,
            clients: 8,
            keys: 16,
            txn_clients: 4,
            lists: 8,
            duration,
            faults: FaultKind::ALL.to_vec(),
            op_timeout: Duration::from_secs(1),
            liveness: Duration::from_secs(15),
            timers: Timers::fast(),
            cmd,
            dir: dir.to_path_buf(),
        }
    }
}

/// The quick profile CI runs: fixed seeds, every nemesis, about two minutes. Three engines
/// twice, and five once (the only shape where a replica can move to a spare engine).
pub fn quick_profile(cmd: EngineCmd, dir: &Path) -> Vec<RunConfig> {
    vec![
        RunConfig::new(1, 3, Duration::from_secs(30), cmd.clone(), dir),
        RunConfig::new(2, 3, Duration::from_secs(30), cmd.clone(), dir),
        RunConfig::new(3, 5, Duration::from_secs(30), cmd, dir),
    ]
}

/// One fault as it happened.
#[derive(Clone, Debug)]
pub struct FaultRecord {
    /// What.
    pub kind: FaultKind,
    /// On whom, as text.
    pub target: String,
    /// When it began and healed, ns since the run began.
    pub start: u64,
    /// When it healed.
    pub healed: u64,
    /// How long after healing the first write was acknowledged.
    pub recovery: Option<Duration>,
    /// The longest stretch without an acknowledged write around the fault.
    pub gap: Duration,
    /// For pauses of a follower: whether the pool's leader was deposed.
    pub deposed: Option<bool>,
}

/// What one run found.
#[derive(Debug)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// Operations recorded (the final reads included).
    pub ops: usize,
    /// Of which acknowledged.
    pub acked: usize,
    /// Of which indeterminate (failed mutations).
    pub indeterminate: usize,
    /// The faults, in order.
    pub faults: Vec<FaultRecord>,
    /// Registers whose history is not linearizable, with a dump.
    pub violations: Vec<String>,
    /// Registers the checker could not decide within its budget.
    pub undecided: usize,
    /// List-append transactions recorded (the final reads included).
    pub txns: usize,
    /// What the transaction checker found, one line each.
    pub txn_anomalies: Vec<String>,
    /// Registers whose final value lost an acknowledged write.
    pub lost: Vec<String>,
    /// Liveness failures: a fault after which no write was acknowledged in time.
    pub stuck: Vec<String>,
    /// Where the run's files are (kept when it failed).
    pub dir: PathBuf,
}

impl RunReport {
    /// Whether the run found nothing wrong.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
            && self.txn_anomalies.is_empty()
            && self.lost.is_empty()
            && self.stuck.is_empty()
            && self.faults.iter().all(|f| f.deposed != Some(true))
    }
}

/// The shared history of a run: register operations and list-append transactions, and the
/// lists the transactions work on.
#[derive(Default)]
struct History {
    events: Mutex<Vec<Event>>,
    txns: Mutex<Vec<Txn>>,
    lists: Mutex<ListKeys>,
}

/// Appends a list takes before a fresh list replaces it (Elle's writes per key). Every append
/// rewrites the whole list in one log entry, so unbounded lists would make entries, and the
/// log, grow without end.
const APPENDS_PER_LIST: u32 = 64;

/// The lists in use: `active` (as many as the run's `lists`) are the ones transactions pick
/// from; a list that took [`APPENDS_PER_LIST`] appends is replaced by a fresh one.
#[derive(Default)]
struct ListKeys {
    active: Vec<u64>,
    appends: BTreeMap<u64, u32>,
    /// Lists ever used are `0..next`.
    next: u64,
}

impl ListKeys {
    fn start(&mut self, n: u32) {
        self.active = (0..u64::from(n)).collect();
        self.next = u64::from(n);
    }

    /// A list to read.
    fn pick_read(&self, rng: &mut StdRng) -> String {
        format!("l{}", self.active.choose(rng).expect("lists"))
    }

    /// A list to append to; counts the append.
    fn pick_append(&mut self, rng: &mut StdRng) -> String {
        let i = rng.random_range(0..self.active.len());
        let k = self.active[i];
        let n = self.appends.entry(k).or_default();
        *n += 1;
        if *n >= APPENDS_PER_LIST {
            self.active[i] = self.next;
            self.next += 1;
        }
        format!("l{k}")
    }
}

impl History {
    fn push(&self, e: Event) {
        self.events.lock().expect("lock").push(e);
    }

    fn push_txn(&self, t: Txn) {
        self.txns.lock().expect("lock").push(t);
    }

    /// The first return of an acknowledged mutation after `t`, if any (polled while waiting
    /// for a write after a heal: one pass, no copy).
    fn first_acked_write_after(&self, t: u64) -> Option<u64> {
        let ev = self.events.lock().expect("lock");
        ev.iter()
            .filter(|e| !matches!(e.op, Op::Read(_)))
            .filter_map(|e| e.ret)
            .filter(|r| *r > t)
            .min()
    }

    /// Return times of acknowledged mutations, sorted.
    fn acked_writes(&self) -> Vec<u64> {
        let ev = self.events.lock().expect("lock");
        let mut t: Vec<u64> = ev
            .iter()
            .filter(|e| !matches!(e.op, Op::Read(_)))
            .filter_map(|e| e.ret)
            .collect();
        t.sort_unstable();
        t
    }
}

/// The label of the pool a run works on.
const POOL: &str = "regs";

/// Transaction clients are numbered from here on (register clients from 1).
const TXN_CLIENTS: u32 = 2000;

/// The final reads are numbered from here on.
const FINAL_READERS: u32 = 10_000;

/// rdb's failpoint on every log commit (its fsync).
const LOG_COMMIT: &str = "rdb::log::commit";

/// rdb's failpoint that slows a replica's lease clock.
const SLOW_CLOCK: &str = "rdb::lease::slow_clock";

fn parse_value(v: Option<Vec<u8>>) -> Result<Option<u64>, String> {
    v.map(|b| {
        std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("a register holds {b:?}, not a number"))
    })
    .transpose()
}

/// One client: picks operations until `stop`, records each.
async fn client_loop(
    id: u32,
    sys_pool: rsvc_client::RsvcClient<pool_svc::PoolApi>,
    cfg: RunConfig,
    t0: Instant,
    history: Arc<History>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ (u64::from(id) << 40));
    let mut n = 0u64;
    let now = || t0.elapsed().as_nanos() as u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = format!("r{}", rng.random_range(0..cfg.keys));
        n += 1;
        let fresh = (u64::from(id) << 32) | n;
        let roll: f64 = rng.random();
        let (req, op) = if roll < 0.5 {
            (PoolRequest::AttrGet { name: key.clone() }, Op::Read(None))
        } else if roll < 0.75 {
            let req = PoolRequest::AttrSet {
                name: key.clone(),
                value: fresh.to_string().into_bytes(),
            };
            (req, Op::Write(fresh))
        } else {
            // Expect a value this client may have seen: its own last write or nothing.
            let expect = if rng.random_bool(0.2) {
                None
            } else {
                Some((u64::from(id) << 32) | n.saturating_sub(rng.random_range(1..4)))
            };
            let req = PoolRequest::AttrCas {
                name: key.clone(),
                expect: expect.map(|v| v.to_string().into_bytes()),
                value: fresh.to_string().into_bytes(),
            };
            (
                req,
                Op::Cas {
                    expect,
                    new: fresh,
                    swapped: false,
                },
            )
        };
        let call = now();
        let res = sys_pool.call_until(&req, Instant::now() + cfg.op_timeout).await;
        let ret = now();
        let event = |ret: Option<u64>, op: Op| Event {
            client: id,
            key: key.clone(),
            call,
            ret,
            op,
        };
        match (res, op) {
            (Ok(PoolResponse::Attr(v)), Op::Read(_)) => {
                history.push(event(Some(ret), Op::Read(parse_value(v)?)));
            }
            (Ok(PoolResponse::Ok), Op::Write(_)) => history.push(event(Some(ret), op)),
            // A refused swap answers with what the register held: a read of it.
            (
                Ok(PoolResponse::Swapped {
                    swapped: false,
                    current,
                }),
                Op::Cas { .. },
            ) => {
                history.push(event(Some(ret), Op::Read(parse_value(current)?)));
            }
            (Ok(PoolResponse::Swapped { swapped: true, .. }), Op::Cas { expect, new, .. }) => {
                history.push(event(
                    Some(ret),
                    Op::Cas {
                        expect,
                        new,
                        swapped: true,
                    },
                ));
            }
            (Ok(other), _) => return Err(format!("client {id}: unexpected answer {other:?} to {req:?}")),
            // A failed read observed nothing.
            (Err(_), Op::Read(_)) => {}
            // A failed mutation may still land, at any time, or never.
            (Err(_), op) => history.push(event(None, op)),
        }
    }
    Ok(())
}

/// A list as an attribute holds it: each element in decimal, followed by a comma.
fn parse_list(v: Option<Vec<u8>>) -> Result<Vec<u64>, String> {
    let Some(b) = v else { return Ok(Vec::new()) };
    let s = std::str::from_utf8(&b).map_err(|_| format!("a list holds {b:?}, not text"))?;
    s.split_terminator(',')
        .map(|e| e.parse().map_err(|_| format!("a list holds {s:?}, not numbers")))
        .collect()
}

/// The `AttrTxn` that runs `mops`, the list-append transaction.
fn attr_ops(mops: &[Mop]) -> Vec<AttrOp> {
    mops.iter()
        .map(|m| match m {
            Mop::Read { key, .. } => AttrOp::Get { name: key.clone() },
            Mop::Append { key, value } => AttrOp::Append {
                name: key.clone(),
                value: format!("{value},").into_bytes(),
            },
        })
        .collect()
}

/// Runs `mops` as one transaction and records it: committed with what each read returned,
/// or, if it failed and appended something, indeterminate. A failed read-only transaction
/// observed nothing and is left out.
async fn run_txn(
    client: &rsvc_client::RsvcClient<pool_svc::PoolApi>,
    id: u32,
    mut mops: Vec<Mop>,
    deadline: Instant,
    t0: Instant,
    history: &History,
) -> Result<(), String> {
    let now = || t0.elapsed().as_nanos() as u64;
    let req = PoolRequest::AttrTxn { ops: attr_ops(&mops) };
    let call = now();
    let res = client.call_until(&req, deadline).await;
    let ret = now();
    match res {
        Ok(PoolResponse::Txn { ok: true, values }) => {
            let mut values = values.into_iter();
            for m in &mut mops {
                if let Mop::Read { value, .. } = m {
                    let v = values.next().ok_or("fewer values than reads")?;
                    *value = Some(parse_list(v)?);
                }
            }
            history.push_txn(Txn {
                client: id,
                call,
                ret: Some(ret),
                ops: mops,
            });
        }
        Ok(other) => {
            return Err(format!(
                "client {id}: unexpected answer {other:?} to a transaction"
            ))
        }
        Err(_) if mops.iter().any(|m| matches!(m, Mop::Append { .. })) => history.push_txn(Txn {
            client: id,
            call,
            ret: None,
            ops: mops,
        }),
        Err(_) => {}
    }
    Ok(())
}

/// One transaction client: random transactions of one to four reads and appends on the
/// run's lists, until `stop`. Every appended value is unique (client id and counter).
async fn txn_loop(
    id: u32,
    client: rsvc_client::RsvcClient<pool_svc::PoolApi>,
    cfg: RunConfig,
    t0: Instant,
    history: Arc<History>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ (u64::from(id) << 40) ^ 0x7478);
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mops = {
            let mut lists = history.lists.lock().expect("lock");
            (0..rng.random_range(1..=4))
                .map(|_| {
                    if rng.random_bool(0.5) {
                        Mop::Read {
                            key: lists.pick_read(&mut rng),
                            value: None,
                        }
                    } else {
                        n += 1;
                        Mop::Append {
                            key: lists.pick_append(&mut rng),
                            value: (u64::from(id) << 32) | n,
                        }
                    }
                })
                .collect()
        };
        run_txn(&client, id, mops, Instant::now() + cfg.op_timeout, t0, &history).await?;
    }
    Ok(())
}

/// A client that knows only one replica (the isolated one), for the length of a fault: it
/// shows that an isolated old leader refuses what it can no longer serve.
struct Pinned<'a> {
    id: u32,
    cfg: &'a RunConfig,
    client_cfg: &'a ClientConfig,
    t0: Instant,
    history: &'a Arc<History>,
}

/// A running [`Pinned`] client: one task on registers, one on list transactions.
struct PinnedRun {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Pinned<'_> {
    fn start(self, sys: &RsvcSystem, rank: u32) -> PinnedRun {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        let pinned = || sys.pool_pinned(POOL, rank, self.client_cfg.clone());
        if let (Some(client), Some(txn_client)) = (pinned(), pinned()) {
            tasks.push(tokio::spawn(client_loop(
                self.id,
                client,
                self.cfg.clone(),
                self.t0,
                self.history.clone(),
                stop.clone(),
            )));
            tasks.push(tokio::spawn(txn_loop(
                TXN_CLIENTS + self.id,
                txn_client,
                self.cfg.clone(),
                self.t0,
                self.history.clone(),
                stop.clone(),
            )));
        }
        PinnedRun { stop, tasks }
    }
}

impl PinnedRun {
    async fn stop(self) -> Result<(), String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        Ok(())
    }
}

/// A tmpfs per engine, for the disk nemesis (root only).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem at `dir` with a ballast file, leaving about `leave` bytes.
fn fill(dir: &Path, leave: u64) -> std::io::Result<PathBuf> {
    let st = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    let free = st.f_bavail * st.f_frsize;
    let path = dir.join("ballast");
    let f = std::fs::File::create(&path)?;
    f.set_len(0)?;
    use std::io::Write;
    let mut w = std::io::BufWriter::new(f);
    let chunk = vec![0u8; 1 << 20];
    let mut left = free.saturating_sub(leave);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if w.write_all(&chunk[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
    let _ = w.flush();
    Ok(path)
}

/// The pool's replicas and leader, from the management service.
async fn pool_ranks(sys: &RsvcSystem) -> Result<Vec<u32>, String> {
    let mgmt = sys.mgmt(ClientConfig {
        deadline: Duration::from_secs(10),
        ..ClientConfig::default()
    });
    match mgmt
        .call(&MgmtRequest::Locate {
            class: "pool".into(),
            label: POOL.into(),
        })
        .await
        .map_err(|e| format!("locate: {e}"))?
    {
        MgmtResponse::Instance(i) => Ok(i.replicas.iter().map(|r| r.0).collect()),
        other => Err(format!("locate answered {other:?}")),
    }
}

async fn mgmt_call(sys: &RsvcSystem, req: MgmtRequest) -> Result<MgmtResponse, String> {
    let mgmt = sys.mgmt(ClientConfig {
        deadline: Duration::from_secs(60),
        rpc_timeout: Duration::from_secs(30),
        ..ClientConfig::default()
    });
    mgmt.call(&req).await.map_err(|e| format!("{req:?}: {e}"))
}

/// The pool's term as the engine of `rank` reports it.
async fn pool_term(sys: &RsvcSystem, rank: u32) -> Option<u64> {
    pool_status(sys, rank).await.map(|s| s.term)
}

/// What the pool's replica on the engine of `rank` reports of itself.
async fn pool_status(sys: &RsvcSystem, rank: u32) -> Option<rsvc_client::ReplicaStatus> {
    let mut m = sys.status(rank).await.ok()?;
    m.remove(&("pool".to_string(), POOL.to_string()))
}

/// A fault about to be injected, and where.
struct Aim {
    kind: FaultKind,
    target: u32,
    leader: Option<u32>,
    ranks: Vec<u32>,
    hold: Duration,
    pinned_id: u32,
}

/// After a pause of a follower: (leader, its term before, the paused rank, the index the
/// paused replica must reach to show it follows the leader again).
type DeposedCheck = (u32, u64, u32, u64);

/// A run in progress: the system, the shared history, and the clock every event is timed by.
struct Run<'a> {
    cfg: &'a RunConfig,
    sys: RsvcSystem,
    t0: Instant,
    history: Arc<History>,
    client_cfg: ClientConfig,
    election: Duration,
    /// Wiped engines whose replicas were not re-created in time (liveness failures).
    unrepaired: Vec<String>,
}

impl Run<'_> {
    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// Injects one fault, holds it and heals it; says what it did.
    async fn inject(
        &mut self,
        aim: &Aim,
        rng: &mut StdRng,
    ) -> Result<(String, Option<DeposedCheck>), String> {
        let Aim {
            kind,
            target,
            leader,
            hold,
            ..
        } = *aim;
        let (cfg, election) = (self.cfg, self.election);
        let sys = &mut self.sys;
        let mut deposed_check = None;
        let desc = match kind {
            FaultKind::Kill => {
                sys.kill(target).await?;
                tokio::time::sleep(hold).await;
                sys.restart(target).await?;
                format!("rank {target}")
            }
            FaultKind::Wipe => {
                // What the engine hosted, and how far each replica had applied: the new ones
                // must get at least as far.
                let before = sys.applied(target).await?;
                sys.kill(target).await?;
                sys.wipe(target)?;
                tokio::time::sleep(hold).await;
                sys.restart(target).await?;
                let rebuilt = sys.wait_rebuilt(target, &before, cfg.liveness * 2).await;
                match rebuilt {
                    Ok(()) => format!("rank {target} ({} replicas re-created)", before.len()),
                    Err(e) => {
                        self.unrepaired.push(format!("after wiping rank {target}: {e}"));
                        format!("rank {target} (NOT re-created)")
                    }
                }
            }
            FaultKind::PauseShort | FaultKind::PauseLong => {
                // A short pause stays under the minimum election timeout.
                let d = if kind == FaultKind::PauseShort {
                    Duration::from_millis(cfg.timers.election_min_ms / 2)
                } else {
                    election * 3 + hold
                };
                let before = match leader {
                    Some(l) if l != target => pool_term(sys, l).await.map(|t| (l, t)),
                    _ => None,
                };
                // The index the resumed replica must reach to show it follows the leader.
                let index = match before {
                    Some((l, _)) => pool_status(sys, l).await.and_then(|s| s.last_log_index),
                    None => None,
                };
                sys.pause(target, true)?;
                tokio::time::sleep(d).await;
                sys.pause(target, false)?;
                deposed_check = before.zip(index).map(|((l, t), i)| (l, t, target, i));
                format!("rank {target} for {} ms", d.as_millis())
            }
            FaultKind::Isolate
            | FaultKind::OneWay
            | FaultKind::Bridge
            | FaultKind::Flap
            | FaultKind::Delay
            | FaultKind::ClockSlow => self.network(aim, rng).await?,
            FaultKind::Transfer | FaultKind::Move => self.membership(aim, rng).await?,
            FaultKind::DiskFull | FaultKind::FsyncStall | FaultKind::FsyncFail => self.disk(aim, rng).await?,
        };
        Ok((desc, deposed_check))
    }

    /// Cuts, delays or flaps links (and, for `clock-slow`, slows the isolated leader's clock).
    async fn network(&self, aim: &Aim, rng: &mut StdRng) -> Result<String, String> {
        let Aim {
            kind,
            target,
            leader,
            hold,
            pinned_id,
            ..
        } = *aim;
        let (cfg, election, sys) = (self.cfg, self.election, &self.sys);
        let pinned = self.pinned(pinned_id);
        Ok(match kind {
            FaultKind::Isolate => {
                let rest: Vec<u32> = (1..=cfg.engines).filter(|r| *r != target).collect();
                sys.net
                    .as_ref()
                    .expect("proxied")
                    .partition(&[vec![target], rest]);
                let pinned = pinned.start(sys, target);
                tokio::time::sleep(hold).await;
                sys.net.as_ref().expect("proxied").heal();
                pinned.stop().await?;
                format!("rank {target}")
            }
            FaultKind::OneWay => {
                let pool: Vec<u32> = (1..=cfg.engines).filter(|r| *r != target).collect();
                let other = *pool.choose(rng).expect("engines");
                let (from, to) = if rng.random_bool(0.5) {
                    (target, other)
                } else {
                    (other, target)
                };
                sys.net.as_ref().expect("proxied").cut(from, to);
                tokio::time::sleep(hold).await;
                sys.net.as_ref().expect("proxied").heal();
                format!("{from} -> {to}")
            }
            FaultKind::Bridge => {
                // target and one other cannot talk; everyone else reaches both.
                let other = *(1..=cfg.engines)
                    .filter(|r| *r != target)
                    .collect::<Vec<_>>()
                    .choose(rng)
                    .expect("engines");
                let net = sys.net.as_ref().expect("proxied");
                net.cut(target, other);
                net.cut(other, target);
                tokio::time::sleep(hold).await;
                net.heal();
                format!("{target} x {other}")
            }
            FaultKind::Flap => {
                let rest: Vec<u32> = (1..=cfg.engines).filter(|r| *r != target).collect();
                let net = sys.net.as_ref().expect("proxied");
                let until = Instant::now() + hold;
                while Instant::now() < until {
                    net.partition(&[vec![target], rest.clone()]);
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
                    net.heal();
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
                }
                format!("rank {target}")
            }
            FaultKind::Delay => {
                let by = Duration::from_millis(rng.random_range(20..150));
                let net = sys.net.as_ref().expect("proxied");
                for r in (1..=cfg.engines).filter(|r| *r != target) {
                    net.delay(target, r, by);
                }
                tokio::time::sleep(hold).await;
                net.heal();
                format!("rank {target} by {} ms", by.as_millis())
            }
            FaultKind::ClockSlow => {
                // Aimed at the leader: only a leader's lease is at stake.
                let l = leader.unwrap_or(target);
                sys.failpoint(l, SLOW_CLOCK, Some("return(8)")).await?;
                let rest: Vec<u32> = (1..=cfg.engines).filter(|r| *r != l).collect();
                let net = sys.net.as_ref().expect("proxied");
                net.partition(&[vec![l], rest]);
                let pinned = pinned.start(sys, l);
                tokio::time::sleep(hold + election * 3).await;
                net.heal();
                pinned.stop().await?;
                sys.failpoint(l, SLOW_CLOCK, None).await?;
                format!("rank {l}, isolated")
            }
            other => unreachable!("{other:?} is not a network fault"),
        })
    }

    /// Moves the leadership or a replica.
    async fn membership(&self, aim: &Aim, rng: &mut StdRng) -> Result<String, String> {
        let Aim {
            kind,
            target,
            leader,
            ref ranks,
            ..
        } = *aim;
        let (cfg, sys) = (self.cfg, &self.sys);
        Ok(match kind {
            FaultKind::Transfer => {
                let to = ranks
                    .iter()
                    .copied()
                    .filter(|r| Some(*r) != leader)
                    .collect::<Vec<_>>();
                let to = *to.choose(rng).expect("replicas");
                let req = MgmtRequest::TransferLeader {
                    class: "pool".into(),
                    label: POOL.into(),
                    to_rank: Some(to),
                };
                match mgmt_call(sys, req).await {
                    Ok(_) => format!("to rank {to}"),
                    Err(e) => format!("to rank {to} (failed: {e})"),
                }
            }
            FaultKind::Move => {
                let spare: Vec<u32> = (1..=cfg.engines).filter(|r| !ranks.contains(r)).collect();
                let Some(&to) = spare.choose(rng) else {
                    return Err(format!("no spare engine for a move; the pool is on {ranks:?}"));
                };
                let req = MgmtRequest::RemoveReplica {
                    class: "pool".into(),
                    label: POOL.into(),
                    rank: target,
                };
                let removed = mgmt_call(sys, req).await;
                let req = MgmtRequest::AddReplica {
                    class: "pool".into(),
                    label: POOL.into(),
                    rank: to,
                };
                let added = mgmt_call(sys, req).await;
                format!(
                    "rank {target} -> {to}{}{}",
                    removed
                        .err()
                        .map(|e| format!(" (remove failed: {e})"))
                        .unwrap_or_default(),
                    added
                        .err()
                        .map(|e| format!(" (add failed: {e})"))
                        .unwrap_or_default()
                )
            }
            other => unreachable!("{other:?} is not a membership fault"),
        })
    }

    /// Fills a disk, or stalls or fails its log commits.
    async fn disk(&self, aim: &Aim, rng: &mut StdRng) -> Result<String, String> {
        let Aim {
            kind, target, hold, ..
        } = *aim;
        let sys = &self.sys;
        Ok(match kind {
            FaultKind::DiskFull => {
                let at = sys.data_dir(target);
                let ballast = fill(&at, 1 << 20).map_err(|e| format!("ballast: {e}"))?;
                tokio::time::sleep(hold).await;
                let _ = std::fs::remove_file(&ballast);
                format!("rank {target}")
            }
            FaultKind::FsyncStall => {
                let ms = rng.random_range(200..600);
                sys.failpoint(target, LOG_COMMIT, Some(&format!("sleep({ms})")))
                    .await?;
                tokio::time::sleep(hold).await;
                sys.failpoint(target, LOG_COMMIT, None).await?;
                format!("rank {target} by {ms} ms")
            }
            FaultKind::FsyncFail => {
                sys.failpoint(target, LOG_COMMIT, Some("return(EIO)")).await?;
                tokio::time::sleep(hold).await;
                sys.failpoint(target, LOG_COMMIT, None).await?;
                format!("rank {target}")
            }
            other => unreachable!("{other:?} is not a disk fault"),
        })
    }

    /// A client for the far side of a partition (see [`Pinned`]).
    fn pinned(&self, id: u32) -> Pinned<'_> {
        Pinned {
            id,
            cfg: self.cfg,
            client_cfg: &self.client_cfg,
            t0: self.t0,
            history: &self.history,
        }
    }

    /// How long after `healed` the first write was acknowledged, if within the bound.
    async fn recovery_after(&self, healed: u64) -> Option<Duration> {
        let h = &self.history;
        wait_for(
            "a write after the heal",
            self.cfg.liveness,
            Duration::from_millis(10),
            || async { h.first_acked_write_after(healed) },
        )
        .await
        .ok()
        .map(|t| Duration::from_nanos(t - healed))
    }

    /// Whether a pause of a follower deposed the leader. A resumed follower that applied the
    /// leader's entries follows it; had it deposed the leader, the term would have moved by
    /// then.
    async fn deposed(&self, (leader, before, paused, index): DeposedCheck) -> bool {
        let sys = &self.sys;
        let _ = wait_for(
            "the resumed replica to follow the leader",
            self.cfg.liveness,
            Duration::from_millis(20),
            || async {
                let applied = pool_status(sys, paused).await?.applied_index?;
                (applied >= index).then_some(())
            },
        )
        .await;
        pool_term(sys, leader).await.is_none_or(|t| t != before)
    }

    /// Every replica leads in turn and reads every register; the reads join the history.
    /// Returns what each register read, over all replicas.
    async fn final_reads(&self) -> Result<BTreeMap<String, BTreeSet<Option<u64>>>, String> {
        let mut values: BTreeMap<String, BTreeSet<Option<u64>>> = BTreeMap::new();
        let ranks = pool_ranks(&self.sys).await?;
        let reader = self.sys.pool(POOL, ClientConfig::default());
        for (i, rank) in ranks.iter().enumerate() {
            // A transfer can fail while the group settles (its target not caught up yet): try
            // again until the replica serves.
            let sys = &self.sys;
            wait_for(
                &format!("rank {rank} to lead for the final reads"),
                DEADLINE,
                Duration::from_millis(100),
                || async {
                    if !sys.serving(*rank, "pool", POOL).await {
                        let req = MgmtRequest::TransferLeader {
                            class: "pool".into(),
                            label: POOL.into(),
                            to_rank: Some(*rank),
                        };
                        if let Err(e) = mgmt_call(sys, req).await {
                            tracing::info!(rank, cause = %e, "transfer for the final reads failed; again");
                        }
                    }
                    sys.serving(*rank, "pool", POOL).await.then_some(())
                },
            )
            .await?;
            // Every list ever used, in read-only transactions of up to 256 lists: an
            // acknowledged append missing here was lost.
            let used = self.history.lists.lock().expect("lock").next;
            for chunk in (0..used).collect::<Vec<_>>().chunks(256) {
                let lists = chunk
                    .iter()
                    .map(|k| Mop::Read {
                        key: format!("l{k}"),
                        value: None,
                    })
                    .collect();
                let before = self.history.txns.lock().expect("lock").len();
                run_txn(
                    &reader,
                    FINAL_READERS + i as u32,
                    lists,
                    Instant::now() + DEADLINE,
                    self.t0,
                    &self.history,
                )
                .await?;
                if self.history.txns.lock().expect("lock").len() == before {
                    return Err(format!("final read of the lists on rank {rank} failed"));
                }
            }
            for k in 0..self.cfg.keys {
                let key = format!("r{k}");
                let call = self.now();
                let v = match reader.call(&PoolRequest::AttrGet { name: key.clone() }).await {
                    Ok(PoolResponse::Attr(v)) => parse_value(v)?,
                    other => return Err(format!("final read of {key} on rank {rank}: {other:?}")),
                };
                self.history.push(Event {
                    client: FINAL_READERS + i as u32,
                    key: key.clone(),
                    call,
                    ret: Some(self.now()),
                    op: Op::Read(v),
                });
                values.entry(key).or_default().insert(v);
            }
        }
        Ok(values)
    }
}

/// Mounts what the disk nemesis needs, starts the system and the pool, and keeps the faults
/// that can run here: disk-full needs root, move a spare engine, the fsync and clock faults an
/// engine built with failpoints.
async fn prepare(cfg: &RunConfig, dir: &Path) -> Result<(Vec<Tmpfs>, RsvcSystem, Vec<FaultKind>), String> {
    let root = rustix::process::geteuid().is_root();
    // The disk nemesis needs a filesystem per engine; engine data dirs live there.
    let mut mounts = Vec::new();
    if cfg.faults.contains(&FaultKind::DiskFull) && root {
        for rank in 1..=cfg.engines {
            let at = dir.join(format!("engine{rank}"));
            mounts.push(Tmpfs::mount(&at, 256).ok_or("could not mount a tmpfs")?);
        }
    }
    let spec = Spec {
        proxied: true,
        cluster: "nemesis".into(),
        ..Spec::new(cfg.engines, cfg.timers)
    };
    let sys = RsvcSystem::start_spec(dir, cfg.cmd.clone(), spec).await?;
    let failpoints = sys.failpoint(1, LOG_COMMIT, None).await.is_ok();
    let faults: Vec<FaultKind> = cfg
        .faults
        .iter()
        .copied()
        .filter(|k| *k != FaultKind::DiskFull || root)
        .filter(|k| *k != FaultKind::Move || cfg.engines > 3)
        .filter(|k| {
            failpoints
                || !matches!(
                    k,
                    FaultKind::FsyncStall | FaultKind::FsyncFail | FaultKind::ClockSlow
                )
        })
        .collect();
    if faults.is_empty() {
        return Err(
            "no fault can run here (disk-full needs root, move needs 5 engines, fsync faults an engine with failpoints)"
                .into(),
        );
    }
    sys.create_pool(POOL, 3).await?;
    sys.leader("pool", POOL, DEADLINE).await?;
    Ok((mounts, sys, faults))
}

/// Runs one seed; returns its report. Errors are harness failures (a system that would not
/// start), not findings.
pub async fn run(cfg: RunConfig) -> Result<RunReport, RunError> {
    let dir = cfg.dir.join(format!("seed-{}", cfg.seed));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| RunError::Start(format!("{}: {e}", dir.display())))?;
    // NB: `mounts` outlives `run_started` (and its engines): they drop after it returns.
    let (mounts, sys, faults) = prepare(&cfg, &dir).await.map_err(RunError::Start)?;
    let r = run_started(&cfg, &dir, sys, &faults)
        .await
        .map_err(RunError::Failed);
    drop(mounts);
    let report = r?;
    if report.passed() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}

/// Why a run produced no report.
#[derive(Debug)]
pub enum RunError {
    /// The system would not start (a port taken between the harness choosing it and an engine
    /// binding it, a mount that failed): not a finding; the seed may run again.
    Start(String),
    /// The run failed after the system started: a client got an answer it should not, a final
    /// read failed. A finding; its directory is kept.
    Failed(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Start(e) => write!(f, "the system did not start: {e}"),
            RunError::Failed(e) => write!(f, "the run failed: {e}"),
        }
    }
}

/// The run after its system started: workload, faults, final reads, checks.
async fn run_started(
    cfg: &RunConfig,
    dir: &Path,
    sys: RsvcSystem,
    faults: &[FaultKind],
) -> Result<RunReport, String> {
    let cfg = cfg.clone();
    let mut run = Run {
        cfg: &cfg,
        sys,
        t0: Instant::now(),
        history: Arc::new(History::default()),
        client_cfg: ClientConfig {
            deadline: cfg.op_timeout,
            rpc_timeout: cfg.op_timeout.min(Duration::from_millis(500)),
            ..ClientConfig::default()
        },
        election: Duration::from_millis(cfg.timers.election_max_ms),
        unrepaired: Vec::new(),
    };
    run.history.lists.lock().expect("lock").start(cfg.lists);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 1..=cfg.clients {
        clients.push(tokio::spawn(client_loop(
            id,
            run.sys.pool(POOL, run.client_cfg.clone()),
            cfg.clone(),
            run.t0,
            run.history.clone(),
            stop.clone(),
        )));
    }
    for i in 1..=cfg.txn_clients {
        clients.push(tokio::spawn(txn_loop(
            TXN_CLIENTS + i,
            run.sys.pool(POOL, run.client_cfg.clone()),
            cfg.clone(),
            run.t0,
            run.history.clone(),
            stop.clone(),
        )));
    }
    let (records, stuck) = run.faults(faults).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.map_err(|e| e.to_string())??;
    }
    let final_values = run.final_reads().await?;
    let events = run.history.events.lock().expect("lock").clone();
    let txns = run.history.txns.lock().expect("lock").clone();
    let mut report = check_run(&cfg, dir, &run.history, &events, records, stuck, &final_values);
    report.txns = txns.len();
    report.txn_anomalies = elle::check(&txns).iter().map(ToString::to_string).collect();
    drop(run);
    if !report.passed() {
        let mut dump = String::new();
        for e in &events {
            let _ = writeln!(dump, "{e:?}");
        }
        let _ = std::fs::write(dir.join("history.txt"), dump);
        let mut dump = String::new();
        for (i, t) in txns.iter().enumerate() {
            let _ = writeln!(dump, "T{i} {t:?}");
        }
        let _ = std::fs::write(dir.join("txns.txt"), dump);
    }
    Ok(report)
}

/// The checks over a finished run's history.
fn check_run(
    cfg: &RunConfig,
    dir: &Path,
    history: &History,
    events: &[Event],
    mut records: Vec<FaultRecord>,
    stuck: Vec<String>,
    final_values: &BTreeMap<String, BTreeSet<Option<u64>>>,
) -> RunReport {
    let acked_times = history.acked_writes();
    for r in &mut records {
        r.gap = longest_gap(&acked_times, r.start, r.healed);
    }
    let mut violations = Vec::new();
    let mut undecided = 0;
    for (k, o) in lincheck::check(events, 5_000_000) {
        match o {
            Outcome::Violation(d) => violations.push(format!("{k}: {d}")),
            Outcome::Unknown => undecided += 1,
            Outcome::Ok => {}
        }
    }
    RunReport {
        seed: cfg.seed,
        ops: events.len(),
        acked: events.iter().filter(|e| e.ret.is_some()).count(),
        indeterminate: events.iter().filter(|e| e.ret.is_none()).count(),
        faults: records,
        violations,
        undecided,
        txns: 0,
        txn_anomalies: Vec::new(),
        lost: lost_writes(events, final_values),
        stuck,
        dir: dir.to_path_buf(),
    }
}

impl Run<'_> {
    /// The nemesis loop: calm, fault, heal, liveness, until the run's time is up. Returns the
    /// faults as they happened and the liveness failures.
    async fn faults(&mut self, faults: &[FaultKind]) -> Result<(Vec<FaultRecord>, Vec<String>), String> {
        let cfg = self.cfg;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut records = Vec::new();
        let mut stuck = Vec::new();
        let end = Instant::now() + cfg.duration;
        while Instant::now() < end {
            // A healthy stretch, then one fault.
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..800))).await;
            let kind = *faults.choose(&mut rng).expect("non-empty");
            let ranks = match pool_ranks(&self.sys).await {
                Ok(r) => r,
                Err(e) => {
                    stuck.push(format!("before a {} fault: {e}", kind.name()));
                    break;
                }
            };
            let leader = self.sys.leader("pool", POOL, cfg.liveness).await.ok();
            // Half of the faults aim at the leader, the others at anyone.
            let target = match leader {
                Some(l) if rng.random_bool(0.5) => l,
                _ => *ranks.choose(&mut rng).expect("replicas"),
            };
            let aim = Aim {
                kind,
                target,
                leader,
                ranks,
                hold: Duration::from_millis(rng.random_range(500..2500)),
                pinned_id: 1000 + records.len() as u32,
            };
            let start = self.now();
            let (desc, deposed_check) = self.inject(&aim, &mut rng).await?;
            let healed = self.now();
            let recovery = self.recovery_after(healed).await;
            stuck.append(&mut self.unrepaired);
            if recovery.is_none() {
                stuck.push(format!(
                    "no write acknowledged within {:?} after {} {desc} healed",
                    cfg.liveness,
                    kind.name()
                ));
            }
            let deposed = match deposed_check {
                Some(check) => Some(self.deposed(check).await),
                None => None,
            };
            tracing::info!(fault = kind.name(), %desc, ?recovery, ?deposed, "fault healed");
            records.push(FaultRecord {
                kind,
                target: desc,
                start,
                healed,
                recovery,
                gap: Duration::ZERO,
                deposed,
            });
            if recovery.is_none() {
                break;
            }
        }
        Ok((records, stuck))
    }
}

/// The longest stretch without an acknowledged write that overlaps `[start, healed]`.
fn longest_gap(acked: &[u64], start: u64, healed: u64) -> Duration {
    let before = acked
        .iter()
        .rev()
        .find(|t| **t <= start)
        .copied()
        .unwrap_or(start);
    let mut last = before;
    let mut gap = 0;
    for &t in acked.iter().filter(|t| **t > start) {
        gap = gap.max(t - last);
        last = t;
        if t > healed {
            break;
        }
    }
    Duration::from_nanos(gap)
}

/// Registers whose final value is neither their last acknowledged mutation nor one that may
/// have landed after it.
fn lost_writes(events: &[Event], finals: &BTreeMap<String, BTreeSet<Option<u64>>>) -> Vec<String> {
    let mut lost = Vec::new();
    for (key, seen) in finals {
        let muts: Vec<&Event> = events
            .iter()
            .filter(|e| &e.key == key)
            .filter(|e| match e.op {
                Op::Write(_) => true,
                Op::Cas { swapped, .. } => swapped || e.ret.is_none(),
                Op::Read(_) => false,
            })
            .collect();
        let value = |e: &Event| match e.op {
            Op::Write(v) | Op::Cas { new: v, .. } => v,
            Op::Read(_) => unreachable!("filtered"),
        };
        let Some(last) = muts.iter().filter(|e| e.ret.is_some()).max_by_key(|e| e.ret) else {
            continue;
        };
        let allowed: BTreeSet<Option<u64>> = muts
            .iter()
            .filter(|e| e.ret.is_none_or(|r| r > last.call))
            .map(|e| Some(value(e)))
            .collect();
        if seen.len() != 1 || !seen.iter().all(|v| allowed.contains(v)) {
            lost.push(format!(
                "{key}: replicas read {seen:?}; the last acknowledged write was {} (allowed: {allowed:?})",
                value(last)
            ));
        }
    }
    lost
}

/// A table of many runs: faults by type, violations, lost writes, recovery and gaps.
pub fn table(reports: &[RunReport]) -> String {
    let mut s = String::new();
    let runs = reports.len();
    let ops: usize = reports.iter().map(|r| r.ops).sum();
    let acked: usize = reports.iter().map(|r| r.acked).sum();
    let ind: usize = reports.iter().map(|r| r.indeterminate).sum();
    let viol: usize = reports.iter().map(|r| r.violations.len()).sum();
    let lost: usize = reports.iter().map(|r| r.lost.len()).sum();
    let stuck: usize = reports.iter().map(|r| r.stuck.len()).sum();
    let undecided: usize = reports.iter().map(|r| r.undecided).sum();
    let txns: usize = reports.iter().map(|r| r.txns).sum();
    let anomalies: usize = reports.iter().map(|r| r.txn_anomalies.len()).sum();
    let _ = writeln!(
        s,
        "runs {runs}, operations {ops} ({acked} acknowledged, {ind} indeterminate), \
         violations {viol}, lost writes {lost}, liveness failures {stuck}, undecided registers {undecided}, \
         transactions {txns}, transaction anomalies {anomalies}"
    );
    let _ = writeln!(
        s,
        "| fault | count | recovery after heal p50 / max (ms) | gap without acked writes min / p50 / max (ms) | healthy leader deposed |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    let mut by: BTreeMap<FaultKind, Vec<&FaultRecord>> = BTreeMap::new();
    for r in reports {
        for f in &r.faults {
            by.entry(f.kind).or_default().push(f);
        }
    }
    let ms = |d: Duration| d.as_millis();
    for (k, fs) in by {
        let mut rec: Vec<Duration> = fs.iter().filter_map(|f| f.recovery).collect();
        rec.sort();
        let mut gaps: Vec<Duration> = fs.iter().map(|f| f.gap).collect();
        gaps.sort();
        let pick = |v: &[Duration], q: f64| v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied();
        let dep = fs.iter().filter(|f| f.deposed.is_some()).count();
        let deposed = fs.iter().filter(|f| f.deposed == Some(true)).count();
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} | {} / {} / {} | {} |",
            k.name(),
            fs.len(),
            pick(&rec, 0.5).map_or("-".into(), |d| ms(d).to_string()),
            pick(&rec, 1.0).map_or("-".into(), |d| ms(d).to_string()),
            pick(&gaps, 0.0).map_or(0, ms),
            pick(&gaps, 0.5).map_or(0, ms),
            pick(&gaps, 1.0).map_or(0, ms),
            if dep == 0 {
                "-".to_string()
            } else {
                format!("{deposed} of {dep}")
            },
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_lost_writes() {
        let acked = [10, 20, 100, 110, 300];
        assert_eq!(longest_gap(&acked, 25, 90), Duration::from_nanos(80));
        assert_eq!(longest_gap(&acked, 105, 120), Duration::from_nanos(190));
        let w = |client, call, ret, v| Event {
            client,
            key: "k".into(),
            call,
            ret,
            op: Op::Write(v),
        };
        let events = vec![w(1, 0, Some(10), 1), w(1, 20, Some(30), 2), w(2, 5, None, 3)];
        let finals = |v: Option<u64>| BTreeMap::from([("k".to_string(), BTreeSet::from([v]))]);
        assert!(lost_writes(&events, &finals(Some(2))).is_empty());
        // The indeterminate write may have landed after the last acknowledged one.
        assert!(lost_writes(&events, &finals(Some(3))).is_empty());
        assert_eq!(lost_writes(&events, &finals(Some(1))).len(), 1);
        assert_eq!(lost_writes(&events, &finals(None)).len(), 1);
        // Replicas that disagree lose something too.
        let split = BTreeMap::from([("k".to_string(), BTreeSet::from([Some(2), Some(3)]))]);
        assert_eq!(lost_writes(&events, &split).len(), 1);
        assert_eq!(FaultKind::parse("one-way"), Ok(FaultKind::OneWay));
        assert!(FaultKind::parse("nope").is_err());
    }
}
