//! What a client needs to know about a service: its class name and its typed messages.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The client-visible face of a replicated service. The server side (`ReplicatedService` in
/// rsvc-server) names one of these, so both ends agree on the types by construction.
pub trait ServiceApi: Send + Sync + 'static {
    /// The service class, e.g. `"pool"`. Engines route calls by it.
    const CLASS: &'static str;
    /// A request (postcard on the wire).
    type Request: Serialize + DeserializeOwned + Send + Sync + Debug + 'static;
    /// A successful response.
    type Response: Serialize + DeserializeOwned + Send + Debug + 'static;
    /// The service's own error.
    type Error: Serialize + DeserializeOwned + Send + Debug + 'static;

    /// Whether `req` changes state. Mutating requests get a sequence number and are applied
    /// at most once, even when retried across a failover.
    fn is_mutating(req: &Self::Request) -> bool;
}
