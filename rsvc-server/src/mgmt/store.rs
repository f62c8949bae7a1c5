//! The management database's layout and its readers.

use super::*;

/// `/ranks`: rank → RankInfo.
pub(super) fn ranks() -> Path {
    Path::root().child("ranks")
}

/// `/instances`: `class/label` → InstanceInfo.
pub(super) fn instances() -> Path {
    Path::root().child("instances")
}

/// A storage failure as the service reports it.
pub(super) fn storage(e: impl std::fmt::Display) -> MgmtError {
    MgmtError::Storage(e.to_string())
}

/// Queues `info` as the directory entry `key` (`class/label`).
pub(super) fn put_instance(tx: &mut Tx, key: String, info: &InstanceInfo) -> Result<(), MgmtError> {
    tx.update(
        &instances(),
        key.into_bytes(),
        postcard::to_allocvec(info).map_err(storage)?,
    );
    Ok(())
}

/// The generation of the newest replica the directory recorded on `rank` (1 if none).
pub(super) fn gen_of(info: &InstanceInfo, rank: u32) -> u32 {
    info.gens.iter().find(|(r, _)| *r == rank).map_or(1, |(_, g)| *g)
}

impl MgmtInner {
    pub(super) async fn up_ranks(tx: &mut Tx) -> Result<Vec<RankInfo>, MgmtError> {
        let all = tx.iterate(&ranks(), .., usize::MAX).await.map_err(storage)?;
        let mut out = Vec::new();
        for (_, v) in all {
            if let rdb::Value::Bytes(b) = v {
                out.push(postcard::from_bytes::<RankInfo>(&b).map_err(storage)?);
            }
        }
        Ok(out)
    }

    /// The instance `class/label` and its directory key; `NotFound` if there is none.
    pub(super) async fn existing(
        tx: &mut Tx,
        class: &str,
        label: &str,
    ) -> Result<(String, InstanceInfo), MgmtError> {
        let key = format!("{class}/{label}");
        let info = Self::instance(tx, &key)
            .await?
            .ok_or_else(|| MgmtError::NotFound(named(class, label)))?;
        Ok((key, info))
    }

    pub(super) async fn instance(tx: &mut Tx, key: &str) -> Result<Option<InstanceInfo>, MgmtError> {
        match tx.lookup(&instances(), key.as_bytes()).await.map_err(storage)? {
            Some(b) => Ok(Some(postcard::from_bytes(&b).map_err(storage)?)),
            None => Ok(None),
        }
    }

    /// Every instance in the directory, of `class` only if given.
    pub(super) async fn list(tx: &mut Tx, class: Option<&str>) -> Result<MgmtResponse, MgmtError> {
        let all = tx.iterate(&instances(), .., usize::MAX).await.map_err(storage)?;
        let mut out = Vec::new();
        for (_, v) in all {
            if let rdb::Value::Bytes(b) = v {
                let i: InstanceInfo = postcard::from_bytes(&b).map_err(storage)?;
                if class.is_none_or(|c| c == i.class) {
                    out.push(i);
                }
            }
        }
        Ok(MgmtResponse::Instances(out))
    }

    /// The management service as an instance (see [`MgmtRequest::DescribeSelf`]).
    pub(super) async fn describe_self(ctx: &mut Ctx) -> Result<MgmtResponse, MgmtError> {
        let ranks = Self::up_ranks(&mut ctx.tx).await?;
        let mut voters = ctx.db.status().voters;
        voters.sort();
        let addr = |rank: u32| {
            ranks
                .iter()
                .find(|r| r.rank == rank)
                .map(|r| r.addr.clone())
                .unwrap_or_default()
        };
        Ok(MgmtResponse::Instance(InstanceInfo {
            class: MGMT_CLASS.into(),
            label: MGMT_INSTANCE.into(),
            db: ctx.db.ident().db.0,
            replicas: voters.iter().map(|v| (v.rank, addr(v.rank))).collect(),
            gens: voters.iter().map(|v| (v.rank, v.gen)).collect(),
        }))
    }
}
