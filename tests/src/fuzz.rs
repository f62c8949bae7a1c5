//! Fuzzing every decoder that reads bytes from the network or the disk: structured random
//! inputs (mutations of valid encodings, and random bytes) run in a loop on the stable
//! toolchain, each input under `catch_unwind` and a time budget.
//!
//! The targets are rdb's ([`rdb::fuzz`]: raft messages, replies, snapshot chunks, on-disk
//! records) and the engine's: the protobuf messages of the client and peer ports as tonic
//! decodes them, the raft message's conversion to rdb's, and the service request payloads
//! (management, pool and container requests) as the engine decodes them. The `rsvc-fuzz`
//! binary runs them; [`replay`] runs the checked-in corpus under `tests/fuzz/corpus` in CI.
//!
//! CAVEAT: this is not coverage-guided (cargo-fuzz and libFuzzer need a nightly toolchain,
//! which CI does not have). The mutations know the formats' weak spots instead: postcard's
//! varint lengths and enum tags, and protobuf's field tags and length prefixes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A decoder as a target runs it: `true` if the bytes were accepted.
pub type Decode = Box<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// One decoder under test.
pub struct Target {
    /// Its name, also its corpus directory's.
    pub name: &'static str,
    /// Decodes as the system does; `true` if accepted. Must not panic.
    pub decode: Decode,
    /// Valid encodings to mutate from.
    pub samples: Vec<Vec<u8>>,
}

fn postcard_target<T: serde::de::DeserializeOwned>(name: &'static str, samples: Vec<Vec<u8>>) -> Target {
    Target {
        name,
        decode: Box::new(|b| rsvc_client::wire::decode::<T>(b).is_ok()),
        samples,
    }
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    rsvc_client::wire::encode(v).expect("a sample encodes")
}

/// Every target: rdb's, then the engine's.
pub fn targets() -> Vec<Target> {
    use pool_svc::{AttrOp, PoolRequest};
    use rsvc_client::mgmt::MgmtRequest;
    use rsvc_client::wire::pb as cpb;
    use rsvc_server::wire::pb as ppb;

    let mut out: Vec<Target> = rdb::fuzz::TARGETS
        .iter()
        .map(|t| {
            let t = *t;
            Target {
                name: t.name(),
                decode: Box::new(move |b| t.decode(b)),
                samples: t.samples(),
            }
        })
        .collect();
    let cont = cont_svc::ContRequest::Create {
        label: "scratch".into(),
        props: vec![("layout".into(), "ec".into())],
    };
    out.push(postcard_target::<PoolRequest>(
        "pool-request",
        vec![
            enc(&PoolRequest::Connect {
                client: "fuzz".into(),
                ttl_ms: 5000,
            }),
            enc(&PoolRequest::AttrTxn {
                ops: vec![
                    AttrOp::Get { name: "a".into() },
                    AttrOp::Set {
                        name: "b".into(),
                        value: b"v".to_vec(),
                    },
                    AttrOp::Append {
                        name: "l".into(),
                        value: b"x".to_vec(),
                    },
                    AttrOp::Expect {
                        name: "c".into(),
                        value: None,
                    },
                ],
            }),
            enc(&PoolRequest::Cont {
                handle: [7; 16],
                req: cont,
            }),
        ],
    ));
    out.push(postcard_target::<MgmtRequest>(
        "mgmt-request",
        vec![
            enc(&MgmtRequest::Join {
                rank: 4,
                addr: "127.0.0.1:7001".into(),
                access_point: false,
                cluster: "rsvc".into(),
                incarnation: 99,
            }),
            enc(&MgmtRequest::CreateInstance {
                class: "pool".into(),
                label: "tank".into(),
                replicas: 3,
            }),
            enc(&MgmtRequest::Dictate {
                class: "pool".into(),
                label: "tank".into(),
                rank: Some(2),
            }),
        ],
    ));
    out.push(postcard_target::<rsvc_server::counter::CounterRequest>(
        "counter-request",
        vec![enc(&rsvc_server::counter::CounterRequest::Add {
            name: "n".into(),
            delta: -3,
        })],
    ));
    // The client port: a call as tonic decodes it, then its payload as the pool service does.
    let call = cpb::CallRequest {
        class: "pool".into(),
        instance: "tank".into(),
        client_id: vec![1; 16],
        seq: 12,
        payload: enc(&PoolRequest::Query),
        probe: false,
        acked: 10,
    };
    out.push(Target {
        name: "call-request",
        decode: Box::new(|b| match cpb::CallRequest::decode(b) {
            Ok(c) => rsvc_client::wire::decode::<PoolRequest>(&c.payload).is_ok(),
            Err(_) => false,
        }),
        samples: vec![call.encode_to_vec()],
    });
    // The peer port: a raft message as tonic decodes it, rsvc-server converts it, and rdb
    // decodes its payload by kind.
    let append = rdb::fuzz::Target::Append.samples().remove(0);
    let raft = ppb::RaftMessage {
        cluster: "rsvc".into(),
        db: vec![9; 16],
        from: Some(ppb::ReplicaRef { rank: 1, gen: 1 }),
        to: Some(ppb::ReplicaRef { rank: 2, gen: 1 }),
        to_storage_id: 77,
        kind: 0,
        payload: append,
    };
    out.push(Target {
        name: "raft-message",
        decode: Box::new(|b| {
            let Ok(m) = ppb::RaftMessage::decode(b) else {
                return false;
            };
            let Ok(rpc) = rsvc_server::wire::rpc_from(m) else {
                return false;
            };
            let t = match rpc.kind {
                rdb::RpcKind::Append => rdb::fuzz::Target::Append,
                rdb::RpcKind::Vote | rdb::RpcKind::PreVote => rdb::fuzz::Target::Vote,
                rdb::RpcKind::Snapshot => rdb::fuzz::Target::SnapshotChunk,
                rdb::RpcKind::TransferLeader => rdb::fuzz::Target::TransferLeader,
            };
            t.decode(&rpc.payload)
        }),
        samples: vec![raft.encode_to_vec()],
    });
    // Replica lifecycle from the management leader.
    let start = ppb::StartReplicaRequest {
        cluster: "rsvc".into(),
        class: "pool".into(),
        instance: "tank".into(),
        db: vec![9; 16],
        gen: 2,
        bootstrap: vec![ppb::Member {
            replica: Some(ppb::ReplicaRef { rank: 1, gen: 2 }),
            addr: "127.0.0.1:7001".into(),
            storage_id: 5,
        }],
    };
    out.push(Target {
        name: "start-replica",
        decode: Box::new(|b| match ppb::StartReplicaRequest::decode(b) {
            Ok(r) => {
                rsvc_server::wire::db_from(&r.db).is_ok()
                    && r.bootstrap
                        .iter()
                        .all(|m| rsvc_server::wire::member_from(m).is_ok())
            }
            Err(_) => false,
        }),
        samples: vec![start.encode_to_vec()],
    });
    out
}

/// Bytes that make length prefixes and tags interesting: varint maxima, lone continuation
/// bytes, and large lengths.
const INTERESTING: &[&[u8]] = &[
    &[0xff, 0xff, 0xff, 0xff, 0x0f],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
    &[0x80],
    &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80],
    &[0x00],
    &[0x7f],
    &[0xfe, 0xff, 0xff, 0x7f],
];

/// One mutation of `input`, sometimes spliced with `other`.
pub fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.random_range(0..4);
    for _ in 0..rounds {
        let len = v.len();
        match rng.random_range(0..10) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let j = rng.random_range(i..=len.min(i + 32));
                v.drain(i..j);
            }
            4 if len > 0 => {
                v.truncate(rng.random_range(0..len));
            }
            5 => {
                let i = rng.random_range(0..=len);
                let pick = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let end = (i + pick.len()).min(len);
                v.splice(i..end, pick.iter().copied());
            }
            6 if len > 0 => {
                // Duplicate a run: repeated elements, nested structures.
                let i = rng.random_range(0..len);
                let j = rng.random_range(i..=len.min(i + 64));
                let run = v[i..j].to_vec();
                v.splice(j..j, run);
            }
            7 if !other.is_empty() => {
                let i = rng.random_range(0..=len);
                let a = rng.random_range(0..other.len());
                let b = rng.random_range(a..=other.len());
                v.splice(i..len.min(i + (b - a)), other[a..b].iter().copied());
            }
            8 => {
                let n = rng.random_range(0..64);
                v = (0..n).map(|_| rng.random()).collect();
            }
            _ if len > 0 => {
                // A small arithmetic change: an off-by-one tag or length.
                let i = rng.random_range(0..len);
                v[i] = v[i].wrapping_add(rng.random_range(1..4)).wrapping_sub(2);
            }
            _ => v.push(rng.random()),
        }
    }
    v
}

/// What one target's run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Inputs tried.
    pub inputs: u64,
    /// Inputs the decoder accepted.
    pub accepted: u64,
    /// Inputs that panicked, with the panic's message.
    pub panics: Vec<(Vec<u8>, String)>,
    /// Inputs that took longer than the budget.
    pub slow: Vec<(Vec<u8>, Duration)>,
    /// The longest time one input took.
    pub max_time: Duration,
    /// How long the run took.
    pub elapsed: Duration,
}

/// How long one input may take before it counts as a hang: far above any decoder's time on
/// inputs of a few KiB (microseconds), so that a loaded machine does not raise false alarms.
pub const INPUT_BUDGET: Duration = Duration::from_secs(1);

/// Runs `target` on one input, catching a panic.
fn one(target: &Target, input: &[u8], report: &mut Report) {
    let t = Instant::now();
    let res = catch_unwind(AssertUnwindSafe(|| (target.decode)(input)));
    let took = t.elapsed();
    report.inputs += 1;
    report.max_time = report.max_time.max(took);
    match res {
        Ok(true) => report.accepted += 1,
        Ok(false) => {}
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            report.panics.push((input.to_vec(), msg));
        }
    }
    if took > INPUT_BUDGET {
        report.slow.push((input.to_vec(), took));
    }
}

/// Runs `n` inputs on `target`, from `seed`: mutations of its samples and of `corpus`
/// (inputs the decoder accepted are kept as further seeds, up to a bound).
pub fn run(target: &Target, corpus: &[Vec<u8>], n: u64, seed: u64) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pool: Vec<Vec<u8>> = target.samples.iter().chain(corpus).cloned().collect();
    let mut report = Report::default();
    let start = Instant::now();
    for input in pool.clone() {
        one(target, &input, &mut report);
    }
    while report.inputs < n {
        let a = &pool[rng.random_range(0..pool.len())];
        let b = &pool[rng.random_range(0..pool.len())];
        let input = mutate(&mut rng, a, b);
        let before = report.accepted;
        one(target, &input, &mut report);
        // An accepted mutation is a new valid shape: mutate from it too (bounded).
        if report.accepted > before && pool.len() < 4096 && rng.random_range(0..16) == 0 {
            pool.push(input);
        }
    }
    report.elapsed = start.elapsed();
    report
}

/// The corpus of `target` under `dir` (`dir/<name>/*`), sorted by file name.
pub fn load_corpus(dir: &Path, target: &Target) -> Vec<Vec<u8>> {
    let Ok(rd) = std::fs::read_dir(dir.join(target.name)) else {
        return Vec::new();
    };
    let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    files.sort();
    files.into_iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// The checked-in corpus.
pub fn corpus_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus")
}

/// Replays the corpus of every target, plus `extra` mutations each: the reports of targets
/// that panicked or hung.
pub fn replay(extra: u64) -> Vec<(&'static str, Report)> {
    let dir = corpus_dir();
    targets()
        .into_iter()
        .map(|t| {
            let corpus = load_corpus(&dir, &t);
            let n = corpus.len() as u64 + t.samples.len() as u64 + extra;
            (t.name, run(&t, &corpus, n, 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in corpus and a short run of every target: no panic, no hang. The long runs
    /// are `rsvc-fuzz` (see docs/testing.md).
    #[test]
    fn the_corpus_and_a_short_run_find_nothing() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let reports = replay(20_000);
        std::panic::set_hook(prev);
        let mut bad = Vec::new();
        for (name, r) in &reports {
            assert!(r.inputs >= 20_000, "{name}: {r:?}");
            if !r.panics.is_empty() || !r.slow.is_empty() {
                bad.push(format!(
                    "{name}: {} panics (first: {:?}), {} slow",
                    r.panics.len(),
                    r.panics.first(),
                    r.slow.len()
                ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
        // The corpus is not empty, and mutations reach inputs that decode.
        assert!(reports.iter().all(|(_, r)| r.accepted > 0), "{reports:?}");
    }

    #[test]
    fn a_decoder_that_panics_is_caught_and_reported() {
        let t = Target {
            name: "panicky",
            decode: Box::new(|b| {
                assert!(b.first() != Some(&0x42), "boom");
                true
            }),
            samples: vec![vec![0x41]],
        };
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = run(&t, &[], 5000, 3);
        std::panic::set_hook(prev);
        assert!(!r.panics.is_empty(), "{r:?}");
        assert!(r.panics[0].1.contains("boom"), "{:?}", r.panics[0]);
    }
}
