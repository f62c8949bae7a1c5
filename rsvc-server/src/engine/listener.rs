//! The listener's guard against connections that never start speaking HTTP/2 (found by
//! `rsvc-fuzz port`): a slowloris or an idle flood used to hold a file descriptor each for as
//! long as it liked, and under a low descriptor limit could shut out the engine's peers.
//!
//! Every accepted connection must deliver the 24-byte HTTP/2 client preface within
//! `EngineLimits::preface_timeout`, or its reads fail and the server drops it. At most
//! `EngineLimits::max_pending_connections` connections may be waiting for their preface at
//! once; one accepted beyond that is closed at once. A connection that sent its preface is
//! left alone (HTTP/2's own flow control and keep-alive take over).
//!
//! With TLS, the handshake must finish within the same `preface_timeout`, and at most
//! `max_pending_connections` handshakes run at once (more wait in the kernel's backlog). The
//! handshake requires a client certificate from the cluster CA, so a connection that gets past
//! it is authenticated; its principal ([`Caller`]) is read once and rides on every request as
//! [`ConnInfo`].
//!
//! A full TLS handshake costs the engine a key exchange and a signature, so a flood of
//! handshakes that fail (another CA's certificate, none at all) is a cheap attack on its CPU.
//! [`HandshakeFailures`] counts such failures (those in which the engine sent its flight, its
//! key share and signature; plain text, or a ClientHello that never completes, costs nothing)
//! per source address: an address that fails
//! more than `EngineLimits::handshake_failures` allows within its window has its new
//! connections closed on arrival, before any TLS work, until the window passes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;

use crate::caller::Caller;

/// The length of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE_LEN: usize = 24;

/// Counts the connections still waiting for their preface.
#[derive(Clone, Default)]
pub(crate) struct Pending(Arc<AtomicUsize>);

impl Pending {
    /// Admits `stream` if fewer than `max` connections are pending; `None` closes it.
    pub(crate) fn admit(&self, stream: TcpStream, max: usize, timeout: Duration) -> Option<Guarded> {
        if self.0.fetch_add(1, Ordering::AcqRel) >= max {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Guarded {
            inner: stream,
            read: 0,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            pending: Some(self.0.clone()),
            wrote: Arc::default(),
        })
    }

    /// How many connections wait for their preface.
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// A TCP connection that must send its preface in time (see the module docs).
pub(crate) struct Guarded {
    inner: TcpStream,
    read: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The pending count this connection is in, until its preface is complete.
    pending: Option<Arc<AtomicUsize>>,
    /// Bytes the engine wrote. In a TLS handshake, more than an alert's worth means its
    /// flight (key share, certificate, signature) went out: the handshake cost its crypto.
    wrote: Arc<AtomicUsize>,
}

impl Guarded {
    fn settle(&mut self) {
        self.deadline = None;
        if let Some(p) = self.pending.take() {
            p.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.settle();
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(deadline) = this.deadline.as_mut() {
            if let Poll::Ready(Ok(())) = res {
                this.read += buf.filled().len() - before;
                if this.read >= PREFACE_LEN {
                    this.settle();
                    return res;
                }
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface in time",
                )));
            }
        }
        res
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Failed TLS handshakes per source address (see the module docs).
pub(crate) struct HandshakeFailures {
    seen: std::sync::Mutex<HashMap<IpAddr, (std::time::Instant, u32)>>,
    limit: u32,
    window: Duration,
}

/// Addresses tracked at most; beyond it, windows that ended are forgotten first.
const MAX_TRACKED: usize = 4096;

impl HandshakeFailures {
    /// Allows `limit` failures per `window` from one address.
    pub(crate) fn new(limit: u32, window: Duration) -> Self {
        HandshakeFailures {
            seen: std::sync::Mutex::default(),
            limit,
            window,
        }
    }

    /// Whether new connections from `ip` are closed on arrival now.
    pub(crate) fn blocked(&self, ip: IpAddr, now: std::time::Instant) -> bool {
        let seen = self.seen.lock().expect("lock");
        seen.get(&ip)
            .is_some_and(|(start, n)| now.duration_since(*start) < self.window && *n >= self.limit)
    }

    /// Counts a failed handshake from `ip`.
    pub(crate) fn failed(&self, ip: IpAddr, now: std::time::Instant) {
        let mut seen = self.seen.lock().expect("lock");
        if seen.len() >= MAX_TRACKED && !seen.contains_key(&ip) {
            let window = self.window;
            seen.retain(|_, (start, _)| now.duration_since(*start) < window);
            if seen.len() >= MAX_TRACKED {
                // Still full of live windows: the oldest goes.
                if let Some(oldest) = seen.iter().min_by_key(|(_, (s, _))| *s).map(|(k, _)| *k) {
                    seen.remove(&oldest);
                }
            }
        }
        let e = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

/// What every request on a connection carries (a request extension): the peer's address and
/// principal.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    /// The peer's address.
    pub(crate) remote: Option<std::net::SocketAddr>,
    /// Who is calling.
    pub(crate) caller: Arc<Caller>,
}

/// The caller of a request: the connection's principal, or, for a request that did not come
/// through the listener (none do), nobody authenticated.
pub(crate) fn caller_of<T>(req: &tonic::Request<T>) -> Arc<Caller> {
    req.extensions()
        .get::<ConnInfo>()
        .map(|c| c.caller.clone())
        .unwrap_or_else(|| Arc::new(Caller::insecure()))
}

/// What an engine may write in a handshake that cost it nothing: an alert or two (7 bytes each).
const ALERT_BYTES: usize = 64;

/// Why a TLS connection was refused, and whether its handshake went as far as the engine's
/// flight (what a handshake flood costs; see [`HandshakeFailures`]).
pub(crate) struct Refused {
    /// Why, with the peer's address.
    pub(crate) why: String,
    /// Whether the handshake cost the engine its key exchange and signature.
    pub(crate) costly: bool,
}

/// An accepted connection, plain or TLS.
pub(crate) enum Conn {
    /// Plain TCP: every caller is [`Caller::insecure`].
    Plain(Guarded, ConnInfo),
    /// Mutual TLS, with the principal of the client's certificate.
    Tls(Box<tokio_rustls::server::TlsStream<Guarded>>, ConnInfo),
}

impl Conn {
    /// A plain connection.
    pub(crate) fn plain(g: Guarded) -> Conn {
        let remote = g.inner.peer_addr().ok();
        Conn::Plain(
            g,
            ConnInfo {
                remote,
                caller: Arc::new(Caller::insecure()),
            },
        )
    }

    /// The address `g` comes from.
    pub(crate) fn remote(g: &Guarded) -> Option<std::net::SocketAddr> {
        g.inner.peer_addr().ok()
    }

    /// Makes the TLS handshake (within `timeout`) and reads the principal of the client's
    /// certificate; `Err` says why the connection is refused.
    pub(crate) async fn tls(
        g: Guarded,
        config: Arc<rustls::ServerConfig>,
        timeout: Duration,
        admin_group: &str,
    ) -> Result<Conn, Refused> {
        let remote = Self::remote(&g);
        let who = remote.map_or("?".to_string(), |r| r.to_string());
        let cheap = |why: String| Refused { why, costly: false };
        // Whatever way it fails later (an alert, a reset, silence), a handshake in which the
        // engine sent its flight has cost it the key exchange and the signature.
        let wrote = g.wrote.clone();
        let s = match tokio::time::timeout(timeout, tokio_rustls::TlsAcceptor::from(config).accept(g)).await {
            Err(_) => {
                return Err(Refused {
                    why: format!("{who}: no TLS handshake within {timeout:?}"),
                    costly: wrote.load(Ordering::Relaxed) > ALERT_BYTES,
                })
            }
            Ok(Err(e)) => {
                return Err(Refused {
                    why: format!("{who}: TLS handshake failed: {e}"),
                    costly: wrote.load(Ordering::Relaxed) > ALERT_BYTES,
                });
            }
            Ok(Ok(s)) => s,
        };
        let cert = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| cheap(format!("{who}: no client certificate")))?;
        let caller = Caller::from_cert(cert, admin_group).map_err(|e| cheap(format!("{who}: {e}")))?;
        Ok(Conn::Tls(
            Box::new(s),
            ConnInfo {
                remote,
                caller: Arc::new(caller),
            },
        ))
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut *$self {
            Conn::Plain($s, _) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::Tls($s, _) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        both!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        both!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Plain(_, i) | Conn::Tls(_, i) => i.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn an_address_that_fails_too_often_is_blocked_until_its_window_passes() {
        let f = HandshakeFailures::new(3, Duration::from_secs(1));
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(!f.blocked(a, t0), "not after {i} failures");
            f.failed(a, t0 + Duration::from_millis(i * 100));
        }
        assert!(f.blocked(a, t0 + Duration::from_millis(500)));
        assert!(
            !f.blocked(b, t0 + Duration::from_millis(500)),
            "another address is not"
        );
        assert!(
            !f.blocked(a, t0 + Duration::from_millis(1001)),
            "the window passed"
        );
        // A new window starts from nothing.
        f.failed(a, t0 + Duration::from_millis(1100));
        assert!(!f.blocked(a, t0 + Duration::from_millis(1200)));
    }

    #[test]
    fn the_table_stays_bounded() {
        let f = HandshakeFailures::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 100) {
            f.failed(
                IpAddr::from(i.to_be_bytes()),
                t0 + Duration::from_micros(i as u64),
            );
        }
        assert!(f.seen.lock().unwrap().len() <= MAX_TRACKED);
        // The newest address is tracked (and blocked: one failure allowed per minute).
        assert!(f.blocked(
            IpAddr::from((MAX_TRACKED as u32 + 99).to_be_bytes()),
            t0 + Duration::from_secs(1)
        ));
    }
}
