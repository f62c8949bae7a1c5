//! Typed clients: [`Pool`], a client of one pool's service that holds no handle (queries,
//! properties, attributes), [`PoolClient`], a connection that holds a handle and keeps its
//! lease alive (what containers need), and [`ContClient`] on top of it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cont_svc::api::Handle;
use cont_svc::{ContError, ContInfo, ContRequest, ContResponse};
use rsvc_client::{ClientConfig, ClientError, Connections, Locator, RsvcClient};

use crate::api::{AttrOp, PoolApi, PoolError, PoolInfo, PoolRequest, PoolResponse};

/// Errors of the typed clients.
pub type Error = ClientError<PoolError>;

fn unexpected(r: PoolResponse) -> Error {
    ClientError::Codec(format!("unexpected answer {r:?}"))
}

/// A client of one pool's service. It opens no handle and runs no background task: queries,
/// properties and attributes need none. [`Pool::connect`] opens a handle when a program needs
/// one (containers do). Clones share one underlying client (its leader cache and sessions).
#[derive(Clone)]
pub struct Pool {
    rpc: Arc<RsvcClient<PoolApi>>,
}

/// A connection to one pool: a handle whose lease a background task renews every third of its
/// TTL. If the handle was evicted anyway (the client was paused, partitioned, or a leader
/// evicted it), the next call, or the renewer, connects again by itself, and
/// [`PoolClient::reconnects`] counts it. It derefs to its [`Pool`] for what needs no handle.
pub struct PoolClient {
    pool: Pool,
    name: String,
    ttl: Duration,
    handle: Arc<Mutex<Handle>>,
    reconnects: Arc<AtomicU64>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for PoolClient {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

async fn connect(rpc: &RsvcClient<PoolApi>, name: &str, ttl: Duration) -> Result<Handle, Error> {
    let req = PoolRequest::Connect {
        client: name.to_string(),
        ttl_ms: ttl.as_millis() as u64,
    };
    match rpc.call(&req).await? {
        PoolResponse::Connected { handle, .. } => Ok(handle),
        other => Err(unexpected(other)),
    }
}

impl std::ops::Deref for PoolClient {
    type Target = Pool;

    fn deref(&self) -> &Pool {
        &self.pool
    }
}

impl Pool {
    /// A client of pool `label`, found through `locator`. Nothing is sent yet.
    pub fn new(label: &str, locator: Arc<dyn Locator>, conns: Connections, cfg: ClientConfig) -> Pool {
        Pool {
            rpc: Arc::new(RsvcClient::<PoolApi>::new(label, locator, conns, cfg)),
        }
    }

    /// Opens a handle as client `name` with lease `ttl` (a replicated write), and keeps it
    /// alive until the returned connection is dropped or disconnected.
    pub async fn connect(&self, name: &str, ttl: Duration) -> Result<PoolClient, Error> {
        let rpc = self.rpc.clone();
        let h = connect(&rpc, name, ttl).await?;
        let handle = Arc::new(Mutex::new(h));
        let reconnects = Arc::new(AtomicU64::new(0));
        let renewer = {
            let (rpc, handle, reconnects, name) =
                (rpc.clone(), handle.clone(), reconnects.clone(), name.to_string());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let h = *handle.lock().expect("lock");
                    match rpc.call(&PoolRequest::Renew { handle: h }).await {
                        Ok(_) => {}
                        Err(ClientError::Service(PoolError::NoHandle)) => {
                            tracing::warn!(client = %name, "pool handle was evicted; reconnecting");
                            if let Ok(n) = connect(&rpc, &name, ttl).await {
                                *handle.lock().expect("lock") = n;
                                reconnects.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(client = %name, cause = %e, "lease renewal failed; will retry")
                        }
                    }
                }
            })
        };
        Ok(PoolClient {
            pool: self.clone(),
            name: name.to_string(),
            ttl,
            handle,
            reconnects,
            renewer,
        })
    }

    /// The underlying service client (leader cache, retry counters).
    pub fn rpc(&self) -> &RsvcClient<PoolApi> {
        &self.rpc
    }

    /// Describes the pool.
    pub async fn query(&self) -> Result<PoolInfo, Error> {
        match self.rpc.call(&PoolRequest::Query).await? {
            PoolResponse::Info(i) => Ok(i),
            other => Err(unexpected(other)),
        }
    }

    /// Sets a user attribute.
    pub async fn attr_set(&self, name: &str, value: &[u8]) -> Result<(), Error> {
        self.rpc
            .call(&PoolRequest::AttrSet {
                name: name.into(),
                value: value.to_vec(),
            })
            .await
            .map(|_| ())
    }

    /// Sets a user attribute to `value` if it holds `expect` now (`None`: absent). Returns
    /// whether it swapped, and if not, what the attribute held.
    pub async fn attr_cas(
        &self,
        name: &str,
        expect: Option<&[u8]>,
        value: &[u8],
    ) -> Result<(bool, Option<Vec<u8>>), Error> {
        let req = PoolRequest::AttrCas {
            name: name.into(),
            expect: expect.map(<[u8]>::to_vec),
            value: value.to_vec(),
        };
        match self.rpc.call(&req).await? {
            PoolResponse::Swapped { swapped, current } => Ok((swapped, current)),
            other => Err(unexpected(other)),
        }
    }

    /// Runs several attribute ops as one serializable transaction (see
    /// [`PoolRequest::AttrTxn`]). Returns whether its expectations held (if not, nothing was
    /// written) and the value of each `Get`, in order.
    pub async fn attr_txn(&self, ops: Vec<AttrOp>) -> Result<(bool, Vec<Option<Vec<u8>>>), Error> {
        match self.rpc.call(&PoolRequest::AttrTxn { ops }).await? {
            PoolResponse::Txn { ok, values } => Ok((ok, values)),
            other => Err(unexpected(other)),
        }
    }

    /// Reads a user attribute.
    pub async fn attr_get(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        match self.rpc.call(&PoolRequest::AttrGet { name: name.into() }).await? {
            PoolResponse::Attr(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Lists user attribute names.
    pub async fn attr_list(&self) -> Result<Vec<String>, Error> {
        match self.rpc.call(&PoolRequest::AttrList).await? {
            PoolResponse::Names(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Reads all properties.
    pub async fn props(&self) -> Result<Vec<(String, String)>, Error> {
        match self.rpc.call(&PoolRequest::PropGet).await? {
            PoolResponse::Props(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Sets a property.
    pub async fn prop_set(&self, name: &str, value: &str) -> Result<(), Error> {
        self.rpc
            .call(&PoolRequest::PropSet {
                name: name.into(),
                value: value.into(),
            })
            .await
            .map(|_| ())
    }
}

impl PoolClient {
    /// Connects to pool `label`, found through `locator`, as client `name` with lease `ttl`:
    /// [`Pool::new`] and [`Pool::connect`] in one step.
    pub async fn connect(
        label: &str,
        locator: Arc<dyn Locator>,
        conns: Connections,
        cfg: ClientConfig,
        name: &str,
        ttl: Duration,
    ) -> Result<PoolClient, Error> {
        Pool::new(label, locator, conns, cfg).connect(name, ttl).await
    }

    /// The pool, for what needs no handle.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The current pool handle.
    pub fn handle(&self) -> Handle {
        *self.handle.lock().expect("lock")
    }

    /// How often the handle had to be re-established after an eviction.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Sends a request built from the current handle; on `NoHandle`, reconnects once and
    /// sends it again.
    async fn with_handle(&self, make: impl Fn(Handle) -> PoolRequest) -> Result<PoolResponse, Error> {
        let h = self.handle();
        match self.rpc.call(&make(h)).await {
            Err(ClientError::Service(PoolError::NoHandle)) => {
                tracing::info!(client = %self.name, "pool handle evicted; reconnecting");
                let n = connect(&self.rpc, &self.name, self.ttl).await?;
                *self.handle.lock().expect("lock") = n;
                self.reconnects.fetch_add(1, Ordering::Relaxed);
                self.rpc.call(&make(n)).await
            }
            r => r,
        }
    }

    /// Runs a container request under this connection's handle.
    pub async fn cont(&self, req: ContRequest) -> Result<ContResponse, Error> {
        match self
            .with_handle(|h| PoolRequest::Cont {
                handle: h,
                req: req.clone(),
            })
            .await?
        {
            PoolResponse::Cont(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Closes the handle.
    pub async fn disconnect(self) -> Result<(), Error> {
        let h = self.handle();
        self.rpc
            .call(&PoolRequest::Disconnect { handle: h })
            .await
            .map(|_| ())
    }
}

/// Container operations through a pool connection.
pub struct ContClient<'a> {
    pool: &'a PoolClient,
}

impl<'a> ContClient<'a> {
    /// Containers of the pool behind `pool`.
    pub fn new(pool: &'a PoolClient) -> Self {
        ContClient { pool }
    }

    /// Creates a container.
    pub async fn create(&self, label: &str, props: Vec<(String, String)>) -> Result<(), Error> {
        self.pool
            .cont(ContRequest::Create {
                label: label.into(),
                props,
            })
            .await
            .map(|_| ())
    }

    /// Opens a container; returns its handle.
    pub async fn open(&self, label: &str) -> Result<Handle, Error> {
        match self.pool.cont(ContRequest::Open { label: label.into() }).await? {
            ContResponse::Opened { cont_handle } => Ok(cont_handle),
            other => Err(ClientError::Codec(format!("unexpected answer {other:?}"))),
        }
    }

    /// Closes a container handle.
    pub async fn close(&self, h: Handle) -> Result<(), Error> {
        self.pool
            .cont(ContRequest::Close { cont_handle: h })
            .await
            .map(|_| ())
    }

    /// Destroys a container (two-phase).
    pub async fn destroy(&self, label: &str, force: bool) -> Result<(), Error> {
        self.pool
            .cont(ContRequest::Destroy {
                label: label.into(),
                force,
            })
            .await
            .map(|_| ())
    }

    /// Lists containers.
    pub async fn list(&self) -> Result<Vec<ContInfo>, Error> {
        match self.pool.cont(ContRequest::List).await? {
            ContResponse::List(v) => Ok(v),
            other => Err(ClientError::Codec(format!("unexpected answer {other:?}"))),
        }
    }

    /// Describes a container.
    pub async fn query(&self, label: &str) -> Result<ContInfo, Error> {
        match self.pool.cont(ContRequest::Query { label: label.into() }).await? {
            ContResponse::Info(i) => Ok(i),
            other => Err(ClientError::Codec(format!("unexpected answer {other:?}"))),
        }
    }

    /// Takes a snapshot through an open container handle.
    pub async fn snapshot(&self, h: Handle) -> Result<u64, Error> {
        match self.pool.cont(ContRequest::SnapCreate { cont_handle: h }).await? {
            ContResponse::Epoch(e) => Ok(e),
            other => Err(ClientError::Codec(format!("unexpected answer {other:?}"))),
        }
    }

    /// Allocates object ids through an open container handle.
    pub async fn alloc_oids(&self, h: Handle, count: u64) -> Result<(u64, u64), Error> {
        match self
            .pool
            .cont(ContRequest::OidAlloc {
                cont_handle: h,
                count,
            })
            .await?
        {
            ContResponse::Oids { start, count } => Ok((start, count)),
            other => Err(ClientError::Codec(format!("unexpected answer {other:?}"))),
        }
    }
}

/// Whether `e` is the container error `c`.
pub fn is_cont_error(e: &Error, c: &ContError) -> bool {
    matches!(e, ClientError::Service(PoolError::Cont(x)) if x == c)
}

/// The exit code a command-line tool gives a pool (or container) error: a missing container
/// or snapshot is [`exit::NOT_FOUND`](rsvc_server::cli::exit::NOT_FOUND), a bad argument
/// `USAGE`, anything else the service refused `REFUSED`.
pub fn pool_code(e: &PoolError) -> u8 {
    use rsvc_server::cli::exit;
    match e {
        PoolError::Invalid(_) | PoolError::Cont(ContError::Invalid(_)) => exit::USAGE,
        PoolError::Denied(_) => exit::DENIED,
        PoolError::Cont(ContError::NotFound(_) | ContError::NoSnapshot(_)) => exit::NOT_FOUND,
        _ => exit::REFUSED,
    }
}
