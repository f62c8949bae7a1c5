//! The `ReplicatedService` trait: what a service author writes.

use std::sync::Arc;

use async_trait::async_trait;
use rdb::{Db, Tx};
use rsvc_client::{ServiceApi, WireError};

use crate::leader_tasks::LeaderTasks;

/// Why a service hook (`bootstrap`, `step_up`) failed. The host logs it; a failed `step_up`
/// gives leadership up, so that another replica may try.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The database refused (it is not the leader any more, storage trouble, ...).
    #[error(transparent)]
    Db(#[from] rdb::Error),
    /// The service's own reason.
    #[error("{0}")]
    Other(String),
}

impl From<String> for ServiceError {
    fn from(s: String) -> Self {
        ServiceError::Other(s)
    }
}

impl From<&str> for ServiceError {
    fn from(s: &str) -> Self {
        ServiceError::Other(s.to_string())
    }
}

/// What `step_up` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepUp {
    /// Ready to serve.
    Up,
    /// The database holds nothing this service can serve from (DAOS `UP_EMPTY`): requests
    /// are refused until a later step-up finds it initialised.
    Empty,
}

/// Everything a request handler gets: the leader term, the transaction it runs in, and who
/// called.
pub struct Ctx {
    /// The term this replica leads; the transaction is bound to it.
    pub term: u64,
    /// The instance id.
    pub instance: String,
    /// The transaction of this request. Queue updates here; the framework commits them,
    /// together with the exactly-once record of a mutating request, after `handle` returns
    /// `Ok`, and discards them after an `Err`.
    pub tx: Tx,
    /// The calling client's random id.
    pub client_id: [u8; 16],
    /// The replica's database, for anything beyond the request's own transaction.
    pub db: Db,
    /// Who called: the principal of the connection's client certificate, or
    /// [`Caller::insecure`](crate::Caller::insecure) without TLS. Services check their ACLs
    /// against it.
    pub caller: Arc<crate::caller::Caller>,
}

/// A service replicated by rsvc. One value exists per hosted replica of an instance.
///
/// The engine calls the hooks in a strict order per replica: `step_up(t)`, then `handle` for
/// requests in term t, then `drain`, then `step_down(t)`, and again for a later term. The
/// same replica never runs two hooks of different terms at once, and `step_down` runs only
/// after every admitted request has finished.
#[async_trait]
pub trait ReplicatedService: Send + Sync + 'static {
    /// The typed face the service shows clients.
    type Api: ServiceApi;

    /// Initialises a brand-new database, once, in one transaction (queue updates into `tx`).
    async fn bootstrap(&self, _tx: &mut Tx) -> Result<(), ServiceError> {
        Ok(())
    }

    /// This replica became leader of `term`: load caches. An `Err` makes the replica give up
    /// leadership. Background work belongs in [`leader_tasks`](Self::leader_tasks).
    async fn step_up(&self, _db: &Db, _term: u64) -> Result<StepUp, ServiceError> {
        Ok(StepUp::Up)
    }

    /// Background work for the term this replica now leads (an evictor, a monitor): spawn it
    /// on `tasks`. Called right after a `step_up` that answered [`StepUp::Up`], once the
    /// replica admits requests. The host cancels every task, and waits until each stopped,
    /// before it calls `drain`; see [`crate::leader_tasks`].
    fn leader_tasks(&self, _db: &Db, _term: u64, _tasks: &mut LeaderTasks) {}

    /// Leadership is ending: stop what would start new requests. Leader tasks have stopped
    /// already.
    async fn drain(&self) {}

    /// Leadership of `term` ended and no request of it is running any more.
    async fn step_down(&self, _term: u64) {}

    /// Handles one request as leader.
    async fn handle(
        &self,
        ctx: &mut Ctx,
        req: <Self::Api as ServiceApi>::Request,
    ) -> Result<<Self::Api as ServiceApi>::Response, <Self::Api as ServiceApi>::Error>;
}

/// Makes the service value for each hosted replica of a class.
pub trait ServiceFactory: Send + Sync + 'static {
    /// The service class this factory serves.
    fn class(&self) -> &'static str;
    /// A fresh service value for replica `instance`.
    fn create(&self, instance: &str) -> HostedService;
}

/// A service value as the engine holds it, whatever its types: make one with
/// [`HostedService::new`] (or [`HostedService::shared`]) in a [`ServiceFactory`].
#[derive(Clone)]
pub struct HostedService(pub(crate) Arc<dyn ErasedService>);

impl HostedService {
    /// Hosts `svc`.
    pub fn new<S: ReplicatedService>(svc: S) -> Self {
        HostedService(Arc::new(Adapter(Box::new(svc))))
    }

    /// Hosts one value shared by every replica it is handed to.
    pub fn shared<S: ReplicatedService>(svc: Arc<S>) -> Self {
        HostedService(Arc::new(Adapter(svc)))
    }
}

/// A [`ServiceFactory`] from a closure.
pub struct FnFactory<S, F>(pub F, pub std::marker::PhantomData<fn() -> S>);

impl<S, F> FnFactory<S, F>
where
    S: ReplicatedService,
    F: Fn(&str) -> S + Send + Sync + 'static,
{
    /// Wraps `f`, called once per hosted replica with the instance id.
    pub fn new(f: F) -> Self {
        FnFactory(f, std::marker::PhantomData)
    }
}

impl<S, F> ServiceFactory for FnFactory<S, F>
where
    S: ReplicatedService,
    F: Fn(&str) -> S + Send + Sync + 'static,
{
    fn class(&self) -> &'static str {
        <S::Api as ServiceApi>::CLASS
    }
    fn create(&self, instance: &str) -> HostedService {
        HostedService::new((self.0)(instance))
    }
}

/// A [`ServiceFactory`] that hands every replica the same shared service value (for services
/// that are instantiated once per engine, like the management service).
pub struct OnceFactory<S>(Arc<S>);

impl<S: ReplicatedService> OnceFactory<S> {
    /// Shares `svc` among all replicas of its class on this engine.
    pub fn new(svc: S) -> Self {
        OnceFactory(Arc::new(svc))
    }
}

impl<S: ReplicatedService> ServiceFactory for OnceFactory<S> {
    fn class(&self) -> &'static str {
        <S::Api as ServiceApi>::CLASS
    }
    fn create(&self, _instance: &str) -> HostedService {
        HostedService::shared(self.0.clone())
    }
}

// Type erasure: the engine holds replicas of any service behind one trait object.

/// The service behind a replica with its types erased, so the engine can hold any.
#[async_trait]
pub(crate) trait ErasedService: Send + Sync + 'static {
    /// See [`ReplicatedService::bootstrap`].
    async fn bootstrap(&self, tx: &mut Tx) -> Result<(), ServiceError>;
    /// See [`ReplicatedService::step_up`].
    async fn step_up(&self, db: &Db, term: u64) -> Result<StepUp, ServiceError>;
    /// See [`ReplicatedService::leader_tasks`].
    fn leader_tasks(&self, db: &Db, term: u64, tasks: &mut LeaderTasks);
    /// See [`ReplicatedService::drain`].
    async fn drain(&self);
    /// See [`ReplicatedService::step_down`].
    async fn step_down(&self, term: u64);
    /// Decodes, handles and encodes one request: `Ok(Ok(response))`, `Ok(Err(service error))`
    /// (both postcard), or a wire error for an undecodable request.
    async fn handle(&self, ctx: &mut Ctx, payload: &[u8]) -> Result<Result<Vec<u8>, Vec<u8>>, WireError>;
    /// Whether the encoded request mutates.
    fn is_mutating(&self, payload: &[u8]) -> Result<bool, WireError>;
}

/// Erases a [`ReplicatedService`], owned or shared.
struct Adapter<T>(T);

fn bad_request(e: postcard::Error) -> WireError {
    WireError::Invalid(format!("undecodable request: {e}"))
}

#[async_trait]
impl<S: ReplicatedService, T: std::ops::Deref<Target = S> + Send + Sync + 'static> ErasedService
    for Adapter<T>
{
    async fn bootstrap(&self, tx: &mut Tx) -> Result<(), ServiceError> {
        self.0.bootstrap(tx).await
    }
    async fn step_up(&self, db: &Db, term: u64) -> Result<StepUp, ServiceError> {
        self.0.step_up(db, term).await
    }
    fn leader_tasks(&self, db: &Db, term: u64, tasks: &mut LeaderTasks) {
        self.0.leader_tasks(db, term, tasks)
    }
    async fn drain(&self) {
        self.0.drain().await
    }
    async fn step_down(&self, term: u64) {
        self.0.step_down(term).await
    }
    async fn handle(&self, ctx: &mut Ctx, payload: &[u8]) -> Result<Result<Vec<u8>, Vec<u8>>, WireError> {
        let req = rsvc_client::wire::decode(payload).map_err(bad_request)?;
        let enc =
            |r: Result<Vec<u8>, postcard::Error>| r.map_err(|e| WireError::Invalid(format!("encode: {e}")));
        Ok(match self.0.handle(ctx, req).await {
            Ok(resp) => Ok(enc(rsvc_client::wire::encode(&resp))?),
            Err(err) => Err(enc(rsvc_client::wire::encode(&err))?),
        })
    }
    fn is_mutating(&self, payload: &[u8]) -> Result<bool, WireError> {
        let req: <S::Api as ServiceApi>::Request = rsvc_client::wire::decode(payload).map_err(bad_request)?;
        Ok(<S::Api as ServiceApi>::is_mutating(&req))
    }
}
