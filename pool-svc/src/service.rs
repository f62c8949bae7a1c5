//! The pool service: a `ReplicatedService` whose rdb also holds the pool's containers.
//!
//! LAYOUT: `/props`, `/attrs`, `/handles` (handle → HandleRec), `/conts` (see cont-svc).
//!
//! HANDLE LEASES (Mooncake client liveness, etcd lease semantics). A handle is persisted when
//! it connects; its lease lives only in the leader's memory. The client renews it, and renewals
//! are not replicated. A background task on the leader evicts handles whose lease ran out, in a
//! transaction that also closes their container handles. On step-up, a new leader gives every
//! persisted handle a fresh full lease, so a failover evicts nobody. A client that misses its
//! renewals loses its handle and gets `NoHandle`; `PoolClient` then reconnects by itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use cont_svc::api::Handle;
use cont_svc::store as cstore;
use cont_svc::ContRequest;
use rdb::{Db, KeyClass, Path, Tx, Value};
use rsvc_server::{Ctx, LeaderTasks, ReplicatedService, ServiceError, StepUp};
use serde::{Deserialize, Serialize};

use rsvc_server::acl::{Acl, Rights};

use crate::access::{self, Access, Grant};
use crate::api::{AttrOp, HandleInfo, PoolApi, PoolError, PoolInfo, PoolRequest, PoolResponse};

/// The most ops one [`PoolRequest::AttrTxn`] may carry: one transaction is one log entry.
pub const MAX_TXN_OPS: usize = 1024;

/// Shortest and longest lease a client may ask for.
pub const TTL_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3600));

fn props() -> Path {
    Path::root().child("props")
}
fn attrs() -> Path {
    Path::root().child("attrs")
}
fn handles() -> Path {
    Path::root().child("handles")
}

/// A persisted pool handle.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct HandleRec {
    client: String,
    ttl_ms: u64,
    /// Who connected and what it was granted.
    grant: Grant,
}

/// A handle as persisted before grants: full rights, usable by anyone holding it.
#[derive(Deserialize)]
struct HandleRecV0 {
    client: String,
    ttl_ms: u64,
}

impl HandleRec {
    fn decode(b: &[u8]) -> Result<HandleRec, PoolError> {
        match postcard::from_bytes::<HandleRec>(b) {
            Ok(r) => Ok(r),
            Err(e) => match postcard::from_bytes::<HandleRecV0>(b) {
                Ok(v0) => Ok(HandleRec {
                    client: v0.client,
                    ttl_ms: v0.ttl_ms,
                    grant: Grant {
                        user: String::new(),
                        groups: Vec::new(),
                        rights: Rights::ALL,
                    },
                }),
                Err(_) => Err(storage(e)),
            },
        }
    }
}

fn storage(e: impl std::fmt::Display) -> PoolError {
    PoolError::Storage(e.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Leader-only lease table: handle → (deadline, ttl).
type Leases = Arc<Mutex<HashMap<Handle, (Instant, Duration)>>>;

/// One pool's service value.
pub struct PoolService {
    label: String,
    leases: Leases,
}

impl PoolService {
    /// The service for pool `label`.
    pub fn new(label: &str) -> Self {
        PoolService {
            label: label.to_string(),
            leases: Arc::default(),
        }
    }

    fn lease_ok(&self, h: &Handle) -> bool {
        self.leases
            .lock()
            .expect("lock")
            .get(h)
            .is_some_and(|(d, _)| Instant::now() < *d)
    }

    async fn check_handle(&self, tx: &mut Tx, h: &Handle) -> Result<HandleRec, PoolError> {
        let rec = tx
            .lookup(&handles(), h)
            .await
            .map_err(storage)?
            .ok_or(PoolError::NoHandle)?;
        if !self.lease_ok(h) {
            return Err(PoolError::NoHandle);
        }
        HandleRec::decode(&rec)
    }

    async fn all_handles(tx: &mut Tx) -> Result<Vec<(Handle, HandleRec)>, PoolError> {
        let mut out = Vec::new();
        for (k, v) in tx.iterate(&handles(), .., usize::MAX).await.map_err(storage)? {
            if let (Ok(h), Value::Bytes(b)) = (<Handle>::try_from(k.as_slice()), v) {
                out.push((h, HandleRec::decode(&b)?));
            }
        }
        Ok(out)
    }

    /// Queues removal of `h` and of the container handles opened under it.
    async fn drop_handle(tx: &mut Tx, h: &Handle) -> Result<(), PoolError> {
        tx.delete(&handles(), h.to_vec());
        cstore::close_handles_of(tx, h).await.map_err(PoolError::Cont)?;
        Ok(())
    }

    /// Re-checks every open handle against the access properties about to be set (in the
    /// same transaction): a handle whose principal may no longer read is closed, one that lost
    /// write keeps read only.
    async fn regrant(&self, tx: &mut Tx, after: &Access) -> Result<(), PoolError> {
        let mut closed = Vec::new();
        for (h, mut rec) in Self::all_handles(tx).await? {
            let now = rec.grant.under(after);
            if now == rec.grant.rights {
                continue;
            }
            if !now.read {
                Self::drop_handle(tx, &h).await?;
                closed.push(h);
            } else {
                // Only if it is still there as read: a concurrent disconnect must not be undone.
                let raw = tx.lookup(&handles(), &h).await.map_err(storage)?;
                tx.expect(&handles(), h.to_vec(), raw);
                rec.grant.rights = now;
                tx.update(
                    &handles(),
                    h.to_vec(),
                    postcard::to_allocvec(&rec).map_err(storage)?,
                );
            }
        }
        if !closed.is_empty() {
            tracing::info!(pool = %self.label, closed = closed.len(), "closed handles that lost their rights");
            let mut l = self.leases.lock().expect("lock");
            for h in &closed {
                l.remove(h);
            }
        }
        Ok(())
    }

    /// One pass of the evictor: removes handles whose lease ran out.
    async fn evict_expired(db: &Db, term: u64, leases: &Leases) -> Result<usize, rdb::Error> {
        let expired: Vec<Handle> = {
            let l = leases.lock().expect("lock");
            let now = Instant::now();
            l.iter()
                .filter(|(_, (d, _))| now >= *d)
                .map(|(h, _)| *h)
                .collect()
        };
        if expired.is_empty() {
            return Ok(0);
        }
        let mut tx = db.begin(Some(term))?;
        let mut n = 0;
        for h in &expired {
            if tx.lookup(&handles(), h).await?.is_some() {
                Self::drop_handle(&mut tx, h)
                    .await
                    .map_err(|e| rdb::Error::Invalid(e.to_string()))?;
                n += 1;
            }
        }
        tx.commit().await?;
        let mut l = leases.lock().expect("lock");
        for h in &expired {
            if l.get(h).is_some_and(|(d, _)| Instant::now() >= *d) {
                l.remove(h);
            }
        }
        Ok(n)
    }
}

#[async_trait]
impl ReplicatedService for PoolService {
    type Api = PoolApi;

    async fn bootstrap(&self, tx: &mut Tx) -> Result<(), ServiceError> {
        let root = Path::root();
        tx.create_kvs(&root, "props", KeyClass::Lexical);
        tx.create_kvs(&root, "attrs", KeyClass::Lexical);
        tx.create_kvs(&root, "handles", KeyClass::Lexical);
        let acl = Acl::default_pool().to_string();
        for (k, v) in [
            ("label", self.label.as_str()),
            (access::OWNER_PROP, access::DEFAULT_OWNER),
            (access::GROUP_PROP, access::DEFAULT_GROUP),
            (access::ACL_PROP, acl.as_str()),
            ("redun_fac", "1"),
            ("map_version", "1"),
        ] {
            tx.update(&props(), k, v);
        }
        cstore::bootstrap(tx);
        Ok(())
    }

    async fn step_up(&self, db: &Db, term: u64) -> Result<StepUp, ServiceError> {
        // Every persisted handle gets a fresh full lease: a failover evicts nobody.
        let mut tx = db.begin(Some(term))?;
        let all = Self::all_handles(&mut tx).await.map_err(|e| e.to_string())?;
        {
            let mut l = self.leases.lock().expect("lock");
            l.clear();
            let now = Instant::now();
            for (h, rec) in &all {
                let ttl = Duration::from_millis(rec.ttl_ms);
                l.insert(*h, (now + ttl, ttl));
            }
        }
        tracing::info!(pool = %self.label, term, handles = all.len(), "pool service up; leases renewed");
        Ok(StepUp::Up)
    }

    fn leader_tasks(&self, db: &Db, term: u64, tasks: &mut LeaderTasks) {
        let (db, leases, label) = (db.clone(), self.leases.clone(), self.label.clone());
        tasks.every("evictor", TTL_RANGE.0 / 2, move || {
            let (db, leases, label) = (db.clone(), leases.clone(), label.clone());
            async move {
                match Self::evict_expired(&db, term, &leases).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(pool = %label, evicted = n, "evicted handles whose lease expired")
                    }
                    Err(e) => tracing::debug!(pool = %label, cause = %e, "eviction pass failed"),
                }
            }
        });
    }

    async fn step_down(&self, _term: u64) {
        self.leases.lock().expect("lock").clear();
    }

    async fn handle(&self, ctx: &mut Ctx, req: PoolRequest) -> Result<PoolResponse, PoolError> {
        let caller = ctx.caller.clone();
        let tx = &mut ctx.tx;
        // Without TLS nobody is authenticated: skip the reads the checks would need.
        // The pool's access properties, read once for the requests checked against them.
        let checked = match access::pool_need(&req) {
            Some((need, what)) if caller.authenticated => {
                let a = access::pool_access(tx, &props()).await?;
                let rights = a.rights(&caller);
                access::need(&caller, rights, need, what)?;
                Some((a, rights))
            }
            _ => None,
        };
        let granted = checked.as_ref().map_or(Rights::ALL, |(_, r)| *r);
        match req {
            PoolRequest::Connect { client, ttl_ms } => {
                let ttl = Duration::from_millis(ttl_ms);
                if ttl < TTL_RANGE.0 || ttl > TTL_RANGE.1 {
                    return Err(PoolError::Invalid(format!(
                        "lease of {ttl_ms} ms is outside {TTL_RANGE:?}"
                    )));
                }
                let h: Handle = rand::random();
                let rec = HandleRec {
                    client,
                    ttl_ms,
                    grant: Grant::of(&caller, granted),
                };
                tx.update(
                    &handles(),
                    h.to_vec(),
                    postcard::to_allocvec(&rec).map_err(storage)?,
                );
                // NB: the lease starts now; if the commit fails, the orphan lease expires and the
                // evictor finds no handle to remove.
                self.leases
                    .lock()
                    .expect("lock")
                    .insert(h, (Instant::now() + ttl, ttl));
                Ok(PoolResponse::Connected { handle: h, ttl_ms })
            }
            PoolRequest::Disconnect { handle } => {
                let rec = tx
                    .lookup(&handles(), &handle)
                    .await
                    .map_err(storage)?
                    .ok_or(PoolError::NoHandle)?;
                // Another principal's handle is no handle of the caller's.
                if !HandleRec::decode(&rec)?.grant.usable_by(&caller) && !caller.admin {
                    return Err(PoolError::NoHandle);
                }
                Self::drop_handle(tx, &handle).await?;
                self.leases.lock().expect("lock").remove(&handle);
                Ok(PoolResponse::Ok)
            }
            PoolRequest::Renew { handle } => {
                if caller.authenticated {
                    let rec = tx.lookup(&handles(), &handle).await.map_err(storage)?;
                    let rec = rec.ok_or(PoolError::NoHandle)?;
                    if !HandleRec::decode(&rec)?.grant.usable_by(&caller) {
                        return Err(PoolError::NoHandle);
                    }
                }
                let mut l = self.leases.lock().expect("lock");
                match l.get_mut(&handle) {
                    Some((deadline, ttl)) if Instant::now() < *deadline => {
                        *deadline = Instant::now() + *ttl;
                        Ok(PoolResponse::Ok)
                    }
                    _ => Err(PoolError::NoHandle),
                }
            }
            PoolRequest::Query => {
                let label = tx
                    .lookup(&props(), b"label")
                    .await
                    .map_err(storage)?
                    .unwrap_or_default();
                let mv = tx
                    .lookup(&props(), b"map_version")
                    .await
                    .map_err(storage)?
                    .unwrap_or_default();
                let handles_n = tx
                    .iterate(&handles(), .., usize::MAX)
                    .await
                    .map_err(storage)?
                    .len() as u64;
                let conts_n = tx
                    .iterate(&cstore::conts(), .., usize::MAX)
                    .await
                    .map_err(storage)?
                    .len() as u64;
                let mut replicas: Vec<u32> = ctx.db.status().voters.iter().map(|r| r.rank).collect();
                replicas.sort_unstable();
                Ok(PoolResponse::Info(PoolInfo {
                    label: String::from_utf8_lossy(&label).into_owned(),
                    replicas,
                    leader: ctx.db.ident().replica.rank,
                    term: ctx.term,
                    handles: handles_n,
                    containers: conts_n,
                    map_version: String::from_utf8_lossy(&mv).parse().unwrap_or(0),
                }))
            }
            PoolRequest::PropGet => {
                let all = tx.iterate(&props(), .., usize::MAX).await.map_err(storage)?;
                Ok(PoolResponse::Props(cstore::string_pairs(all)))
            }
            PoolRequest::PropSet { name, value } => {
                if name == "map_version" {
                    return Err(PoolError::Invalid(
                        "map_version is maintained by the service".into(),
                    ));
                }
                let before = access::pool_access(tx, &props()).await?;
                if !before.owned_by(&caller) {
                    return Err(PoolError::Denied(format!(
                        "{caller} may not set pool properties: that needs the pool's owner ({:?}) or an admin",
                        before.owner
                    )));
                }
                if access::is_access_prop(&name) {
                    let mut after = before.clone();
                    match name.as_str() {
                        access::OWNER_PROP => after.owner = value.clone(),
                        access::GROUP_PROP => after.group = value.clone(),
                        _ => after.acl = access::parse_acl(&value)?,
                    }
                    self.regrant(tx, &after).await?;
                }
                let mv = tx.lookup(&props(), b"map_version").await.map_err(storage)?;
                let next = mv
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).parse::<u64>().unwrap_or(0))
                    .unwrap_or(0)
                    + 1;
                tx.expect(&props(), b"map_version".to_vec(), mv);
                tx.update(&props(), b"map_version".to_vec(), next.to_string().into_bytes());
                tx.update(&props(), name.into_bytes(), value.into_bytes());
                Ok(PoolResponse::Ok)
            }
            PoolRequest::AttrSet { name, value } => {
                if name.is_empty() {
                    return Err(PoolError::Invalid("empty attribute name".into()));
                }
                tx.update(&attrs(), name.into_bytes(), value);
                Ok(PoolResponse::Ok)
            }
            PoolRequest::AttrCas { name, expect, value } => {
                if name.is_empty() {
                    return Err(PoolError::Invalid("empty attribute name".into()));
                }
                let current = tx.lookup(&attrs(), name.as_bytes()).await.map_err(storage)?;
                if current != expect {
                    return Ok(PoolResponse::Swapped {
                        swapped: false,
                        current,
                    });
                }
                // The precondition makes the swap atomic with the read above: a concurrent
                // change fails the transaction, and the retry reads again.
                tx.expect(&attrs(), name.clone().into_bytes(), current);
                tx.update(&attrs(), name.into_bytes(), value);
                Ok(PoolResponse::Swapped {
                    swapped: true,
                    current: None,
                })
            }
            PoolRequest::AttrTxn { ops } => attr_txn(tx, ops).await,
            PoolRequest::AttrGet { name } => Ok(PoolResponse::Attr(
                tx.lookup(&attrs(), name.as_bytes()).await.map_err(storage)?,
            )),
            PoolRequest::AttrList => {
                let all = tx.iterate(&attrs(), .., usize::MAX).await.map_err(storage)?;
                Ok(PoolResponse::Names(
                    all.into_iter()
                        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                        .collect(),
                ))
            }
            PoolRequest::AttrDel { name } => {
                if tx
                    .lookup(&attrs(), name.as_bytes())
                    .await
                    .map_err(storage)?
                    .is_none()
                {
                    return Err(PoolError::Invalid(format!("no attribute {name:?}")));
                }
                tx.delete(&attrs(), name.into_bytes());
                Ok(PoolResponse::Ok)
            }
            PoolRequest::Evict => {
                if !caller.admin {
                    return Err(PoolError::Denied(format!(
                        "{caller} may not evict: that needs a certificate in the admin group"
                    )));
                }
                let all = Self::all_handles(tx).await?;
                for (h, _) in &all {
                    Self::drop_handle(tx, h).await?;
                }
                self.leases.lock().expect("lock").clear();
                Ok(PoolResponse::Evicted(all.len() as u64))
            }
            PoolRequest::ListHandles => {
                // Handles are capabilities: only the owner and admins see everyone's.
                let own_only = checked.as_ref().is_some_and(|(a, _)| !a.owned_by(&caller));
                Ok(PoolResponse::Handles(
                    Self::all_handles(tx)
                        .await?
                        .into_iter()
                        .filter(|(_, r)| !own_only || r.grant.user == caller.user)
                        .map(|(handle, r)| HandleInfo {
                            handle,
                            client: r.client,
                            ttl_ms: r.ttl_ms,
                        })
                        .collect(),
                ))
            }
            PoolRequest::Cont { handle, mut req } => {
                let mut rec = self.check_handle(tx, &handle).await?;
                if !rec.grant.usable_by(&caller) {
                    return Err(PoolError::NoHandle);
                }
                if caller.authenticated {
                    // Rights only shrink: an ACL change that committed after this handle was
                    // granted (and so was not re-checked with it) still takes effect here.
                    let now = rec.grant.under(&access::pool_access(tx, &props()).await?);
                    rec.grant.rights = Rights {
                        read: rec.grant.rights.read && now.read,
                        write: rec.grant.rights.write && now.write,
                    };
                    if !rec.grant.rights.read {
                        return Err(PoolError::NoHandle);
                    }
                }
                match &mut req {
                    ContRequest::Create { props, .. } => {
                        access::need(&caller, rec.grant.rights, Rights::WRITE, "create a container")?;
                        access::initial_cont_props(&caller, props)?;
                    }
                    ContRequest::Destroy { .. } => {
                        access::need(&caller, rec.grant.rights, Rights::WRITE, "destroy a container")?
                    }
                    _ => {}
                }
                if caller.authenticated {
                    if let Some((label, need, what)) = access::cont_target(tx, &handle, &req).await? {
                        let a = access::cont_access(tx, &label).await?;
                        if let ContRequest::PropSet { name, value, .. } = &req {
                            if cont_svc::store::ACL_PROP == name {
                                access::parse_acl(value)?;
                            }
                            if access::is_access_prop(name) && !a.owned_by(&caller) {
                                return Err(PoolError::Denied(format!(
                                    "{caller} may not change who may use container {label:?}: that needs its owner ({:?}) or an admin",
                                    a.owner
                                )));
                            }
                        }
                        access::need(&caller, a.rights(&caller), need, what)?;
                    }
                }
                if let ContRequest::Destroy { label, force } = req {
                    // Phase one commits on its own, so that a crash between the phases leaves a
                    // container that refuses every use until a retried destroy finishes it.
                    let mut p1 = ctx.db.begin(Some(ctx.term)).map_err(storage)?;
                    if cstore::destroy_phase1(&mut p1, &label, force)
                        .await
                        .map_err(PoolError::Cont)?
                    {
                        p1.commit().await.map_err(storage)?;
                    }
                    // A fresh transaction: this request's reads predate phase one.
                    *tx = ctx.db.begin(Some(ctx.term)).map_err(storage)?;
                    cstore::destroy_phase2(tx, &label)
                        .await
                        .map_err(PoolError::Cont)?;
                    return Ok(PoolResponse::Cont(cont_svc::ContResponse::Ok));
                }
                let mut r = cstore::handle(tx, &handle, now_ms(), req)
                    .await
                    .map_err(PoolError::Cont)?;
                if let (true, cont_svc::ContResponse::List(all)) = (caller.authenticated, &mut r) {
                    // Only the containers the caller may read.
                    let mut readable = Vec::new();
                    for info in all.drain(..) {
                        if access::cont_access(tx, &info.label).await?.rights(&caller).read {
                            readable.push(info);
                        }
                    }
                    *all = readable;
                }
                Ok(PoolResponse::Cont(r))
            }
        }
    }
}

/// Runs an [`PoolRequest::AttrTxn`] on `tx`.
///
/// Optimistic concurrency, validated at apply: the ops run against the transaction's snapshot
/// overlaid with its own writes; then every attribute it read from the snapshot becomes a
/// precondition of the entry (`expect` with the value read), and its writes follow. Applied
/// entries are totally ordered, and an entry applies only if nothing it read changed since its
/// snapshot, so the transaction is serializable at its apply point; a failed precondition has
/// no effect and answers `Busy`, which the client retries. A blind `Set` reads nothing and
/// conflicts with nothing.
async fn attr_txn(tx: &mut Tx, ops: Vec<AttrOp>) -> Result<PoolResponse, PoolError> {
    use std::collections::BTreeMap;
    if ops.len() > MAX_TXN_OPS {
        return Err(PoolError::Invalid(format!(
            "a transaction of {} ops; at most {MAX_TXN_OPS}",
            ops.len()
        )));
    }
    if ops.iter().any(|op| op.name().is_empty()) {
        return Err(PoolError::Invalid("empty attribute name".into()));
    }
    // What the snapshot held, for each attribute read; and the transaction's own view.
    let mut read: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    let mut view: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    let mut written: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut values = Vec::new();
    for op in ops {
        if let AttrOp::Set { name, value } = op {
            view.insert(name.clone(), Some(value.clone()));
            written.insert(name, value);
            continue;
        }
        let name = op.name().to_string();
        let current = match view.get(&name) {
            Some(v) => v.clone(),
            None => {
                let v = tx.lookup(&attrs(), name.as_bytes()).await.map_err(storage)?;
                read.insert(name.clone(), v.clone());
                view.insert(name.clone(), v.clone());
                v
            }
        };
        match op {
            AttrOp::Get { .. } => values.push(current),
            AttrOp::Append { value, .. } => {
                let mut v = current.unwrap_or_default();
                v.extend_from_slice(&value);
                view.insert(name.clone(), Some(v.clone()));
                written.insert(name, v);
            }
            AttrOp::Expect { value, .. } => {
                if current != value {
                    return Ok(PoolResponse::Txn { ok: false, values });
                }
            }
            AttrOp::Set { .. } => unreachable!("handled above"),
        }
    }
    if !written.is_empty() {
        for (name, v) in read {
            tx.expect(&attrs(), name.into_bytes(), v);
        }
        for (name, v) in written {
            tx.update(&attrs(), name.into_bytes(), v);
        }
    }
    Ok(PoolResponse::Txn { ok: true, values })
}
