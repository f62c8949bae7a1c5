//! The engine's one error contract: how rdb's errors reach clients (`wire_of`), and how the
//! engine's own reach the peers that call it (`From<EngineError> for tonic::Status`). What a
//! client retries, and why, is [`rsvc_client::WireError::is_retryable`]'s table; this module
//! decides which wire error each server-side failure becomes.
//!
//! NB: `wire_of` is a function, not `From<&rdb::Error> for WireError`: both types belong to
//! other crates (rsvc-client does not depend on rdb), so the orphan rule forbids the impl.

use rsvc_client::WireError;
use tonic::Status;

use crate::engine::EngineError;

/// What a client is told when rdb fails on the request path.
///
/// | rdb error | wire error | why |
/// |---|---|---|
/// | `NotLeader` | `NotLeader` | the client follows the hint |
/// | `Timeout` | `NotLeader` | a commit that did not finish in time: the leader may have lost its quorum, and the outcome is unknown. The client finds the leader again and repeats the same sequence number, which exactly-once makes safe |
/// | `NoSpace` | `NoSpace` | refused before anything was appended |
/// | `Busy` | `Busy` | nothing was applied; retry |
/// | `Apply(PreconditionFailed)` | `Busy` | a lost race with a concurrent request: nothing was applied, so the same request may be retried |
/// | other `Apply` | `Invalid` | the transaction is wrong and would fail again |
/// | `Stopped` | `Shutdown` | the replica stopped (a storage error, or its engine stops) |
/// | anything else | `Invalid` | not retryable, with rdb's message |
pub(crate) fn wire_of(e: &rdb::Error) -> WireError {
    match e {
        rdb::Error::NotLeader { .. } | rdb::Error::Timeout(_) => WireError::NotLeader,
        rdb::Error::NoSpace { .. } => WireError::NoSpace,
        rdb::Error::Busy(_) => WireError::Busy,
        rdb::Error::Apply(rdb::ApplyError::PreconditionFailed(_)) => WireError::Busy,
        rdb::Error::Apply(a) => WireError::Invalid(format!("transaction refused: {a}")),
        rdb::Error::Stopped(_) => WireError::Shutdown,
        other => WireError::Invalid(other.to_string()),
    }
}

/// What a peer engine (the management leader, mostly) is told. The management service's
/// `ask_leader` moves on to the next replica on `FAILED_PRECONDITION` (not the leader),
/// `UNAVAILABLE` (busy, stopping, electing) and `NOT_FOUND` (no replica here), and gives up on
/// the codes that say the request itself cannot succeed: `INVALID_ARGUMENT`,
/// `DEADLINE_EXCEEDED` and `INTERNAL`.
impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match e {
            EngineError::UnknownClass(c) => Status::not_found(format!("unknown class {c}")),
            EngineError::Invalid(m) => Status::invalid_argument(m),
            EngineError::Precondition(m) => Status::failed_precondition(m),
            EngineError::Rdb(e) => match e {
                rdb::Error::NotLeader { .. } => Status::failed_precondition("not the leader"),
                rdb::Error::Busy(m) => Status::unavailable(m),
                rdb::Error::Stopped(m) => Status::unavailable(format!("replica stopped: {m}")),
                rdb::Error::NotFound(m) => Status::not_found(m),
                rdb::Error::Exists(m) => Status::already_exists(m),
                rdb::Error::NoSpace { .. } => Status::resource_exhausted(e.to_string()),
                rdb::Error::Invalid(m) => Status::invalid_argument(m),
                rdb::Error::Timeout(m) => Status::deadline_exceeded(m),
                other => Status::internal(other.to_string()),
            },
            other => Status::internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_race_is_busy_and_a_wrong_transaction_is_invalid() {
        let race = rdb::Error::Apply(rdb::ApplyError::PreconditionFailed("k".into()));
        assert_eq!(wire_of(&race), WireError::Busy);
        assert!(wire_of(&race).is_retryable());
        let timeout = rdb::Error::Timeout("commit".into());
        assert_eq!(wire_of(&timeout), WireError::NotLeader);
        let space = rdb::Error::NoSpace { free: 1, needed: 2 };
        assert!(!wire_of(&space).is_retryable());
    }

    #[test]
    fn peers_are_told_whether_to_ask_another_replica() {
        let code = |e: EngineError| Status::from(e).code();
        let not_leader = rdb::Error::NotLeader {
            leader: None,
            term: 3,
        };
        assert_eq!(
            code(EngineError::Rdb(not_leader)),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(EngineError::Rdb(rdb::Error::Busy("x".into()))),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(EngineError::Invalid("x".into())),
            tonic::Code::InvalidArgument
        );
        assert_eq!(code(EngineError::UnknownClass("x".into())), tonic::Code::NotFound);
    }
}
