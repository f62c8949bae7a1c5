//! Linearizability of reads and writes under faults, checked with stateright's
//! `LinearizabilityTester`, one register per key (P-compositionality).
//!
//! Six clients read and write three keys through whichever replica leads, while a nemesis
//! partitions replicas, makes leaders resign, and the network loses and delays messages. A
//! write whose outcome is unknown (any error after it may have been sent) stays pending forever
//! and its client continues under a fresh thread id, as the checker requires.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Cluster;
use rdb::{DbConfig, Path};
use stateright::semantics::register::{Register, RegisterOp, RegisterRet};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester};
use tokio::sync::Mutex;

const KEYS: usize = 3;
const CLIENTS: u64 = 6;

type Tester = LinearizabilityTester<u64, Register<u64>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_under_partitions_and_loss_are_linearizable() {
    let c = Arc::new(Cluster::new(3, DbConfig::fast()).await);
    c.net.set_drop_rate(0.02);
    c.net.set_delay(Duration::from_millis(1));
    let testers: Arc<Vec<Mutex<Tester>>> = Arc::new(
        (0..KEYS)
            .map(|_| Mutex::new(LinearizabilityTester::new(Register(0))))
            .collect(),
    );
    let run_for = Duration::from_secs(6);
    let start = Instant::now();

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let c = c.clone();
        let testers = testers.clone();
        clients.push(tokio::spawn(async move {
            let mut thread = client * 1_000_000;
            let mut next_value = client * 1_000_000 + 1;
            let mut done = 0u64;
            while start.elapsed() < run_for {
                let key = rand::random::<u64>() as usize % KEYS;
                let name = format!("key{key}");
                let Some(db) = c
                    .running()
                    .map(|(_, d)| d.clone())
                    .find(|d| d.up_term().is_some())
                else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let Ok(mut tx) = db.begin(None) else { continue };
                if rand::random::<bool>() {
                    let v = next_value;
                    next_value += 1;
                    testers[key]
                        .lock()
                        .await
                        .on_invoke(thread, RegisterOp::Write(v))
                        .unwrap();
                    tx.update(&Path::root(), name, v.to_be_bytes().to_vec());
                    match tx.commit().await {
                        Ok(_) => {
                            testers[key]
                                .lock()
                                .await
                                .on_return(thread, RegisterRet::WriteOk)
                                .unwrap();
                            done += 1;
                        }
                        // Outcome unknown: leave it pending, carry on as a new thread.
                        Err(_) => thread += 1,
                    }
                } else {
                    testers[key]
                        .lock()
                        .await
                        .on_invoke(thread, RegisterOp::Read)
                        .unwrap();
                    match tx.lookup(&Path::root(), name.as_bytes()).await {
                        Ok(v) => {
                            let v = v.map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
                            testers[key]
                                .lock()
                                .await
                                .on_return(thread, RegisterRet::ReadOk(v))
                                .unwrap();
                            done += 1;
                        }
                        Err(_) => thread += 1,
                    }
                }
            }
            done
        }));
    }

    // The nemesis.
    let nemesis = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut faults = 0;
            while start.elapsed() < run_for {
                let victim = (rand::random::<u32>() % 3) as usize;
                match rand::random::<u8>() % 3 {
                    0 => c.net.isolate(c.nodes[victim].replica.rank),
                    1 => {
                        if let Some((_, d)) = c.running().find(|(_, d)| d.up_term().is_some()) {
                            let _ = d.resign().await;
                        }
                    }
                    _ => c.net.block(
                        c.nodes[victim].replica.rank,
                        c.nodes[(victim + 1) % 3].replica.rank,
                    ),
                }
                faults += 1;
                let hold = Duration::from_millis(300 + rand::random::<u64>() % 500);
                tokio::time::sleep(hold).await;
                c.net.heal();
                c.net.set_drop_rate(0.02);
                c.net.set_delay(Duration::from_millis(1));
                let settle = Duration::from_millis(200 + rand::random::<u64>() % 300);
                tokio::time::sleep(settle).await;
            }
            c.net.heal();
            faults
        })
    };

    let mut ops = 0;
    for t in clients {
        ops += t.await.unwrap();
    }
    let faults = nemesis.await.unwrap();
    eprintln!("{ops} completed operations, {faults} faults injected");
    assert!(ops > 100, "too few operations completed ({ops}) to say anything");
    for (k, t) in testers.iter().enumerate() {
        let t = t.lock().await;
        assert!(
            t.is_consistent(),
            "history of key{k} is not linearizable: {} operations",
            t.len()
        );
    }
    Arc::try_unwrap(c).ok().expect("clients done").shutdown().await;
}
