//! Pool requests, responses and errors (postcard on the wire).

use cont_svc::api::Handle;
use cont_svc::{ContError, ContRequest, ContResponse};
use rsvc_client::ServiceApi;
use serde::{Deserialize, Serialize};

/// The pool service's class name.
pub const POOL_CLASS: &str = "pool";

/// Pool operations.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PoolRequest {
    /// Opens a handle with a liveness lease of `ttl_ms`, renewed by the client.
    Connect {
        /// Who connects: a free-form name that `ListHandles` shows.
        client: String,
        /// The lease in milliseconds, within [`crate::service::TTL_RANGE`].
        ttl_ms: u64,
    },
    /// Closes a handle (and its container handles).
    Disconnect {
        /// The handle `Connect` returned.
        handle: Handle,
    },
    /// Renews a handle's lease.
    Renew {
        /// The handle whose lease restarts at its full TTL; it must not have expired yet.
        handle: Handle,
    },
    /// Describes the pool.
    Query,
    /// Reads all properties.
    PropGet,
    /// Sets one property (`label` and `owner` included).
    PropSet {
        /// The property's name; `map_version` is the service's own and refused.
        name: String,
        /// Its new value, replacing any old one.
        value: String,
    },
    /// Sets a user attribute.
    AttrSet {
        /// The attribute's name; must not be empty.
        name: String,
        /// Its new value (opaque bytes), replacing any old one.
        value: Vec<u8>,
    },
    /// Reads a user attribute.
    AttrGet {
        /// The attribute's name.
        name: String,
    },
    /// Lists user attribute names.
    AttrList,
    /// Deletes a user attribute.
    AttrDel {
        /// The attribute to delete; an absent one is `Invalid`.
        name: String,
    },
    /// Evicts every handle; returns how many.
    Evict,
    /// Lists the open handles.
    ListHandles,
    /// A container operation under a pool handle.
    Cont {
        /// The pool handle the operation runs under; it must be open with a live lease.
        handle: Handle,
        /// The container operation.
        req: ContRequest,
    },
    /// Sets a user attribute to `value` only if it now holds `expect` (`None`: absent), in one
    /// transaction; answers [`PoolResponse::Swapped`].
    AttrCas {
        /// The attribute's name; must not be empty.
        name: String,
        /// The value the attribute must hold now for the swap; `None`: it must be absent.
        expect: Option<Vec<u8>>,
        /// The value to set if it does.
        value: Vec<u8>,
    },
    /// Several user attributes in one serializable transaction (etcd's `Txn`, with appends).
    ///
    /// The ops run in order on one snapshot, each seeing the effects of the ones before it.
    /// If an [`AttrOp::Expect`] does not hold, nothing is written and the answer says so. Every
    /// attribute the transaction read is checked again when its entry applies: a concurrent
    /// change makes the entry apply nothing and the call answer `Busy`, which the client retries
    /// on a newer snapshot. So the result is as if the transaction ran alone at the moment it
    /// applied. Answers [`PoolResponse::Txn`].
    AttrTxn {
        /// The steps, run in order; at most [`crate::service::MAX_TXN_OPS`], none with an
        /// empty name.
        ops: Vec<AttrOp>,
    },
}

/// One step of a [`PoolRequest::AttrTxn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttrOp {
    /// Reads an attribute; its value joins the answer.
    Get {
        /// The attribute to read.
        name: String,
    },
    /// Sets an attribute.
    Set {
        /// The attribute to write.
        name: String,
        /// Its new value, replacing any old one.
        value: Vec<u8>,
    },
    /// Appends bytes to an attribute (an absent one counts as empty).
    Append {
        /// The attribute to extend.
        name: String,
        /// The bytes to add at its end.
        value: Vec<u8>,
    },
    /// The attribute must hold `value` (`None`: absent) for the transaction to write anything.
    Expect {
        /// The attribute to check, as earlier steps left it.
        name: String,
        /// The value it must hold, compared byte for byte; `None`: it must be absent.
        value: Option<Vec<u8>>,
    },
}

impl AttrOp {
    /// The attribute it names.
    pub fn name(&self) -> &str {
        match self {
            AttrOp::Get { name } | AttrOp::Set { name, .. } | AttrOp::Append { name, .. } => name,
            AttrOp::Expect { name, .. } => name,
        }
    }
}

/// A pool handle as `ListHandles` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleInfo {
    /// The handle.
    pub handle: Handle,
    /// Who connected.
    pub client: String,
    /// Its lease.
    pub ttl_ms: u64,
}

/// What `Query` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// The pool's label.
    pub label: String,
    /// The replicas' ranks.
    pub replicas: Vec<u32>,
    /// The leader's rank.
    pub leader: u32,
    /// The leader's term.
    pub term: u64,
    /// Open handles.
    pub handles: u64,
    /// Containers.
    pub containers: u64,
    /// Bumped by every property change.
    pub map_version: u64,
}

/// Answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolResponse {
    /// Done.
    Ok,
    /// A new handle.
    Connected {
        /// The new pool handle.
        handle: Handle,
        /// Its lease in milliseconds, as requested; renew well within it.
        ttl_ms: u64,
    },
    /// The pool.
    Info(PoolInfo),
    /// Properties.
    Props(Vec<(String, String)>),
    /// An attribute value.
    Attr(Option<Vec<u8>>),
    /// Attribute names.
    Names(Vec<String>),
    /// How many handles were evicted.
    Evicted(u64),
    /// Open handles.
    Handles(Vec<HandleInfo>),
    /// A container answer.
    Cont(ContResponse),
    /// Whether an [`PoolRequest::AttrCas`] swapped; if not, what the attribute held.
    Swapped {
        /// Whether the attribute now holds the new value.
        swapped: bool,
        /// If not swapped, what the attribute held (`None`: absent); `None` if swapped.
        current: Option<Vec<u8>>,
    },
    /// What an [`PoolRequest::AttrTxn`] did: whether its expectations held (and so its writes
    /// were made), and the value of each [`AttrOp::Get`], in order.
    Txn {
        /// Whether every [`AttrOp::Expect`] held; if not, nothing was written.
        ok: bool,
        /// The value of each [`AttrOp::Get`] in order (`None`: absent); when `ok` is false,
        /// only those before the failed expectation.
        values: Vec<Option<Vec<u8>>>,
    },
}

/// Pool errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PoolError {
    /// The handle is unknown, closed, or was evicted (its lease expired): reconnect.
    #[error("unknown or evicted pool handle")]
    NoHandle,
    /// A bad argument.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A container error.
    #[error("container: {0}")]
    Cont(ContError),
    /// Storage trouble.
    #[error("storage: {0}")]
    Storage(String),
    /// The caller's principal may not do this: the pool's or container's ACL does not grant
    /// it, the handle is read-only, or it needs the owner or an admin.
    #[error("permission denied: {0}")]
    Denied(String),
}

/// The pool service's typed face.
pub struct PoolApi;

impl ServiceApi for PoolApi {
    const CLASS: &'static str = POOL_CLASS;
    type Request = PoolRequest;
    type Response = PoolResponse;
    type Error = PoolError;

    fn is_mutating(req: &PoolRequest) -> bool {
        match req {
            PoolRequest::Query
            | PoolRequest::PropGet
            | PoolRequest::AttrGet { .. }
            | PoolRequest::AttrList
            | PoolRequest::ListHandles
            // A renewal only touches the leader's memory.
            | PoolRequest::Renew { .. } => false,
            PoolRequest::AttrTxn { ops } => ops
                .iter()
                .any(|op| matches!(op, AttrOp::Set { .. } | AttrOp::Append { .. })),
            PoolRequest::Cont { req, .. } => req.is_mutating(),
            _ => true,
        }
    }
}
