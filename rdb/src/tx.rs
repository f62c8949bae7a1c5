//! Transactions: queries on committed state, queued updates, one commit.

use std::ops::{Bound, RangeBounds};

use redb::{ReadTransaction, ReadableDatabase};

use crate::db::{Committed, Db};
use crate::error::{Error, Result};
use crate::kv::{self, ApplyError, KeyClass, Op, Path, Stored, Tables, TreeRead, Value, ENTRIES, KVS};

/// A transaction bound to one leader term.
///
/// Queries read the committed state as of the first query (a ReadIndex round proves, once per
/// transaction, that this replica still leads and has applied everything committed before it).
/// They never see the transaction's own queued updates. Updates are queued and sent as one unit
/// by [`Tx::commit`]. Dropping a transaction discards it.
pub struct Tx {
    db: Db,
    term: u64,
    ops: Vec<Op>,
    read: Option<ReadTransaction>,
}

type ReadTables =
    Tables<redb::ReadOnlyTable<(u64, &'static [u8]), &'static [u8]>, redb::ReadOnlyTable<u64, &'static [u8]>>;

fn det<T>(r: std::result::Result<T, ApplyError>) -> Result<T> {
    r.map_err(Error::Apply)
}

impl Tx {
    pub(crate) fn new(db: Db, term: u64) -> Self {
        Tx {
            db,
            term,
            ops: Vec::new(),
            read: None,
        }
    }

    /// The term this transaction is bound to.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// The updates queued so far.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    async fn tables(&mut self) -> Result<ReadTables> {
        if self.read.is_none() {
            self.db.ensure_linearizable(self.term).await?;
            self.read = Some(self.db.sm_database()?.begin_read()?);
        }
        let r = self.read.as_ref().expect("just set");
        Ok(Tables {
            entries: r.open_table(ENTRIES)?,
            kvs: r.open_table(KVS)?,
        })
    }

    async fn resolve(&mut self, path: &Path) -> Result<(ReadTables, u64, KeyClass)> {
        let t = self.tables().await?;
        let (id, info) = det(t.resolve(path)?)?;
        Ok((t, id, info.class))
    }

    fn value(t: &ReadTables, stored: Stored) -> Result<Value> {
        Ok(match stored {
            Stored::Bytes(b) => Value::Bytes(b),
            Stored::Kvs(id) => {
                let info = t
                    .info(id)?
                    .ok_or_else(|| Error::Storage(format!("KVS id {id} has no info")))?;
                Value::Kvs(info.class)
            }
        })
    }

    /// What `key` of the KVS at `kvs` holds, if anything.
    pub async fn get(&mut self, kvs: &Path, key: &[u8]) -> Result<Option<Value>> {
        let (t, id, _) = self.resolve(kvs).await?;
        match t.entry(id, key)? {
            Some(s) => Ok(Some(Self::value(&t, s)?)),
            None => Ok(None),
        }
    }

    /// The value of `key` in the KVS at `kvs`. A child KVS there is a `WrongType` error.
    pub async fn lookup(&mut self, kvs: &Path, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.get(kvs, key).await? {
            None => Ok(None),
            Some(Value::Bytes(b)) => Ok(Some(b)),
            Some(Value::Kvs(_)) => Err(Error::Apply(ApplyError::WrongType(
                "key holds a KVS, not a value".into(),
            ))),
        }
    }

    /// The class of the KVS at `path`; `NotFound` if there is none.
    pub async fn kvs_class(&mut self, path: &Path) -> Result<KeyClass> {
        Ok(self.resolve(path).await?.2)
    }

    /// Up to `limit` entries of the KVS at `kvs` with keys in `range`, in key order.
    pub async fn iterate(
        &mut self,
        kvs: &Path,
        range: impl RangeBounds<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Value)>> {
        let (t, id, _) = self.resolve(kvs).await?;
        let start = range.start_bound().map(|k| k.as_slice());
        let end = range.end_bound().map(|k| k.as_slice());
        let mut out = Vec::new();
        for item in t.entries.range(kv::kvs_range(id, start, end))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let key = k.value().1.to_vec();
            out.push((key, Self::value(&t, Stored::decode(v.value())?)?));
        }
        Ok(out)
    }

    /// The entry with the smallest key.
    pub async fn fetch_first(&mut self, kvs: &Path) -> Result<Option<(Vec<u8>, Value)>> {
        Ok(self.iterate(kvs, .., 1).await?.pop())
    }

    /// The entry with the smallest key above `after`.
    pub async fn fetch_next(&mut self, kvs: &Path, after: &[u8]) -> Result<Option<(Vec<u8>, Value)>> {
        Ok(self
            .iterate(kvs, (Bound::Excluded(after.to_vec()), Bound::Unbounded), 1)
            .await?
            .pop())
    }

    /// The entry with the largest key.
    pub async fn fetch_last(&mut self, kvs: &Path) -> Result<Option<(Vec<u8>, Value)>> {
        let (t, id, _) = self.resolve(kvs).await?;
        let mut it = t
            .entries
            .range(kv::kvs_range(id, Bound::Unbounded, Bound::Unbounded))?;
        match it.next_back() {
            Some(item) => {
                let (k, v) = item?;
                let key = k.value().1.to_vec();
                Ok(Some((key, Self::value(&t, Stored::decode(v.value())?)?)))
            }
            None => Ok(None),
        }
    }

    /// The largest key of an Integer KVS, as a number.
    pub async fn max_key(&mut self, kvs: &Path) -> Result<Option<u64>> {
        match self.fetch_last(kvs).await? {
            None => Ok(None),
            Some((k, _)) => kv::int_of_key(&k)
                .map(Some)
                .ok_or_else(|| Error::Apply(ApplyError::InvalidKey("max_key needs an Integer KVS".into()))),
        }
    }

    /// Queues creation of the child KVS `key` of `parent`.
    pub fn create_kvs(&mut self, parent: &Path, key: impl Into<Vec<u8>>, class: KeyClass) -> &mut Self {
        self.ops.push(Op::CreateKvs {
            parent: parent.clone(),
            key: key.into(),
            class,
        });
        self
    }

    /// Queues destruction of the child KVS `key` of `parent` (it must have no child KVSs).
    pub fn destroy_kvs(&mut self, parent: &Path, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::DestroyKvs {
            parent: parent.clone(),
            key: key.into(),
        });
        self
    }

    /// Queues `kvs[key] = value`.
    pub fn update(&mut self, kvs: &Path, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Update {
            kvs: kvs.clone(),
            key: key.into(),
            value: value.into(),
            critical: false,
        });
        self
    }

    /// Queues `kvs[key] = value`, allowed even when space is low. Keep these small.
    pub fn update_critical(
        &mut self,
        kvs: &Path,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(Op::Update {
            kvs: kvs.clone(),
            key: key.into(),
            value: value.into(),
            critical: true,
        });
        self
    }

    /// Queues removal of `key` (which must exist) from `kvs`.
    pub fn delete(&mut self, kvs: &Path, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete {
            kvs: kvs.clone(),
            key: key.into(),
        });
        self
    }

    /// Queues a precondition: at commit, `kvs[key]` must equal `value` (`None`: be absent),
    /// or the whole transaction fails with `PreconditionFailed` and has no effect.
    pub fn expect(&mut self, kvs: &Path, key: impl Into<Vec<u8>>, value: Option<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Expect {
            kvs: kvs.clone(),
            key: key.into(),
            value,
        });
        self
    }

    /// Commits the queued updates as one unit in this transaction's term and waits until they
    /// are applied. A transaction with no updates commits nothing and returns `Ok(None)`.
    ///
    /// Errors: `NotLeader` (nothing was appended, or the entry was appended but not by the
    /// leader of this term), `NoSpace` (nothing was appended), `Apply` (appended, applied, and
    /// failed deterministically: no effect), `Stopped`.
    pub async fn commit(mut self) -> Result<Option<Committed>> {
        self.read = None;
        if self.ops.is_empty() {
            return Ok(None);
        }
        let ops = std::mem::take(&mut self.ops);
        match self.db.commit_ops(self.term, ops).await {
            Ok(c) => Ok(Some(c)),
            Err(Error::Apply(ApplyError::StaleTerm { .. })) => Err(self.db.not_leader()),
            Err(e) => Err(e),
        }
    }
}
