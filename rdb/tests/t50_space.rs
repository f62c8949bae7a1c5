//! Free-space admission (DAOS semantics) and what a real ENOSPC from the disk does.

mod common;

use common::{wait_for, Cluster, DEADLINE};
use std::time::Duration;

use rdb::{DbConfig, Error, Path};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_space_refuses_ordinary_writes_but_not_critical_ones() {
    let config = DbConfig {
        free_space_cache: std::time::Duration::ZERO,
        ..DbConfig::fast()
    };
    let c = Cluster::new(3, config).await;
    for i in 0..10 {
        c.put(&format!("k{i}"), "v").await;
    }
    let (l, _) = c.leader().await;
    let db = c.db(l).clone();
    let root = Path::root();

    c.nodes[l].probe.set(1 << 20); // 1 MiB: under the 4 MiB no-append threshold
    let before = db.status().last_log_index;
    let mut tx = db.begin(None).unwrap();
    tx.update(&root, "big", vec![0u8; 1000]);
    match tx.commit().await {
        Err(Error::NoSpace { free, needed }) => {
            assert_eq!(free, 1 << 20);
            assert!(needed >= 4 << 20);
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert_eq!(
        db.status().last_log_index,
        before,
        "a refused transaction appends nothing"
    );
    assert!(!Error::NoSpace { free: 0, needed: 1 }.to_string().is_empty());

    // An operator can still free space and record small critical facts.
    let mut tx = db.begin(None).unwrap();
    tx.delete(&root, "k0").update_critical(&root, "state", "draining");
    tx.commit().await.unwrap();
    // A big batch of deletes is not "critical" (DAOS: at most 8 operations).
    let mut tx = db.begin(None).unwrap();
    for i in 1..10 {
        tx.delete(&root, format!("k{i}"));
    }
    assert!(matches!(tx.commit().await, Err(Error::NoSpace { .. })));

    c.nodes[l].probe.set(8 << 10); // under the 16 KiB critical floor: nothing passes
    let mut tx = db.begin(None).unwrap();
    tx.delete(&root, "k1");
    assert!(matches!(tx.commit().await, Err(Error::NoSpace { .. })));
    assert!(db.status().admission_rejections >= 3);

    // Space returns: writes resume by themselves, and nothing acknowledged was lost.
    c.nodes[l].probe.set(1 << 30);
    let mut tx = db.begin(None).unwrap();
    tx.update(&root, "big", vec![0u8; 1000]);
    tx.commit().await.unwrap();
    assert_eq!(c.get("k0").await, None);
    assert_eq!(c.get("k1").await.as_deref(), Some("v"));
    assert_eq!(c.get("state").await.as_deref(), Some("draining"));
    c.shutdown().await;
}

/// The leader has room but both followers are short: no quorum can hold an ordinary write, so
/// the leader refuses it at once with the followers' reading (they report their space on every
/// AppendEntries reply). One follower with room again is enough for a quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_admits_only_what_a_quorum_can_hold() {
    let config = DbConfig {
        free_space_cache: std::time::Duration::ZERO,
        ..DbConfig::fast()
    };
    let c = Cluster::new(3, config).await;
    c.put("a", "1").await;
    let (l, _) = c.leader().await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let db = c.db(l).clone();
    let root = Path::root();

    // One follower short: the leader and the other follower still form a quorum.
    c.nodes[followers[0]].probe.set(1 << 20);
    for i in 0..5 {
        c.put(&format!("one-short-{i}"), "v").await;
    }
    // Both short: refused once their next reports arrive (a heartbeat or two).
    c.nodes[followers[1]].probe.set(2 << 20);
    let (free, needed) = wait_for(DEADLINE, "a write refused on the followers' account", || async {
        let mut tx = db.begin(None).unwrap();
        tx.update(&root, "w", "v");
        match tx.commit().await {
            Err(Error::NoSpace { free, needed }) => Some((free, needed)),
            Ok(_) => None,
            Err(e) => panic!("{e}"),
        }
    })
    .await;
    assert_eq!(
        free,
        2 << 20,
        "the refusal names the tighter replica of the best quorum"
    );
    assert!(needed >= 4 << 20);
    let before = db.status().last_log_index;
    let mut tx = db.begin(None).unwrap();
    tx.update(&root, "w", "v");
    assert!(matches!(tx.commit().await, Err(Error::NoSpace { .. })));
    assert_eq!(
        db.status().last_log_index,
        before,
        "a refused transaction appends nothing"
    );
    // Critical transactions still pass: the followers are above the critical floor.
    let mut tx = db.begin(None).unwrap();
    tx.delete(&root, "a");
    tx.commit().await.unwrap();

    // One follower has room again: writes resume by themselves.
    c.nodes[followers[1]].probe.set(1 << 30);
    wait_for(DEADLINE, "writes to resume", || async {
        let mut tx = db.begin(None).unwrap();
        tx.update(&root, "w", "again");
        tx.commit().await.ok()
    })
    .await;
    assert_eq!(c.get("w").await.as_deref(), Some("again"));
    assert_eq!(c.get("a").await, None);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_on_the_leader_stops_it_without_losing_acknowledged_writes() {
    let mut c = Cluster::new(3, DbConfig::fast()).await;
    for i in 0..20 {
        c.put(&format!("k{i}"), "v").await;
    }
    let (l, term) = c.leader().await;
    let db = c.db(l).clone();

    // The disk under the leader fills up for real (redb sees ENOSPC from its file writes).
    c.nodes[l].faults.set_full(true);
    let mut tx = db.begin(None).unwrap();
    tx.update(&Path::root(), "doomed", "x");
    let res = tx.commit().await;
    assert!(
        res.is_err(),
        "a write that could not be made durable must not be acknowledged: {res:?}"
    );
    assert!(c.nodes[l].faults.failed_writes() > 0);
    wait_for(DEADLINE, "the leader stops on the storage error", || async {
        db.status().stopped.is_some().then_some(())
    })
    .await;
    assert_eq!(db.up_term(), None);

    // The others carry on, with every acknowledged write.
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let (_, new_term) = c.leader_among(&others).await;
    assert!(new_term > term);
    for i in 0..20 {
        assert_eq!(c.get(&format!("k{i}")).await.as_deref(), Some("v"));
    }
    c.put("after", "enospc").await;

    // Space returns; the replica restarts and catches up.
    c.nodes[l].faults.set_full(false);
    c.stop_after_storage_error(l).await;
    c.start(l).await.unwrap();
    let target = c.db(others[0]).status().last_log_index.unwrap();
    c.wait_applied(target).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_on_a_follower_leaves_the_group_writable() {
    let mut c = Cluster::new(3, DbConfig::fast()).await;
    c.put("a", "1").await;
    let (l, _) = c.leader().await;
    let f = (0..3).find(|&i| i != l).unwrap();
    c.nodes[f].faults.set_full(true);
    for i in 0..20 {
        c.put(&format!("k{i}"), "v").await;
    }
    let fdb = c.db(f).clone();
    wait_for(DEADLINE, "the follower stops on the storage error", || async {
        fdb.status().stopped.is_some().then_some(())
    })
    .await;
    c.nodes[f].faults.set_full(false);
    c.stop_after_storage_error(f).await;
    c.start(f).await.unwrap();
    let target = c.db(l).status().last_log_index.unwrap();
    c.wait_applied(target).await;
    c.shutdown().await;
}

/// A leader whose log write fails after its followers got the entry must not lead again in
/// the same term with the shorter log it reopens with: it would write another entry at that
/// index, under the same log id, and the followers would keep the first one. The fault suite
/// found replicas that disagreed this way (fsync-eio on the leader, then the engine reopened
/// it). Every replica must end with the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_unflushed_entries_comes_back_without_forking_the_log() {
    let mut c = Cluster::new(3, DbConfig::fast()).await;
    c.put("a", "1").await;
    let (l, term) = c.leader().await;
    let db = c.db(l).clone();
    c.nodes[l].faults.set_full(true);
    let mut tx = db.begin(None).unwrap();
    tx.update(&Path::root(), "doomed", "x");
    let _ = tx.commit().await;
    wait_for(DEADLINE, "the leader stops on the storage error", || async {
        db.status().stopped.is_some().then_some(())
    })
    .await;
    // Back at once, before the followers' lease on it ran out, as the engine reopens it.
    c.nodes[l].faults.set_full(false);
    c.stop_after_storage_error(l).await;
    c.start(l).await.unwrap();
    c.put("after", "y").await;
    let (_, now) = c.leader().await;
    eprintln!("leader {l} in term {term}; after its return the group leads in term {now}");

    // Each replica in turn leads and reads both keys: they must all agree.
    let mut seen = Vec::new();
    for i in 0..3 {
        let to = c.db(i).ident().replica;
        wait_for(DEADLINE, "a leadership transfer", || async {
            let (cur, _) = c.leader().await;
            if cur == i {
                return Some(());
            }
            c.db(cur)
                .transfer_leadership(to, Duration::from_secs(5))
                .await
                .ok()?;
            (c.leader().await.0 == i).then_some(())
        })
        .await;
        seen.push((i, c.get("doomed").await, c.get("after").await));
    }
    assert!(
        seen.iter().all(|(_, d, a)| (d, a) == (&seen[0].1, &seen[0].2)),
        "replicas disagree: {seen:?}"
    );
    assert_eq!(seen[0].2.as_deref(), Some("y"), "the acknowledged write is there");
    c.shutdown().await;
}
