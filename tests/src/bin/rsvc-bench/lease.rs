//! The lease-election pattern: what users of "etcd plus a lease-based election" (Mooncake's
//! master, Milvus's coordinators) get when the leader process dies.
//!
//! Each participant is a real process (`rsvc-bench campaign`): it takes an etcd lease of
//! `--ttl` seconds, keeps it alive every third of that, campaigns with etcd's election API under
//! a name, with its own TCP address as the value, and once elected serves writes: for each
//! `put <key>` line a client sends, it Puts the key into etcd and answers `ok`. A participant
//! whose lease is lost exits rather than serve on.
//!
//! The client does what a client of that pattern must: it asks etcd who leads (the election's
//! leader key), connects there, and on any failure asks again. When the holder is killed with
//! SIGKILL, its key stays until etcd expires the lease, so the client keeps finding the dead
//! holder until then: the gap is the lease's time to live, whatever etcd's own Raft timers are.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use rsvc_tests::etcd::EtcdCluster;
use rsvc_tests::proc::Proc;
use rsvc_tests::{wait_for, DEADLINE};

use crate::workloads::{bar, Writer, FAILOVER_RPC_TIMEOUT, VALUE};

/// The election's name (a key prefix in etcd).
const ELECTION: &str = "rsvc-bench-leader";

/// What `rsvc-bench campaign` takes.
#[derive(clap::Args, Debug)]
pub(crate) struct CampaignArgs {
    /// etcd client URLs (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// The election's name.
    #[arg(long, default_value = ELECTION)]
    election: String,
    /// The lease's time to live, in seconds.
    #[arg(long, default_value_t = 5)]
    ttl: i64,
}

/// The participant process: campaign, then serve while the lease lives.
pub(crate) async fn campaign(a: CampaignArgs) -> Result<(), String> {
    let e = |e: etcd_client::Error| e.to_string();
    // NB: no request timeout, as campaigning blocks until this participant is elected.
    let mut client = Client::connect(&a.endpoints, None).await.map_err(e)?;
    let lease = client.lease_grant(a.ttl, None).await.map_err(e)?.id();
    let (mut keeper, mut acks) = client.lease_keep_alive(lease).await.map_err(e)?;
    let every = Duration::from_millis((a.ttl as u64 * 1000 / 3).max(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let alive = match keeper.keep_alive().await {
                Ok(()) => matches!(acks.message().await, Ok(Some(r)) if r.ttl() > 0),
                Err(_) => false,
            };
            if !alive {
                // Serving on without the lease would make two leaders.
                eprintln!("campaign: lease {lease:x} lost; exiting");
                std::process::exit(3);
            }
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?.to_string();
    println!("standby {addr}");
    client
        .election_client()
        .campaign(a.election.as_str(), addr.as_str(), lease)
        .await
        .map_err(e)?;
    println!("leader {addr}");
    loop {
        let (conn, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let client = client.clone();
        tokio::spawn(serve(conn, client));
    }
}

/// Answers one client connection: `put <key>` → a Put into etcd → `ok`.
async fn serve(conn: TcpStream, mut client: Client) {
    let (r, mut w) = conn.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let answer = match line.strip_prefix("put ") {
            Some(key) => match client.put(key, VALUE.to_vec(), None).await {
                Ok(_) => "ok\n".to_string(),
                Err(e) => format!("error {e}\n"),
            },
            None => format!("error malformed request {line:?}\n"),
        };
        if w.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A participant as the bench sees it.
struct Participant {
    proc: Proc,
}

impl Participant {
    fn spawn(dir: &Path, endpoints: &[String], n: usize) -> Result<Participant, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.args(["campaign", "--endpoints", &endpoints.join(","), "--ttl", "5"]);
        let proc = Proc::spawn(cmd, &dir.join(format!("campaign-{n}.log")))?;
        Ok(Participant { proc })
    }

    async fn elected(&mut self) -> Result<(), String> {
        self.proc.line_with("leader ", DEADLINE).await.map(|_| ())
    }
}

/// The client of the pattern: a connection to whoever the election names.
#[derive(Default)]
struct PatternClient {
    conn: Option<(
        tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
        tokio::net::tcp::OwnedWriteHalf,
    )>,
}

impl PatternClient {
    async fn put(&mut self, etcd: &mut Client, key: &str) -> Result<(), String> {
        let r = tokio::time::timeout(FAILOVER_RPC_TIMEOUT, self.try_put(etcd, key))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        if r.is_err() {
            self.conn = None;
            // Asking etcd again at once would only spin on the dead holder's key.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        r
    }

    async fn try_put(&mut self, etcd: &mut Client, key: &str) -> Result<(), String> {
        if self.conn.is_none() {
            let leader = etcd
                .election_client()
                .leader(ELECTION)
                .await
                .map_err(|e| e.to_string())?;
            let addr = leader
                .kv()
                .ok_or("no leader")?
                .value_str()
                .map_err(|e| e.to_string())?
                .to_string();
            let (r, w) = TcpStream::connect(&addr)
                .await
                .map_err(|e| format!("{addr}: {e}"))?
                .into_split();
            self.conn = Some((BufReader::new(r).lines(), w));
        }
        let (lines, w) = self.conn.as_mut().expect("connected");
        w.write_all(format!("put {key}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        match lines.next_line().await.map_err(|e| e.to_string())? {
            Some(l) if l == "ok" => Ok(()),
            Some(l) => Err(l),
            None => Err("connection closed".into()),
        }
    }
}

/// How many participants have a key in the election now.
async fn candidates(etcd: &mut Client) -> Option<usize> {
    let r = etcd
        .get(
            format!("{ELECTION}/"),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .ok()?;
    Some(r.count() as usize)
}

/// `trials` kills of the holder with a standby campaigning: the client gaps (ms), the times
/// until the standby was elected (ms), and the acknowledged writes found missing afterwards.
pub(crate) async fn run(dir: &Path, trials: usize) -> Result<(Vec<f64>, Vec<f64>, u64), String> {
    let etcd = EtcdCluster::start(&dir.join("etcd-lease"), 3, 100, 1000).await?;
    let endpoints = etcd.endpoints();
    let mut n = 0;
    let mut holder = Participant::spawn(dir, &endpoints, n)?;
    holder.elected().await?;
    let mut etcd_client = etcd.client().await?;
    let w = {
        let c = Arc::new(tokio::sync::Mutex::new((
            PatternClient::default(),
            etcd.client().await?,
        )));
        Writer::start("lease-".into(), move |k| {
            let c = c.clone();
            async move {
                let mut c = c.lock().await;
                let (pc, etcd) = &mut *c;
                pc.put(etcd, &k).await
            }
        })
    };
    crate::workloads::flowing(&w, Instant::now()).await?;
    let (mut gaps, mut elected) = (Vec::new(), Vec::new());
    for t in 0..trials {
        let pb = bar(format!("etcd lease-election pattern: trial {}/{trials}", t + 1));
        n += 1;
        let mut standby = Participant::spawn(dir, &endpoints, n)?;
        // The standby's campaign must be registered before the holder dies.
        wait_for(
            "the standby to campaign",
            DEADLINE,
            Duration::from_millis(20),
            || async { candidates(&mut etcd_client.clone()).await.filter(|c| *c >= 2) },
        )
        .await?;
        crate::workloads::flowing(&w, Instant::now()).await?;
        let at = Instant::now();
        holder.proc.kill().await;
        standby.elected().await?;
        let served = Instant::now();
        elected.push((served - at).as_secs_f64() * 1000.0);
        gaps.push(w.outage(at, served).await?.as_secs_f64() * 1000.0);
        holder = standby;
        pb.finish_and_clear();
    }
    let acked = w.finish().await;
    let mut lost = 0u64;
    for k in &acked {
        let r = etcd_client
            .get(k.as_str(), None)
            .await
            .map_err(|e| e.to_string())?;
        if r.kvs().is_empty() {
            lost += 1;
        }
    }
    drop(holder);
    Ok((gaps, elected, lost))
}
