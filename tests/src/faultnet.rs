//! A fault-injecting TCP proxy in front of every engine: partitions without privileges.
//!
//! Engine `r` listens on `127.0.1.r` and advertises a proxy port on the same address, so every
//! connection to it, from a peer or a client, passes through the proxy. Engines dial their peers
//! from their own listen address (rsvc-server does), so the proxy tells the caller from the
//! connection's source address: `127.0.1.s` is engine `s`, anything else is a client (rank 0).
//!
//! A rule cuts the directed pair (caller, callee): every connection that caller opened to that
//! callee stops moving bytes, both ways, as a partition that drops packets would; new ones are
//! accepted and then left silent. That is the message-level one-way cut of the Raft literature:
//! `cut(1, 2)` loses what 1 sends to 2 (requests and their replies), while 2 still reaches 1.
//! When a cut heals, the silenced connections are closed, so that callers reconnect instead of
//! waiting for bytes that are gone. A delay holds every chunk of a pair's traffic for a while.
//!
//! CAVEATS: a cut silences whole connections, not single packets; there is no reordering; a
//! delay applies per chunk read, so large messages see it once per chunk.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The loopback address engine `rank` lives on.
pub fn engine_ip(rank: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, rank as u8))
}

/// The rank a connection's source address stands for (0: a client).
fn rank_of(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 1] => u32::from(v4.octets()[3]),
        _ => 0,
    }
}

/// What the network does now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// Directed (caller, callee) pairs that are cut.
    pub cut: BTreeSet<(u32, u32)>,
    /// Delay of every chunk between a pair, either way.
    pub delay: BTreeMap<(u32, u32), Duration>,
}

impl Rules {
    fn is_cut(&self, from: u32, to: u32) -> bool {
        self.cut.contains(&(from, to))
    }

    fn delay_of(&self, from: u32, to: u32) -> Duration {
        self.delay.get(&(from, to)).copied().unwrap_or_default()
    }
}

/// The proxies of one system, and the rules they follow. Dropping it stops them.
pub struct FaultNet {
    rules: Arc<watch::Sender<Rules>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Default for FaultNet {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultNet {
    /// No proxies yet, and a network without faults.
    pub fn new() -> Self {
        FaultNet {
            rules: Arc::new(watch::channel(Rules::default()).0),
            tasks: Vec::new(),
        }
    }

    /// Starts the proxy of engine `rank`: it listens on `listen` and forwards to `target`.
    pub async fn add(&mut self, rank: u32, listen: SocketAddr, target: SocketAddr) -> std::io::Result<()> {
        let l = TcpListener::bind(listen).await?;
        let rules = self.rules.clone();
        self.tasks.push(tokio::spawn(async move {
            while let Ok((conn, peer)) = l.accept().await {
                let from = rank_of(peer.ip());
                tokio::spawn(forward(conn, from, rank, target, rules.subscribe()));
            }
        }));
        Ok(())
    }

    /// The rules in force.
    pub fn rules(&self) -> Rules {
        self.rules.borrow().clone()
    }

    /// Replaces the rules.
    pub fn set(&self, rules: Rules) {
        self.rules.send_replace(rules);
    }

    /// Cuts what `from` sends to `to` (one way).
    pub fn cut(&self, from: u32, to: u32) {
        self.rules.send_modify(|r| {
            r.cut.insert((from, to));
        });
    }

    /// Splits `ranks` into sides that cannot reach each other (both ways); clients still
    /// reach everyone.
    pub fn partition(&self, sides: &[Vec<u32>]) {
        self.rules.send_modify(|r| {
            for (i, a) in sides.iter().enumerate() {
                for (j, b) in sides.iter().enumerate() {
                    if i != j {
                        for &x in a {
                            for &y in b {
                                r.cut.insert((x, y));
                            }
                        }
                    }
                }
            }
        });
    }

    /// Delays everything between `a` and `b`, both ways.
    pub fn delay(&self, a: u32, b: u32, by: Duration) {
        self.rules.send_modify(|r| {
            r.delay.insert((a, b), by);
            r.delay.insert((b, a), by);
        });
    }

    /// Lifts every rule.
    pub fn heal(&self) {
        self.set(Rules::default());
    }
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Moves bytes between a caller and the engine while the rules allow; a cut silences the
/// connection, and its healing closes it.
async fn forward(
    client: TcpStream,
    from: u32,
    to: u32,
    target: SocketAddr,
    mut rules: watch::Receiver<Rules>,
) {
    let _ = client.set_nodelay(true);
    let cut_now = |r: &watch::Receiver<Rules>| r.borrow().is_cut(from, to);
    if cut_now(&rules) {
        // Accepted, then silent (a connect into a partition hangs, then times out), until the
        // cut heals: then closed, so that the caller dials again.
        while cut_now(&rules) {
            if rules.changed().await.is_err() {
                return;
            }
        }
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, from, to, rules.clone());
    let down = pump(sr, cw, from, to, rules.clone());
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    // Either side closed, or a cut healed: both halves drop here, closing the connection.
}

/// One direction of a connection: copies chunks, delayed as the rules say; while the pair is
/// cut it stops reading (the bytes pile up, as behind a dead link), and returns once the cut
/// heals so that the connection is closed.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    from: u32,
    to: u32,
    mut rules: watch::Receiver<Rules>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if rules.borrow_and_update().is_cut(from, to) {
            loop {
                if rules.changed().await.is_err() || !rules.borrow_and_update().is_cut(from, to) {
                    return;
                }
            }
        }
        let n = tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = rules.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let delay = rules.borrow().delay_of(from, to);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if rules.borrow().is_cut(from, to) {
            // Cut while in flight: the chunk is lost with the link.
            continue;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
