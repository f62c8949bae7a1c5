//! Transaction semantics on a one-replica group (real redb files, real openraft).

mod common;

use common::Cluster;
use rdb::{int_key, ApplyError, DbConfig, Error, KeyClass, Path, Value};

async fn one() -> Cluster {
    Cluster::new(1, DbConfig::fast()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_do_not_see_own_queued_updates() {
    let c = one().await;
    let db = c.db(0);
    let root = Path::root();
    let mut tx = db.begin(None).unwrap();
    tx.update(&root, "a", "1");
    assert_eq!(
        tx.lookup(&root, b"a").await.unwrap(),
        None,
        "own update must be invisible before commit"
    );
    tx.commit().await.unwrap();

    let mut tx = db.begin(None).unwrap();
    assert_eq!(tx.lookup(&root, b"a").await.unwrap(), Some(b"1".to_vec()));
    tx.update(&root, "a", "2").delete(&root, "a");
    assert_eq!(tx.lookup(&root, b"a").await.unwrap(), Some(b"1".to_vec()));
    tx.commit().await.unwrap();
    let mut tx = db.begin(None).unwrap();
    assert_eq!(
        tx.lookup(&root, b"a").await.unwrap(),
        None,
        "update then delete in one tx leaves nothing"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_errors_leave_no_trace() {
    let c = one().await;
    let db = c.db(0);
    let root = Path::root();
    let mut tx = db.begin(None).unwrap();
    tx.update(&root, "keep", "v0");
    tx.commit().await.unwrap();

    // Several effects, then an op that fails: none of them may land.
    let mut tx = db.begin(None).unwrap();
    tx.update(&root, "keep", "v1")
        .update(&root, "new", "x")
        .create_kvs(&root, "dir", KeyClass::Lexical)
        .update(&root.child("dir"), "inner", "y")
        .delete(&root, "missing");
    match tx.commit().await {
        Err(Error::Apply(ApplyError::NotFound(_))) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    let mut tx = db.begin(None).unwrap();
    assert_eq!(tx.lookup(&root, b"keep").await.unwrap(), Some(b"v0".to_vec()));
    assert_eq!(tx.lookup(&root, b"new").await.unwrap(), None);
    assert!(tx.get(&root, b"dir").await.unwrap().is_none());
    drop(tx);

    // A KVS id consumed by the failed tx is not leaked into the next one's view.
    let mut tx = db.begin(None).unwrap();
    tx.create_kvs(&root, "dir", KeyClass::Lexical)
        .update(&root.child("dir"), "inner", "z");
    tx.commit().await.unwrap();
    let mut tx = db.begin(None).unwrap();
    assert_eq!(
        tx.lookup(&root.child("dir"), b"inner").await.unwrap(),
        Some(b"z".to_vec())
    );

    // Preconditions.
    let mut tx = db.begin(None).unwrap();
    tx.expect(&root, "keep", Some(b"wrong".to_vec()))
        .update(&root, "keep", "v2");
    assert!(matches!(
        tx.commit().await,
        Err(Error::Apply(ApplyError::PreconditionFailed(_)))
    ));
    let mut tx = db.begin(None).unwrap();
    tx.expect(&root, "keep", Some(b"v0".to_vec()))
        .update(&root, "keep", "v2");
    tx.commit().await.unwrap();
    let mut tx = db.begin(None).unwrap();
    tx.expect(&root, "absent", None)
        .update(&root, "absent", "now-present");
    tx.commit().await.unwrap();
    let mut tx = db.begin(None).unwrap();
    assert_eq!(tx.lookup(&root, b"keep").await.unwrap(), Some(b"v2".to_vec()));
    assert_eq!(
        tx.lookup(&root, b"absent").await.unwrap(),
        Some(b"now-present".to_vec())
    );

    // Wrong types and existing keys.
    let mut tx = db.begin(None).unwrap();
    tx.update(&root, "dir", "overwrite a KVS");
    assert!(matches!(
        tx.commit().await,
        Err(Error::Apply(ApplyError::WrongType(_)))
    ));
    let mut tx = db.begin(None).unwrap();
    tx.create_kvs(&root, "keep", KeyClass::Generic);
    assert!(matches!(
        tx.commit().await,
        Err(Error::Apply(ApplyError::Exists(_)))
    ));
    let mut tx = db.begin(None).unwrap();
    tx.update(&root.child("keep"), "x", "through a value");
    assert!(matches!(
        tx.commit().await,
        Err(Error::Apply(ApplyError::WrongType(_)))
    ));
    let mut tx = db.begin(None).unwrap();
    assert!(matches!(
        tx.lookup(&root.child("nope"), b"x").await,
        Err(Error::Apply(ApplyError::NotFound(_)))
    ));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_classes_order_and_validate_keys() {
    let c = one().await;
    let db = c.db(0);
    let root = Path::root();
    let ints = root.child("ints");
    let lex = root.child("lex");
    let mut tx = db.begin(None).unwrap();
    tx.create_kvs(&root, "ints", KeyClass::Integer)
        .create_kvs(&root, "lex", KeyClass::Lexical);
    for n in [300u64, 2, 70_000, 1, 256] {
        tx.update(&ints, int_key(n), n.to_string());
    }
    for k in ["b", "ab", "a", "ba", "B"] {
        tx.update(&lex, k, k);
    }
    tx.commit().await.unwrap();

    let mut tx = db.begin(None).unwrap();
    let keys: Vec<u64> = tx
        .iterate(&ints, .., 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| rdb::int_of_key(&k).unwrap())
        .collect();
    assert_eq!(
        keys,
        vec![1, 2, 256, 300, 70_000],
        "Integer KVS iterates in numeric order"
    );
    assert_eq!(tx.max_key(&ints).await.unwrap(), Some(70_000));
    let (first, v) = tx.fetch_first(&ints).await.unwrap().unwrap();
    assert_eq!(
        (rdb::int_of_key(&first), v),
        (Some(1), Value::Bytes(b"1".to_vec()))
    );
    let (next, _) = tx.fetch_next(&ints, &int_key(2)).await.unwrap().unwrap();
    assert_eq!(rdb::int_of_key(&next), Some(256));
    let in_range: Vec<u64> = tx
        .iterate(&ints, int_key(2)..int_key(300), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| rdb::int_of_key(&k).unwrap())
        .collect();
    assert_eq!(in_range, vec![2, 256]);

    let lkeys: Vec<String> = tx
        .iterate(&lex, .., 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| String::from_utf8(k).unwrap())
        .collect();
    assert_eq!(
        lkeys,
        vec!["B", "a", "ab", "b", "ba"],
        "Lexical KVS iterates in byte order"
    );
    assert_eq!(tx.fetch_last(&lex).await.unwrap().unwrap().0, b"ba".to_vec());
    assert_eq!(
        tx.iterate(&lex, .., 2).await.unwrap().len(),
        2,
        "limit is honoured"
    );
    assert_eq!(tx.kvs_class(&ints).await.unwrap(), KeyClass::Integer);
    assert_eq!(
        tx.get(&root, b"ints").await.unwrap(),
        Some(Value::Kvs(KeyClass::Integer))
    );
    drop(tx);

    let mut tx = db.begin(None).unwrap();
    tx.update(&ints, "not-8-bytes", "x");
    assert!(matches!(
        tx.commit().await,
        Err(Error::Apply(ApplyError::InvalidKey(_)))
    ));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvs_destroy_only_after_children() {
    let c = one().await;
    let db = c.db(0);
    let root = Path::root();
    let a = root.child("a");
    let mut tx = db.begin(None).unwrap();
    tx.create_kvs(&root, "a", KeyClass::Generic)
        .create_kvs(&a, "b", KeyClass::Generic)
        .update(&a, "v", "1")
        .update(&a.child("b"), "w", "2");
    tx.commit().await.unwrap();

    let mut tx = db.begin(None).unwrap();
    tx.destroy_kvs(&root, "a");
    assert!(matches!(
        tx.commit().await,
        Err(Error::Apply(ApplyError::NotEmpty(_)))
    ));

    // Children first, then the parent, in one transaction: values go with their KVS.
    let mut tx = db.begin(None).unwrap();
    tx.destroy_kvs(&a, "b").destroy_kvs(&root, "a");
    tx.commit().await.unwrap();
    let mut tx = db.begin(None).unwrap();
    assert!(tx.get(&root, b"a").await.unwrap().is_none());
    drop(tx);

    // Recreating it yields an empty KVS: no values resurface from the old one.
    let mut tx = db.begin(None).unwrap();
    tx.create_kvs(&root, "a", KeyClass::Generic);
    tx.commit().await.unwrap();
    let mut tx = db.begin(None).unwrap();
    assert!(tx.iterate(&a, .., 10).await.unwrap().is_empty());
    assert!(matches!(
        tx.lookup(&a.child("b"), b"w").await,
        Err(Error::Apply(ApplyError::NotFound(_)))
    ));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_binding_and_empty_commit() {
    let c = one().await;
    let db = c.db(0);
    let term = db.up_term().unwrap();
    assert!(matches!(db.begin(Some(term + 1)), Err(Error::NotLeader { .. })));
    let tx = db.begin(Some(term)).unwrap();
    assert_eq!(
        tx.commit().await.unwrap(),
        None,
        "a tx without updates commits nothing"
    );

    // A tx begun while leading cannot commit once this replica stopped serving.
    let mut stale = db.begin(Some(term)).unwrap();
    stale.update(&Path::root(), "k", "stale");
    let before = db.status().last_log_index;
    db.resign().await.unwrap();
    assert!(matches!(db.begin(None), Err(Error::NotLeader { .. })));
    assert!(matches!(stale.commit().await, Err(Error::NotLeader { .. })));
    assert_eq!(db.status().last_log_index, before, "a refused tx appends nothing");
    // A lone voter takes its leadership up again after the resignation hold.
    db.wait_up(common::DEADLINE).await.unwrap();
    let mut tx = db.begin(None).unwrap();
    assert_eq!(tx.lookup(&Path::root(), b"k").await.unwrap(), None);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_share_entries() {
    let c = one().await;
    let db = c.db(0).clone();
    let before = db.status().last_log_index.unwrap();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let mut tx = db.begin(None).unwrap();
                tx.update(&Path::root(), format!("w{w}-{i}"), vec![0u8; 64]);
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let entries = db.status().last_log_index.unwrap() - before;
    assert!(
        entries < 640,
        "640 commits from 32 writers took {entries} entries: no batching happened"
    );
    let mut tx = db.begin(None).unwrap();
    assert_eq!(tx.iterate(&Path::root(), .., 10_000).await.unwrap().len(), 640);
    c.shutdown().await;
}
