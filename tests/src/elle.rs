//! A checker of transactional consistency for list-append histories, in the manner of Elle
//! (Kingsbury and Alvaro, "Elle: Inferring Isolation Anomalies from Experimental
//! Observations", VLDB 2020).
//!
//! Each key holds a list of numbers; a transaction appends to some keys and reads whole lists
//! of others. Every value is appended once, so a read names exactly the appends it saw and
//! in which order: a list is its own history. Reading `[1, 2, 3]` says that the appends of 1,
//! 2 and 3 happened in that order and that the reader came after the third and before
//! whatever was appended next. The system claims strict serializability; the check is
//! whether one total order of the transactions, consistent with real time, explains every
//! read. It runs in four steps, all near-linear in the size of the history:
//!
//! 1. **Each read alone.** A read of a key that the transaction itself appended to must end
//!    with those appends, in order, and no read may hold an append that its transaction
//!    makes only later ([`Anomaly::Internal`]). What precedes the transaction's own appends
//!    is the *external* read, what it saw of others. A read may not hold a value twice
//!    ([`Anomaly::Duplicate`]) nor a value that no transaction appended to that key
//!    ([`Anomaly::Garbage`]).
//! 2. **The reads of a key together.** They must all be prefixes of one another
//!    ([`Anomaly::IncompatibleOrder`]); the longest (whole, own appends included) is then the
//!    key's *version order*. Appends that no read holds stay unordered. A read that ends
//!    with a value that its writer followed with another append to the same key saw the
//!    middle of a transaction ([`Anomaly::IntermediateRead`], G1b). An acknowledged append
//!    that no read holds, while some read of the key began after it returned, is
//!    [`Anomaly::LostAppend`]: the version order cannot place it, so the graph below cannot
//!    see it.
//! 3. **A dependency graph over transactions.** Consecutive versions give write-write (`ww`)
//!    edges from writer to writer; an external read ending with version *i* gives a
//!    write-read (`wr`) edge from its writer to the reader and a read-write anti-dependency
//!    (`rw`) from the reader to the writer of version *i + 1* (of version 1 for an empty
//!    read). A transaction that returned before another was invoked precedes it in real time
//!    (`rt`). Real-time edges are not drawn pairwise, which would be quadratic: each return
//!    event becomes a virtual node, the virtual nodes form a chain in time order, a
//!    transaction points at its return's node, and the last return before a transaction's
//!    call points at the transaction. Paths through the chain are exactly the real-time
//!    order, and the chain itself is acyclic, so it adds no cycle of its own. Indeterminate
//!    transactions (no answer: they may or may not have committed, at any time after their
//!    call) are kept when some read saw one of their appends, and dropped otherwise, which
//!    is the same as deciding that they never committed.
//! 4. **Cycles.** A serial order exists exactly when the graph is acyclic. Tarjan's
//!    algorithm (iterative, so that long histories do not overflow the stack) finds the
//!    strongly connected components; each one with two transactions or more is reported as
//!    one concrete cycle ([`Anomaly::Cycle`]), found by breadth-first search inside the
//!    component and classified as Elle does: only `ww` edges is G0, `ww` and `wr` is G1c,
//!    exactly one `rw` is G-single, more is G2, and "-realtime" is appended when the cycle
//!    needs a real-time edge (a path through the chain, shown as one `-rt->` step). The
//!    search looks for the simplest explanation first: G0, G1c or G-single without real
//!    time, then the same with it (a stale read, an anti-dependency on a transaction that
//!    had returned before the reader began, first of all), and only then G2.
//!
//! CAVEATS:
//!
//! - Only read values order appends. An anomaly among appends that nobody read is invisible,
//!   except the one case [`Anomaly::LostAppend`] covers; a workload should read its keys
//!   often.
//! - When the reads of a key disagree, the longest well-formed read is taken as the version
//!   order and every read that is not a prefix of it is reported against it; if the longest
//!   read is the wrong one, every other read is reported. Reads found faulty in steps 1 and
//!   2 are left out of the graph, which may hide a cycle they would have closed.
//! - Some faults show twice: a read of an intermediate append (G1b) missed the writer's next
//!   append to the key, which is also a G-single cycle with the writer.
//! - Each strongly connected component yields one cycle, not all of them. The G-single
//!   search tries a bounded number of anti-dependency edges, so in a very large component it
//!   may report G2 where a G-single cycle also exists.
//! - Real time is compared as given: all call and return times must come from one clock. A
//!   return time before its own call is taken as the call time. Real-time precedence is
//!   strict (a return at the very instant of another call does not order them).
//! - Values are assumed unique per key; a value appended twice is attributed to the first
//!   transaction that appended it.

use std::collections::{HashMap, VecDeque};
use std::fmt;

/// One micro-operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mop {
    /// Appends `value` to the list at `key`.
    Append {
        /// The key.
        key: String,
        /// The value appended (unique per key).
        value: u64,
    },
    /// Reads the whole list at `key`.
    Read {
        /// The key.
        key: String,
        /// The list read (an absent key reads as empty); `None` when the transaction did not
        /// answer.
        value: Option<Vec<u64>>,
    },
}

/// One transaction of a history: who ran it, when (ns, one clock for all clients), and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Txn {
    /// The client that ran it.
    pub client: u32,
    /// When it was invoked.
    pub call: u64,
    /// When it returned, committed; `None`: indeterminate (it failed or timed out and may or
    /// may not have committed, at any time after `call`).
    pub ret: Option<u64>,
    /// What it did, in order.
    pub ops: Vec<Mop>,
}

/// A transaction as an anomaly names it: its index in the history and its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnRef {
    /// The index of the transaction in the slice given to [`check`].
    pub index: usize,
    /// Its client.
    pub client: u32,
}

/// A dependency from one transaction to the next in a cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dep {
    /// Write-write: the next transaction appended the version after this one's, on the key.
    Ww(String),
    /// Write-read: the next transaction read this one's append to the key as its last value.
    Wr(String),
    /// Read-write (anti-dependency): this transaction read the key without the next one's
    /// append, the version that followed what it read.
    Rw(String),
    /// Real time: this transaction returned before the next one was invoked.
    Rt,
}

/// The class of a dependency cycle, as Elle (after Adya) names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CycleKind {
    /// Only write-write edges: a write cycle.
    G0,
    /// Write-write and write-read edges: circular information flow.
    G1c,
    /// Exactly one anti-dependency: read skew.
    GSingle,
    /// Two or more anti-dependencies: write skew and the like.
    G2,
}

/// Something no strictly serializable execution could have produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Anomaly {
    /// A read of a key after the transaction's own appends to it did not end with them, or a
    /// read held an append that its transaction made only later.
    Internal {
        /// The transaction.
        txn: TxnRef,
        /// The key.
        key: String,
        /// What it read.
        read: Vec<u64>,
        /// What it had appended to the key before the read.
        own: Vec<u64>,
    },
    /// A read held the same value twice.
    Duplicate {
        /// The reader.
        txn: TxnRef,
        /// The key.
        key: String,
        /// What it read.
        read: Vec<u64>,
        /// The value that occurs more than once.
        value: u64,
    },
    /// A read held a value that no transaction appended to that key.
    Garbage {
        /// The reader.
        txn: TxnRef,
        /// The key.
        key: String,
        /// What it read.
        read: Vec<u64>,
        /// The value nobody appended.
        value: u64,
    },
    /// Two reads of a key of which neither is a prefix of the other.
    IncompatibleOrder {
        /// The key.
        key: String,
        /// One reader.
        a: TxnRef,
        /// What it read.
        a_read: Vec<u64>,
        /// The reader of the longest read of the key, the version order.
        b: TxnRef,
        /// What it read.
        b_read: Vec<u64>,
    },
    /// G1b: a read ended with an append that its transaction followed with another append to
    /// the same key, so it saw an intermediate state of that transaction.
    IntermediateRead {
        /// The reader.
        reader: TxnRef,
        /// The key.
        key: String,
        /// The last value it read.
        value: u64,
        /// The transaction that appended it.
        writer: TxnRef,
        /// That transaction's last append to the key.
        final_value: u64,
    },
    /// An acknowledged append that no read ever held, although a read of the key began after
    /// the append's transaction returned.
    LostAppend {
        /// The appending transaction.
        writer: TxnRef,
        /// The key.
        key: String,
        /// The lost value.
        value: u64,
        /// The first transaction invoked after the writer returned that read the key.
        reader: TxnRef,
        /// What it read.
        read: Vec<u64>,
    },
    /// A cycle in the dependency graph: no serial order explains it.
    Cycle {
        /// Its class.
        kind: CycleKind,
        /// Whether it needs a real-time edge (the anomaly is then "-realtime").
        realtime: bool,
        /// Each transaction of the cycle with its dependency on the next one; the last one's
        /// leads back to the first.
        steps: Vec<(TxnRef, Dep)>,
    },
}

impl Anomaly {
    /// A short name: `internal`, `duplicate`, `garbage`, `incompatible-order`, `G1b`,
    /// `lost-append`, or the cycle class (`G0`, `G1c`, `G-single`, `G2`, with `-realtime`).
    pub fn name(&self) -> String {
        match self {
            Anomaly::Internal { .. } => "internal".into(),
            Anomaly::Duplicate { .. } => "duplicate".into(),
            Anomaly::Garbage { .. } => "garbage".into(),
            Anomaly::IncompatibleOrder { .. } => "incompatible-order".into(),
            Anomaly::IntermediateRead { .. } => "G1b".into(),
            Anomaly::LostAppend { .. } => "lost-append".into(),
            Anomaly::Cycle { kind, realtime, .. } => {
                format!("{kind}{}", if *realtime { "-realtime" } else { "" })
            }
        }
    }
}

impl fmt::Display for TxnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "T{} (client {})", self.index, self.client)
    }
}

impl fmt::Display for Dep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dep::Ww(k) => write!(f, "-ww[{k}]->"),
            Dep::Wr(k) => write!(f, "-wr[{k}]->"),
            Dep::Rw(k) => write!(f, "-rw[{k}]->"),
            Dep::Rt => write!(f, "-rt->"),
        }
    }
}

impl fmt::Display for CycleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CycleKind::G0 => "G0",
            CycleKind::G1c => "G1c",
            CycleKind::GSingle => "G-single",
            CycleKind::G2 => "G2",
        })
    }
}

/// A list for a message, its middle elided when it is long.
fn list(v: &[u64]) -> String {
    if v.len() <= 12 {
        return format!("{v:?}");
    }
    let s = |w: &[u64]| w.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    format!(
        "[{}, .. ({} values) .., {}]",
        s(&v[..4]),
        v.len(),
        s(&v[v.len() - 4..])
    )
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        match self {
            Anomaly::Internal { txn, key, read, own } => write!(
                f,
                "{name}: {txn} read {} from {key:?} after appending {} to it; a transaction sees its \
                 own appends, and only those it made before, at the end",
                list(read),
                list(own)
            ),
            Anomaly::Duplicate {
                txn,
                key,
                read,
                value,
            } => write!(
                f,
                "{name}: {txn} read {} from {key:?}, which holds {value} more than once",
                list(read)
            ),
            Anomaly::Garbage {
                txn,
                key,
                read,
                value,
            } => write!(
                f,
                "{name}: {txn} read {} from {key:?}, but no transaction appended {value} to it",
                list(read)
            ),
            Anomaly::IncompatibleOrder {
                key,
                a,
                a_read,
                b,
                b_read,
            } => {
                let at = a_read.iter().zip(b_read).take_while(|(x, y)| x == y).count();
                write!(
                    f,
                    "{name}: {a} read {} and {b} read {} from {key:?}; neither is a prefix of the \
                     other (they differ at index {at})",
                    list(a_read),
                    list(b_read)
                )
            }
            Anomaly::IntermediateRead {
                reader,
                key,
                value,
                writer,
                final_value,
            } => write!(
                f,
                "{name} (intermediate read): {reader} read {key:?} ending with {value}, which {writer} \
                 followed with more appends to it, up to {final_value}, in the same transaction"
            ),
            Anomaly::LostAppend {
                writer,
                key,
                value,
                reader,
                read,
            } => write!(
                f,
                "{name}: {writer} appended {value} to {key:?} and committed, but no read ever held \
                 it, though {reader}, invoked after that commit, read {}",
                list(read)
            ),
            Anomaly::Cycle {
                kind,
                realtime,
                steps,
            } => {
                let what = match kind {
                    CycleKind::G0 => "a cycle of writes",
                    CycleKind::G1c => "circular information flow",
                    CycleKind::GSingle => "read skew, a cycle with one anti-dependency",
                    CycleKind::G2 => "a cycle with several anti-dependencies",
                };
                let rt = if *realtime { ", given real-time order" } else { "" };
                write!(f, "{name} ({what}{rt}): ")?;
                for (t, d) in steps {
                    write!(f, "{t} {d} ")?;
                }
                match steps.first() {
                    Some((t, _)) => write!(f, "{t}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The kind of a graph edge; the order is the order of preference when explaining a cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Ww,
    Wr,
    Rw,
    Rt,
}

impl Kind {
    fn bit(self) -> u8 {
        1 << self as u8
    }
}

const WW: u8 = 1;
const WR: u8 = 2;
const RW: u8 = 4;
const RT: u8 = 8;
const ALL: u8 = WW | WR | RW | RT;

/// An edge of the graph: its target, its kind, and the key (index) that drew it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    kind: Kind,
    to: usize,
    key: usize,
}

impl Edge {
    fn new(kind: Kind, to: usize, key: usize) -> Edge {
        Edge { kind, to, key }
    }
}

/// A directed graph in compressed rows; each node's edges are sorted by kind.
struct Graph {
    start: Vec<usize>,
    edges: Vec<Edge>,
}

impl Graph {
    /// The graph of `n` nodes with the edges `(from, edge)`, duplicates dropped.
    fn new(n: usize, list: Vec<(usize, Edge)>) -> Graph {
        // A counting sort by source, then each row by kind.
        let mut at = vec![0; n + 1];
        for &(from, _) in &list {
            at[from + 1] += 1;
        }
        for i in 0..n {
            at[i + 1] += at[i];
        }
        let mut rows = vec![Edge::new(Kind::Ww, 0, 0); list.len()];
        let mut fill = at.clone();
        for (from, e) in list {
            rows[fill[from]] = e;
            fill[from] += 1;
        }
        let (mut start, mut edges) = (vec![0; n + 1], Vec::with_capacity(rows.len()));
        for v in 0..n {
            let row = &mut rows[at[v]..at[v + 1]];
            row.sort_unstable();
            for &e in row.iter() {
                if edges[start[v]..]
                    .last()
                    .is_none_or(|l: &Edge| (l.kind, l.to) != (e.kind, e.to))
                {
                    edges.push(e);
                }
            }
            start[v + 1] = edges.len();
        }
        Graph { start, edges }
    }

    fn len(&self) -> usize {
        self.start.len() - 1
    }

    fn out(&self, v: usize) -> &[Edge] {
        &self.edges[self.start[v]..self.start[v + 1]]
    }

    /// The subgraph induced by `nodes`, renumbered by position in `nodes`.
    fn induced(&self, nodes: &[usize]) -> Graph {
        let local: HashMap<usize, usize> = nodes.iter().enumerate().map(|(i, &v)| (v, i)).collect();
        let mut list = Vec::new();
        for (i, &v) in nodes.iter().enumerate() {
            for e in self.out(v) {
                if let Some(&to) = local.get(&e.to) {
                    list.push((i, Edge { to, ..*e }));
                }
            }
        }
        Graph::new(nodes.len(), list)
    }
}

/// The strongly connected components with more than one node, of the edges whose kind is in
/// `mask` (Tarjan's algorithm, with an explicit stack).
fn sccs(g: &Graph, mask: u8) -> Vec<Vec<usize>> {
    const UNSEEN: usize = usize::MAX;
    let n = g.len();
    let (mut index, mut low, mut on) = (vec![UNSEEN; n], vec![0; n], vec![false; n]);
    let (mut stack, mut calls, mut out) = (Vec::new(), Vec::<(usize, usize)>::new(), Vec::new());
    let mut next = 0;
    for root in 0..n {
        if index[root] != UNSEEN {
            continue;
        }
        let mut enter = Some(root);
        loop {
            if let Some(v) = enter.take() {
                (index[v], low[v], on[v]) = (next, next, true);
                next += 1;
                stack.push(v);
                calls.push((v, 0));
            }
            let Some(&mut (v, ref mut i)) = calls.last_mut() else {
                break;
            };
            if let Some(&e) = g.out(v).get(*i) {
                *i += 1;
                if mask & e.kind.bit() == 0 {
                    continue;
                }
                if index[e.to] == UNSEEN {
                    enter = Some(e.to);
                } else if on[e.to] {
                    low[v] = low[v].min(index[e.to]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(u, _)) = calls.last() {
                low[u] = low[u].min(low[v]);
            }
            if low[v] == index[v] {
                let mut scc = Vec::new();
                while let Some(w) = stack.pop() {
                    on[w] = false;
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort_unstable();
                    out.push(scc);
                }
            }
        }
    }
    out
}

/// A path from `from` to `to` (a cycle when they are equal) over edges whose kind is in
/// `mask`, through the fewest transactions (`real`; virtual nodes cost nothing, so that a
/// real-time step counts once): each node with the edge it leaves by. A 0-1 breadth-first
/// search.
fn path(g: &Graph, real: &[bool], from: usize, to: usize, mask: u8) -> Option<Vec<(usize, Edge)>> {
    let mut dist = vec![usize::MAX; g.len()];
    let mut parent: Vec<Option<(usize, Edge)>> = vec![None; g.len()];
    let mut last: Option<(usize, usize, Edge)> = None;
    dist[from] = 0;
    let mut queue = VecDeque::from([from]);
    while let Some(u) = queue.pop_front() {
        for &e in g.out(u).iter().filter(|e| mask & e.kind.bit() != 0) {
            let d = dist[u] + usize::from(real[e.to]);
            if e.to == to {
                if last.is_none_or(|(best, ..)| d < best) {
                    last = Some((d, u, e));
                }
            } else if d < dist[e.to] {
                dist[e.to] = d;
                parent[e.to] = Some((u, e));
                if real[e.to] {
                    queue.push_back(e.to);
                } else {
                    queue.push_front(e.to);
                }
            }
        }
    }
    let (_, mut v, e) = last?;
    let mut steps = vec![(v, e)];
    while let Some((p, pe)) = parent[v] {
        steps.push((p, pe));
        v = p;
    }
    steps.reverse();
    Some(steps)
}

/// Any cycle over the edges in `mask`, through the smallest component they form, starting at
/// a transaction.
fn any_cycle(g: &Graph, real: &[bool], mask: u8) -> Option<Vec<(usize, Edge)>> {
    let c = sccs(g, mask).into_iter().min_by_key(Vec::len)?;
    let start = c.iter().copied().find(|&v| real[v]).unwrap_or(c[0]);
    path(g, real, start, start, mask)
}

/// A cycle made of one anti-dependency and a path back over the edges in `base`. The
/// anti-dependencies that surely close one are tried first: with real time in `base`, those
/// on a transaction that returned before the reader began (`before(writer, reader)`, a stale
/// read), then those inside one component of `base`; of the others, at most `TRIES`.
fn single_rw_cycle(
    g: &Graph,
    real: &[bool],
    base: u8,
    before: impl Fn(usize, usize) -> bool,
) -> Option<Vec<(usize, Edge)>> {
    const TRIES: usize = 64;
    let mut comp = vec![usize::MAX; g.len()];
    for (i, c) in sccs(g, base).iter().enumerate() {
        c.iter().for_each(|&v| comp[v] = i);
    }
    let mut rws: Vec<(usize, usize, Edge)> = (0..g.len())
        .flat_map(|u| {
            g.out(u)
                .iter()
                .filter(|e| e.kind == Kind::Rw)
                .map(move |e| (u, *e))
        })
        .map(|(u, e)| match () {
            _ if base & RT != 0 && before(e.to, u) => (0, u, e),
            _ if comp[u] != usize::MAX && comp[u] == comp[e.to] => (1, u, e),
            _ => (2, u, e),
        })
        .collect();
    rws.sort_by_key(|&(rank, ..)| rank);
    rws.into_iter().take(TRIES).find_map(|(_, u, e)| {
        let mut back = path(g, real, e.to, u, base)?;
        back.insert(0, (u, e));
        Some(back)
    })
}

/// A cycle in the component `g` (of at least two transactions, told from the virtual nodes
/// by `real`; `before(a, b)`: a returned before b was invoked), the simplest first: at most
/// one anti-dependency without real time, then with it, then several.
fn explain(g: &Graph, real: &[bool], before: impl Fn(usize, usize) -> bool + Copy) -> Vec<(usize, Edge)> {
    let mild = |rt| {
        any_cycle(g, real, WW | rt)
            .or_else(|| any_cycle(g, real, WW | WR | rt))
            .or_else(|| single_rw_cycle(g, real, WW | WR | rt, before))
    };
    mild(0)
        .or_else(|| mild(RT))
        .or_else(|| any_cycle(g, real, WW | WR | RW))
        .or_else(|| any_cycle(g, real, ALL))
        .unwrap_or_default() // Never empty: `g` is strongly connected over all its edges.
}

/// A write as the index knows it: who appended the value, its last append to that key, and
/// the number of the last read that held it (0: none did).
struct Write {
    txn: usize,
    last: u64,
    read: usize,
}

/// A read with a value: who, the whole list, how much of it is external, and whether it
/// passed the checks of a single read.
struct Read<'a> {
    txn: usize,
    list: &'a [u64],
    ext: usize,
    sane: bool,
}

/// Key names, numbered in order of first sight.
#[derive(Default)]
struct Keys<'a> {
    names: Vec<&'a str>,
    ix: HashMap<&'a str, usize>,
}

impl<'a> Keys<'a> {
    fn id(&mut self, k: &'a str) -> usize {
        *self.ix.entry(k).or_insert_with(|| {
            self.names.push(k);
            self.names.len() - 1
        })
    }
}

/// Checks a list-append history for strict serializability: the anomalies found, none when
/// the history is explained by a serial order consistent with real time (as far as reads
/// can tell; see the module's caveats). Give it every committed and every indeterminate
/// transaction; [`Txn::ret`] says which is which. Anomalies come in the order of the steps
/// of the method, and within a step in history order.
pub fn check(txns: &[Txn]) -> Vec<Anomaly> {
    let n = txns.len();
    let at = |t: usize| TxnRef {
        index: t,
        client: txns[t].client,
    };
    let done = |t: usize| txns[t].ret.map(|r| r.max(txns[t].call));
    let mut keys = Keys::default();
    let mut out = Vec::new();

    // The writer of every (key, value), and that writer's last append to the key.
    let mut writes: HashMap<(usize, u64), Write> = HashMap::new();
    let mut own: HashMap<usize, Vec<u64>> = HashMap::new();
    for (t, txn) in txns.iter().enumerate() {
        own.clear();
        for m in &txn.ops {
            if let Mop::Append { key, value } = m {
                own.entry(keys.id(key)).or_default().push(*value);
            }
        }
        for (&k, vs) in &own {
            if let Some(&last) = vs.last() {
                for &v in vs {
                    writes.entry((k, v)).or_insert(Write {
                        txn: t,
                        last,
                        read: 0,
                    });
                }
            }
        }
    }

    // Step 1: each read alone.
    let mut reads: Vec<Vec<Read>> = Vec::new();
    let mut read_no = 0;
    for (t, txn) in txns.iter().enumerate() {
        own.clear();
        for m in &txn.ops {
            let (key, list) = match m {
                Mop::Append { key, value } => {
                    own.entry(keys.id(key)).or_default().push(*value);
                    continue;
                }
                Mop::Read { value: None, .. } => continue,
                Mop::Read {
                    key,
                    value: Some(list),
                } => (key, list),
            };
            let k = keys.id(key);
            let mine = own.get(&k).map_or(&[][..], Vec::as_slice);
            // One look-up per value: mark it seen, by this read (a duplicate if it already
            // was), or find that nobody appended it.
            read_no += 1;
            let ext = list.len().saturating_sub(mine.len());
            let (mut dup, mut garbage, mut future) = (None, None, false);
            for (i, &v) in list.iter().enumerate() {
                match writes.get_mut(&(k, v)) {
                    Some(w) if w.read == read_no => _ = dup.get_or_insert(v),
                    Some(w) => {
                        w.read = read_no;
                        // Its own append, seen before it made it (or out of place).
                        future |= i < ext && w.txn == t;
                    }
                    None => _ = garbage.get_or_insert(v),
                }
            }
            let (txn, key, read) = (at(t), || key.clone(), || list.clone());
            let anomaly = if future || !list.ends_with(mine) {
                Some(Anomaly::Internal {
                    txn,
                    key: key(),
                    read: read(),
                    own: mine.to_vec(),
                })
            } else if let Some(value) = dup {
                Some(Anomaly::Duplicate {
                    txn,
                    key: key(),
                    read: read(),
                    value,
                })
            } else {
                garbage.map(|value| Anomaly::Garbage {
                    txn,
                    key: key(),
                    read: read(),
                    value,
                })
            };
            if reads.len() <= k {
                reads.resize_with(k + 1, Vec::new);
            }
            reads[k].push(Read {
                txn: t,
                list,
                ext,
                sane: anomaly.is_none(),
            });
            out.extend(anomaly);
        }
    }
    reads.resize_with(keys.names.len(), Vec::new);

    // Step 2 and the edges of step 3, key by key.
    let mut edges: Vec<(usize, Edge)> = Vec::new();
    for (k, rs) in reads.iter().enumerate() {
        let sane = || rs.iter().filter(|r| r.sane);
        let Some(longest) = sane().reduce(|a, b| if b.list.len() > a.list.len() { b } else { a }) else {
            continue;
        };
        let order = longest.list;
        let writer: Vec<usize> = order.iter().map(|v| writes[&(k, *v)].txn).collect();
        for w in writer.windows(2).filter(|w| w[0] != w[1]) {
            edges.push((w[0], Edge::new(Kind::Ww, w[1], k)));
        }
        for r in sane() {
            if !order.starts_with(r.list) {
                out.push(Anomaly::IncompatibleOrder {
                    key: keys.names[k].to_string(),
                    a: at(r.txn),
                    a_read: r.list.to_vec(),
                    b: at(longest.txn),
                    b_read: order.to_vec(),
                });
                continue;
            }
            if let Some(&value) = order[..r.ext].last() {
                let w = &writes[&(k, value)];
                if w.txn != r.txn {
                    if w.last != value {
                        out.push(Anomaly::IntermediateRead {
                            reader: at(r.txn),
                            key: keys.names[k].to_string(),
                            value,
                            writer: at(w.txn),
                            final_value: w.last,
                        });
                    }
                    edges.push((w.txn, Edge::new(Kind::Wr, r.txn, k)));
                }
            }
            if let Some(&w) = writer.get(r.ext).filter(|&&w| w != r.txn) {
                edges.push((r.txn, Edge::new(Kind::Rw, w, k)));
            }
        }
    }

    // Lost appends: acknowledged, never read, though a read of the key began after.
    let by_call: Vec<Vec<(u64, usize)>> = reads
        .iter()
        .map(|rs| {
            let mut v: Vec<(u64, usize)> = rs
                .iter()
                .enumerate()
                .map(|(i, r)| (txns[r.txn].call, i))
                .collect();
            v.sort_unstable();
            v
        })
        .collect();
    for (t, txn) in txns.iter().enumerate() {
        let Some(ret) = done(t) else { continue };
        for m in &txn.ops {
            let Mop::Append { key, value } = m else { continue };
            let k = keys.id(key);
            let w = &writes[&(k, *value)];
            if w.read != 0 || w.txn != t {
                continue;
            }
            let calls = &by_call[k];
            if let Some(&(_, i)) = calls.get(calls.partition_point(|&(c, _)| c <= ret)) {
                out.push(Anomaly::LostAppend {
                    writer: at(t),
                    key: key.clone(),
                    value: *value,
                    reader: at(reads[k][i].txn),
                    read: reads[k][i].list.to_vec(),
                });
            }
        }
    }

    // Real time, through a chain of virtual nodes n, n + 1, ... one per return, in time
    // order. Indeterminate transactions that nobody saw are left out altogether.
    let mut included: Vec<bool> = txns.iter().map(|t| t.ret.is_some()).collect();
    for w in writes.values().filter(|w| w.read != 0) {
        included[w.txn] = true;
    }
    let mut rets: Vec<(u64, usize)> = (0..n)
        .filter(|&t| included[t])
        .filter_map(|t| Some((done(t)?, t)))
        .collect();
    rets.sort_unstable();
    let rt = |to: usize| Edge::new(Kind::Rt, to, 0);
    for (j, &(_, t)) in rets.iter().enumerate() {
        edges.push((t, rt(n + j)));
        if j + 1 < rets.len() {
            edges.push((n + j, rt(n + j + 1)));
        }
    }
    for t in (0..n).filter(|&t| included[t]) {
        let p = rets.partition_point(|&(r, _)| r < txns[t].call);
        if p > 0 {
            edges.push((n + p - 1, rt(t)));
        }
    }

    // Step 4: one cycle per component of two transactions or more.
    let g = Graph::new(n + rets.len(), edges);
    for scc in sccs(&g, ALL) {
        if scc.iter().filter(|&&v| v < n).count() < 2 {
            continue;
        }
        let real: Vec<bool> = scc.iter().map(|&v| v < n).collect();
        let before = |a: usize, b: usize| done(scc[a]).is_some_and(|r| r < txns[scc[b]].call);
        let mut cycle = explain(&g.induced(&scc), &real, before);
        if let Some(p) = cycle.iter().position(|&(v, _)| real[v]) {
            cycle.rotate_left(p);
        }
        // A real-time step runs through virtual nodes from one transaction to the next.
        let steps: Vec<(TxnRef, Dep)> = cycle
            .iter()
            .filter(|&&(v, _)| real[v])
            .map(|&(v, e)| {
                let key = || keys.names[e.key].to_string();
                let dep = match e.kind {
                    Kind::Ww => Dep::Ww(key()),
                    Kind::Wr => Dep::Wr(key()),
                    Kind::Rw => Dep::Rw(key()),
                    Kind::Rt => Dep::Rt,
                };
                (at(scc[v]), dep)
            })
            .collect();
        let count = |f: fn(&Dep) -> bool| steps.iter().filter(|(_, d)| f(d)).count();
        let kind = match count(|d| matches!(d, Dep::Rw(_))) {
            0 if count(|d| matches!(d, Dep::Wr(_))) > 0 => CycleKind::G1c,
            0 => CycleKind::G0,
            1 => CycleKind::GSingle,
            _ => CycleKind::G2,
        };
        let realtime = count(|d| *d == Dep::Rt) > 0;
        out.push(Anomaly::Cycle {
            kind,
            realtime,
            steps,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(key: &str, value: u64) -> Mop {
        Mop::Append {
            key: key.into(),
            value,
        }
    }

    fn rd(key: &str, value: &[u64]) -> Mop {
        Mop::Read {
            key: key.into(),
            value: Some(value.to_vec()),
        }
    }

    fn unanswered(key: &str) -> Mop {
        Mop::Read {
            key: key.into(),
            value: None,
        }
    }

    fn tx(client: u32, call: u64, ret: Option<u64>, ops: Vec<Mop>) -> Txn {
        Txn {
            client,
            call,
            ret,
            ops,
        }
    }

    /// The names of the anomalies found, after checking that each one displays.
    fn names(h: &[Txn]) -> Vec<String> {
        let found = check(h);
        for a in &found {
            assert!(a.to_string().starts_with(&a.name()), "{a}");
        }
        found.iter().map(Anomaly::name).collect()
    }

    #[test]
    fn a_serial_history_passes() {
        let h = [
            tx(1, 0, Some(10), vec![app("x", 1), rd("y", &[])]),
            tx(
                2,
                20,
                Some(30),
                vec![rd("x", &[1]), app("x", 2), rd("x", &[1, 2])],
            ),
            tx(3, 25, Some(35), vec![app("y", 3)]),
            tx(1, 40, Some(50), vec![rd("x", &[1, 2]), rd("y", &[3])]),
        ];
        assert!(names(&h).is_empty());
    }

    #[test]
    fn concurrent_and_indeterminate_histories_pass() {
        let h = [
            // Concurrent with the next four: serialized before them all.
            tx(1, 0, Some(100), vec![rd("x", &[]), app("y", 10)]),
            tx(2, 10, Some(20), vec![app("x", 1)]),
            // Indeterminate and observed: it committed, some time after its call.
            tx(3, 5, None, vec![app("x", 2), unanswered("y")]),
            // Indeterminate and never observed: it did not commit, or nobody looked since.
            tx(4, 6, None, vec![app("x", 3)]),
            tx(2, 30, Some(40), vec![rd("x", &[1, 2]), rd("y", &[10])]),
            tx(5, 110, Some(120), vec![rd("x", &[1, 2]), rd("y", &[10])]),
        ];
        assert!(names(&h).is_empty());
    }

    #[test]
    fn a_write_cycle_is_g0() {
        let h = [
            tx(1, 0, Some(100), vec![app("x", 1), app("y", 2)]),
            tx(2, 0, Some(100), vec![app("x", 3), app("y", 4)]),
            tx(3, 200, Some(300), vec![rd("x", &[1, 3]), rd("y", &[4, 2])]),
        ];
        assert_eq!(names(&h), ["G0"]);
        let shown = check(&h)[0].to_string();
        assert!(
            shown.contains("-ww[x]->") && shown.contains("-ww[y]->"),
            "{shown}"
        );
    }

    #[test]
    fn circular_information_flow_is_g1c() {
        let h = [
            tx(1, 0, Some(100), vec![app("x", 1), rd("y", &[2])]),
            tx(2, 0, Some(100), vec![app("y", 2), rd("x", &[1])]),
        ];
        assert_eq!(names(&h), ["G1c"]);
    }

    #[test]
    fn read_skew_is_g_single() {
        let h = [
            tx(1, 0, Some(100), vec![app("x", 1), app("y", 2)]),
            tx(2, 0, Some(100), vec![rd("x", &[]), rd("y", &[2])]),
            tx(3, 200, Some(300), vec![rd("x", &[1])]),
        ];
        assert_eq!(names(&h), ["G-single"]);
    }

    #[test]
    fn write_skew_is_g2() {
        let h = [
            tx(1, 0, Some(100), vec![rd("x", &[]), rd("y", &[]), app("x", 1)]),
            tx(2, 0, Some(100), vec![rd("x", &[]), rd("y", &[]), app("y", 2)]),
            tx(3, 200, Some(300), vec![rd("x", &[1]), rd("y", &[2])]),
        ];
        assert_eq!(names(&h), ["G2"]);
    }

    #[test]
    fn a_stale_read_is_caught_by_real_time() {
        let mut h = vec![
            tx(1, 0, Some(10), vec![app("x", 1)]),
            tx(1, 20, Some(30), vec![app("x", 2)]),
            tx(2, 40, Some(50), vec![rd("x", &[1])]),
            tx(3, 60, Some(70), vec![rd("x", &[1, 2])]),
        ];
        assert_eq!(names(&h), ["G-single-realtime"]);
        let shown = check(&h)[0].to_string();
        assert!(
            shown.contains("T2 (client 2) -rw[x]-> T1 (client 1) -rt-> T2"),
            "{shown}"
        );
        // The same read, invoked before the second append returned, is fine.
        h[2].call = 25;
        assert!(names(&h).is_empty());
    }

    #[test]
    fn a_lost_append_needs_a_later_read() {
        let mut h = vec![
            tx(1, 0, Some(10), vec![app("x", 1)]),
            tx(2, 5, Some(15), vec![app("x", 2)]),
            tx(3, 20, Some(30), vec![rd("x", &[2])]),
        ];
        assert_eq!(names(&h), ["lost-append"]);
        // A read concurrent with the append may miss it.
        h[2].call = 8;
        assert!(names(&h).is_empty());
        // An indeterminate append may never have happened.
        h[2].call = 20;
        h[0].ret = None;
        assert!(names(&h).is_empty());
    }

    #[test]
    fn reads_that_disagree_are_an_incompatible_order() {
        let h = [
            tx(1, 0, Some(100), vec![app("x", 1)]),
            tx(2, 0, Some(100), vec![app("x", 2)]),
            tx(3, 200, Some(300), vec![rd("x", &[1, 2])]),
            tx(4, 200, Some(300), vec![rd("x", &[2, 1, 3])]),
            tx(5, 0, Some(100), vec![app("x", 3)]),
        ];
        assert_eq!(names(&h), ["incompatible-order"]);
    }

    #[test]
    fn malformed_reads_are_duplicate_garbage_and_internal() {
        let base = [tx(1, 0, Some(10), vec![app("x", 1)])];
        let with = |t: Txn| [base[0].clone(), t];
        let later = |ops| tx(2, 20, Some(30), ops);
        assert_eq!(names(&with(later(vec![rd("x", &[1, 1])]))), ["duplicate"]);
        assert_eq!(names(&with(later(vec![rd("x", &[1, 9])]))), ["garbage"]);
        // Appended to another key is garbage here too.
        assert_eq!(names(&with(later(vec![rd("y", &[1])]))), ["garbage"]);
        // A transaction sees its own appends, in order, at the end.
        assert!(names(&with(later(vec![app("x", 5), app("x", 6), rd("x", &[1, 5, 6])]))).is_empty());
        for bad in [&[1][..], &[1, 6, 5], &[5, 1, 6]] {
            let h = with(later(vec![app("x", 5), app("x", 6), rd("x", bad)]));
            assert_eq!(names(&h), ["internal"], "{bad:?}");
        }
        // Nor the ones it has yet to make.
        assert_eq!(
            names(&with(later(vec![rd("x", &[1, 5]), app("x", 5)]))),
            ["internal"]
        );
    }

    #[test]
    fn an_intermediate_read_is_g1b() {
        let h = [
            tx(1, 0, Some(100), vec![app("x", 1), app("x", 2)]),
            tx(2, 0, Some(100), vec![rd("x", &[1])]),
            tx(3, 200, Some(300), vec![rd("x", &[1, 2])]),
        ];
        // Reading 1 without 2 also puts the reader both after and before the writer.
        assert_eq!(names(&h), ["G1b", "G-single"]);
    }

    /// SplitMix64.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        }
    }

    /// A valid history: random transactions executed one after the other against a model,
    /// each given a call and a return around its place in that serial order, on clients that
    /// run one transaction at a time. One in ten is indeterminate, and half of those commit.
    fn valid_history(rng: &mut Rng, txns: usize, keys: u64) -> Vec<Txn> {
        let mut model: Vec<Vec<u64>> = vec![Vec::new(); keys as usize];
        let mut busy: Vec<u64> = vec![0; 6];
        let mut out = Vec::with_capacity(txns);
        let mut next = 1;
        for i in 0..txns {
            let at = 1000 + 100 * i as u64;
            let mut c = rng.below(busy.len() as u64) as usize;
            if busy[c] >= at {
                c = busy.iter().position(|&b| b < at).unwrap_or_else(|| {
                    busy.push(0);
                    busy.len() - 1
                });
            }
            let call = at - rng.below((at - busy[c]).min(400));
            let lost = rng.below(10) == 0;
            let commits = !lost || rng.below(2) == 0;
            let (mut ops, mut appended) = (Vec::new(), Vec::new());
            for _ in 0..1 + rng.below(4) {
                let k = rng.below(keys) as usize;
                let key = format!("k{k}");
                if rng.below(2) == 0 {
                    model[k].push(next);
                    appended.push(k);
                    ops.push(Mop::Append { key, value: next });
                    next += 1;
                } else {
                    ops.push(Mop::Read {
                        key,
                        value: (!lost).then(|| model[k].clone()),
                    });
                }
            }
            if !commits {
                for &k in appended.iter().rev() {
                    model[k].pop();
                }
            }
            let ret = (!lost).then(|| at + rng.below(400));
            busy[c] = ret.unwrap_or(call + rng.below(300));
            out.push(Txn {
                client: c as u32,
                call,
                ret,
                ops,
            });
        }
        out
    }

    #[test]
    fn random_valid_histories_pass_and_mutated_ones_fail() {
        let (mut dropped, mut swapped) = (0, 0);
        for seed in 0..300 {
            let mut rng = Rng(seed);
            let n = 20 + rng.below(150) as usize;
            let keys = 1 + rng.below(6);
            let h = valid_history(&mut rng, n, keys);
            let found = check(&h);
            assert!(found.is_empty(), "seed {seed}: {}", found[0]);
            let writer: HashMap<u64, usize> = (h.iter().enumerate())
                .flat_map(|(t, x)| x.ops.iter().map(move |m| (t, m)))
                .filter_map(|(t, m)| match m {
                    Mop::Append { value, .. } => Some((*value, t)),
                    Mop::Read { .. } => None,
                })
                .collect();
            let reads: Vec<(usize, usize, &str, &Vec<u64>)> = (h.iter().enumerate())
                .flat_map(|(t, x)| x.ops.iter().enumerate().map(move |(i, m)| (t, i, m)))
                .filter_map(|(t, i, m)| match m {
                    Mop::Read { key, value: Some(l) } => Some((t, i, key.as_str(), l)),
                    _ => None,
                })
                .collect();
            let mutate = |t: usize, i: usize, f: &dyn Fn(&mut Vec<u64>)| {
                let mut h = h.clone();
                if let Mop::Read { value: Some(l), .. } = &mut h[t].ops[i] {
                    f(l);
                }
                check(&h)
            };
            // Drop the last value of a read whose writer returned before the reader began:
            // either a later version exists (a stale read) or nobody saw it (lost).
            let stale: Vec<_> = (reads.iter())
                .filter(|(t, _, _, l)| {
                    l.last()
                        .is_some_and(|v| h[writer[v]].ret.is_some_and(|r| r < h[*t].call))
                })
                .collect();
            if !stale.is_empty() {
                let &&(t, i, _, _) = &stale[rng.below(stale.len() as u64) as usize];
                let found = mutate(t, i, &|l| {
                    l.pop();
                });
                assert!(
                    !found.is_empty(),
                    "seed {seed}: dropping from T{t} went unnoticed"
                );
                dropped += 1;
            }
            // Swap two values of a read when another read of the key holds both.
            let twice: Vec<_> = (reads.iter())
                .filter(|(t, i, k, l)| {
                    l.len() >= 2
                        && (reads.iter())
                            .any(|(u, j, k2, l2)| (u, j) != (t, i) && k2 == k && l2.len() >= l.len())
                })
                .collect();
            if !twice.is_empty() {
                let &&(t, i, _, l) = &twice[rng.below(twice.len() as u64) as usize];
                let a = rng.below(l.len() as u64 - 1) as usize;
                let b = a + 1 + rng.below((l.len() - a - 1) as u64) as usize;
                let found = mutate(t, i, &|l| l.swap(a, b));
                assert!(!found.is_empty(), "seed {seed}: swapping in T{t} went unnoticed");
                swapped += 1;
            }
        }
        assert!(
            dropped > 100 && swapped > 100,
            "{dropped} dropped, {swapped} swapped"
        );
    }

    #[test]
    fn a_long_history_checks_without_overflowing() {
        let mut h = valid_history(&mut Rng(7), 100_000, 20_000);
        assert!(check(&h).is_empty());
        // Empty a late read whose first value was acknowledged long before: the component
        // spans nearly the whole history, and the cycle shown is still the two-step one.
        let (t, i) = (99_000..100_000)
            .rev()
            .flat_map(|t| (0..h[t].ops.len()).map(move |i| (t, i)))
            .find(|&(t, i)| matches!(&h[t].ops[i], Mop::Read { value: Some(l), .. } if l.len() >= 2))
            .unwrap();
        if let Mop::Read { value: Some(l), .. } = &mut h[t].ops[i] {
            l.clear();
        }
        let found = check(&h);
        let stale = found.iter().find(|a| a.name() == "G-single-realtime");
        assert!(
            matches!(stale, Some(Anomaly::Cycle { steps, .. }) if steps.len() == 2),
            "{found:?}"
        );
        // One long dependency chain: every transaction reads all before it on one key.
        let mut h = Vec::new();
        let mut seen = Vec::new();
        for i in 0..3_000u64 {
            h.push(tx(1, 10 * i, Some(10 * i + 5), vec![rd("x", &seen), app("x", i)]));
            seen.push(i);
        }
        // Turn a late read stale: it closes without real time, the appends are ordered by
        // the reads.
        if let Mop::Read { value: Some(l), .. } = &mut h[2_998].ops[0] {
            l.clear();
        }
        assert_eq!(names(&h), ["G-single"]);
    }
}
