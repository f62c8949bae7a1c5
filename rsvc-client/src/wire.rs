//! The protobuf contract (generated) and the conversions between it and the Rust types. All
//! framing and encoding of this crate lives here.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::WireError;
use crate::leader::Hint;

/// Generated protobuf types and the tonic client/server of `rsvc.v1.Rsvc`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("rsvc.v1");
}

/// Largest message the client and servers accept (16 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Encodes a service value as the postcard bytes a [`pb::CallRequest`] or reply carries.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(v)
}

/// Decodes a service value from postcard bytes.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

/// A hint with its address, as carried on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireHint {
    /// Rank and term.
    pub hint: Hint,
    /// The hinted rank's address, if the sender knew it.
    pub addr: Option<String>,
}

impl From<&WireHint> for pb::Hint {
    fn from(h: &WireHint) -> Self {
        pb::Hint {
            valid: true,
            rank: h.hint.rank,
            term: h.hint.term,
            addr: h.addr.clone().unwrap_or_default(),
        }
    }
}

/// Reads a wire hint; `None` if absent or marked invalid.
pub fn hint_of(h: Option<&pb::Hint>) -> Option<WireHint> {
    let h = h?;
    h.valid.then(|| WireHint {
        hint: Hint {
            rank: h.rank,
            term: h.term,
        },
        addr: (!h.addr.is_empty()).then(|| h.addr.clone()),
    })
}

impl From<&WireError> for pb::WireError {
    fn from(e: &WireError) -> Self {
        use pb::ErrorKind as K;
        let (kind, service_error) = match e {
            WireError::NotLeader => (K::NotLeader, vec![]),
            WireError::NotReplica => (K::NotReplica, vec![]),
            WireError::NoSpace => (K::NoSpace, vec![]),
            WireError::Stale => (K::Stale, vec![]),
            WireError::Busy => (K::Busy, vec![]),
            WireError::NoHandle => (K::NoHandle, vec![]),
            WireError::Shutdown => (K::Shutdown, vec![]),
            WireError::Invalid(_) => (K::Invalid, vec![]),
            WireError::Service(b) => (K::Service, b.clone()),
        };
        pb::WireError {
            kind: kind as i32,
            message: match e {
                WireError::Invalid(m) => m.clone(),
                other => other.to_string(),
            },
            service_error,
        }
    }
}

impl From<&pb::WireError> for WireError {
    fn from(e: &pb::WireError) -> Self {
        use pb::ErrorKind as K;
        match K::try_from(e.kind).unwrap_or(K::Unspecified) {
            K::NotLeader => WireError::NotLeader,
            K::NotReplica => WireError::NotReplica,
            K::NoSpace => WireError::NoSpace,
            K::Stale => WireError::Stale,
            K::Busy => WireError::Busy,
            K::NoHandle => WireError::NoHandle,
            K::Shutdown => WireError::Shutdown,
            K::Service => WireError::Service(e.service_error.clone()),
            K::Invalid | K::Unspecified => WireError::Invalid(e.message.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip() {
        for e in [
            WireError::NotLeader,
            WireError::NotReplica,
            WireError::NoSpace,
            WireError::Stale,
            WireError::Busy,
            WireError::NoHandle,
            WireError::Shutdown,
            WireError::Invalid("bad".into()),
            WireError::Service(vec![1, 2, 3]),
        ] {
            let pbe = pb::WireError::from(&e);
            assert_eq!(WireError::from(&pbe), e);
        }
        let unknown = pb::WireError {
            kind: 999,
            message: "from the future".into(),
            service_error: vec![],
        };
        assert_eq!(
            WireError::from(&unknown),
            WireError::Invalid("from the future".into())
        );
    }

    #[test]
    fn hints_round_trip() {
        let h = WireHint {
            hint: Hint { rank: 3, term: 9 },
            addr: Some("127.0.0.1:1".into()),
        };
        assert_eq!(hint_of(Some(&pb::Hint::from(&h))), Some(h));
        assert_eq!(hint_of(Some(&pb::Hint::default())), None);
        assert_eq!(hint_of(None), None);
    }
}
