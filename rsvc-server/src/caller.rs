//! Who is calling: the principal that a connection's client certificate names.
//!
//! With mutual TLS on, every connection to an engine presents a certificate signed by the
//! cluster CA, and the listener turns it into a [`Caller`] once, at the handshake. A client
//! certificate names a user (its subject's common name) and groups (its subject's organization
//! entries), as Kubernetes and etcd read them. An engine certificate also carries the DNS
//! names [`ENGINE_NAME`] and `rank<N>.`[`ENGINE_NAME`]:
//! only such a connection may send raft messages or replica lifecycle calls.
//!
//! Without TLS nobody is authenticated, so nothing can be authorized: every caller is
//! [`Caller::insecure`], which may do everything (as etcd without auth). That mode is for
//! development on loopback; a non-loopback listener needs `--insecure` to run so.

use rsvc_client::tls::ENGINE_NAME;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The principal behind a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The user: the certificate subject's common name (`anonymous` without TLS).
    pub user: String,
    /// The groups: the certificate subject's organization entries.
    pub groups: Vec<String>,
    /// The rank an engine certificate names; `None` for a client.
    pub engine: Option<u32>,
    /// Whether this caller may administer the system: an engine, or a member of the admin
    /// group (`admin` unless configured otherwise); always without TLS.
    pub admin: bool,
    /// Whether a verified certificate names this caller. `false` only without TLS, where
    /// every check passes.
    pub authenticated: bool,
}

impl Caller {
    /// The caller of a connection without TLS: unauthenticated, so allowed everything.
    pub fn insecure() -> Caller {
        Caller {
            user: "anonymous".into(),
            groups: Vec::new(),
            engine: None,
            admin: true,
            authenticated: false,
        }
    }

    /// An authenticated client `user` in `groups` (tests, and services that act on behalf of
    /// someone); admin if `groups` holds `admin_group`.
    pub fn client(user: &str, groups: &[&str], admin_group: &str) -> Caller {
        Caller {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            engine: None,
            admin: groups.contains(&admin_group),
            authenticated: true,
        }
    }

    /// The caller a verified certificate (DER) names, or why it names none: a certificate
    /// without a common name names nobody.
    pub fn from_cert(der: &[u8], admin_group: &str) -> Result<Caller, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
        let subject = cert.subject();
        let user = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
            .filter(|cn| !cn.is_empty())
            .ok_or("the certificate's subject has no common name (CN), so it names no user")?;
        let groups: Vec<String> = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .map(str::to_string)
            .collect();
        let mut dns = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let GeneralName::DNSName(d) = n {
                    dns.push(d.to_string());
                }
            }
        }
        let engine = if dns.iter().any(|d| d == ENGINE_NAME) {
            let suffix = format!(".{ENGINE_NAME}");
            dns.iter()
                .filter_map(|d| d.strip_suffix(&suffix))
                .filter_map(|r| r.strip_prefix("rank"))
                .find_map(|r| r.parse::<u32>().ok())
        } else {
            None
        };
        let admin = engine.is_some() || groups.iter().any(|g| g == admin_group);
        Ok(Caller {
            user,
            groups,
            engine,
            admin,
            authenticated: true,
        })
    }

    /// Whether this caller is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.authenticated, self.engine) {
            (false, _) => write!(f, "an unauthenticated caller"),
            (true, Some(r)) => write!(f, "engine rank {r}"),
            (true, None) if self.groups.is_empty() => write!(f, "user {:?}", self.user),
            (true, None) => write!(f, "user {:?} (groups {})", self.user, self.groups.join(",")),
        }
    }
}
