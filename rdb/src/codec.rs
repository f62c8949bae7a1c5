//! Encoding of everything rdb persists or sends: postcard behind a leading format version byte.
//!
//! NB: openraft's serde output is not a stable format across openraft versions. Every record
//! rdb writes therefore starts with [`FORMAT_V1`]; a later format gets a new byte and a
//! converter, and a reader refuses a byte it does not know instead of guessing.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The only record format so far: postcard of the record's serde form (openraft types
/// included) after this byte.
pub const FORMAT_V1: u8 = 1;

/// A record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The record was empty: not even a version byte.
    #[error("empty record")]
    Empty,
    /// The version byte is not one this build can read.
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    /// postcard failed.
    #[error("postcard: {0}")]
    Postcard(#[from] postcard::Error),
}

/// Encodes `value` as `[FORMAT_V1, postcard bytes...]`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(postcard::to_extend(value, vec![FORMAT_V1])?)
}

/// Decodes a record written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&FORMAT_V1, rest)) => Ok(postcard::from_bytes(rest)?),
        Some((&v, _)) => Err(CodecError::UnknownVersion(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let v = (7u64, String::from("x"), vec![1u8, 2, 3]);
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes[0], FORMAT_V1);
        let back: (u64, String, Vec<u8>) = decode(&bytes).unwrap();
        assert_eq!(back, v);
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(matches!(
            decode::<(u64, String, Vec<u8>)>(&bad),
            Err(CodecError::UnknownVersion(9))
        ));
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Empty)));
    }
}
