//! The listener's guard against connections that never start speaking HTTP/2 (found by
//! `rsvc-fuzz port`): a slowloris or an idle flood used to hold a file descriptor each for as
//! long as it liked, and under a low descriptor limit could shut out the engine's peers.
//!
//! Every accepted connection must deliver the 24-byte HTTP/2 client preface within
//! `EngineLimits::preface_timeout`, or its reads fail and the server drops it. At most
//! `EngineLimits::max_pending_connections` connections may be waiting for their preface at
//! once; one accepted beyond that is closed at once. A connection that sent its preface is
//! left alone (HTTP/2's own flow control and keep-alive take over).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

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
        Pin::new(&mut self.inner).poll_write(cx, buf)
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
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}
