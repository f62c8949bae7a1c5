//! Container requests, responses and errors (postcard on the wire, inside a pool request).

use serde::{Deserialize, Serialize};

/// A pool or container handle: 16 random bytes.
pub type Handle = [u8; 16];

/// Container operations. Every one names the pool handle it runs under.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ContRequest {
    /// Creates a container with initial properties.
    Create {
        /// The new container's label: 1-127 of `[A-Za-z0-9._-]`, unique in the pool.
        label: String,
        /// Initial properties as (name, value) pairs.
        props: Vec<(String, String)>,
    },
    /// Opens a container; returns a container handle tied to the pool handle.
    Open {
        /// The container to open; it must not be `Destroying`.
        label: String,
    },
    /// Closes a container handle.
    Close {
        /// The handle `Open` returned.
        cont_handle: Handle,
    },
    /// Destroys a container (two-phase); `force` also closes open handles instead of refusing.
    Destroy {
        /// The container to destroy.
        label: String,
        /// Close open handles instead of failing with `Busy`.
        force: bool,
    },
    /// Lists containers.
    List,
    /// Describes a container.
    Query {
        /// The container to describe.
        label: String,
    },
    /// Reads all properties.
    PropGet {
        /// The container whose properties to read.
        label: String,
    },
    /// Sets one property.
    PropSet {
        /// The container to change.
        label: String,
        /// The property's name.
        name: String,
        /// Its new value, replacing any old one.
        value: String,
    },
    /// Sets a user attribute.
    AttrSet {
        /// The container to change.
        label: String,
        /// The attribute's name.
        name: String,
        /// Its new value (opaque bytes), replacing any old one.
        value: Vec<u8>,
    },
    /// Reads a user attribute.
    AttrGet {
        /// The container to read from.
        label: String,
        /// The attribute's name.
        name: String,
    },
    /// Lists user attribute names.
    AttrList {
        /// The container whose attributes to list.
        label: String,
    },
    /// Deletes a user attribute.
    AttrDel {
        /// The container to change.
        label: String,
        /// The attribute to delete; the commit fails if it does not exist.
        name: String,
    },
    /// Takes a snapshot through an open container handle; returns its epoch.
    SnapCreate {
        /// An open handle of the container to snapshot.
        cont_handle: Handle,
    },
    /// Lists snapshot epochs.
    SnapList {
        /// The container whose snapshots to list.
        label: String,
    },
    /// Destroys one snapshot.
    SnapDestroy {
        /// The container that holds the snapshot.
        label: String,
        /// The snapshot's epoch, as `SnapCreate` returned it.
        epoch: u64,
    },
    /// Allocates `count` object ids through an open container handle.
    OidAlloc {
        /// An open handle of the container to allocate in.
        cont_handle: Handle,
        /// How many consecutive ids to allocate: 1 to 2^40.
        count: u64,
    },
}

impl ContRequest {
    /// Whether the request changes state.
    pub fn is_mutating(&self) -> bool {
        !matches!(
            self,
            ContRequest::List
                | ContRequest::Query { .. }
                | ContRequest::PropGet { .. }
                | ContRequest::AttrGet { .. }
                | ContRequest::AttrList { .. }
                | ContRequest::SnapList { .. }
        )
    }
}

/// A container's life-cycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContState {
    /// Usable.
    Normal,
    /// Phase one of destroy happened; phase two has not.
    Destroying,
}

/// What `Query` and `List` report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContInfo {
    /// The container's label.
    pub label: String,
    /// Its uuid (16 bytes).
    pub uuid: Handle,
    /// Life-cycle state.
    pub state: ContState,
    /// Open handles.
    pub handles: u64,
    /// Snapshots.
    pub snapshots: u64,
    /// Next unallocated object id.
    pub next_oid: u64,
}

/// Answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContResponse {
    /// Done.
    Ok,
    /// A new container handle.
    Opened {
        /// The new handle; pass it to `Close`, `SnapCreate` and `OidAlloc`.
        cont_handle: Handle,
    },
    /// One container.
    Info(ContInfo),
    /// Containers.
    List(Vec<ContInfo>),
    /// Properties.
    Props(Vec<(String, String)>),
    /// An attribute value.
    Attr(Option<Vec<u8>>),
    /// Attribute names.
    Names(Vec<String>),
    /// A snapshot epoch.
    Epoch(u64),
    /// Snapshot epochs.
    Epochs(Vec<u64>),
    /// Allocated object ids: `[start, start + count)`.
    Oids {
        /// The first allocated id.
        start: u64,
        /// How many ids were allocated (as requested).
        count: u64,
    },
}

/// Container errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ContError {
    /// No container with that label.
    #[error("no container {0:?}")]
    NotFound(String),
    /// A container with that label exists.
    #[error("container {0:?} exists")]
    Exists(String),
    /// The container handle is unknown or was closed or evicted.
    #[error("unknown or evicted container handle")]
    NoHandle,
    /// The container is being destroyed.
    #[error("container {0:?} is being destroyed")]
    Destroying(String),
    /// The container is still open and `force` was not given.
    #[error("container {0:?} has {1} open handle(s)")]
    Busy(String, u64),
    /// No such snapshot.
    #[error("no snapshot at epoch {0}")]
    NoSnapshot(u64),
    /// A bad argument.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Storage trouble.
    #[error("storage: {0}")]
    Storage(String),
}
