//! rdb's one error enum.

use crate::kv::ApplyError;
use crate::types::ReplicaId;

/// Everything an rdb call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// This replica is not the leader of the requested term (or of any). `leader` and `term`
    /// are the best known hint: the replica it believes leads, and the term it knows.
    #[error("not leader (hint: leader {leader:?}, term {term})")]
    NotLeader {
        /// The replica this one believes leads, if it knows of any.
        leader: Option<ReplicaId>,
        /// The latest term this replica knows (0 if the hint was not available).
        term: u64,
    },
    /// Free space is below the admission threshold; nothing was appended.
    #[error("no space: {free} bytes free, {needed} needed")]
    NoSpace {
        /// Bytes free on the replica that decided the refusal: this one, or the voter that
        /// keeps the quorum short.
        free: u64,
        /// Bytes that replica needs free to take the transaction: its size, the replica's
        /// upkeep and the admission threshold.
        needed: u64,
    },
    /// The transaction was applied and failed deterministically: it had no effect.
    #[error("transaction failed: {0}")]
    Apply(#[from] ApplyError),
    /// Another membership change is still in progress.
    #[error("busy: {0}")]
    Busy(String),
    /// There is no replica where one was expected.
    #[error("not found: {0}")]
    NotFound(String),
    /// A replica already exists where one was to be created.
    #[error("already exists: {0}")]
    Exists(String),
    /// The replica's files are missing or belong to another incarnation: its disk was wiped or
    /// replaced. It must not rejoin under its old identity.
    #[error("replica identity lost: {0}")]
    IdentityLost(String),
    /// The replica is not running: it was stopped, or a storage error stopped it.
    #[error("replica stopped: {0}")]
    Stopped(String),
    /// A deadline passed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// An I/O error in rdb's own files.
    #[error("storage: {0}")]
    Storage(String),
    /// The caller asked for something that cannot be done.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Anything else openraft reported.
    #[error("raft: {0}")]
    Raft(String),
}

impl Error {
    /// Whether retrying (possibly at another replica, after a backoff) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotLeader { .. } | Error::NoSpace { .. } | Error::Busy(_) | Error::Timeout(_)
        )
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Storage(e.to_string())
            }
        }
    )*};
}
storage_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    crate::codec::CodecError
);

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;
