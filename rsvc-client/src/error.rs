//! The errors that cross the wire (a closed set) and the client's own error enum.

/// The closed set of errors a server sends; see `proto/rsvc.proto`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not the leader; the reply's hint says who might be.
    #[error("not leader")]
    NotLeader,
    /// No replica of the instance here.
    #[error("not a replica")]
    NotReplica,
    /// Out of space; nothing was written.
    #[error("no space")]
    NoSpace,
    /// The request referred to an outdated term or version.
    #[error("stale")]
    Stale,
    /// Busy; retry later.
    #[error("busy")]
    Busy,
    /// Unknown or evicted handle.
    #[error("no handle")]
    NoHandle,
    /// The engine is shutting down.
    #[error("shutting down")]
    Shutdown,
    /// Malformed request or unknown service class.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The service's own error, postcard-encoded.
    #[error("service error")]
    Service(Vec<u8>),
}

impl WireError {
    /// Whether the SDK sends the very same request again, within the call's deadline. The
    /// contract, one line per error:
    ///
    /// | error | retried | why |
    /// |---|---|---|
    /// | `NotLeader` | yes: at once to a hinted new leader, else after a backoff | the request was not admitted; a timed-out commit also comes back as this, and exactly-once makes its retry safe |
    /// | `NotReplica` | yes, at another replica; the list is refreshed | the engine hosts no replica of the instance (moved, or not created yet) |
    /// | `Busy` | yes, after a backoff | nothing was applied: a lost race with a concurrent request (a failed precondition), or a leader whose database is not ready |
    /// | `Shutdown` | yes, at another replica | the engine is stopping |
    /// | `NoSpace` | no | refused before anything was appended; asking again within the deadline only delays the answer, but the caller may retry later (see [`ClientError::is_retryable`]) |
    /// | `Stale` | no | a sequence number the engine has already forgotten: the client's own bug |
    /// | `NoHandle` | no | the handle is unknown or was evicted: open a new one |
    /// | `Invalid` | no | the request itself is wrong |
    /// | `Service` | no | the service answered; its error is the result |
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            WireError::NotLeader | WireError::NotReplica | WireError::Busy | WireError::Shutdown
        )
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError<E> {
    /// The service answered with its own error.
    #[error("service error: {0:?}")]
    Service(E),
    /// The directory says the instance does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The deadline passed before any replica could be tried: none was known and none could be
    /// learned (from the management service), for the reason in `cause`.
    #[error("no replica of {what} could be found in time: {cause}")]
    NoReplicas {
        /// The instance, `class/label`.
        what: String,
        /// The last reason the lookup gave.
        cause: String,
    },
    /// The deadline passed; says what was tried.
    #[error("deadline of {deadline_ms} ms passed after {attempts} attempts; last: {last}")]
    Deadline {
        /// The call's deadline.
        deadline_ms: u64,
        /// How many replicas were asked, in all.
        attempts: u32,
        /// What the last attempt ran into.
        last: String,
    },
    /// A final (not retryable) framework error.
    #[error("{0}")]
    Wire(WireError),
    /// The reply could not be decoded.
    #[error("bad reply: {0}")]
    Codec(String),
    /// The TLS handshake with an engine failed on a certificate (an unknown CA, an expired
    /// certificate, a wrong name, or the engine refused this client's certificate), or the
    /// engine refused the connection's principal. Retrying cannot help until the certificates
    /// change.
    #[error("{0}")]
    Security(String),
}

impl<E> ClientError<E> {
    /// Whether the caller may try again later (the call itself already retried until its
    /// deadline): nothing answered in time, or the engine was out of space.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Deadline { .. } | ClientError::NoReplicas { .. } => true,
            ClientError::Wire(e) => e.is_retryable() || *e == WireError::NoSpace,
            _ => false,
        }
    }
}
