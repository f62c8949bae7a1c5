//! # pool-svc: the DAOS-style pool service, its typed clients and binaries
//!
//! A pool is an instance of the replicated service class `pool`, created through the management
//! service on N engines. Its rdb holds the pool's properties, attributes and handles, and, as
//! in DAOS, all of its containers (see `cont-svc`). So container operations share the pool's
//! leadership and are atomic with pool state.
//!
//! - [`api`]: requests, responses and errors.
//! - [`service`]: the `ReplicatedService`, with handle leases and the leader's evictor.
//! - [`client`]: `Pool` (no handle: queries, properties, attributes), `PoolClient` (a handle
//!   that renews its lease in the background and reconnects by itself after an eviction) and
//!   `ContClient`.
//!
//! ## CAVEATS
//!
//! - Leases are measured by the leader's clock only. A new leader restarts every lease at full
//!   length, so a client that died just before a failover keeps its handle up to two TTLs.
//! - ACLs are enforced only with TLS on: without it nobody is authenticated (see [`access`]).

pub mod access;
pub mod api;
pub mod client;
pub mod service;

pub use api::{AttrOp, PoolApi, PoolError, PoolInfo, PoolRequest, PoolResponse, POOL_CLASS};
pub use client::{ContClient, Pool, PoolClient};
pub use service::PoolService;

/// The service factories an engine needs to host pools (and their containers).
pub fn factories() -> Vec<std::sync::Arc<dyn rsvc_server::ServiceFactory>> {
    vec![std::sync::Arc::new(rsvc_server::FnFactory::new(PoolService::new))]
}
