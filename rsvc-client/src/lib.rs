//! # rsvc-client: finding the leader of a replicated service and calling it
//!
//! This crate owns the wire contract that clients and engines share: the client-facing protos
//! (`proto/rsvc.proto`), the leader hint, and the closed set of wire errors. It depends on
//! neither the engine nor the storage, so a program that only calls services stays light.
//!
//! ## LEADER SEARCH
//!
//! [`leader::ReplicaSet`] is DAOS's `dc_rsvc` algorithm as a plain state machine. A client keeps
//! the sorted replica list of an instance, the leader it believes in with that leader's term,
//! and whether that leader still answers. It calls the leader while it answers, and otherwise
//! walks the list round-robin from a random start. A hint with a newer term wins; an older one is
//! ignored, and a hinted rank not on the list is added. `NotReplica` and unreachable replicas are
//! dropped, and an empty list is refilled through a [`Locator`], usually the management
//! service.
//!
//! ## CALLS
//!
//! [`RsvcClient::call`] retries on retryable errors, backing off exponentially with full
//! jitter, until an overall deadline. The error names the attempts it made and the last
//! failure. Mutating requests carry the client's random id and a sequence number, so that the
//! engine applies a retried request once and returns the first result (exactly-once). One
//! client may be shared by many tasks (`Arc<RsvcClient<_>>`) with many calls in flight: each
//! request also carries the client's acknowledged low-water mark (every seq below its oldest
//! outstanding call), which lets the engine forget the results the client no longer needs
//! (the client sessions of the Raft dissertation, 6.3).
//!
//! ## SECURITY
//!
//! [`Connections::with_tls`] speaks mutual TLS ([`tls`]): engines are checked against the name
//! every engine certificate carries, and a certificate failure ends a call at once with
//! [`ClientError::Security`] instead of being retried until the deadline.
//!
//! ## CAVEATS
//!
//! - A client silent for longer than the engine keeps its records (300 s) is forgotten: a
//!   retry after that could apply twice.
//! - Connections are created lazily and never pruned.

pub mod api;
pub mod client;
pub mod error;
pub mod leader;
pub mod mgmt;
pub mod status;
pub mod tls;
pub mod wire;

pub use api::ServiceApi;
pub use client::{ClientConfig, Connections, LocateError, Locator, Replicas, RsvcClient, StaticLocator};
pub use error::{ClientError, WireError};
pub use leader::{Hint, ReplicaSet};
pub use status::{replica_status, ReplicaStatus};
