//! Who may do what to a pool and its containers: DAOS's ACL semantics, checked against the
//! principal of the caller's client certificate (`Ctx::caller`).
//!
//! - A pool has an owner, an owner group and an ACL (its properties `owner`, `owner_group`
//!   and `acl`). A new pool has no owner and the owner group `admin`, under DAOS's default
//!   ACL `A::OWNER@:rw,A:G:GROUP@:rw`, so members of the admin group may use it until its
//!   creator names the real owner.
//! - `Connect` needs read; the handle records the rights granted and whose they are. Every
//!   later call under the handle is checked against them: only the principal that connected
//!   may use it, and a read-only handle cannot create or destroy containers.
//! - Calls without a handle (queries, properties, attributes) are checked against the ACL at
//!   the time of the call: reads need read, writes need write.
//! - Changing the owner, the owner group or the ACL (`PropSet`) needs the owner or an admin.
//!   It re-checks every open handle in the same transaction: a handle whose principal lost
//!   read is closed (with its container handles), and one that lost write keeps read only.
//! - `Evict` needs an admin, as in DAOS (`dmg pool evict`).
//! - A container has the same three properties; they are set at create (to the creator and
//!   its first group, and DAOS's default ACL) unless the create names them. Opening it needs
//!   read. Every container operation is checked against the container's ACL when it runs:
//!   reads need read, writes (properties, attributes, snapshots, object ids) need write.
//!
//! Without TLS nobody is authenticated and every check passes (see `rsvc_server::caller`).
//!
//! CAVEATS: container handles do not record rights; a container call is checked against
//! the ACL as it is when the call runs, which also means that a revoked right takes effect
//! at once for containers. Handles made before this module existed carry no principal and
//! keep full rights until they close.

use cont_svc::store as cstore;
use cont_svc::ContRequest;
use rdb::{Path, Tx};
use rsvc_server::acl::{Acl, Rights};
use rsvc_server::Caller;

use crate::api::{PoolError, PoolRequest};

/// The pool property naming its owner (a user).
pub const OWNER_PROP: &str = "owner";
/// The pool property naming its owner group.
pub const GROUP_PROP: &str = "owner_group";
/// The pool property holding its ACL.
pub const ACL_PROP: &str = "acl";
/// Whom a new pool belongs to: nobody, so that no certificate's user owns it before its
/// creator names one (only admins may change it until then).
pub const DEFAULT_OWNER: &str = "";
/// A new pool's owner group: the default admin group.
pub const DEFAULT_GROUP: &str = "admin";

/// The properties that say who may do what.
pub fn is_access_prop(name: &str) -> bool {
    matches!(name, OWNER_PROP | GROUP_PROP | ACL_PROP)
}

/// Parses an ACL as a property value, or says what is wrong with it.
pub fn parse_acl(text: &str) -> Result<Acl, PoolError> {
    text.parse::<Acl>()
        .map_err(|e| PoolError::Invalid(format!("bad ACL: {e}")))
}

/// A pool's or container's owner, owner group and ACL.
#[derive(Clone, Debug)]
pub struct Access {
    /// The owner.
    pub owner: String,
    /// The owner group.
    pub group: String,
    /// The ACL.
    pub acl: Acl,
}

impl Access {
    /// What `caller` may do.
    pub fn rights(&self, caller: &Caller) -> Rights {
        self.acl.rights(caller, &self.owner, &self.group)
    }

    /// Whether `caller` owns it (or administers the system).
    pub fn owned_by(&self, caller: &Caller) -> bool {
        !caller.authenticated || caller.admin || (!self.owner.is_empty() && caller.user == self.owner)
    }
}

fn storage(e: impl std::fmt::Display) -> PoolError {
    PoolError::Storage(e.to_string())
}

/// The pool's access properties as `tx` reads them.
pub async fn pool_access(tx: &mut Tx, props: &Path) -> Result<Access, PoolError> {
    let mut get = async |name: &str| -> Result<Option<String>, PoolError> {
        Ok(tx
            .lookup(props, name.as_bytes())
            .await
            .map_err(storage)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    };
    let owner = get(OWNER_PROP).await?.unwrap_or_default();
    let group = get(GROUP_PROP).await?.unwrap_or_default();
    let acl = match get(ACL_PROP).await? {
        Some(t) => parse_acl(&t)?,
        None => Acl::default_pool(),
    };
    Ok(Access { owner, group, acl })
}

/// A container's access properties.
pub async fn cont_access(tx: &mut Tx, label: &str) -> Result<Access, PoolError> {
    let (owner, group, acl) = cstore::access_props(tx, label).await.map_err(PoolError::Cont)?;
    let acl = match acl {
        Some(t) => parse_acl(&t)?,
        None => Acl::default_container(),
    };
    Ok(Access { owner, group, acl })
}

/// Refuses unless `have` holds `need`.
pub fn need(caller: &Caller, have: Rights, need: Rights, what: &str) -> Result<(), PoolError> {
    if have.contains(need) {
        Ok(())
    } else {
        Err(PoolError::Denied(format!(
            "{caller} may not {what}: that needs {need} and the ACL grants {have}"
        )))
    }
}

/// What a pool request without a handle needs, checked against the pool's ACL; `Ok(None)` for
/// requests checked elsewhere (under a handle) or not at all (`Renew`).
pub fn pool_need(req: &PoolRequest) -> Option<(Rights, &'static str)> {
    use PoolRequest as R;
    Some(match req {
        R::Connect { .. } => (Rights::READ, "connect to the pool"),
        R::Query | R::PropGet | R::AttrGet { .. } | R::AttrList | R::ListHandles => {
            (Rights::READ, "read the pool")
        }
        R::AttrSet { .. } | R::AttrCas { .. } | R::AttrDel { .. } => (Rights::WRITE, "write the pool"),
        R::AttrTxn { ops } => {
            if ops.iter().any(|op| {
                matches!(
                    op,
                    crate::api::AttrOp::Set { .. } | crate::api::AttrOp::Append { .. }
                )
            }) {
                (Rights::ALL, "read and write the pool")
            } else {
                (Rights::READ, "read the pool")
            }
        }
        R::PropSet { .. } | R::Evict | R::Disconnect { .. } | R::Renew { .. } | R::Cont { .. } => {
            return None
        }
    })
}

/// The container a container request names, by label or by container handle, and the rights
/// it needs there; `None` for requests that concern the pool handle alone (create, destroy,
/// list, close).
pub async fn cont_target(
    tx: &mut Tx,
    pool_handle: &cont_svc::api::Handle,
    req: &ContRequest,
) -> Result<Option<(String, Rights, &'static str)>, PoolError> {
    use ContRequest as C;
    let by_label = |label: &String, r: Rights, what: &'static str| Ok(Some((label.clone(), r, what)));
    match req {
        C::Create { .. } | C::Destroy { .. } | C::List | C::Close { .. } => Ok(None),
        C::Open { label } => by_label(label, Rights::READ, "open the container"),
        C::Query { label } | C::PropGet { label } | C::AttrGet { label, .. } | C::AttrList { label } => {
            by_label(label, Rights::READ, "read the container")
        }
        C::SnapList { label } => by_label(label, Rights::READ, "read the container"),
        C::PropSet { label, .. } | C::AttrSet { label, .. } | C::AttrDel { label, .. } => {
            by_label(label, Rights::WRITE, "write the container")
        }
        C::SnapDestroy { label, .. } => by_label(label, Rights::WRITE, "write the container"),
        C::SnapCreate { cont_handle } | C::OidAlloc { cont_handle, .. } => {
            let label = cstore::label_of(tx, cont_handle, pool_handle)
                .await
                .map_err(PoolError::Cont)?;
            Ok(Some((label, Rights::WRITE, "write the container")))
        }
    }
}

/// The principal a handle was opened by, and the rights it was granted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// The user (empty: a handle from before grants, or without TLS).
    pub user: String,
    /// The user's groups when it connected.
    pub groups: Vec<String>,
    /// The rights granted at connect (or at the last ACL change).
    pub rights: Rights,
}

impl Grant {
    /// What `caller` was granted.
    pub fn of(caller: &Caller, rights: Rights) -> Grant {
        Grant {
            user: if caller.authenticated {
                caller.user.clone()
            } else {
                String::new()
            },
            groups: caller.groups.clone(),
            rights,
        }
    }

    /// Whether `caller` may use a handle of this grant: the same user (with TLS), anyone
    /// for a grant without a user.
    pub fn usable_by(&self, caller: &Caller) -> bool {
        self.user.is_empty() || !caller.authenticated || caller.user == self.user
    }

    /// The rights the grant's principal has under `access`, re-evaluated after a change.
    pub fn under(&self, access: &Access) -> Rights {
        if self.user.is_empty() {
            return self.rights;
        }
        let caller = Caller {
            user: self.user.clone(),
            groups: self.groups.clone(),
            engine: None,
            admin: false,
            authenticated: true,
        };
        access.rights(&caller)
    }
}

/// A container's initial access properties: the creator and its first group, and the default
/// ACL, unless `props` names them; an ACL given there must parse.
pub fn initial_cont_props(caller: &Caller, props: &mut Vec<(String, String)>) -> Result<(), PoolError> {
    if let Some((_, acl)) = props.iter().find(|(k, _)| k == cstore::ACL_PROP) {
        parse_acl(acl)?;
    } else {
        props.push((cstore::ACL_PROP.into(), Acl::default_container().to_string()));
    }
    if !props.iter().any(|(k, _)| k == cstore::OWNER_PROP) {
        props.push((cstore::OWNER_PROP.into(), caller.user.clone()));
    }
    if !props.iter().any(|(k, _)| k == cstore::GROUP_PROP) {
        props.push((
            cstore::GROUP_PROP.into(),
            caller.groups.first().cloned().unwrap_or_default(),
        ));
    }
    Ok(())
}
