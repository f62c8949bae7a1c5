//! The data model: a tree of key-value stores (KVSs), its on-disk layout in the state-machine
//! redb file, the update operations a transaction queues, and how they are applied.
//!
//! LAYOUT. Every KVS has a numeric id; the root is id 0. Two tables hold the tree:
//!
//! ```text
//!   entries: (kvs id u64, key bytes) -> 0x00 ++ value bytes      a plain value
//!                                     -> 0x01 ++ child id (u64 BE) a child KVS
//!   kvs:     kvs id -> KvsInfo { class, child_kvs }               one row per live KVS
//! ```
//!
//! Keys of one KVS are therefore a contiguous range of `entries`, in byte order. Integer keys
//! are stored as 8-byte big-endian numbers, so byte order is numeric order; Lexical keys are in
//! byte order; Generic keys are in byte order too, which satisfies "any order".
//!
//! APPLY CONTRACT. `apply_tx` applies a transaction's operations in order against an
//! overlay and writes the overlay out only if every operation succeeded. A deterministic error
//! (missing KVS or key, a precondition, a wrong key) therefore leaves no effect at all, and every
//! replica reaches the same verdict because it depends only on the state and the operations. An
//! I/O error is not deterministic: it is returned as [`redb::StorageError`] and the caller must
//! stop the replica rather than carry on with a state that might differ from its peers'.

use std::collections::BTreeMap;
use std::ops::Bound;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// `(kvs id, key) -> tagged value`.
pub(crate) const ENTRIES: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("entries");
/// `kvs id -> KvsInfo` (postcard).
pub(crate) const KVS: TableDefinition<u64, &[u8]> = TableDefinition::new("kvs");

/// The id of the root KVS, which always exists.
pub(crate) const ROOT_ID: u64 = 0;

const TAG_BYTES: u8 = 0;
const TAG_KVS: u8 = 1;

/// How the keys of a KVS are ordered (DAOS rdb KVS classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyClass {
    /// Any byte-string keys; iteration order is unspecified (rdb happens to use byte order).
    Generic,
    /// `u64` keys in numeric order; every key must be 8 bytes, see [`int_key`].
    Integer,
    /// Byte-string keys in byte order.
    Lexical,
}

/// Encodes an Integer-class key.
pub fn int_key(n: u64) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

/// Decodes an Integer-class key; `None` if it is not 8 bytes.
pub fn int_of_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// The path of a KVS: the keys leading to it from the root. The root's path is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Path(#[serde(with = "path_keys")] pub Vec<Vec<u8>>);

/// Serializes path keys as byte strings (postcard: length + raw bytes, not one element each).
mod path_keys {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(keys: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let v: Vec<&serde_bytes::Bytes> = keys.iter().map(|k| serde_bytes::Bytes::new(k)).collect();
        v.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v: Vec<serde_bytes::ByteBuf> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|b| b.into_vec()).collect())
    }
}

impl Path {
    /// The root KVS.
    pub fn root() -> Self {
        Path(Vec::new())
    }

    /// The child KVS `key` of this one.
    pub fn child(&self, key: impl Into<Vec<u8>>) -> Self {
        let mut p = self.0.clone();
        p.push(key.into());
        Path(p)
    }
}

impl<K: Into<Vec<u8>>, const N: usize> From<[K; N]> for Path {
    fn from(keys: [K; N]) -> Self {
        Path(keys.into_iter().map(Into::into).collect())
    }
}

/// One queued update of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Creates the child KVS `key` in the KVS at `parent`. Fails with `Exists` if `key` is taken.
    CreateKvs {
        /// The KVS to create the child in.
        parent: Path,
        /// The child's key in `parent`; must fit `parent`'s key class.
        key: Vec<u8>,
        /// How the new KVS orders its own keys.
        class: KeyClass,
    },
    /// Destroys the child KVS `key` of `parent` with all its values. Fails with `NotEmpty` if it
    /// still has child KVSs: a KVS is destroyed only after its children.
    DestroyKvs {
        /// The KVS that holds the child.
        parent: Path,
        /// The child's key in `parent`.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Sets `key` in the KVS at `kvs` to `value`. `critical` updates pass free-space admission
    /// when space is low (DAOS `update_critical`).
    Update {
        /// The KVS to write in.
        kvs: Path,
        /// The key to set; must fit the KVS's key class and must not hold a child KVS.
        key: Vec<u8>,
        /// The new value, replacing any old one.
        value: Vec<u8>,
        /// Set by [`crate::Tx::update_critical`]: the update counts as critical, so a
        /// transaction of few enough critical operations needs only the critical threshold.
        critical: bool,
    },
    /// Removes `key` from the KVS at `kvs`; fails with `NotFound` if it is absent.
    Delete {
        /// The KVS to remove the key from.
        kvs: Path,
        /// The key to remove; it must hold a value, not a child KVS.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// A precondition: `key` in the KVS at `kvs` holds `value` (`None`: is absent). Lets a caller
    /// make a transaction conditional on what it read (compare-and-set).
    Expect {
        /// The KVS to look in.
        kvs: Path,
        /// The key to check; a key holding a child KVS fails with `WrongType`.
        key: Vec<u8>,
        /// The value the key must hold, compared byte for byte; `None`: the key must be absent.
        value: Option<Vec<u8>>,
    },
}

impl Op {
    /// Whether this operation may pass admission control when space is low: it frees space or
    /// is explicitly marked critical.
    pub fn is_critical(&self) -> bool {
        matches!(
            self,
            Op::DestroyKvs { .. } | Op::Delete { .. } | Op::Expect { .. } | Op::Update { critical: true, .. }
        )
    }

    /// Rough encoded size, for admission and batching bounds.
    pub fn approx_size(&self) -> usize {
        let path = |p: &Path| p.0.iter().map(|k| k.len() + 2).sum::<usize>();
        match self {
            Op::CreateKvs { parent, key, .. } | Op::DestroyKvs { parent, key } => {
                8 + path(parent) + key.len()
            }
            Op::Update { kvs, key, value, .. } => 8 + path(kvs) + key.len() + value.len(),
            Op::Delete { kvs, key } => 8 + path(kvs) + key.len(),
            Op::Expect { kvs, key, value } => 8 + path(kvs) + key.len() + value.as_ref().map_or(0, Vec::len),
        }
    }
}

/// The updates of one transaction, in order.
pub type TxOps = Vec<Op>;

/// A deterministic reason why a transaction was not applied. The transaction had no effect.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ApplyError {
    /// A KVS on the path, or the key, does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The key to create already exists.
    #[error("already exists: {0}")]
    Exists(String),
    /// The KVS to destroy still has child KVSs.
    #[error("KVS not empty: {0}")]
    NotEmpty(String),
    /// A value was found where a KVS was expected, or the other way round.
    #[error("wrong type: {0}")]
    WrongType(String),
    /// The key does not fit the KVS class (Integer keys are 8 bytes).
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// An [`Op::Expect`] did not hold.
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// The transaction was bound to term `tx_term` but its entry was appended in `entry_term`.
    #[error("transaction of term {tx_term} reached the log in term {entry_term}")]
    StaleTerm {
        /// The term the transaction was begun in (the leadership it was bound to).
        tx_term: u64,
        /// The term of the log entry that carried it.
        entry_term: u64,
    },
}

/// Per-KVS metadata, one row in [`KVS`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KvsInfo {
    pub class: KeyClass,
    /// Number of child KVSs; a KVS can be destroyed only when this is zero.
    pub child_kvs: u64,
}

impl KvsInfo {
    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("KvsInfo encodes")
    }
    pub(crate) fn decode(b: &[u8]) -> Result<Self, redb::StorageError> {
        postcard::from_bytes(b).map_err(|e| corrupt(format!("KvsInfo: {e}")))
    }
}

/// What a key of a KVS holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    /// A plain value.
    Bytes(Vec<u8>),
    /// A child KVS of the given class.
    Kvs(KeyClass),
}

/// A stored entry value before the child KVS class is looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    Bytes(Vec<u8>),
    Kvs(u64),
}

impl Stored {
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Stored::Bytes(b) => {
                let mut v = Vec::with_capacity(b.len() + 1);
                v.push(TAG_BYTES);
                v.extend_from_slice(b);
                v
            }
            Stored::Kvs(id) => {
                let mut v = vec![TAG_KVS];
                v.extend_from_slice(&id.to_be_bytes());
                v
            }
        }
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, redb::StorageError> {
        match b.split_first() {
            Some((&TAG_BYTES, rest)) => Ok(Stored::Bytes(rest.to_vec())),
            Some((&TAG_KVS, rest)) => int_of_key(rest)
                .map(Stored::Kvs)
                .ok_or_else(|| corrupt("bad child id".into())),
            _ => Err(corrupt("bad entry tag".into())),
        }
    }
}

pub(crate) fn corrupt(msg: String) -> redb::StorageError {
    redb::StorageError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, msg))
}

fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
        _ => format!("0x{}", key.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    }
}

fn show_path(p: &Path) -> String {
    let mut s = String::from("/");
    s.push_str(&p.0.iter().map(|k| show_key(k)).collect::<Vec<_>>().join("/"));
    s
}

/// Read access to the tree, shared by queries (read transactions) and apply (the write
/// transaction plus an overlay).
pub(crate) trait TreeRead {
    fn entry(&self, kvs: u64, key: &[u8]) -> Result<Option<Stored>, redb::StorageError>;
    fn info(&self, kvs: u64) -> Result<Option<KvsInfo>, redb::StorageError>;

    /// Resolves a path to a KVS id and its info.
    fn resolve(&self, path: &Path) -> Result<Result<(u64, KvsInfo), ApplyError>, redb::StorageError> {
        let mut id = ROOT_ID;
        for (depth, key) in path.0.iter().enumerate() {
            match self.entry(id, key)? {
                Some(Stored::Kvs(child)) => id = child,
                Some(Stored::Bytes(_)) => {
                    let at = Path(path.0[..=depth].to_vec());
                    return Ok(Err(ApplyError::WrongType(format!(
                        "{} is a value, not a KVS",
                        show_path(&at)
                    ))));
                }
                None => {
                    let at = Path(path.0[..=depth].to_vec());
                    return Ok(Err(ApplyError::NotFound(format!("KVS {}", show_path(&at)))));
                }
            }
        }
        match self.info(id)? {
            Some(info) => Ok(Ok((id, info))),
            None => Err(corrupt(format!(
                "KVS {} (id {id}) has no info row",
                show_path(path)
            ))),
        }
    }
}

/// A committed-state view over any readable pair of tables.
pub(crate) struct Tables<E, K> {
    pub entries: E,
    pub kvs: K,
}

impl<E, K> TreeRead for Tables<E, K>
where
    E: ReadableTable<(u64, &'static [u8]), &'static [u8]>,
    K: ReadableTable<u64, &'static [u8]>,
{
    fn entry(&self, kvs: u64, key: &[u8]) -> Result<Option<Stored>, redb::StorageError> {
        match self.entries.get((kvs, key))? {
            Some(v) => Ok(Some(Stored::decode(v.value())?)),
            None => Ok(None),
        }
    }
    fn info(&self, kvs: u64) -> Result<Option<KvsInfo>, redb::StorageError> {
        match self.kvs.get(kvs)? {
            Some(v) => Ok(Some(KvsInfo::decode(v.value())?)),
            None => Ok(None),
        }
    }
}

/// Pending effects of one transaction, laid over the committed tables.
struct Overlay<'b, B: TreeRead> {
    base: &'b B,
    entries: BTreeMap<(u64, Vec<u8>), Option<Stored>>,
    infos: BTreeMap<u64, Option<KvsInfo>>,
    /// KVSs destroyed by this transaction whose values must be removed.
    destroyed: Vec<u64>,
    next_id: u64,
}

impl<B: TreeRead> TreeRead for Overlay<'_, B> {
    fn entry(&self, kvs: u64, key: &[u8]) -> Result<Option<Stored>, redb::StorageError> {
        match self.entries.get(&(kvs, key.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => self.base.entry(kvs, key),
        }
    }
    fn info(&self, kvs: u64) -> Result<Option<KvsInfo>, redb::StorageError> {
        match self.infos.get(&kvs) {
            Some(v) => Ok(v.clone()),
            None => self.base.info(kvs),
        }
    }
}

fn check_key(info: &KvsInfo, key: &[u8]) -> Result<(), ApplyError> {
    if info.class == KeyClass::Integer && key.len() != 8 {
        return Err(ApplyError::InvalidKey(format!(
            "Integer KVS keys are 8 bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

impl<B: TreeRead> Overlay<'_, B> {
    fn op(&mut self, op: &Op) -> Result<Result<(), ApplyError>, redb::StorageError> {
        // `?` on the outer layer propagates I/O errors; `try_det!` returns deterministic ones.
        macro_rules! try_det {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(e)),
                }
            };
        }
        match op {
            Op::CreateKvs { parent, key, class } => {
                let (pid, mut pinfo) = try_det!(self.resolve(parent)?);
                try_det!(check_key(&pinfo, key));
                if self.entry(pid, key)?.is_some() {
                    return Ok(Err(ApplyError::Exists(show_path(&parent.child(key.clone())))));
                }
                let id = self.next_id;
                self.next_id += 1;
                self.entries.insert((pid, key.clone()), Some(Stored::Kvs(id)));
                self.infos.insert(
                    id,
                    Some(KvsInfo {
                        class: *class,
                        child_kvs: 0,
                    }),
                );
                pinfo.child_kvs += 1;
                self.infos.insert(pid, Some(pinfo));
            }
            Op::DestroyKvs { parent, key } => {
                let (pid, mut pinfo) = try_det!(self.resolve(parent)?);
                let path = parent.child(key.clone());
                let child = match self.entry(pid, key)? {
                    Some(Stored::Kvs(c)) => c,
                    Some(Stored::Bytes(_)) => {
                        return Ok(Err(ApplyError::WrongType(format!(
                            "{} is a value",
                            show_path(&path)
                        ))))
                    }
                    None => return Ok(Err(ApplyError::NotFound(format!("KVS {}", show_path(&path))))),
                };
                let info = self
                    .info(child)?
                    .ok_or_else(|| corrupt(format!("KVS id {child} has no info")))?;
                if info.child_kvs > 0 {
                    return Ok(Err(ApplyError::NotEmpty(format!(
                        "{} has {} child KVS(s)",
                        show_path(&path),
                        info.child_kvs
                    ))));
                }
                self.entries.insert((pid, key.clone()), None);
                // Values written into the child by this same transaction die with it.
                self.entries.retain(|(k, _), _| *k != child);
                self.infos.insert(child, None);
                self.destroyed.push(child);
                pinfo.child_kvs -= 1;
                self.infos.insert(pid, Some(pinfo));
            }
            Op::Update { kvs, key, value, .. } => {
                let (id, info) = try_det!(self.resolve(kvs)?);
                try_det!(check_key(&info, key));
                if let Some(Stored::Kvs(_)) = self.entry(id, key)? {
                    return Ok(Err(ApplyError::WrongType(format!(
                        "{} is a KVS; destroy it instead of overwriting",
                        show_path(&kvs.child(key.clone()))
                    ))));
                }
                self.entries
                    .insert((id, key.clone()), Some(Stored::Bytes(value.clone())));
            }
            Op::Delete { kvs, key } => {
                let (id, _) = try_det!(self.resolve(kvs)?);
                let path = kvs.child(key.clone());
                match self.entry(id, key)? {
                    Some(Stored::Bytes(_)) => {
                        self.entries.insert((id, key.clone()), None);
                    }
                    Some(Stored::Kvs(_)) => {
                        return Ok(Err(ApplyError::WrongType(format!(
                            "{} is a KVS; use destroy",
                            show_path(&path)
                        ))))
                    }
                    None => return Ok(Err(ApplyError::NotFound(format!("key {}", show_path(&path))))),
                }
            }
            Op::Expect { kvs, key, value } => {
                let (id, _) = try_det!(self.resolve(kvs)?);
                let found = match self.entry(id, key)? {
                    Some(Stored::Bytes(b)) => Some(b),
                    Some(Stored::Kvs(_)) => {
                        return Ok(Err(ApplyError::WrongType(format!(
                            "{} is a KVS",
                            show_path(&kvs.child(key.clone()))
                        ))))
                    }
                    None => None,
                };
                if &found != value {
                    return Ok(Err(ApplyError::PreconditionFailed(format!(
                        "{} is {}",
                        show_path(&kvs.child(key.clone())),
                        if found.is_some() {
                            "present or different"
                        } else {
                            "absent"
                        }
                    ))));
                }
            }
        }
        Ok(Ok(()))
    }
}

/// The write side used by apply: the two tables open in a redb write transaction.
pub(crate) type WriteTables<'t> =
    Tables<redb::Table<'t, (u64, &'static [u8]), &'static [u8]>, redb::Table<'t, u64, &'static [u8]>>;

/// Applies one transaction atomically: all of `ops` or, on the first deterministic error,
/// nothing. `next_id` is the KVS id counter, advanced only if the transaction applies.
pub(crate) fn apply_tx(
    tables: &mut WriteTables<'_>,
    next_id: &mut u64,
    ops: &[Op],
) -> Result<Result<(), ApplyError>, redb::StorageError> {
    let mut ov = Overlay {
        base: &*tables,
        entries: BTreeMap::new(),
        infos: BTreeMap::new(),
        destroyed: vec![],
        next_id: *next_id,
    };
    for op in ops {
        if let Err(e) = ov.op(op)? {
            return Ok(Err(e));
        }
    }
    let Overlay {
        entries,
        infos,
        destroyed,
        next_id: new_next,
        ..
    } = ov;
    for id in destroyed {
        tables
            .entries
            .retain_in((id, &[][..])..(id + 1, &[][..]), |_, _| false)?;
    }
    for ((kvs, key), v) in entries {
        match v {
            Some(s) => {
                tables
                    .entries
                    .insert((kvs, key.as_slice()), s.encode().as_slice())?;
            }
            None => {
                tables.entries.remove((kvs, key.as_slice()))?;
            }
        }
    }
    for (id, info) in infos {
        match info {
            Some(i) => {
                tables.kvs.insert(id, i.encode().as_slice())?;
            }
            None => {
                tables.kvs.remove(id)?;
            }
        }
    }
    *next_id = new_next;
    Ok(Ok(()))
}

/// A bound on the `entries` table's `(kvs id, key)` keys.
pub(crate) type EntryBound<'a> = Bound<(u64, &'a [u8])>;

/// Range bounds over the entries of one KVS.
pub(crate) fn kvs_range<'a>(
    id: u64,
    start: Bound<&'a [u8]>,
    end: Bound<&'a [u8]>,
) -> (EntryBound<'a>, EntryBound<'a>) {
    let lo = match start {
        Bound::Included(k) => Bound::Included((id, k)),
        Bound::Excluded(k) => Bound::Excluded((id, k)),
        Bound::Unbounded => Bound::Included((id, &[][..])),
    };
    let hi = match end {
        Bound::Included(k) => Bound::Included((id, k)),
        Bound::Excluded(k) => Bound::Excluded((id, k)),
        Bound::Unbounded => Bound::Excluded((id + 1, &[][..])),
    };
    (lo, hi)
}
