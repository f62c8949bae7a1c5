//! Snapshots, log purging, and catching up a replica whose log entries are gone.

mod common;

use common::{wait_for, Cluster, DEADLINE};
use rdb::{DbConfig, KeyClass, Path};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_catches_up_from_a_chunked_snapshot() {
    let config = DbConfig {
        snapshot_every_entries: 50,
        keep_log_behind_snapshot: 5,
        snapshot_chunk_bytes: 64 << 10,
        ..DbConfig::fast()
    };
    let mut c = Cluster::new(3, config).await;
    let (l, _) = c.leader().await;
    let lagger = (0..3).find(|&i| i != l).unwrap();
    let lag_index = c.db(lagger).status().last_log_index.unwrap();
    c.stop(lagger).await;

    // ~6 MB of state in a nested layout, far more than one 64 KiB chunk.
    let root = Path::root();
    let data = root.child("data");
    {
        let mut tx = c.db(l).begin(None).unwrap();
        tx.create_kvs(&root, "data", KeyClass::Integer);
        tx.commit().await.unwrap();
    }
    let value = |i: u64| vec![(i % 251) as u8; 4096];
    for batch in 0..30u64 {
        let mut tx = c.db(l).begin(None).unwrap();
        for j in 0..50u64 {
            let i = batch * 50 + j;
            tx.update(&data, rdb::int_key(i), value(i));
        }
        tx.commit().await.unwrap();
    }
    for i in 0..200 {
        c.put(&format!("small{i}"), "x").await;
    }
    let leader = c.db(l).clone();
    wait_for(DEADLINE, "the leader purges past the lagging replica", || async {
        leader.status().purged_index.filter(|&p| p > lag_index)
    })
    .await;

    c.start(lagger).await.unwrap();
    let target = leader.status().last_log_index.unwrap();
    c.wait_applied(target).await;
    let st = c.db(lagger).status();
    assert!(
        st.snapshot_index.is_some(),
        "the lagging replica installed a snapshot"
    );

    // Make the caught-up replica the leader and read everything through it.
    c.stop(l).await;
    let (nl, _) = c.leader().await;
    let mut tx = c.db(nl).begin(None).unwrap();
    let got = tx.iterate(&data, .., 10_000).await.unwrap();
    assert_eq!(got.len(), 1500);
    for (k, v) in got {
        let i = rdb::int_of_key(&k).unwrap();
        assert_eq!(
            v,
            rdb::Value::Bytes(value(i)),
            "value {i} intact after snapshot transfer"
        );
    }
    assert_eq!(tx.lookup(&root, b"small199").await.unwrap(), Some(b"x".to_vec()));
    drop(tx);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_snapshot_and_purge() {
    let config = DbConfig {
        snapshot_every_entries: 20,
        keep_log_behind_snapshot: 0,
        ..DbConfig::fast()
    };
    let mut c = Cluster::new(1, config).await;
    for i in 0..100 {
        c.put(&format!("k{i}"), &i.to_string()).await;
    }
    let db = c.db(0).clone();
    wait_for(DEADLINE, "a purge", || async {
        db.status().purged_index.filter(|&p| p > 20)
    })
    .await;
    c.stop(0).await;
    c.start(0).await.unwrap();
    for i in 0..100 {
        assert_eq!(c.get(&format!("k{i}")).await, Some(i.to_string()));
    }
    c.shutdown().await;
}
