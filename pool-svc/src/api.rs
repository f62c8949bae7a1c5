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
    Connect { client: String, ttl_ms: u64 },
    /// Closes a handle (and its container handles).
    Disconnect { handle: Handle },
    /// Renews a handle's lease.
    Renew { handle: Handle },
    /// Describes the pool.
    Query,
    /// Reads all properties.
    PropGet,
    /// Sets one property (`label` and `owner` included).
    PropSet { name: String, value: String },
    /// Sets a user attribute.
    AttrSet { name: String, value: Vec<u8> },
    /// Reads a user attribute.
    AttrGet { name: String },
    /// Lists user attribute names.
    AttrList,
    /// Deletes a user attribute.
    AttrDel { name: String },
    /// Evicts every handle; returns how many.
    Evict,
    /// Lists the open handles.
    ListHandles,
    /// A container operation under a pool handle.
    Cont { handle: Handle, req: ContRequest },
    /// Sets a user attribute to `value` only if it now holds `expect` (`None`: absent), in one
    /// transaction; answers [`PoolResponse::Swapped`].
    AttrCas {
        name: String,
        expect: Option<Vec<u8>>,
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
    AttrTxn { ops: Vec<AttrOp> },
}

/// One step of a [`PoolRequest::AttrTxn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttrOp {
    /// Reads an attribute; its value joins the answer.
    Get { name: String },
    /// Sets an attribute.
    Set { name: String, value: Vec<u8> },
    /// Appends bytes to an attribute (an absent one counts as empty).
    Append { name: String, value: Vec<u8> },
    /// The attribute must hold `value` (`None`: absent) for the transaction to write anything.
    Expect { name: String, value: Option<Vec<u8>> },
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
    Connected { handle: Handle, ttl_ms: u64 },
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
    Swapped { swapped: bool, current: Option<Vec<u8>> },
    /// What an [`PoolRequest::AttrTxn`] did: whether its expectations held (and so its writes
    /// were made), and the value of each [`AttrOp::Get`], in order.
    Txn { ok: bool, values: Vec<Option<Vec<u8>>> },
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
