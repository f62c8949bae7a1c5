//! Three-replica groups on real redb files over the in-process transport, with faults.

mod common;

use common::{wait_for, Cluster, DEADLINE};
use rdb::{Db, DbConfig, Error, LeaderEvent, Path, ReplicaId};

fn cfg() -> DbConfig {
    DbConfig::fast()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_reelection_keeps_data() {
    let mut c = Cluster::new(3, cfg()).await;
    for i in 0..50 {
        c.put(&format!("k{i}"), &format!("v{i}")).await;
    }
    let (old, old_term) = c.leader().await;
    c.stop(old).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let (new, new_term) = c.leader_among(&others).await;
    assert_ne!(new, old);
    assert!(new_term > old_term, "a new leader has a newer term");
    for i in 0..50 {
        assert_eq!(
            c.get(&format!("k{i}")).await,
            Some(format!("v{i}")),
            "acknowledged write k{i} survives"
        );
    }
    c.put("after", "failover").await;

    // The old leader comes back as a follower and catches up.
    c.start(old).await.unwrap();
    let idx = c.db(new).status().last_log_index.unwrap();
    c.wait_applied(idx).await;
    let st = c.db(old).status();
    assert_eq!(st.up_term, None);
    assert!(st.term >= new_term);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_neither_commits_nor_reads() {
    let c = Cluster::new(3, cfg()).await;
    c.put("x", "1").await;
    let (old, old_term) = c.leader().await;
    let old_db = c.db(old).clone();
    let mut pre = old_db.begin(None).unwrap();
    pre.update(&Path::root(), "x", "from-the-old-leader");
    let mut pre_read = old_db.begin(None).unwrap();

    c.net.isolate(c.nodes[old].replica.rank);
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let (new, new_term) = c.leader_among(&others).await;
    assert!(new_term > old_term);
    let new_db = c.db(new).clone();
    let mut tx = new_db.begin(None).unwrap();
    tx.update(&Path::root(), "x", "2");
    tx.commit().await.unwrap();

    // The cut-off leader must neither commit nor answer a read.
    match pre.commit().await {
        Err(Error::NotLeader { .. } | Error::Timeout(_) | Error::Stopped(_)) => {}
        other => panic!("a partitioned leader committed: {other:?}"),
    }
    match pre_read.lookup(&Path::root(), b"x").await {
        Err(Error::NotLeader { .. } | Error::Timeout(_)) => {}
        other => panic!("a partitioned leader answered a read: {other:?}"),
    }
    wait_for(DEADLINE, "the cut-off leader stops serving", || async {
        old_db.up_term().is_none().then_some(())
    })
    .await;
    assert!(matches!(old_db.begin(None), Err(Error::NotLeader { .. })));

    // After healing, the old leader follows and everyone sees the new value.
    c.net.heal();
    let idx = new_db.status().last_log_index.unwrap();
    c.wait_applied(idx).await;
    assert_eq!(c.get("x").await.as_deref(), Some("2"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_all_from_disk() {
    let mut c = Cluster::new(3, cfg()).await;
    for i in 0..20 {
        c.put(&format!("k{i}"), "v").await;
    }
    let root = Path::root();
    {
        let (l, _) = c.leader().await;
        let mut tx = c.db(l).begin(None).unwrap();
        tx.create_kvs(&root, "dir", rdb::KeyClass::Integer).update(
            &root.child("dir"),
            rdb::int_key(7),
            "seven",
        );
        tx.commit().await.unwrap();
    }
    for i in 0..3 {
        c.stop(i).await;
    }
    for i in 0..3 {
        c.start(i).await.unwrap();
    }
    let (l, _) = c.leader().await;
    for i in 0..20 {
        assert_eq!(c.get(&format!("k{i}")).await.as_deref(), Some("v"));
    }
    let mut tx = c.db(l).begin(None).unwrap();
    assert_eq!(
        tx.lookup(&root.child("dir"), &rdb::int_key(7)).await.unwrap(),
        Some(b"seven".to_vec())
    );
    drop(tx);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_replicas() {
    let mut c = Cluster::new(3, cfg()).await;
    c.put("a", "1").await;
    let n4 = c.add_node(ReplicaId::new(4, 1)).await;
    let member = c.db(n4).member();
    let (l, _) = c.leader().await;
    c.db(l).add_replica(member).await.unwrap();
    wait_for(DEADLINE, "replica 4 votes", || async {
        c.db(l)
            .status()
            .voters
            .contains(&ReplicaId::new(4, 1))
            .then_some(())
    })
    .await;
    // The new voter has the old data.
    let idx = c.db(l).status().last_log_index.unwrap();
    c.wait_applied(idx).await;

    // Remove a follower; the group keeps working with the rest.
    let victim = (0..3).find(|&i| i != l).unwrap();
    let victim_id = c.nodes[victim].replica;
    c.db(l).remove_replica(victim_id).await.unwrap();
    let st = c.db(l).status();
    assert!(!st.voters.contains(&victim_id));
    assert_eq!(st.voters.len(), 3);
    c.stop(victim).await;
    c.put("b", "2").await;
    assert!(matches!(
        c.db(l).remove_replica(ReplicaId::new(99, 1)).await,
        Err(Error::NotFound(_))
    ));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dictate_recovers_a_lone_survivor() {
    let mut c = Cluster::new(3, cfg()).await;
    for i in 0..10 {
        c.put(&format!("k{i}"), "v").await;
    }
    let (l, _) = c.leader().await;
    let idx = c.db(l).status().last_log_index.unwrap();
    c.wait_applied(idx).await;
    for i in 0..3 {
        c.stop(i).await;
    }
    // Two replicas are lost for good; the survivor is told to go it alone.
    let survivor = 2;
    Db::dictate(&c.nodes[survivor].dir).unwrap();
    c.start(survivor).await.unwrap();
    let db = c.db(survivor).clone();
    db.wait_up(DEADLINE).await.unwrap();
    assert_eq!(db.status().voters, vec![c.nodes[survivor].replica]);
    for i in 0..10 {
        assert_eq!(c.get(&format!("k{i}")).await.as_deref(), Some("v"));
    }
    c.put("after-dictate", "ok").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_replica_is_refused() {
    let mut c = Cluster::new(3, cfg()).await;
    c.put("a", "1").await;
    let (l, _) = c.leader().await;
    let victim = (0..3).find(|&i| i != l).unwrap();
    c.stop(victim).await;
    let dir = c.nodes[victim].dir.clone();

    // Partial loss: the log file is gone. The replica refuses to start.
    std::fs::remove_file(dir.join("log.redb")).unwrap();
    match c.start(victim).await {
        Err(Error::IdentityLost(msg)) => assert!(msg.contains("log.redb"), "{msg}"),
        other => panic!("expected IdentityLost, got {other:?}"),
    }
    // Files from another incarnation are refused too.
    std::fs::remove_dir_all(&dir).unwrap();
    let other = c.tmp.path().join("elsewhere");
    Db::create(&other, c.id, c.nodes[victim].replica, None).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(other.join("log.redb"), dir.join("log.redb")).unwrap();
    Db::create(&c.tmp.path().join("third"), c.id, c.nodes[victim].replica, None).unwrap();
    std::fs::copy(c.tmp.path().join("third/sm.redb"), dir.join("sm.redb")).unwrap();
    std::fs::copy(c.tmp.path().join("third/replica.id"), dir.join("replica.id")).unwrap();
    assert!(matches!(c.start(victim).await, Err(Error::IdentityLost(_))));

    // Whole directory wiped and recreated under the same (rank, gen): it gets a new storage
    // id, and the group refuses to treat it as the voter it replaced.
    std::fs::remove_dir_all(&dir).unwrap();
    Db::create(&dir, c.id, c.nodes[victim].replica, None).unwrap();
    c.start(victim).await.unwrap();
    // Many commits and heartbeats later, the leader has had every chance to feed it.
    for i in 0..20 {
        c.put(&format!("b{i}"), "2").await;
    }
    let st = c.db(victim).status();
    assert_eq!(st.last_log_index, None, "the impostor received no log entries");
    assert!(st.voters.is_empty(), "the impostor knows no membership");
    c.put("c", "3").await;
    c.stop(victim).await;

    // Rejoining under a new generation works.
    let new_id = ReplicaId::new(c.nodes[victim].replica.rank, 2);
    let n = c.add_node(new_id).await;
    let (l, _) = c.leader().await;
    c.db(l).remove_replica(c.nodes[victim].replica).await.unwrap();
    c.db(l).add_replica(c.db(n).member()).await.unwrap();
    let idx = c.db(l).status().last_log_index.unwrap();
    c.wait_applied(idx).await;
    assert!(c.db(l).status().voters.contains(&new_id));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_events_alternate_through_failovers() {
    let mut c = Cluster::new(3, cfg()).await;
    let mut streams: Vec<_> = (0..3).map(|i| c.db(i).take_events().unwrap()).collect();
    assert!(c.db(0).take_events().is_none(), "one stream per replica");
    for round in 0..3 {
        let (l, _) = c.leader().await;
        c.put(&format!("r{round}"), "x").await;
        c.db(l).resign().await.unwrap();
        let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
        c.leader_among(&others).await;
    }
    let (l, _) = c.leader().await;
    c.stop(l).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    c.leader_among(&others).await;
    c.shutdown().await;

    let mut ups = 0;
    for (i, rx) in streams.iter_mut().enumerate() {
        let mut up: Option<u64> = None;
        let mut last = 0;
        while let Ok(ev) = rx.try_recv() {
            match ev {
                LeaderEvent::StepUp { term } => {
                    assert!(up.is_none(), "replica {i}: StepUp while up");
                    assert!(term >= last, "replica {i}: term went back");
                    up = Some(term);
                    last = term;
                    ups += 1;
                }
                LeaderEvent::StepDown { term } => {
                    assert_eq!(up, Some(term), "replica {i}: StepDown without matching StepUp");
                    up = None;
                }
            }
        }
        assert_eq!(up, None, "replica {i}: stopped replicas end stepped down");
    }
    assert!(
        ups >= 5,
        "expected at least five step-ups over four leader changes, saw {ups}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_transfer_skips_the_election_timeout() {
    let c = Cluster::new(3, cfg()).await;
    for i in 0..20 {
        c.put(&format!("k{i}"), "v").await;
    }
    // A leader that has led for longer than its lease can hand over at once.
    let (l, term) = c.leader().await;
    let lease = cfg().election_timeout.1;
    let since = std::time::Instant::now();
    wait_for(DEADLINE, "the leader outlives its lease", || async {
        (since.elapsed() > lease).then_some(())
    })
    .await;
    let target = (0..3).find(|&i| i != l).unwrap();
    let to = c.nodes[target].replica;
    let t = std::time::Instant::now();
    c.db(l).transfer_leadership(to, DEADLINE).await.unwrap();
    let (nl, nterm) = c.leader().await;
    let gap = t.elapsed();
    assert_eq!(nl, target, "the chosen replica leads");
    assert!(nterm > term);
    eprintln!(
        "leadership transfer {} -> {}: {gap:?} (election timeout is {:?}..{:?})",
        c.nodes[l].replica,
        to,
        cfg().election_timeout.0,
        cfg().election_timeout.1
    );
    c.put("after-transfer", "v").await;
    assert_eq!(c.get("k7").await.as_deref(), Some("v"));
    assert!(matches!(
        c.db(nl).transfer_leadership(c.nodes[nl].replica, DEADLINE).await,
        Err(Error::Invalid(_))
    ));
    c.shutdown().await;
}

/// Regression (operator issue): a leader asked to hand over right after it was elected made
/// its target campaign in vain against openraft's vote lease, term after term (6 to 9, 2.4 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_just_elected_leader_hands_over_in_one_term() {
    let c = Cluster::new(3, cfg()).await;
    c.put("k", "v").await;
    let (l, _) = c.leader().await;
    let b = (0..3).find(|&i| i != l).unwrap();
    c.db(l)
        .transfer_leadership(c.nodes[b].replica, DEADLINE)
        .await
        .unwrap();
    let (nl, term) = c.leader().await;
    assert_eq!(nl, b);
    // At once, while the new leader is younger than its vote lease.
    let third = (0..3).find(|&i| i != l && i != b).unwrap();
    c.db(b)
        .transfer_leadership(c.nodes[third].replica, DEADLINE)
        .await
        .unwrap();
    let (nl, nterm) = c.leader().await;
    assert_eq!(nl, third, "the chosen replica leads");
    assert_eq!(nterm, term + 1, "one election, no campaigns in vain");
    c.put("after", "v").await;
    c.shutdown().await;
}

/// A follower cut off for several election timeouts comes back without deposing the healthy
/// leader: with pre-vote it never raised its term while it could not win (openraft 0.9 had no
/// pre-vote; such a replica came back with a higher term and forced an election).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_for_several_election_timeouts_rejoins_without_a_new_term() {
    let c = Cluster::new(3, cfg()).await;
    c.put("x", "0").await;
    let (leader, term) = c.leader().await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let rank = c.nodes[follower].replica.rank;
    c.net.isolate(rank);
    // The fault lasts five maximum election timeouts; the leader keeps committing meanwhile
    // through the remaining quorum, in the same term.
    let cut = std::time::Instant::now();
    let mut writes = 0;
    while cut.elapsed() < cfg().election_timeout.1 * 5 {
        c.put("x", &writes.to_string()).await;
        writes += 1;
        assert_eq!(
            c.db(leader).up_term(),
            Some(term),
            "the leader lost its term during the cut"
        );
    }
    assert_eq!(
        c.db(follower).status().term,
        term,
        "the cut-off follower raised its term: its pre-votes must have failed"
    );
    c.net.heal();
    let idx = c.db(leader).status().last_log_index.unwrap();
    c.wait_applied(idx).await;
    c.put("x", "after").await;
    assert_eq!(
        c.db(leader).up_term(),
        Some(term),
        "the rejoining follower deposed the leader"
    );
    for (_, d) in c.running() {
        assert_eq!(d.status().term, term, "a replica left the leader's term");
    }
    assert!(writes > 0);
    c.shutdown().await;
}
