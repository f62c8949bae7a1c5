//! The `ReplicatedService` trait: what a service author writes.

use async_trait::async_trait;
use rdb::{Db, Tx};
use rsvc_client::ServiceApi;

use crate::leader_tasks::LeaderTasks;

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
    async fn bootstrap(&self, _tx: &mut Tx) -> Result<(), String> {
        Ok(())
    }

    /// This replica became leader of `term`: load caches. An `Err` makes the replica give up
    /// leadership. Background work belongs in [`leader_tasks`](Self::leader_tasks).
    async fn step_up(&self, _db: &Db, _term: u64) -> Result<StepUp, String> {
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
    fn create(&self, instance: &str) -> std::sync::Arc<dyn crate::host::ErasedService>;
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
    fn create(&self, instance: &str) -> std::sync::Arc<dyn crate::host::ErasedService> {
        std::sync::Arc::new(crate::host::Adapter((self.0)(instance)))
    }
}

/// A [`ServiceFactory`] that hands every replica the same shared service value (for services
/// that are instantiated once per engine, like the management service).
pub struct OnceFactory<S>(std::sync::Arc<crate::host::Adapter<S>>);

impl<S: ReplicatedService> OnceFactory<S> {
    /// Shares `svc` among all replicas of its class on this engine.
    pub fn new(svc: S) -> Self {
        OnceFactory(std::sync::Arc::new(crate::host::Adapter(svc)))
    }
}

impl<S: ReplicatedService> ServiceFactory for OnceFactory<S> {
    fn class(&self) -> &'static str {
        <S::Api as ServiceApi>::CLASS
    }
    fn create(&self, _instance: &str) -> std::sync::Arc<dyn crate::host::ErasedService> {
        self.0.clone()
    }
}
