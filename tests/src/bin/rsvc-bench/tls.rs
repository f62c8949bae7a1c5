//! What mutual TLS costs: the same 3-engine system with and without TLS, measured in one run,
//! alternating, so that a noisy machine weighs on both alike. In these rows the `floor` column
//! is rsvc without TLS, and `rsvc/floor` is the cost of TLS as a ratio.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use pool_svc::{PoolRequest, PoolResponse};
use rsvc_client::{Connections, RsvcClient, StaticLocator};
use rsvc_tests::rsvc::{EngineCmd, RsvcSystem, Spec, Timers};

use crate::report::{Better, Pcts, Report};
use crate::workloads::{cfg, closed_loop, hist, rsvc_put, LABEL};
use crate::Opts;
use rsvc_tests::DEADLINE;

/// Measures writes (one client), reads (the most clients of the run) and the cost of a new
/// connection, on a plain and a TLS system.
pub(crate) async fn run(rep: &mut Report, o: &Opts, dir: &Path, cmd: &EngineCmd) -> Result<(), String> {
    let mut systems = Vec::new();
    for tls in [false, true] {
        let spec = Spec {
            tls,
            ..Spec::new(3, Timers::defaults())
        };
        let name = if tls { "rsvc-tls" } else { "rsvc-plain" };
        let sys = RsvcSystem::start_spec(&dir.join(name), cmd.clone(), spec).await?;
        crate::workloads::ready_pool(&sys).await?;
        for k in 0..64 {
            rsvc_put(&sys.pool(LABEL, cfg()), format!("r{k}")).await?;
        }
        systems.push(sys);
    }
    let (plain, tls) = (&systems[0], &systems[1]);

    // One client's durable writes.
    let mut rates = Vec::new();
    for (what, sys) in [("plain", plain), ("TLS", tls)] {
        let c = Arc::new(sys.pool(LABEL, cfg()));
        let r = closed_loop(
            format!("{what}: writes, 1 client"),
            1,
            o.seconds(),
            move |_, k| {
                let c = c.clone();
                async move { rsvc_put(&c, format!("t{k}")).await }
            },
        )
        .await;
        rates.push((r.rate(), Pcts::of(&r.hist).p50));
    }
    let row = rep.row(
        "with TLS (floor: without): write, 1 client",
        "ops/s",
        Better::Higher,
    );
    row.rsvc = Some(rates[1].0);
    row.floor = Some(rates[0].0);
    let row = rep.row(
        "with TLS (floor: without): write, 1 client, p50",
        "ms",
        Better::Lower,
    );
    row.rsvc = Some(rates[1].1);
    row.floor = Some(rates[0].1);

    // Linearizable reads from many clients on one connection per engine.
    let n = o.clients().into_iter().max().unwrap_or(1);
    let mut rates = Vec::new();
    for (what, sys) in [("plain", plain), ("TLS", tls)] {
        let clients: Arc<Vec<_>> = Arc::new((0..n).map(|_| sys.pool(LABEL, cfg())).collect());
        let r = closed_loop(
            format!("{what}: reads, {n} clients"),
            n,
            o.seconds(),
            move |c, k| {
                let clients = clients.clone();
                async move {
                    let name = format!("r{}", (c as u64 * 7919 + k) % 64);
                    match clients[c].call(&PoolRequest::AttrGet { name }).await {
                        Ok(PoolResponse::Attr(Some(_))) => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                }
            },
        )
        .await;
        rates.push(r.rate());
    }
    let row = rep.row(
        format!("with TLS (floor: without): reads, {n} clients"),
        "ops/s",
        Better::Higher,
    );
    row.rsvc = Some(rates[1]);
    row.floor = Some(rates[0]);

    // A new connection (TCP, and the TLS handshake) and its first read.
    let trials = if o.quick { 20 } else { 300 };
    let mut p50 = Vec::new();
    for sys in [plain, tls] {
        let rank = sys.leader("pool", LABEL, DEADLINE).await?;
        let addr = sys.engines[&rank].addr.clone();
        let files = match sys.tls_paths("admin") {
            Some(p) => Some(rsvc_client::tls::TlsFiles::load(p).map_err(|e| e.to_string())?),
            None => None,
        };
        let mut h = hist();
        for _ in 0..trials {
            // A pool of its own: a new connection.
            let conns = Connections::default().with_tls(files.clone());
            let loc = Arc::new(StaticLocator(vec![(rank, addr.clone())]));
            let c: RsvcClient<pool_svc::PoolApi> = RsvcClient::new(LABEL, loc, conns, cfg());
            let t = Instant::now();
            match c.call(&PoolRequest::AttrGet { name: "r0".into() }).await {
                Ok(PoolResponse::Attr(Some(_))) => {}
                other => return Err(format!("first read on a new connection: {other:?}")),
            }
            let _ = h.record(t.elapsed().as_micros().max(1) as u64);
        }
        p50.push(Pcts::of(&h).p50);
    }
    let row = rep.row(
        "with TLS (floor: without): new connection and first read, p50",
        "ms",
        Better::Lower,
    );
    row.rsvc = Some(p50[1]);
    row.floor = Some(p50[0]);
    Ok(())
}
