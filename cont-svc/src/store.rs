//! Containers in the pool's rdb: layout and handlers. See the crate docs for the layout.
//!
//! Every handler reads committed state through `tx` and queues its updates into it. Where it
//! reads and then writes a counter (OIDs, snapshot epochs), it adds a precondition on what it
//! read, so two concurrent requests cannot both succeed with the same value. The loser's
//! commit fails with nothing applied, and its client retries.

use rdb::{int_key, int_of_key, KeyClass, Path, Tx, Value};
use serde::{Deserialize, Serialize};

use crate::api::{ContError, ContInfo, ContRequest, ContResponse, ContState, Handle};

/// Where containers live in the pool's KVS tree.
pub fn conts() -> Path {
    Path::root().child("conts")
}

fn cont(label: &str) -> Path {
    conts().child(label)
}

/// Per-container metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContMeta {
    /// The container's uuid.
    pub uuid: Handle,
    /// Life-cycle state.
    pub state: ContState,
    /// Next object id to hand out.
    pub next_oid: u64,
    /// Creation time on the leader, ms since the epoch.
    pub created_ms: u64,
}

/// The plain values of an iteration as UTF-8 (lossy) name/value pairs; child KVSs are skipped.
pub fn string_pairs(entries: Vec<(Vec<u8>, Value)>) -> Vec<(String, String)> {
    entries
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::Bytes(b) => Some((
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&b).into_owned(),
            )),
            Value::Kvs(_) => None,
        })
        .collect()
}

fn storage(e: impl std::fmt::Display) -> ContError {
    ContError::Storage(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, ContError> {
    postcard::to_allocvec(v).map_err(storage)
}

/// Queues creation of the containers KVS (pool bootstrap).
pub fn bootstrap(tx: &mut Tx) {
    tx.create_kvs(&Path::root(), "conts", KeyClass::Lexical);
}

fn valid_label(label: &str) -> Result<(), ContError> {
    let ok = !label.is_empty()
        && label.len() <= 127
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ContError::Invalid(format!(
            "container label {label:?} must be 1-127 of [A-Za-z0-9._-]"
        )))
    }
}

async fn meta_raw(tx: &mut Tx, label: &str) -> Result<Option<Vec<u8>>, ContError> {
    match tx.get(&conts(), label.as_bytes()).await.map_err(storage)? {
        None => Ok(None),
        Some(_) => tx.lookup(&cont(label), b"meta").await.map_err(storage),
    }
}

async fn meta(tx: &mut Tx, label: &str) -> Result<(ContMeta, Vec<u8>), ContError> {
    let raw = meta_raw(tx, label)
        .await?
        .ok_or_else(|| ContError::NotFound(label.to_string()))?;
    Ok((postcard::from_bytes(&raw).map_err(storage)?, raw))
}

/// Metadata of a usable (not Destroying) container.
async fn live_meta(tx: &mut Tx, label: &str) -> Result<(ContMeta, Vec<u8>), ContError> {
    let (m, raw) = meta(tx, label).await?;
    if m.state == ContState::Destroying {
        return Err(ContError::Destroying(label.to_string()));
    }
    Ok((m, raw))
}

/// The container property naming its owner (a user), set at create to the creator.
pub const OWNER_PROP: &str = "owner";
/// The container property naming its owner group, set at create to the creator's first group.
pub const GROUP_PROP: &str = "owner_group";
/// The container property holding its ACL (DAOS syntax, see `rsvc_server::acl`).
pub const ACL_PROP: &str = "acl";

/// A container's owner, owner group and ACL text as its properties hold them (empty where
/// unset).
pub async fn access_props(tx: &mut Tx, label: &str) -> Result<(String, String, Option<String>), ContError> {
    meta(tx, label).await?;
    let props = cont(label).child("props");
    let owner = lookup_string(tx, &props, OWNER_PROP).await?;
    let group = lookup_string(tx, &props, GROUP_PROP).await?;
    let acl = tx.lookup(&props, ACL_PROP.as_bytes()).await.map_err(storage)?;
    Ok((
        owner.unwrap_or_default(),
        group.unwrap_or_default(),
        acl.map(|b| String::from_utf8_lossy(&b).into_owned()),
    ))
}

async fn lookup_string(tx: &mut Tx, path: &Path, name: &str) -> Result<Option<String>, ContError> {
    Ok(tx
        .lookup(path, name.as_bytes())
        .await
        .map_err(storage)?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// The label of the container that container handle `h`, opened under `pool_handle`,
/// belongs to.
pub async fn label_of(tx: &mut Tx, h: &Handle, pool_handle: &Handle) -> Result<String, ContError> {
    by_handle(tx, h, pool_handle).await
}

/// Finds the container a container handle belongs to. A container handle is tied to the pool
/// handle it was opened under: under any other, it is no handle.
async fn by_handle(tx: &mut Tx, h: &Handle, pool_handle: &Handle) -> Result<String, ContError> {
    for (label, _) in tx.iterate(&conts(), .., usize::MAX).await.map_err(storage)? {
        let label = String::from_utf8_lossy(&label).into_owned();
        if let Some(owner) = tx
            .lookup(&cont(&label).child("handles"), h)
            .await
            .map_err(storage)?
        {
            if owner.as_slice() != pool_handle.as_slice() {
                return Err(ContError::NoHandle);
            }
            return Ok(label);
        }
    }
    Err(ContError::NoHandle)
}

async fn info(tx: &mut Tx, label: &str) -> Result<ContInfo, ContError> {
    let (m, _) = meta(tx, label).await?;
    let handles = tx
        .iterate(&cont(label).child("handles"), .., usize::MAX)
        .await
        .map_err(storage)?
        .len() as u64;
    let snapshots = tx
        .iterate(&cont(label).child("snaps"), .., usize::MAX)
        .await
        .map_err(storage)?
        .len() as u64;
    Ok(ContInfo {
        label: label.to_string(),
        uuid: m.uuid,
        state: m.state,
        handles,
        snapshots,
        next_oid: m.next_oid,
    })
}

/// Closes every container handle opened under `pool_handle` (queued into `tx`); returns how
/// many. Called when a pool handle disconnects or is evicted.
pub async fn close_handles_of(tx: &mut Tx, pool_handle: &Handle) -> Result<u64, ContError> {
    let mut n = 0;
    for (label, _) in tx.iterate(&conts(), .., usize::MAX).await.map_err(storage)? {
        let hk = conts().child(label.clone()).child("handles");
        for (h, v) in tx.iterate(&hk, .., usize::MAX).await.map_err(storage)? {
            if v == Value::Bytes(pool_handle.to_vec()) {
                tx.delete(&hk, h);
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Phase one of destroy, as its own transaction: mark Destroying and close every handle.
pub async fn destroy_phase1(tx: &mut Tx, label: &str, force: bool) -> Result<bool, ContError> {
    let (mut m, raw) = meta(tx, label).await?;
    if m.state == ContState::Destroying {
        return Ok(false); // an earlier attempt got this far
    }
    let hk = cont(label).child("handles");
    let open = tx.iterate(&hk, .., usize::MAX).await.map_err(storage)?;
    if !open.is_empty() && !force {
        return Err(ContError::Busy(label.to_string(), open.len() as u64));
    }
    for (h, _) in open {
        tx.delete(&hk, h);
    }
    m.state = ContState::Destroying;
    tx.expect(&cont(label), b"meta".to_vec(), Some(raw));
    tx.update_critical(&cont(label), b"meta".to_vec(), encode(&m)?);
    Ok(true)
}

/// Phase two of destroy: remove the container's KVSs, children first.
pub async fn destroy_phase2(tx: &mut Tx, label: &str) -> Result<(), ContError> {
    let (m, _) = meta(tx, label).await?;
    if m.state != ContState::Destroying {
        return Err(ContError::Invalid(format!(
            "container {label:?} is not being destroyed"
        )));
    }
    let c = cont(label);
    for child in ["props", "attrs", "snaps", "handles"] {
        tx.destroy_kvs(&c, child);
    }
    tx.destroy_kvs(&conts(), label);
    Ok(())
}

/// Handles one container request under an already validated pool handle. `Destroy` is
/// handled by the caller with the two phase functions.
pub async fn handle(
    tx: &mut Tx,
    pool_handle: &Handle,
    now_ms: u64,
    req: ContRequest,
) -> Result<ContResponse, ContError> {
    match req {
        ContRequest::Create { label, props } => {
            valid_label(&label)?;
            if tx
                .get(&conts(), label.as_bytes())
                .await
                .map_err(storage)?
                .is_some()
            {
                return Err(ContError::Exists(label));
            }
            let c = cont(&label);
            tx.create_kvs(&conts(), label.clone(), KeyClass::Lexical);
            let m = ContMeta {
                uuid: rand::random(),
                state: ContState::Normal,
                next_oid: 1,
                created_ms: now_ms,
            };
            tx.update(&c, b"meta".to_vec(), encode(&m)?);
            tx.create_kvs(&c, "props", KeyClass::Lexical);
            for (k, v) in props {
                tx.update(&c.child("props"), k.into_bytes(), v.into_bytes());
            }
            tx.create_kvs(&c, "attrs", KeyClass::Lexical);
            tx.create_kvs(&c, "snaps", KeyClass::Integer);
            tx.create_kvs(&c, "handles", KeyClass::Lexical);
            Ok(ContResponse::Ok)
        }
        ContRequest::Open { label } => {
            live_meta(tx, &label).await?;
            let h: Handle = rand::random();
            tx.update(&cont(&label).child("handles"), h.to_vec(), pool_handle.to_vec());
            Ok(ContResponse::Opened { cont_handle: h })
        }
        ContRequest::Close { cont_handle } => {
            let label = by_handle(tx, &cont_handle, pool_handle).await?;
            tx.delete(&cont(&label).child("handles"), cont_handle.to_vec());
            Ok(ContResponse::Ok)
        }
        ContRequest::Destroy { .. } => Err(ContError::Invalid(
            "destroy is two-phase; the pool service runs it".into(),
        )),
        ContRequest::List => {
            let mut out = Vec::new();
            for (label, _) in tx.iterate(&conts(), .., usize::MAX).await.map_err(storage)? {
                out.push(info(tx, &String::from_utf8_lossy(&label)).await?);
            }
            Ok(ContResponse::List(out))
        }
        ContRequest::Query { label } => Ok(ContResponse::Info(info(tx, &label).await?)),
        ContRequest::PropGet { label } => {
            live_meta(tx, &label).await?;
            let all = tx
                .iterate(&cont(&label).child("props"), .., usize::MAX)
                .await
                .map_err(storage)?;
            Ok(ContResponse::Props(string_pairs(all)))
        }
        ContRequest::PropSet { label, name, value } => {
            live_meta(tx, &label).await?;
            tx.update(
                &cont(&label).child("props"),
                name.into_bytes(),
                value.into_bytes(),
            );
            Ok(ContResponse::Ok)
        }
        ContRequest::AttrSet { label, name, value } => {
            live_meta(tx, &label).await?;
            tx.update(&cont(&label).child("attrs"), name.into_bytes(), value);
            Ok(ContResponse::Ok)
        }
        ContRequest::AttrGet { label, name } => {
            live_meta(tx, &label).await?;
            Ok(ContResponse::Attr(
                tx.lookup(&cont(&label).child("attrs"), name.as_bytes())
                    .await
                    .map_err(storage)?,
            ))
        }
        ContRequest::AttrList { label } => {
            live_meta(tx, &label).await?;
            let all = tx
                .iterate(&cont(&label).child("attrs"), .., usize::MAX)
                .await
                .map_err(storage)?;
            Ok(ContResponse::Names(
                all.into_iter()
                    .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                    .collect(),
            ))
        }
        ContRequest::AttrDel { label, name } => {
            live_meta(tx, &label).await?;
            tx.delete(&cont(&label).child("attrs"), name.into_bytes());
            Ok(ContResponse::Ok)
        }
        ContRequest::SnapCreate { cont_handle } => {
            let label = by_handle(tx, &cont_handle, pool_handle).await?;
            live_meta(tx, &label).await?;
            let snaps = cont(&label).child("snaps");
            // Epochs increase strictly: at least the time now, above the newest snapshot.
            let last = tx.max_key(&snaps).await.map_err(storage)?;
            let epoch = last.map_or(now_ms, |l| l.max(now_ms - 1) + 1);
            tx.expect(&snaps, int_key(epoch), None);
            tx.update(&snaps, int_key(epoch), now_ms.to_be_bytes().to_vec());
            Ok(ContResponse::Epoch(epoch))
        }
        ContRequest::SnapList { label } => {
            meta(tx, &label).await?;
            let all = tx
                .iterate(&cont(&label).child("snaps"), .., usize::MAX)
                .await
                .map_err(storage)?;
            Ok(ContResponse::Epochs(
                all.into_iter().filter_map(|(k, _)| int_of_key(&k)).collect(),
            ))
        }
        ContRequest::SnapDestroy { label, epoch } => {
            live_meta(tx, &label).await?;
            let snaps = cont(&label).child("snaps");
            if tx
                .lookup(&snaps, &int_key(epoch))
                .await
                .map_err(storage)?
                .is_none()
            {
                return Err(ContError::NoSnapshot(epoch));
            }
            tx.delete(&snaps, int_key(epoch));
            Ok(ContResponse::Ok)
        }
        ContRequest::OidAlloc { cont_handle, count } => {
            if count == 0 || count > 1 << 40 {
                return Err(ContError::Invalid(format!("cannot allocate {count} object ids")));
            }
            let label = by_handle(tx, &cont_handle, pool_handle).await?;
            let (mut m, raw) = live_meta(tx, &label).await?;
            let start = m.next_oid;
            m.next_oid = start
                .checked_add(count)
                .ok_or_else(|| ContError::Invalid("object ids exhausted".into()))?;
            tx.expect(&cont(&label), b"meta".to_vec(), Some(raw));
            tx.update(&cont(&label), b"meta".to_vec(), encode(&m)?);
            Ok(ContResponse::Oids { start, count })
        }
    }
}
