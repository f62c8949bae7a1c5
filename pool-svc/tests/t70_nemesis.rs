//! The fault suite's quick profile (rsvc-tests' `nemesis`): real `pool-svc serve` engines
//! behind fault proxies, eight clients on sixteen registers and four running list-append
//! transactions, and every nemesis in turn (kill -9, wiped data directories, short and long
//! pauses, isolation, one-way cuts, bridges, flapping links, slow links, leadership transfers,
//! replica moves, and, as root, a full disk), checked for linearizability, strict
//! serializability of the transactions, lost writes, liveness after each heal, and leaders
//! deposed by a resumed follower. Fixed seeds;
//! `rsvc-fault --runs N` runs random ones (docs/testing.md).

use rsvc_tests::nemesis::{self, table};
use rsvc_tests::rsvc::EngineCmd;

const POOL_SVC: &str = env!("CARGO_BIN_EXE_pool-svc");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_profile_finds_no_violation_no_lost_write_and_no_stuck_service() {
    let dir = tempfile::tempdir().unwrap();
    let mut reports = Vec::new();
    for cfg in nemesis::quick_profile(EngineCmd::pool_svc(POOL_SVC), dir.path()) {
        reports.push(nemesis::run(cfg).await.unwrap());
    }
    eprintln!("{}", table(&reports));
    for r in &reports {
        assert!(r.violations.is_empty(), "seed {}: {:#?}", r.seed, r.violations);
        assert!(
            r.txn_anomalies.is_empty(),
            "seed {}: {:#?}",
            r.seed,
            r.txn_anomalies
        );
        assert!(r.lost.is_empty(), "seed {}: {:#?}", r.seed, r.lost);
        assert!(r.stuck.is_empty(), "seed {}: {:#?}", r.seed, r.stuck);
        assert_eq!(r.undecided, 0, "seed {}: the checker ran out of budget", r.seed);
        // Pre-vote: a follower that wakes from a pause never deposes a healthy leader.
        for f in &r.faults {
            assert_ne!(
                f.deposed,
                Some(true),
                "seed {}: a pause of {} deposed the leader",
                r.seed,
                f.target
            );
        }
        assert!(
            r.acked > 1000,
            "seed {}: only {} acknowledged operations",
            r.seed,
            r.acked
        );
        assert!(r.txns > 100, "seed {}: only {} transactions", r.seed, r.txns);
    }
    let kinds: std::collections::BTreeSet<_> = reports
        .iter()
        .flat_map(|r| r.faults.iter().map(|f| f.kind))
        .collect();
    assert!(kinds.len() >= 8, "the quick profile exercised only {kinds:?}");
}

/// The suite can fail: a leader whose clock runs 8 times slow holds its read lease well past
/// the moment its followers elect another leader, and a client that still reaches it only (the
/// far side of the partition) reads stale values. Both checkers must say so: the register
/// checker finds a stale read, and the transaction checker a cycle through real time (a
/// read-only transaction that missed an append which had returned before it began).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_a_slow_clock_serves_stale_reads_and_the_checkers_find_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut stale_reads, mut cycles) = (Vec::new(), Vec::new());
    for seed in 21..=28 {
        let mut cfg = nemesis::RunConfig::new(
            seed,
            3,
            std::time::Duration::from_secs(10),
            EngineCmd::pool_svc(POOL_SVC),
            dir.path(),
        );
        cfg.faults = vec![nemesis::FaultKind::ClockSlow];
        let r = nemesis::run(cfg)
            .await
            .expect("the engines need the failpoints feature (rsvc-tests enables it)");
        assert!(
            r.lost.is_empty() && r.stuck.is_empty(),
            "{:?} {:?}",
            r.lost,
            r.stuck
        );
        stale_reads.extend(r.violations);
        cycles.extend(r.txn_anomalies);
        if !stale_reads.is_empty() && !cycles.is_empty() {
            break;
        }
    }
    assert!(
        stale_reads.iter().any(|v| v.contains("read")),
        "no stale read found with a slow leader clock: {stale_reads:#?}"
    );
    assert!(
        cycles.iter().any(|c| c.contains("realtime")),
        "no real-time cycle among the transactions with a slow leader clock: {cycles:#?}"
    );
    eprintln!("{}\n{}", stale_reads[0], cycles[0]);
}
