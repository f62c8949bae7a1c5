//! # cont-svc: containers, kept inside a pool service's replicated state
//!
//! As in DAOS, containers are not a replicated service of their own. They live in the rdb of
//! the pool that holds them, under the pool's leadership. A container operation is therefore
//! atomic with pool state: evicting a pool handle closes that handle's containers in the same
//! transaction, and a container never outlives its pool's replicas.
//!
//! This crate holds the container half of the pool service:
//! - [`api`]: the typed requests, responses and errors clients send. The pool service carries
//!   them as `PoolRequest::Cont`.
//! - [`store`]: the layout of containers in rdb and the handler the pool service calls with
//!   its transaction. The caller must already have checked the pool handle.
//!
//! ## LAYOUT (under the pool's root KVS)
//!
//! ```text
//! /conts/<label>/meta      ContMeta { uuid, state, next_oid, created_ms }
//! /conts/<label>/props     name -> value
//! /conts/<label>/attrs     name -> value
//! /conts/<label>/snaps     Integer: epoch -> created_ms
//! /conts/<label>/handles   handle -> pool handle that opened it
//! ```
//!
//! ## DESTROY IS TWO-PHASE (DAOS)
//!
//! Phase one marks the container `Destroying` and drops its open handles in one transaction,
//! so no new open can succeed. Phase two removes its KVSs, children first. If the leader dies
//! between the phases, the container stays `Destroying`, refuses every use, and a retried
//! destroy finishes the job.
//!
//! ## CAVEATS
//!
//! - Snapshots record an epoch and a time; there is no data to snapshot in this model.
//! - OID allocation hands out ranges from a per-container counter; the counter never goes back.

pub mod api;
pub mod store;

pub use api::{ContError, ContInfo, ContRequest, ContResponse, ContState};
