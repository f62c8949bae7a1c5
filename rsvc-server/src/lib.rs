//! # rsvc-server: the engine that hosts replicated services
//!
//! An engine is one process with a rank, a listen address and a data directory. It hosts many
//! replicas, keyed by (service class, instance id); each replica is an rdb database (its own
//! raft group) with one subdirectory of the data directory. One gRPC listener carries everything:
//! client calls (`rsvc.v1.Rsvc`, owned by rsvc-client), raft traffic between engines and replica
//! lifecycle (`rsvc.peer.v1.Peer`).
//!
//! ## SERVICES
//!
//! A service author implements [`ReplicatedService`]: typed requests and responses (postcard on
//! the wire), `bootstrap` for a new database, `step_up`/`drain`/`step_down` hooks, and `handle`.
//! The engine drives each replica through Down, SteppingUp, Up (or UpEmpty) and SteppingDown
//! from rdb's leadership events, which are proven and strictly alternating. It admits requests
//! only in Up. Every reply carries a leader hint, the leader's replies included, and an engine
//! with no replica of the instance answers `NotReplica`. Background work that only a leader
//! does is spawned on [`LeaderTasks`]; the engine cancels and joins it before `drain`, so no
//! task of an old term outlives its leadership.
//!
//! ## EXACTLY-ONCE
//!
//! A mutating request runs in one rdb transaction together with its (client id, sequence) →
//! result record. A retry after a failover therefore finds the first result instead of applying
//! twice (DAOS svc_ops). A client may have many calls in flight at once: the engine keeps a
//! result per outstanding sequence number until the client acknowledges it. See [`host`].
//!
//! ## SECURITY
//!
//! With mutual TLS on ([`EngineConfig::tls`]), every connection presents a certificate from
//! the cluster CA, and the listener reads its principal ([`Caller`]) once, at the handshake.
//! Peer calls need an engine certificate, and a raft message must come from the rank its
//! certificate names; system administration needs the admin group; services check their own
//! ACLs against `Ctx::caller` (pool-svc does, with [`acl`]). [`certs`] makes a development
//! PKI.
//!
//! ## CAVEATS
//!
//! - Graceful stop hands each led instance to its most caught-up voter (rdb's TimeoutNow
//!   transfer). That is one round trip in a 3-replica group whose leader has led longer than its
//!   lease. Larger groups wait for the followers' leases (at most `election_timeout_max`).
//! - Exactly-once keeps one result per outstanding mutating call of a client, and forgets them
//!   as the client acknowledges them; a client silent for `SVC_OPS_MAX_AGE` is forgotten
//!   altogether, and a retry after that could apply again (DAOS keeps the same bound).
//! - Engine liveness is a health check from the management leader once per maximum election
//!   timeout (200 ms to 1 s). An engine is `Down` after two failed rounds. After `reconf_after`
//!   its replicas move to a spare engine, one change per instance per round. Without a spare
//!   the instance runs with fewer replicas until an operator adds one. A flapping engine can
//!   cause needless moves.
//! - Without TLS nobody is authenticated and every caller may do everything; an engine
//!   refuses a non-loopback listener without TLS unless told `insecure`. With TLS, see
//!   [`caller`] and docs/security.md: no revocation lists, and the metrics listener stays
//!   plain HTTP.

pub mod acl;
pub mod caller;
pub mod certs;
pub mod cli;
pub mod config;
pub mod counter;
pub mod engine;
pub mod error;
pub mod host;
pub mod leader_tasks;
pub mod metrics;
pub mod mgmt;
mod rpc;
pub mod service;
pub mod transport;
pub mod wire;

pub use caller::Caller;
pub use engine::{Engine, EngineConfig, EngineError, EngineLimits};
pub use host::State;
pub use leader_tasks::{CancellationToken, LeaderTasks};
pub use service::{
    Ctx, FnFactory, HostedService, OnceFactory, ReplicatedService, ServiceError, ServiceFactory, StepUp,
};
pub use transport::GrpcTransport;
