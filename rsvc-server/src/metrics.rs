//! Prometheus text metrics: per hosted replica, its role, term, indexes, request counts and
//! latency, admission rejections and free space. Served at `GET /metrics` on a separate listener.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::engine::Engine;
use crate::host::State;

/// Renders the engine's metrics in the Prometheus text format.
pub fn render(engine: &Engine) -> String {
    let mut out = String::new();
    let mut family = |name: &str,
                      help: &str,
                      kind: &str,
                      rows: Vec<(String, String, String)>,
                      value_of: &dyn Fn(&(String, String, String)) -> String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for r in &rows {
            let _ = writeln!(
                out,
                "{name}{{class=\"{}\",instance=\"{}\"}} {}",
                r.0,
                r.1,
                value_of(r)
            );
        }
    };
    let hosts = engine.hosts();
    let rows = |f: &dyn Fn(&crate::host::Host) -> String| -> Vec<(String, String, String)> {
        hosts
            .iter()
            .map(|h| (h.class.clone(), h.instance.clone(), f(h)))
            .collect()
    };
    let v = |r: &(String, String, String)| r.2.clone();
    let opt = |x: Option<u64>| x.map_or("NaN".to_string(), |v| v.to_string());
    family(
        "rsvc_replica_serving",
        "1 if this replica serves as leader (Up)",
        "gauge",
        rows(&|h| u8::from(h.state().0 == State::Up).to_string()),
        &v,
    );
    family(
        "rsvc_replica_term",
        "newest raft term this replica knows",
        "gauge",
        rows(&|h| h.db.status().term.to_string()),
        &v,
    );
    family(
        "rsvc_replica_last_log_index",
        "index of the last log entry",
        "gauge",
        rows(&|h| opt(h.db.status().last_log_index)),
        &v,
    );
    family(
        "rsvc_replica_applied_index",
        "index of the last applied entry",
        "gauge",
        rows(&|h| opt(h.db.status().applied_index)),
        &v,
    );
    family(
        "rsvc_requests_ok_total",
        "requests handled as leader",
        "counter",
        rows(&|h| h.stats.ok.load(Ordering::Relaxed).to_string()),
        &v,
    );
    family(
        "rsvc_requests_failed_total",
        "requests failed with a framework error",
        "counter",
        rows(&|h| h.stats.failed.load(Ordering::Relaxed).to_string()),
        &v,
    );
    family(
        "rsvc_requests_not_leader_total",
        "requests refused as not leader",
        "counter",
        rows(&|h| h.stats.not_leader.load(Ordering::Relaxed).to_string()),
        &v,
    );
    family(
        "rsvc_request_latency_us_sum",
        "sum of request handling latencies in microseconds",
        "counter",
        rows(&|h| h.stats.latency_us_sum.load(Ordering::Relaxed).to_string()),
        &v,
    );
    family(
        "rsvc_admission_rejections_total",
        "transactions refused for lack of space",
        "counter",
        rows(&|h| h.db.status().admission_rejections.to_string()),
        &v,
    );
    family(
        "rsvc_replica_free_bytes",
        "free bytes this replica sees: the filesystem's, less the upkeep of the engine's other replicas",
        "gauge",
        rows(&|h| opt(h.db.status().space.map(|s| s.free))),
        &v,
    );
    family(
        "rsvc_replica_upkeep_bytes",
        "what this replica's next snapshot and redb file growth may take",
        "gauge",
        rows(&|h| opt(h.db.status().space.map(|s| s.upkeep))),
        &v,
    );
    family(
        "rsvc_replica_stopped",
        "1 if a storage error stopped this replica (the engine reopens it once a second)",
        "gauge",
        rows(&|h| u8::from(h.db.status().stopped.is_some()).to_string()),
        &v,
    );
    let (handshakes, peer_calls) = engine.security_refusals();
    let _ = writeln!(
        out,
        "# HELP rsvc_tls_handshakes_refused_total connections refused at the TLS handshake (no certificate, another CA, expired, too slow)\n\
         # TYPE rsvc_tls_handshakes_refused_total counter\nrsvc_tls_handshakes_refused_total {handshakes}\n\
         # HELP rsvc_peer_calls_refused_total peer calls refused because the certificate is not an engine's\n\
         # TYPE rsvc_peer_calls_refused_total counter\nrsvc_peer_calls_refused_total {peer_calls}"
    );
    out
}

/// Serves `GET /metrics` on `addr` until the engine stops. Returns the bound address.
pub async fn serve(engine: Engine, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let engine = engine.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let engine = engine.clone();
                    async move {
                        #[cfg(feature = "failpoints")]
                        if let Some(name) = req.uri().path().strip_prefix("/failpoints/") {
                            return failpoint(name.to_string(), req).await;
                        }
                        let resp = if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(render(&engine))))
                        } else {
                            Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                        };
                        resp
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(bound)
}

/// `PUT /failpoints/<name>` with a `fail` action list as the body (`sleep(300)`, `return(EIO)`,
/// `off`, ...) configures a failpoint in this engine; `DELETE` removes it. Only in builds with
/// the `failpoints` feature, which the fault suite uses; never in a production build.
#[cfg(feature = "failpoints")]
async fn failpoint(
    name: String,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::http::Error> {
    use http_body_util::BodyExt;
    let reply = |status: u16, text: String| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(text)))
    };
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
        Err(e) => return reply(400, format!("bad body: {e}\n")),
    };
    match method {
        hyper::Method::PUT => match fail::cfg(name.clone(), &body) {
            Ok(()) => {
                tracing::warn!(failpoint = %name, actions = %body, "failpoint set");
                reply(200, "ok\n".into())
            }
            Err(e) => reply(400, format!("{e}\n")),
        },
        hyper::Method::DELETE => {
            fail::remove(&name);
            tracing::warn!(failpoint = %name, "failpoint removed");
            reply(200, "ok\n".into())
        }
        _ => reply(405, "PUT or DELETE\n".into()),
    }
}
