//! Pool and container access control lists, with DAOS semantics and fewer rights.
//!
//! A pool and a container each carry an owner (a user name), an owner group (a group name) and
//! an [`Acl`]: a list of entries, each of which gives one principal some [`Rights`]. A pool
//! connect or a container open asks [`Acl::rights`] what the authenticated [`Caller`] may do,
//! and refuses the handle if that lacks what the request needs. The code that creates handles
//! decides what that is; as in DAOS, a read-only handle needs `r` and a read-write one `rw`.
//!
//! The text form is DAOS's: `A:<flags>:<principal>:<perms>`, such as `A::OWNER@:rw`,
//! `A:G:GROUP@:rw`, `A::EVERYONE@:r`, `A::alice@:rw` and `A:G:staff@:r`, with entries separated
//! by commas or newlines. Lines that start with `#` are comments. A principal is one of the three
//! special names (`OWNER@`, `GROUP@`, `EVERYONE@`) or a name with a trailing `@`; the `G` flag
//! makes a name a group. `GROUP@` is a group with or without the flag, and is printed with it.
//! Permissions are `r` and `w`; an entry with neither is written `-` (or left empty, as DAOS
//! writes it). [`Display`](std::fmt::Display) prints what [`FromStr`] reads back.
//!
//! Evaluation follows DAOS, and the first rule that applies decides:
//!
//! 1. An unauthenticated caller (no TLS) gets every right. Nothing can be checked without a
//!    certificate, so an engine without TLS enforces no ACL at all.
//! 2. The owner gets the `OWNER@` entry's rights, if there is one, and nothing else.
//! 3. A user with an entry of their own gets that entry's rights and nothing else.
//! 4. A caller in at least one group that has an entry gets the union of the rights of all
//!    such entries. `GROUP@` stands for the owner group. The union decides even when it is
//!    smaller than `EVERYONE@`'s rights, or empty.
//! 5. Everyone else gets the `EVERYONE@` entry's rights, or none.
//!
//! Some consequences follow. Entries only allow: there are no deny entries. To shut a user
//! or a group out, give them an entry with fewer rights (`A::mallory@:-`). The more specific
//! entry then decides, and broader entries no longer count. A named user entry therefore also
//! cuts that user off from every group entry, and an owner with an `OWNER@` entry gets exactly
//! that entry, however generous the group entries are. The order of entries does not matter,
//! and each principal has at most one entry; a duplicate is an error, as in DAOS.
//!
//! Caveats:
//!
//! - Admin status does not bypass the ACL. An administrator (a member of the admin group)
//!   gets only what the ACL gives their user and groups, as in DAOS, whose admin tool acts on
//!   pools through its own management paths rather than through a pool handle. An ACL that
//!   locks everyone out must be mended by whatever sets the ACL or the owner, not by
//!   connecting as an admin.
//! - Identities are the certificate's: the user is its common name and the groups are its
//!   organization entries, compared byte for byte and case-sensitively. There is no directory
//!   lookup and no mapping from names to uids: a group membership lasts as long as the
//!   certificate that states it.
//! - An empty owner or owner group matches nobody, so `OWNER@` and `GROUP@` entries are then
//!   inert.
//! - Rights are decided when a handle is created. This module keeps no handles, so an ACL
//!   change does not reach handles already open; whoever keeps handles decides whether to
//!   evict them.
//! - DAOS has more permissions (create and delete container, get and set properties, get and
//!   set the ACL, set the owner), audit and alarm entries, and more flags. They are rejected
//!   with an error, not ignored, so that an ACL written for DAOS never silently means
//!   something else here.
//! - Deserializing an [`Acl`] with serde does not check it; call [`Acl::validate`] on one
//!   that comes from an untrusted source.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::caller::Caller;

/// What a principal may do: read, write, both or neither.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rights {
    /// Read (`r`): a read-only pool connect or container open.
    pub read: bool,
    /// Write (`w`): a read-write pool connect or container open, together with `read`.
    pub write: bool,
}

impl Rights {
    /// No rights (`-`).
    pub const NONE: Rights = Rights {
        read: false,
        write: false,
    };
    /// Read only (`r`).
    pub const READ: Rights = Rights {
        read: true,
        write: false,
    };
    /// Write only (`w`).
    pub const WRITE: Rights = Rights {
        read: false,
        write: true,
    };
    /// Read and write (`rw`).
    pub const ALL: Rights = Rights {
        read: true,
        write: true,
    };

    /// Whether these rights include every right in `other`.
    pub fn contains(self, other: Rights) -> bool {
        (self.read || !other.read) && (self.write || !other.write)
    }

    /// The rights in either `self` or `other`.
    pub fn union(self, other: Rights) -> Rights {
        Rights {
            read: self.read || other.read,
            write: self.write || other.write,
        }
    }

    /// Whether these are no rights at all.
    pub fn is_empty(self) -> bool {
        self == Rights::NONE
    }
}

impl BitOr for Rights {
    type Output = Rights;

    fn bitor(self, other: Rights) -> Rights {
        self.union(other)
    }
}

impl BitOrAssign for Rights {
    fn bitor_assign(&mut self, other: Rights) {
        *self = self.union(other);
    }
}

impl fmt::Display for Rights {
    /// `r`, `w`, `rw`, or `-` for none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.read, self.write) {
            (false, false) => "-",
            (true, false) => "r",
            (false, true) => "w",
            (true, true) => "rw",
        })
    }
}

/// What DAOS means by each permission letter it has and this module does not.
fn daos_permission(letter: char) -> Option<&'static str> {
    Some(match letter {
        'c' => "create container",
        'd' => "delete container",
        't' => "get properties",
        'T' => "set properties",
        'a' => "get ACL",
        'A' => "set ACL",
        'o' => "set owner",
        _ => return None,
    })
}

impl FromStr for Rights {
    type Err = String;

    /// Any of the letters `r` and `w` in any order (`r`, `w`, `rw`, `wr`); `-` or nothing for
    /// no rights.
    fn from_str(s: &str) -> Result<Rights, String> {
        if s == "-" {
            return Ok(Rights::NONE);
        }
        let mut rights = Rights::NONE;
        for c in s.chars() {
            match c {
                'r' => rights.read = true,
                'w' => rights.write = true,
                _ => {
                    let what = match daos_permission(c) {
                        Some(meaning) => format!("DAOS permission '{c}' ({meaning})"),
                        None => format!("unknown permission '{c}'"),
                    };
                    return Err(format!(
                        "{what} in {s:?} is not supported: the accepted permissions are \
                         r (read) and w (write), or - for none"
                    ));
                }
            }
        }
        Ok(rights)
    }
}

/// Whom an entry is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AcePrincipal {
    /// The owner of the pool or container (`OWNER@`).
    Owner,
    /// Members of the owner group of the pool or container (`GROUP@`).
    OwnerGroup,
    /// Everyone not matched by a more specific entry (`EVERYONE@`).
    Everyone,
    /// A named user (`alice@` in an entry).
    User(String),
    /// Members of a named group (`staff@` with the `G` flag in an entry).
    Group(String),
}

/// The longest user or group name, in bytes (DAOS's principal limit).
pub const MAX_NAME_LEN: usize = 255;

/// The names that a user or group cannot have, because `<name>@` is a special principal.
const RESERVED_NAMES: [&str; 3] = ["OWNER", "GROUP", "EVERYONE"];

/// Why `name` cannot name a user or a group, if it cannot.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "the name is {} bytes long, more than the {MAX_NAME_LEN} allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, ':' | ',') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "the name {name:?} contains {c:?}: a name has no ':', ',', whitespace or control \
             characters"
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(format!(
            "{name}@ is a special principal, not the name of a user or group"
        ));
    }
    Ok(())
}

impl AcePrincipal {
    /// Whether this principal is a group (`GROUP@` or a named group): entries for it carry the
    /// `G` flag.
    pub fn is_group(&self) -> bool {
        matches!(self, AcePrincipal::OwnerGroup | AcePrincipal::Group(_))
    }

    /// Why this principal cannot appear in an entry, if it cannot: a user or group name must
    /// be non-empty, at most [`MAX_NAME_LEN`] bytes, without `:`, `,`, whitespace or control
    /// characters, and not `OWNER`, `GROUP` or `EVERYONE`.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            AcePrincipal::User(name) | AcePrincipal::Group(name) => check_name(name),
            _ => Ok(()),
        }
    }

    /// The principal field of an entry: `OWNER@`, `GROUP@`, `EVERYONE@` or `<name>@`.
    fn entry_field(&self) -> String {
        match self {
            AcePrincipal::Owner => "OWNER@".into(),
            AcePrincipal::OwnerGroup => "GROUP@".into(),
            AcePrincipal::Everyone => "EVERYONE@".into(),
            AcePrincipal::User(name) | AcePrincipal::Group(name) => format!("{name}@"),
        }
    }

    /// The principal of an entry's principal field, given whether the entry has the `G` flag.
    fn from_entry_field(field: &str, group_flag: bool) -> Result<AcePrincipal, String> {
        let special = match field {
            "OWNER@" => Some(AcePrincipal::Owner),
            "GROUP@" => return Ok(AcePrincipal::OwnerGroup),
            "EVERYONE@" => Some(AcePrincipal::Everyone),
            _ => None,
        };
        if let Some(p) = special {
            if group_flag {
                return Err(format!("{field} is not a group, so it takes no G flag"));
            }
            return Ok(p);
        }
        let Some(name) = field.strip_suffix('@') else {
            return Err(format!(
                "the principal {field:?} does not end with '@' (write {field}@ for a user, \
                 and add the G flag for a group)"
            ));
        };
        if name.is_empty() {
            return Err(format!("the principal {field:?} has an empty name"));
        }
        check_name(name)?;
        Ok(if group_flag {
            AcePrincipal::Group(name.into())
        } else {
            AcePrincipal::User(name.into())
        })
    }
}

impl fmt::Display for AcePrincipal {
    /// DAOS's principal form, as `acl delete` takes it: `OWNER@`, `GROUP@`, `EVERYONE@`,
    /// `u:alice@` or `g:staff@`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcePrincipal::User(name) => write!(f, "u:{name}@"),
            AcePrincipal::Group(name) => write!(f, "g:{name}@"),
            special => f.write_str(&special.entry_field()),
        }
    }
}

impl FromStr for AcePrincipal {
    type Err = String;

    /// DAOS's principal form: `OWNER@`, `GROUP@`, `EVERYONE@`, `u:<user>@` or `g:<group>@`.
    fn from_str(s: &str) -> Result<AcePrincipal, String> {
        let s = s.trim();
        let fail = |why: String| format!("principal {s:?}: {why}");
        match s {
            "OWNER@" => Ok(AcePrincipal::Owner),
            "GROUP@" => Ok(AcePrincipal::OwnerGroup),
            "EVERYONE@" => Ok(AcePrincipal::Everyone),
            _ => {
                let (group, rest) = if let Some(rest) = s.strip_prefix("u:") {
                    (false, rest)
                } else if let Some(rest) = s.strip_prefix("g:") {
                    (true, rest)
                } else {
                    return Err(fail(
                        "expected OWNER@, GROUP@, EVERYONE@, u:<user>@ or g:<group>@".into(),
                    ));
                };
                let Some(name) = rest.strip_suffix('@') else {
                    return Err(fail("a user or group name ends with '@'".into()));
                };
                check_name(name).map_err(fail)?;
                Ok(if group {
                    AcePrincipal::Group(name.into())
                } else {
                    AcePrincipal::User(name.into())
                })
            }
        }
    }
}

/// One access control entry: the rights one principal is allowed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ace {
    /// Whom the entry is about.
    pub principal: AcePrincipal,
    /// What the entry allows.
    pub rights: Rights,
}

impl Ace {
    /// The entry that allows `principal` `rights`.
    pub fn new(principal: AcePrincipal, rights: Rights) -> Ace {
        Ace { principal, rights }
    }
}

impl fmt::Display for Ace {
    /// DAOS's entry form, such as `A::alice@:rw` or `A:G:staff@:r`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flags = if self.principal.is_group() { "G" } else { "" };
        write!(f, "A:{flags}:{}:{}", self.principal.entry_field(), self.rights)
    }
}

impl FromStr for Ace {
    type Err = String;

    /// One entry, `A:<flags>:<principal>:<perms>`, with surrounding whitespace ignored. The
    /// error quotes the entry.
    fn from_str(s: &str) -> Result<Ace, String> {
        let entry = s.trim();
        parse_entry(entry).map_err(|why| format!("ACL entry {entry:?}: {why}"))
    }
}

/// An entry without surrounding whitespace, or why it is none (without the entry itself).
fn parse_entry(entry: &str) -> Result<Ace, String> {
    let fields: Vec<&str> = entry.split(':').collect();
    let [access, flags, principal, perms] = fields[..] else {
        return Err(format!(
            "expected 4 fields separated by ':' (<type>:<flags>:<principal>:<perms>, such as \
             A::alice@:rw), found {}",
            fields.len()
        ));
    };
    if access.is_empty() {
        return Err("the access type is missing: only A (allow) is supported".into());
    }
    for c in access.chars() {
        match c {
            'A' => {}
            'U' => return Err("access type U (audit) is not supported: only A (allow) is".into()),
            'L' => return Err("access type L (alarm) is not supported: only A (allow) is".into()),
            _ => return Err(format!("unknown access type {c:?}: only A (allow) is supported")),
        }
    }
    let mut group_flag = false;
    for c in flags.chars() {
        let unsupported = match c {
            'G' => {
                group_flag = true;
                continue;
            }
            'S' => "DAOS flag 'S' (audit success)",
            'F' => "DAOS flag 'F' (audit failure)",
            'P' => "DAOS flag 'P' (pool inherit)",
            _ => return Err(format!("unknown flag {c:?}: only G (group) is supported")),
        };
        return Err(format!("{unsupported} is not supported: only G (group) is"));
    }
    let principal = AcePrincipal::from_entry_field(principal, group_flag)?;
    let rights = perms.parse::<Rights>()?;
    Ok(Ace { principal, rights })
}

/// An access control list: at most [`Acl::MAX_ENTRIES`] entries, at most one per principal.
///
/// The field is public for construction and inspection; [`Acl::validate`] checks a list built
/// by hand, and [`Acl::set`] and [`FromStr`] keep a list valid.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Acl(pub Vec<Ace>);

impl Acl {
    /// The most entries an ACL may have.
    pub const MAX_ENTRIES: usize = 64;

    /// The ACL of a new pool, as in DAOS: `A::OWNER@:rw,A:G:GROUP@:rw`, so that the owner and
    /// the owner group may read and write and nobody else may do anything.
    pub fn default_pool() -> Acl {
        Acl(vec![
            Ace::new(AcePrincipal::Owner, Rights::ALL),
            Ace::new(AcePrincipal::OwnerGroup, Rights::ALL),
        ])
    }

    /// The ACL of a new container: the same as [`Acl::default_pool`].
    pub fn default_container() -> Acl {
        Acl::default_pool()
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[Ace] {
        &self.0
    }

    /// Whether the list has no entries (so that every authenticated caller gets no rights).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rights of `principal`'s own entry, if it has one.
    pub fn get(&self, principal: &AcePrincipal) -> Option<Rights> {
        self.0
            .iter()
            .find(|ace| ace.principal == *principal)
            .map(|ace| ace.rights)
    }

    /// Why this list is not a valid ACL, if it is not: a user or group name that cannot be
    /// written, a principal with two entries, or more than [`Acl::MAX_ENTRIES`] entries.
    pub fn validate(&self) -> Result<(), String> {
        if self.0.len() > Acl::MAX_ENTRIES {
            return Err(format!(
                "the ACL has {} entries, more than the {} allowed",
                self.0.len(),
                Acl::MAX_ENTRIES
            ));
        }
        for (i, ace) in self.0.iter().enumerate() {
            ace.principal
                .validate()
                .map_err(|why| format!("ACL entry {:?}: {why}", ace.to_string()))?;
            if let Some(first) = self.0[..i].iter().find(|a| a.principal == ace.principal) {
                return Err(duplicate(first, ace));
            }
        }
        Ok(())
    }

    /// Gives `ace`'s principal `ace`'s rights: replaces that principal's entry in place, or
    /// appends one ("acl update"). Fails, changing nothing, if the principal cannot be
    /// written or the list is already full.
    pub fn set(&mut self, ace: Ace) -> Result<(), String> {
        ace.principal
            .validate()
            .map_err(|why| format!("ACL entry {:?}: {why}", ace.to_string()))?;
        if let Some(old) = self.0.iter_mut().find(|a| a.principal == ace.principal) {
            old.rights = ace.rights;
            return Ok(());
        }
        if self.0.len() >= Acl::MAX_ENTRIES {
            return Err(format!(
                "cannot add ACL entry {:?}: the ACL already has the {} entries allowed",
                ace.to_string(),
                Acl::MAX_ENTRIES
            ));
        }
        self.0.push(ace);
        Ok(())
    }

    /// Removes `principal`'s entry ("acl delete"); whether there was one.
    pub fn remove(&mut self, principal: &AcePrincipal) -> bool {
        let before = self.0.len();
        self.0.retain(|ace| ace.principal != *principal);
        self.0.len() != before
    }

    /// What `caller` may do on an object owned by user `owner` and group `owner_group`,
    /// decided as DAOS decides (see the [module documentation](self)): an unauthenticated
    /// caller gets [`Rights::ALL`]; then the owner's `OWNER@` entry, a named user's own entry,
    /// the union of every matching group entry, and `EVERYONE@`, in that order, the first that
    /// applies deciding alone. Admin status plays no part.
    pub fn rights(&self, caller: &Caller, owner: &str, owner_group: &str) -> Rights {
        if !caller.authenticated {
            return Rights::ALL;
        }
        if !owner.is_empty() && caller.user == owner {
            if let Some(rights) = self.get(&AcePrincipal::Owner) {
                return rights;
            }
        }
        let own = self.0.iter().find_map(|ace| match &ace.principal {
            AcePrincipal::User(name) if *name == caller.user => Some(ace.rights),
            _ => None,
        });
        if let Some(rights) = own {
            return rights;
        }
        let mut matched = false;
        let mut union = Rights::NONE;
        for ace in &self.0 {
            let member = match &ace.principal {
                AcePrincipal::OwnerGroup => !owner_group.is_empty() && caller.in_group(owner_group),
                AcePrincipal::Group(group) => caller.in_group(group),
                _ => false,
            };
            if member {
                matched = true;
                union |= ace.rights;
            }
        }
        if matched {
            return union;
        }
        self.get(&AcePrincipal::Everyone).unwrap_or(Rights::NONE)
    }
}

/// The error for a second entry of one principal.
fn duplicate(first: &Ace, second: &Ace) -> String {
    format!(
        "ACL entry {:?}: {} already has an entry ({:?}); an ACL has one entry per principal",
        second.to_string(),
        second.principal,
        first.to_string()
    )
}

impl fmt::Display for Acl {
    /// The entries separated by commas (`A::OWNER@:rw,A:G:GROUP@:rw`), or with `{:#}` one per
    /// line, each ending in a newline. An empty ACL prints nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, ace) in self.0.iter().enumerate() {
            if f.alternate() {
                writeln!(f, "{ace}")?;
            } else {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{ace}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for Acl {
    type Err = String;

    /// Entries separated by commas and/or newlines, whitespace around each ignored, empty
    /// pieces skipped, and lines starting with `#` taken as comments; `""` is the empty ACL.
    /// The result is valid (see [`Acl::validate`]).
    fn from_str(s: &str) -> Result<Acl, String> {
        let mut acl = Acl::default();
        for line in s.lines() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            for piece in line.split(',') {
                if piece.trim().is_empty() {
                    continue;
                }
                let ace: Ace = piece.parse()?;
                if let Some(first) = acl.0.iter().find(|a| a.principal == ace.principal) {
                    return Err(duplicate(first, &ace));
                }
                acl.0.push(ace);
            }
        }
        if acl.0.len() > Acl::MAX_ENTRIES {
            return Err(format!(
                "the ACL has {} entries, more than the {} allowed",
                acl.0.len(),
                Acl::MAX_ENTRIES
            ));
        }
        Ok(acl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn user(name: &str) -> AcePrincipal {
        AcePrincipal::User(name.into())
    }

    fn group(name: &str) -> AcePrincipal {
        AcePrincipal::Group(name.into())
    }

    fn acl(s: &str) -> Acl {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        match s.parse::<Acl>() {
            Ok(a) => panic!("{s:?} parsed as {a:?}"),
            Err(e) => e,
        }
    }

    #[track_caller]
    fn assert_contains(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
    }

    #[test]
    fn rights_parse_display_and_algebra() {
        for (s, r) in [
            ("r", Rights::READ),
            ("w", Rights::WRITE),
            ("rw", Rights::ALL),
            ("wr", Rights::ALL),
            ("-", Rights::NONE),
            ("", Rights::NONE),
        ] {
            assert_eq!(s.parse::<Rights>().unwrap(), r, "{s:?}");
        }
        assert_eq!(Rights::NONE.to_string(), "-");
        assert_eq!(Rights::READ.to_string(), "r");
        assert_eq!(Rights::WRITE.to_string(), "w");
        assert_eq!(Rights::ALL.to_string(), "rw");
        assert_eq!(Rights::default(), Rights::NONE);
        assert!(Rights::ALL.contains(Rights::READ));
        assert!(Rights::ALL.contains(Rights::ALL));
        assert!(Rights::READ.contains(Rights::NONE));
        assert!(!Rights::READ.contains(Rights::WRITE));
        assert!(!Rights::NONE.contains(Rights::READ));
        assert_eq!(Rights::READ | Rights::WRITE, Rights::ALL);
        assert_eq!(Rights::READ.union(Rights::NONE), Rights::READ);
        assert!(Rights::NONE.is_empty() && !Rights::READ.is_empty());
    }

    #[test]
    fn rights_reject_other_letters() {
        let e = "rc".parse::<Rights>().unwrap_err();
        assert_contains(
            &e,
            &["'c'", "create container", "\"rc\"", "r (read)", "w (write)"],
        );
        let e = "A".parse::<Rights>().unwrap_err();
        assert_contains(&e, &["'A'", "set ACL"]);
        let e = "rx".parse::<Rights>().unwrap_err();
        assert_contains(&e, &["unknown permission 'x'", "r (read) and w (write)"]);
        let e = "r-".parse::<Rights>().unwrap_err();
        assert_contains(&e, &["'-'"]);
    }

    #[test]
    fn parses_every_form() {
        let a = acl("A::OWNER@:rw");
        assert_eq!(a.0, vec![Ace::new(AcePrincipal::Owner, Rights::ALL)]);
        let a = acl("A:G:GROUP@:rw");
        assert_eq!(a.0, vec![Ace::new(AcePrincipal::OwnerGroup, Rights::ALL)]);
        let a = acl("A::GROUP@:r");
        assert_eq!(a.0, vec![Ace::new(AcePrincipal::OwnerGroup, Rights::READ)]);
        let a = acl("A::EVERYONE@:r");
        assert_eq!(a.0, vec![Ace::new(AcePrincipal::Everyone, Rights::READ)]);
        let a = acl("A::alice@:rw");
        assert_eq!(a.0, vec![Ace::new(user("alice"), Rights::ALL)]);
        let a = acl("A:G:staff@:r");
        assert_eq!(a.0, vec![Ace::new(group("staff"), Rights::READ)]);
        let a = acl("A::mallory@:");
        assert_eq!(a.0, vec![Ace::new(user("mallory"), Rights::NONE)]);
        let a = acl("A::mallory@:-");
        assert_eq!(a.0, vec![Ace::new(user("mallory"), Rights::NONE)]);
        let a = acl("A::bob@:wr");
        assert_eq!(a.0, vec![Ace::new(user("bob"), Rights::ALL)]);
        // A name may hold '@' (a domain); the last '@' ends it.
        let a = acl("A::alice@example.com@:r");
        assert_eq!(a.0, vec![Ace::new(user("alice@example.com"), Rights::READ)]);
        // A user and a group of the same name are different principals.
        let a = acl("A::ops@:r,A:G:ops@:rw");
        assert_eq!(a.get(&user("ops")), Some(Rights::READ));
        assert_eq!(a.get(&group("ops")), Some(Rights::ALL));
    }

    #[test]
    fn separators_whitespace_comments_and_empty() {
        assert_eq!(acl(""), Acl::default());
        assert_eq!(acl("  \n ,\n"), Acl::default());
        let expected = Acl(vec![
            Ace::new(AcePrincipal::Owner, Rights::ALL),
            Ace::new(AcePrincipal::OwnerGroup, Rights::ALL),
            Ace::new(AcePrincipal::Everyone, Rights::READ),
            Ace::new(user("alice"), Rights::WRITE),
        ]);
        for s in [
            "A::OWNER@:rw,A:G:GROUP@:rw,A::EVERYONE@:r,A::alice@:w",
            "A::OWNER@:rw\nA:G:GROUP@:rw\nA::EVERYONE@:r\nA::alice@:w\n",
            "  A::OWNER@:rw ,\n\tA:G:GROUP@:rw,\r\n A::EVERYONE@:r , A::alice@:w,",
            "# pool ACL, by hand\nA::OWNER@:rw\n\n  # more\n\
             A:G:GROUP@:rw,A::EVERYONE@:r\nA::alice@:w",
        ] {
            assert_eq!(acl(s), expected, "{s:?}");
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(Acl::default_pool().to_string(), "A::OWNER@:rw,A:G:GROUP@:rw");
        assert_eq!(acl("A::OWNER@:rw,A:G:GROUP@:rw"), Acl::default_pool());
        assert_eq!(Acl::default_container(), Acl::default_pool());
    }

    #[test]
    fn display_round_trips() {
        let s = "A::OWNER@:rw,A:G:GROUP@:r,A::EVERYONE@:-,A::alice@:w,A:G:staff@:rw";
        let a = acl(s);
        assert_eq!(a.to_string(), s);
        assert_eq!(acl(&a.to_string()), a);
        let lines = format!("{a:#}");
        assert_eq!(lines, s.replace(',', "\n") + "\n");
        assert_eq!(acl(&lines), a);
        // GROUP@ without G prints with it.
        assert_eq!(acl("A::GROUP@:r").to_string(), "A:G:GROUP@:r");
        assert_eq!(Acl::default().to_string(), "");
        assert_eq!(format!("{:#}", Acl::default()), "");
    }

    #[test]
    fn principal_text_form() {
        for (s, p) in [
            ("OWNER@", AcePrincipal::Owner),
            ("GROUP@", AcePrincipal::OwnerGroup),
            ("EVERYONE@", AcePrincipal::Everyone),
            ("u:alice@", user("alice")),
            ("g:staff@", group("staff")),
        ] {
            assert_eq!(s.parse::<AcePrincipal>().unwrap(), p);
            assert_eq!(p.to_string(), s);
        }
        let e = "alice@".parse::<AcePrincipal>().unwrap_err();
        assert_contains(&e, &["\"alice@\"", "u:<user>@"]);
        let e = "u:alice".parse::<AcePrincipal>().unwrap_err();
        assert_contains(&e, &["\"u:alice\"", "'@'"]);
        let e = "g:@".parse::<AcePrincipal>().unwrap_err();
        assert_contains(&e, &["empty"]);
        let e = "u:OWNER@".parse::<AcePrincipal>().unwrap_err();
        assert_contains(&e, &["special principal"]);
    }

    #[test]
    fn rejects_other_access_types() {
        let e = err("A::OWNER@:rw,U::alice@:r");
        assert_contains(&e, &["\"U::alice@:r\"", "U (audit)", "only A (allow)"]);
        let e = err("L::alice@:r");
        assert_contains(&e, &["\"L::alice@:r\"", "L (alarm)", "only A (allow)"]);
        let e = err("AU::alice@:r");
        assert_contains(&e, &["\"AU::alice@:r\"", "U (audit)"]);
        let e = err("D::alice@:r");
        assert_contains(&e, &["\"D::alice@:r\"", "unknown access type 'D'"]);
        let e = err(":G:staff@:r");
        assert_contains(&e, &["\":G:staff@:r\"", "access type is missing"]);
    }

    #[test]
    fn rejects_other_flags() {
        for (flag, meaning) in [
            ('S', "audit success"),
            ('F', "audit failure"),
            ('P', "pool inherit"),
        ] {
            let entry = format!("A:G{flag}:staff@:r");
            let e = err(&entry);
            assert_contains(
                &e,
                &[
                    &format!("{entry:?}"),
                    &format!("'{flag}'"),
                    meaning,
                    "only G (group)",
                ],
            );
        }
        let e = err("A:g:staff@:r");
        assert_contains(&e, &["\"A:g:staff@:r\"", "unknown flag 'g'", "only G (group)"]);
        let e = err("A:G:OWNER@:rw");
        assert_contains(&e, &["\"A:G:OWNER@:rw\"", "OWNER@ is not a group"]);
        let e = err("A:G:EVERYONE@:r");
        assert_contains(&e, &["EVERYONE@ is not a group"]);
    }

    #[test]
    fn rejects_bad_principals() {
        let e = err("A::alice:rw");
        assert_contains(&e, &["\"A::alice:rw\"", "\"alice\"", "does not end with '@'"]);
        let e = err("A:G:@:r");
        assert_contains(&e, &["\"A:G:@:r\"", "empty name"]);
        let e = err("A::al ice@:r");
        assert_contains(&e, &["\"A::al ice@:r\"", "' '", "whitespace"]);
        let e = err("A::al\u{7}ice@:r");
        assert_contains(&e, &["control"]);
        // A ':' in the name makes too many fields.
        let e = err("A::al:ice@:r");
        assert_contains(&e, &["\"A::al:ice@:r\"", "expected 4 fields", "found 5"]);
        // A ',' in the name splits the entry.
        let e = err("A::al,ice@:r");
        assert_contains(&e, &["\"A::al\"", "found 3"]);
        let long = format!("A::{}@:r", "x".repeat(MAX_NAME_LEN + 1));
        assert_contains(&err(&long), &["256 bytes", "255"]);
        let fine = format!("A::{}@:r", "x".repeat(MAX_NAME_LEN));
        assert_eq!(acl(&fine).0.len(), 1);
        let e = err("A::alice@:rc");
        assert_contains(&e, &["\"A::alice@:rc\"", "'c'", "create container"]);
        let e = err("A::alice@");
        assert_contains(&e, &["\"A::alice@\"", "found 3"]);
    }

    #[test]
    fn rejects_duplicates_and_too_many() {
        let e = err("A::alice@:r,A::bob@:r,A::alice@:rw");
        assert_contains(
            &e,
            &[
                "\"A::alice@:rw\"",
                "u:alice@ already has an entry",
                "\"A::alice@:r\"",
            ],
        );
        let e = err("A:G:GROUP@:r\nA::GROUP@:rw");
        assert_contains(&e, &["\"A:G:GROUP@:rw\"", "GROUP@ already has an entry"]);
        let e = err("A::EVERYONE@:r,A::EVERYONE@:r");
        assert_contains(&e, &["EVERYONE@ already has an entry"]);

        let entries = |n: usize| {
            (0..n)
                .map(|i| format!("A::user{i}@:r"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(acl(&entries(Acl::MAX_ENTRIES)).0.len(), 64);
        let e = err(&entries(Acl::MAX_ENTRIES + 1));
        assert_contains(&e, &["65 entries", "64 allowed"]);
    }

    #[test]
    fn validate_checks_hand_built_lists() {
        assert_eq!(Acl::default_pool().validate(), Ok(()));
        let a = Acl(vec![Ace::new(user("a,b"), Rights::READ)]);
        assert_contains(&a.validate().unwrap_err(), &["\"a,b\"", "','"]);
        let a = Acl(vec![Ace::new(group("OWNER"), Rights::READ)]);
        assert_contains(&a.validate().unwrap_err(), &["OWNER@ is a special principal"]);
        let a = Acl(vec![
            Ace::new(user("bob"), Rights::READ),
            Ace::new(user("bob"), Rights::ALL),
        ]);
        assert_contains(&a.validate().unwrap_err(), &["u:bob@ already has an entry"]);
        let a = Acl((0..65)
            .map(|i| Ace::new(user(&format!("u{i}")), Rights::READ))
            .collect());
        assert_contains(&a.validate().unwrap_err(), &["65 entries"]);
    }

    #[test]
    fn set_and_remove() {
        let mut a = Acl::default_pool();
        a.set(Ace::new(user("alice"), Rights::READ)).unwrap();
        a.set(Ace::new(AcePrincipal::Owner, Rights::READ)).unwrap();
        assert_eq!(a.to_string(), "A::OWNER@:r,A:G:GROUP@:rw,A::alice@:r");
        a.set(Ace::new(user("alice"), Rights::ALL)).unwrap();
        assert_eq!(a.get(&user("alice")), Some(Rights::ALL));
        assert_eq!(a.0.len(), 3);

        let e = a.set(Ace::new(user("a b"), Rights::READ)).unwrap_err();
        assert_contains(&e, &["\"A::a b@:r\"", "whitespace"]);
        assert_eq!(a.0.len(), 3);

        assert!(a.remove(&user("alice")));
        assert!(!a.remove(&user("alice")));
        assert!(!a.remove(&group("alice")));
        assert!(a.remove(&AcePrincipal::OwnerGroup));
        assert_eq!(a.to_string(), "A::OWNER@:r");

        let mut full = Acl((0..64)
            .map(|i| Ace::new(user(&format!("u{i}")), Rights::READ))
            .collect());
        let e = full.set(Ace::new(user("one-more"), Rights::READ)).unwrap_err();
        assert_contains(&e, &["\"A::one-more@:r\"", "64 entries"]);
        // Replacing an existing entry still works when full.
        full.set(Ace::new(user("u3"), Rights::ALL)).unwrap();
        assert_eq!(full.get(&user("u3")), Some(Rights::ALL));
    }

    fn client(user: &str, groups: &[&str]) -> Caller {
        Caller::client(user, groups, "admin")
    }

    #[test]
    fn unauthenticated_gets_everything() {
        assert_eq!(Acl::default().rights(&Caller::insecure(), "o", "g"), Rights::ALL);
        let a = acl("A::EVERYONE@:-");
        assert_eq!(a.rights(&Caller::insecure(), "o", "g"), Rights::ALL);
    }

    #[test]
    fn owner_entry_wins_over_broader_entries() {
        let a = acl("A::OWNER@:r,A:G:GROUP@:rw,A::EVERYONE@:rw,A::olive@:rw,A:G:staff@:rw");
        let olive = client("olive", &["pgroup", "staff"]);
        assert_eq!(a.rights(&olive, "olive", "pgroup"), Rights::READ);
        // Not the owner of this one: her own entry decides.
        assert_eq!(a.rights(&olive, "someone", "pgroup"), Rights::ALL);
        // An owner without an OWNER@ entry is evaluated as anyone else.
        let a = acl("A:G:staff@:r,A::EVERYONE@:rw");
        assert_eq!(a.rights(&olive, "olive", "pgroup"), Rights::READ);
        assert_eq!(
            acl("A::EVERYONE@:w").rights(&client("olive", &[]), "olive", "g"),
            Rights::WRITE
        );
    }

    #[test]
    fn named_user_wins_over_groups() {
        let a = acl("A::alice@:r,A:G:staff@:rw,A:G:GROUP@:rw,A::EVERYONE@:rw");
        let alice = client("alice", &["staff", "pgroup"]);
        assert_eq!(a.rights(&alice, "owner", "pgroup"), Rights::READ);
        let a = acl("A::mallory@:-,A::EVERYONE@:rw");
        assert_eq!(a.rights(&client("mallory", &[]), "owner", "g"), Rights::NONE);
    }

    #[test]
    fn groups_union() {
        let a = acl("A:G:readers@:r,A:G:writers@:w,A:G:GROUP@:-,A::EVERYONE@:rw");
        let both = client("carol", &["readers", "writers"]);
        assert_eq!(a.rights(&both, "owner", "pgroup"), Rights::ALL);
        let reader = client("dave", &["readers", "pgroup"]);
        assert_eq!(a.rights(&reader, "owner", "pgroup"), Rights::READ);
        let writer = client("erin", &["writers"]);
        assert_eq!(a.rights(&writer, "owner", "pgroup"), Rights::WRITE);
        // GROUP@ matches by the owner group.
        let a = acl("A:G:GROUP@:r,A:G:staff@:w");
        let frank = client("frank", &["pgroup", "staff"]);
        assert_eq!(a.rights(&frank, "owner", "pgroup"), Rights::ALL);
        assert_eq!(a.rights(&frank, "owner", "other"), Rights::WRITE);
    }

    #[test]
    fn matched_group_decides_even_below_everyone() {
        let a = acl("A:G:interns@:r,A::EVERYONE@:rw");
        assert_eq!(
            a.rights(&client("gina", &["interns"]), "owner", "pgroup"),
            Rights::READ
        );
        let a = acl("A:G:GROUP@:-,A::EVERYONE@:rw");
        assert_eq!(
            a.rights(&client("hank", &["pgroup"]), "owner", "pgroup"),
            Rights::NONE
        );
        assert_eq!(a.rights(&client("ivy", &[]), "owner", "pgroup"), Rights::ALL);
    }

    #[test]
    fn nobody_matching_gets_nothing() {
        let a = Acl::default_pool();
        let stranger = client("stranger", &["elsewhere"]);
        assert_eq!(a.rights(&stranger, "owner", "pgroup"), Rights::NONE);
        assert_eq!(
            Acl::default().rights(&stranger, "stranger", "elsewhere"),
            Rights::NONE
        );
        // The default pool ACL lets the owner and the owner group in.
        assert_eq!(a.rights(&client("owner", &[]), "owner", "pgroup"), Rights::ALL);
        assert_eq!(
            a.rights(&client("x", &["pgroup"]), "owner", "pgroup"),
            Rights::ALL
        );
        // An empty owner or owner group matches nobody.
        let nameless = client("", &[""]);
        assert_eq!(a.rights(&nameless, "", ""), Rights::NONE);
    }

    #[test]
    fn admin_does_not_bypass() {
        let root = client("root", &["admin"]);
        assert!(root.admin);
        assert_eq!(Acl::default_pool().rights(&root, "owner", "pgroup"), Rights::NONE);
        let a = acl("A:G:admin@:r");
        assert_eq!(a.rights(&root, "owner", "pgroup"), Rights::READ);
    }

    fn arb_rights() -> impl Strategy<Value = Rights> {
        (any::<bool>(), any::<bool>()).prop_map(|(read, write)| Rights { read, write })
    }

    fn arb_principal() -> impl Strategy<Value = AcePrincipal> {
        let name = "[a-zA-Z0-9_.@é-]{1,12}".prop_map(|n| {
            if RESERVED_NAMES.contains(&n.as_str()) {
                format!("{n}x")
            } else {
                n
            }
        });
        prop_oneof![
            Just(AcePrincipal::Owner),
            Just(AcePrincipal::OwnerGroup),
            Just(AcePrincipal::Everyone),
            name.clone().prop_map(AcePrincipal::User),
            name.prop_map(AcePrincipal::Group),
        ]
    }

    fn arb_acl() -> impl Strategy<Value = Acl> {
        proptest::collection::vec((arb_principal(), arb_rights()), 0..80).prop_map(|entries| {
            let mut acl = Acl::default();
            for (principal, rights) in entries {
                if acl.0.len() < Acl::MAX_ENTRIES && acl.get(&principal).is_none() {
                    acl.0.push(Ace::new(principal, rights));
                }
            }
            acl
        })
    }

    proptest! {
        #[test]
        fn parse_display_round_trips(a in arb_acl()) {
            prop_assert_eq!(a.validate(), Ok(()));
            prop_assert_eq!(a.to_string().parse::<Acl>(), Ok(a.clone()));
            prop_assert_eq!(format!("{a:#}").parse::<Acl>(), Ok(a.clone()));
            for ace in &a.0 {
                prop_assert_eq!(ace.to_string().parse::<Ace>(), Ok(ace.clone()));
                let principal = ace.principal.to_string().parse::<AcePrincipal>();
                prop_assert_eq!(principal, Ok(ace.principal.clone()));
            }
        }
    }
}
