//! Development certificates: a CA, engine certificates and client certificates for mutual
//! TLS, in one step (as CockroachDB's `cert create-ca`, `create-node` and `create-client`).
//!
//! [`generate`] writes into one directory:
//!
//! | file | what |
//! |---|---|
//! | `ca.crt`, `ca.key` | the CA (CN `rsvc CA`, OU `development CA <random id>`), made on the first run and reused after |
//! | `engine-<rank>.crt`, `engine-<rank>.key` | an engine's certificate and key, one pair per rank |
//! | `<user>.crt`, `<user>.key` | a client's certificate and key, one pair per user |
//!
//! The directory is created with mode 0700; certificates are 0644, keys 0600 from the moment
//! they exist. Keys are ECDSA P-256 in unencrypted PKCS#8 PEM.
//!
//! ## NAMING CONVENTION
//!
//! What [`Caller::from_cert`](crate::caller::Caller::from_cert) reads, and what certificates
//! from any other CA (the production path) must follow too:
//!
//! - An engine certificate carries the SAN DNS names [`ENGINE_NAME`] (`rsvc-engine`: what
//!   clients and other engines verify an engine against) and `rank<N>.rsvc-engine` (which
//!   rank it is: only such a peer may send raft messages or replica lifecycle calls), and the
//!   extended key usages serverAuth and clientAuth (it listens, and it calls other engines).
//!   Here its subject is CN `rsvc-engine-<N>`, and it also names `localhost` and `127.0.0.1`.
//! - A client certificate names the user in its subject's common name (CN) and each group in
//!   an organization (O) entry of its subject, one entry per group, as Kubernetes and etcd
//!   read them; its extended key usage is clientAuth. Membership of the admin group (`admin`
//!   unless configured otherwise) makes the caller an administrator.
//!
//! ## ADDING ENGINES AND USERS LATER
//!
//! When `ca.crt` and `ca.key` both exist, [`generate`] signs the new certificates with them
//! instead of making a new CA, so an engine or a user can be added to a running system:
//! `generate` with just that rank or user. It refuses to replace an engine's or a user's
//! existing certificate or key unless [`CertSpec::force`] is set, and it never replaces the
//! CA: to start over, use another directory or remove `ca.crt` and `ca.key` (every
//! certificate the old CA signed then stops working). A directory with only one of the two
//! is an error.
//!
//! Generating into a different directory makes a new, unrelated CA with its own
//! certificates: that is how tests get a "wrong CA" for the unknown-issuer error (each new
//! CA's subject has a random OU besides CN `rsvc CA`, so that two never share a name, and a
//! certificate of the other fails as an unknown issuer rather than a bad signature), and
//! [`CertSpec::expired`] gives certificates whose validity ended yesterday for the expired
//! certificate error.
//!
//! ## CAVEATS
//!
//! - For development and tests. The CA's private key lies on disk, unencrypted, next to the
//!   certificates: whoever reads `ca.key` can make a certificate for any user or any engine,
//!   and so administer the system. Production wants a CA whose key stays elsewhere (offline,
//!   or an HSM or a secrets manager) and certificates that follow the convention above.
//! - No revocation: there is no CRL and no OCSP, and engines check none. A leaked key is
//!   valid until its certificate expires; the remedy is a new CA and new certificates.
//! - A new CA is valid for ten years, or for [`CertSpec::valid_for`] if that is longer. A
//!   reused CA that has expired is refused, but one that expires before the certificates it
//!   signs is not: they stop verifying when it does.
//!
//! NB: rcgen keeps one value per attribute type in a subject, so a client certificate with
//! several groups cannot come from it as is. This module writes a client certificate's
//! subject (and every certificate's issuer, the CA's subject byte for byte) into the
//! to-be-signed part that rcgen made, and signs that again with the CA's key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, PublicKeyData, SigningKey,
};
use rsvc_client::tls::ENGINE_NAME;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

/// The common name of a CA that [`generate`] makes.
pub const CA_NAME: &str = "rsvc CA";

/// The CA certificate's file name in the output directory.
pub const CA_CERT: &str = "ca.crt";

/// The CA key's file name in the output directory.
pub const CA_KEY: &str = "ca.key";

/// How long certificates are valid unless said otherwise: 365 days.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 86_400);

/// The longest validity [`generate`] accepts: 100 years.
pub const MAX_VALIDITY: Duration = Duration::from_secs(36_500 * 86_400);

/// How long a new CA is valid at least: ten years.
const CA_VALIDITY: Duration = Duration::from_secs(3_650 * 86_400);

/// How far back a certificate's validity starts, for clocks that lag this one.
const CLOCK_SKEW: Duration = Duration::from_secs(3_600);

const DAY: Duration = Duration::from_secs(86_400);

/// What [`generate`] makes, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSpec {
    /// The directory to write into; created with mode 0700 if missing.
    pub out: PathBuf,
    /// The engines to make certificates for, by rank.
    pub ranks: Vec<u32>,
    /// The clients to make certificates for: each user's name and groups.
    pub users: Vec<(String, Vec<String>)>,
    /// How long the engine and client certificates are valid, from now.
    pub valid_for: Duration,
    /// Make the engine and client certificates already expired (valid from two days ago to
    /// one day ago), for tests of the expired-certificate error. The CA stays valid.
    pub expired: bool,
    /// Replace the certificates and keys of the engines and users named that exist (never
    /// the CA's).
    pub force: bool,
}

impl CertSpec {
    /// Nothing to make yet, into `out`, valid for [`DEFAULT_VALIDITY`].
    pub fn new(out: impl Into<PathBuf>) -> CertSpec {
        CertSpec {
            out: out.into(),
            ranks: Vec::new(),
            users: Vec::new(),
            valid_for: DEFAULT_VALIDITY,
            expired: false,
            force: false,
        }
    }

    /// Adds an engine certificate for `rank`.
    pub fn rank(mut self, rank: u32) -> CertSpec {
        self.ranks.push(rank);
        self
    }

    /// Adds a client certificate for `user` in `groups`.
    pub fn user(mut self, user: &str, groups: &[&str]) -> CertSpec {
        self.users
            .push((user.to_string(), groups.iter().map(|g| g.to_string()).collect()));
        self
    }
}

/// The certificate and key files of engine `rank` in `dir`.
pub fn engine_files(dir: &Path, rank: u32) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("engine-{rank}.crt")),
        dir.join(format!("engine-{rank}.key")),
    )
}

/// The certificate and key files of client `user` in `dir`.
pub fn user_files(dir: &Path, user: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{user}.crt")), dir.join(format!("{user}.key")))
}

/// Checks a user or group name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with a dot (a
/// user's name becomes a file name).
pub fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a {what} name: use 1 to 64 of A-Z a-z 0-9 . _ - and do not start with a dot"
        ))
    }
}

/// Parses a user as the command line gives it: `USER` (no groups) or `USER:GROUP,GROUP,...`.
pub fn parse_user_spec(s: &str) -> Result<(String, Vec<String>), String> {
    let (user, groups) = match s.split_once(':') {
        None => (s, Vec::new()),
        Some((_, "")) => {
            return Err(format!(
                "{s:?}: no groups after ':' (say USER or USER:GROUP,GROUP)"
            ))
        }
        Some((u, g)) => (u, g.split(',').map(str::to_string).collect()),
    };
    check_user(user)?;
    for g in &groups {
        check_name("group", g)?;
    }
    Ok((user.to_string(), groups))
}

/// Checks a user's name, and that its files cannot be mistaken for the CA's or an engine's.
fn check_user(user: &str) -> Result<(), String> {
    check_name("user", user)?;
    let engine_like = user
        .strip_prefix("engine-")
        .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()));
    if user == "ca" || engine_like {
        return Err(format!(
            "user name {user:?} is reserved: its files would be those of the CA or an engine"
        ));
    }
    Ok(())
}

/// Checks a spec before anything is written.
fn check_spec(spec: &CertSpec) -> Result<(), String> {
    if spec.ranks.is_empty() && spec.users.is_empty() {
        return Err("nothing to make: name at least one engine rank or one user".into());
    }
    if spec.valid_for.is_zero() || spec.valid_for > MAX_VALIDITY {
        return Err(format!(
            "a validity of {} days is out of range: more than 0 and at most {} days",
            spec.valid_for.as_secs() / 86_400,
            MAX_VALIDITY.as_secs() / 86_400
        ));
    }
    for (i, r) in spec.ranks.iter().enumerate() {
        if spec.ranks[..i].contains(r) {
            return Err(format!("rank {r} is named twice"));
        }
    }
    for (i, (user, groups)) in spec.users.iter().enumerate() {
        check_user(user)?;
        if spec.users[..i].iter().any(|(u, _)| u == user) {
            return Err(format!("user {user:?} is named twice"));
        }
        for g in groups {
            check_name("group", g)?;
        }
    }
    Ok(())
}

/// Makes the CA (unless `spec.out` holds one already) and the certificates and keys of
/// `spec`'s engines and users, and returns the files written, the CA's first if it is new.
///
/// Everything is checked before anything is written: the names, and that no engine or user
/// file exists unless `spec.force`. An existing CA is reused (see the module documentation);
/// a directory with only one of `ca.crt` and `ca.key`, or with a CA that cannot sign (not a
/// CA, expired, a key that is not its own), is an error.
pub fn generate(spec: &CertSpec) -> Result<Vec<PathBuf>, String> {
    check_spec(spec)?;
    let dir = &spec.out;
    let (ca_crt, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let reuse = match (ca_crt.exists(), ca_key.exists()) {
        (true, true) => true,
        (false, false) => false,
        (has_crt, _) => {
            let (there, missing) = if has_crt {
                (&ca_crt, &ca_key)
            } else {
                (&ca_key, &ca_crt)
            };
            return Err(format!(
                "{} exists but {} does not: a CA needs both (restore the missing one, or move \
                 the other away to make a new CA)",
                there.display(),
                missing.display()
            ));
        }
    };
    let mut leaves: Vec<(PathBuf, PathBuf, Leaf<'_>)> = Vec::new();
    for &rank in &spec.ranks {
        let (c, k) = engine_files(dir, rank);
        leaves.push((c, k, Leaf::Engine(rank)));
    }
    for (user, groups) in &spec.users {
        let (c, k) = user_files(dir, user);
        leaves.push((c, k, Leaf::User(user, groups)));
    }
    if !spec.force {
        for (c, k, _) in &leaves {
            for f in [c, k] {
                if f.exists() {
                    return Err(format!(
                        "{} exists: refusing to overwrite it (`--force` replaces an engine's or \
                         a user's files)",
                        f.display()
                    ));
                }
            }
        }
    }
    if dir.exists() && !dir.is_dir() {
        return Err(format!("{} exists and is not a directory", dir.display()));
    }
    let now = SystemTime::now();
    let ca = if reuse {
        Some(Ca::load(&ca_crt, &ca_key, now)?)
    } else {
        None
    };

    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let ca = match ca {
        Some(ca) => ca,
        None => {
            let (ca, cert_pem, key_pem) = Ca::create(now, spec.valid_for.max(CA_VALIDITY))?;
            write_file(&ca_key, &key_pem, 0o600, false)?;
            written.push(ca_key.clone());
            write_file(&ca_crt, &cert_pem, 0o644, false)?;
            written.push(ca_crt.clone());
            ca
        }
    };
    for (cert_path, key_path, leaf) in &leaves {
        let (cert_pem, key_pem) = ca.issue(leaf, now, spec)?;
        write_file(key_path, &key_pem, 0o600, spec.force)?;
        written.push(key_path.clone());
        write_file(cert_path, &cert_pem, 0o644, spec.force)?;
        written.push(cert_path.clone());
    }
    Ok(written)
}

/// An end-entity certificate to make.
enum Leaf<'a> {
    Engine(u32),
    User(&'a str, &'a [String]),
}

/// A CA that signs: its key, its subject as DER, and its subject key identifier.
struct Ca {
    key: KeyPair,
    name: Vec<u8>,
    key_id: Option<Vec<u8>>,
}

impl Ca {
    /// Makes a new CA valid from an hour before `now` for `valid_for`; returns it with its
    /// certificate and key as PEM.
    fn create(now: SystemTime, valid_for: Duration) -> Result<(Ca, String, String), String> {
        let key = KeyPair::generate().map_err(|e| format!("cannot make the CA key: {e}"))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, CA_NAME);
        let id: [u8; 8] = rand::random();
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, format!("development CA {id}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.serial_number = Some(serial());
        set_validity(&mut p, now - CLOCK_SKEW, now + valid_for)?;
        let cert = p
            .self_signed(&key)
            .map_err(|e| format!("cannot make the CA certificate: {e}"))?;
        let (name, key_id) = ca_identity(cert.der())?;
        let key_pem = key.serialize_pem();
        Ok((Ca { key, name, key_id }, pem("CERTIFICATE", cert.der()), key_pem))
    }

    /// Reads the CA in `crt` and `key`, and checks that it can sign at `now`.
    fn load(crt: &Path, key: &Path, now: SystemTime) -> Result<Ca, String> {
        let der = CertificateDer::from_pem_file(crt)
            .map_err(|e| format!("cannot read a certificate from {}: {e}", crt.display()))?;
        let key_pem = fs::read_to_string(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
        let key_pair = KeyPair::from_pem(&key_pem)
            .map_err(|e| format!("{} is not a PKCS#8 private key that can sign: {e}", key.display()))?;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| format!("cannot parse the certificate in {}: {e}", crt.display()))?;
        if !cert.is_ca() {
            return Err(format!(
                "{} is not a CA certificate (no basicConstraints CA:TRUE)",
                crt.display()
            ));
        }
        if cert.public_key().raw != key_pair.subject_public_key_info().as_slice() {
            return Err(format!(
                "{} is not the key of the certificate in {}",
                key.display(),
                crt.display()
            ));
        }
        let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if cert.validity().not_after.timestamp() < now_secs {
            return Err(format!(
                "the CA in {} expired on {}: move {CA_CERT} and {CA_KEY} away (or use another \
                 directory) to make a new one",
                crt.display(),
                cert.validity().not_after
            ));
        }
        let (name, key_id) = ca_identity(&der)?;
        Ok(Ca {
            key: key_pair,
            name,
            key_id,
        })
    }

    /// Makes `leaf`'s key and certificate (PEM), signed by this CA.
    fn issue(&self, leaf: &Leaf<'_>, now: SystemTime, spec: &CertSpec) -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
        let (mut p, subject) = match *leaf {
            Leaf::Engine(rank) => {
                let names = vec![
                    ENGINE_NAME.to_string(),
                    format!("rank{rank}.{ENGINE_NAME}"),
                    "localhost".to_string(),
                    "127.0.0.1".to_string(),
                ];
                let mut p =
                    CertificateParams::new(names).map_err(|e| format!("cannot name engine {rank}: {e}"))?;
                p.distinguished_name = rcgen::DistinguishedName::new();
                p.distinguished_name
                    .push(DnType::CommonName, format!("rsvc-engine-{rank}"));
                p.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                (p, None)
            }
            Leaf::User(user, groups) => {
                let mut p = CertificateParams::default();
                // Replaced by `subject`; rcgen's subject holds one O at most.
                p.distinguished_name = rcgen::DistinguishedName::new();
                p.distinguished_name.push(DnType::CommonName, user);
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                (p, Some(subject_name(user, groups)))
            }
        };
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.serial_number = Some(serial());
        p.use_authority_key_identifier_extension = self.key_id.is_some();
        if spec.expired {
            set_validity(&mut p, now - 2 * DAY, now - DAY)?;
        } else {
            set_validity(&mut p, now - CLOCK_SKEW, now + spec.valid_for)?;
        }
        let mut ip = CertificateParams::default();
        if let Some(id) = &self.key_id {
            ip.key_identifier_method = KeyIdMethod::PreSpecified(id.clone());
        }
        let issuer = Issuer::new(ip, &self.key);
        let cert = p
            .signed_by(&key, &issuer)
            .map_err(|e| format!("cannot make a certificate: {e}"))?;
        let der = resign(cert.der(), &self.name, subject.as_deref(), &self.key)?;
        Ok((pem("CERTIFICATE", &der), key.serialize_pem()))
    }
}

/// A CA certificate's subject (DER) and subject key identifier.
fn ca_identity(der: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("cannot parse the CA certificate: {e}"))?;
    let key_id = cert.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
        _ => None,
    });
    Ok((cert.subject().as_raw().to_vec(), key_id))
}

/// Sets a certificate's validity to [`from`, `to`] (whole seconds).
fn set_validity(p: &mut CertificateParams, from: SystemTime, to: SystemTime) -> Result<(), String> {
    let since_epoch = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| Duration::from_secs(d.as_secs()))
            .map_err(|_| "the clock is before 1970".to_string())
    };
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    p.not_before = epoch + since_epoch(from)?;
    p.not_after = epoch + since_epoch(to)?;
    Ok(())
}

/// A random positive 128-bit serial number.
fn serial() -> rcgen::SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] = (b[0] & 0x7f) | 0x40;
    b.to_vec().into()
}

/// A subject naming `user` (CN) in `groups` (one O each, before the CN as Kubernetes
/// writes them), as DER.
fn subject_name(user: &str, groups: &[String]) -> Vec<u8> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    let rdn = |oid: &[u8], value: &str| {
        let attr = [der(0x06, oid), der(0x0c, value.as_bytes())].concat();
        der(0x31, &der(0x30, &attr))
    };
    let mut rdns: Vec<u8> = groups.iter().flat_map(|g| rdn(O, g)).collect();
    rdns.extend(rdn(CN, user));
    der(0x30, &rdns)
}

/// Replaces the issuer (and the subject, if given) of certificate `cert` and signs it again
/// with `key`, which must be of the algorithm `cert` names.
fn resign(cert: &[u8], issuer: &[u8], subject: Option<&[u8]>, key: &KeyPair) -> Result<Vec<u8>, String> {
    let top = der_split(der_content(cert)?)?;
    let [tbs, alg, _sig] = top[..] else {
        return Err("malformed certificate: not three parts".into());
    };
    let parts = der_split(der_content(tbs)?)?;
    // [0] version (always there in a v3 certificate), serial, signature, issuer, validity,
    // subject, ...
    let skip = usize::from(parts.first().is_some_and(|p| p[0] == 0xa0));
    if parts.len() < skip + 6 {
        return Err("malformed certificate: too few parts".into());
    }
    let mut body = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        body.extend_from_slice(match i.checked_sub(skip) {
            Some(2) => issuer,
            Some(4) => subject.unwrap_or(part),
            _ => part,
        });
    }
    let tbs = der(0x30, &body);
    let sig = key
        .sign(&tbs)
        .map_err(|e| format!("cannot sign a certificate: {e}"))?;
    let mut bits = vec![0u8];
    bits.extend(sig);
    let mut out = tbs;
    out.extend_from_slice(alg);
    out.extend(der(0x03, &bits));
    Ok(der(0x30, &out))
}

/// The header length and content length of the DER element at the start of `buf`.
fn der_header(buf: &[u8]) -> Result<(usize, usize), String> {
    let bad = || "malformed DER".to_string();
    if buf.len() < 2 || buf[0] & 0x1f == 0x1f {
        return Err(bad());
    }
    let first = usize::from(buf[1]);
    if first < 0x80 {
        return Ok((2, first));
    }
    let n = first & 0x7f;
    if n == 0 || n > 4 || buf.len() < 2 + n {
        return Err(bad());
    }
    let len = buf[2..2 + n]
        .iter()
        .fold(0usize, |a, &b| (a << 8) | usize::from(b));
    Ok((2 + n, len))
}

/// The content of the one DER element `tlv`.
fn der_content(tlv: &[u8]) -> Result<&[u8], String> {
    let (h, l) = der_header(tlv)?;
    tlv.get(h..h + l).ok_or_else(|| "truncated DER".to_string())
}

/// Splits `buf`, a run of DER elements, into whole elements (header and content).
fn der_split(mut buf: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (h, l) = der_header(buf)?;
        let end = h
            .checked_add(l)
            .filter(|&e| e <= buf.len())
            .ok_or_else(|| "truncated DER".to_string())?;
        out.push(&buf[..end]);
        buf = &buf[end..];
    }
    Ok(out)
}

/// One DER element: `tag`, the definite length, `content`.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let zeros = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - zeros) as u8);
        out.extend_from_slice(&bytes[zeros..]);
    }
    out.extend_from_slice(content);
    out
}

/// `der` as PEM with `label`: base64 in lines of 64.
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |a, (i, &b)| a | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]
            } else {
                b'='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `contents` to `path` with `mode` from the start: into a temporary file beside it,
/// then renamed over it (`replace`) or linked to it (fails if it exists).
fn write_file(path: &Path, contents: &str, mode: u32, replace: bool) -> Result<(), String> {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    // A leftover of a run that died.
    let _ = fs::remove_file(&tmp);
    let res = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode as asked, whatever the umask: never wider than `mode`.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        if replace {
            return fs::rename(&tmp, path);
        }
        // A link fails if `path` exists; where links are not supported, a rename it is.
        match fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => fs::rename(&tmp, path),
            other => other,
        }
    })();
    let _ = fs::remove_file(&tmp);
    res.map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caller::Caller;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{CertificateError, RootCertStore};
    use rustls_pki_types::{PrivateKeyDer, ServerName, UnixTime};
    use std::sync::Arc;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn cert(p: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(p).unwrap()
    }

    /// The workspace's provider. NB: rustls 0.23.48 deprecates it for lacking post-quantum key
    /// exchange, which verifying a certificate does not use.
    #[allow(deprecated)]
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(dir: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(cert(&dir.join(CA_CERT))).unwrap();
        Arc::new(roots)
    }

    /// Verifies `leaf` as a client certificate against the CA in `ca_dir`.
    fn verify_client(ca_dir: &Path, leaf: &Path) -> Result<(), rustls::Error> {
        let v = WebPkiClientVerifier::builder_with_provider(roots(ca_dir), provider())
            .build()
            .unwrap();
        v.verify_client_cert(&cert(leaf), &[], UnixTime::now())
            .map(|_| ())
    }

    /// Verifies `leaf` as a server certificate for `name` against the CA in `ca_dir`.
    fn verify_server(ca_dir: &Path, leaf: &Path, name: &str) -> Result<(), rustls::Error> {
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca_dir), provider())
            .build()
            .unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        v.verify_server_cert(&cert(leaf), &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn now_secs() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn makes_a_ca_engines_and_users_whose_principals_parse() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let spec = CertSpec::new(&dir)
            .rank(1)
            .rank(2)
            .user("admin", &["admin"])
            .user("alice", &["staff", "ops"])
            .user("bob", &[]);
        let written = generate(&spec).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.key",
                "ca.crt",
                "engine-1.key",
                "engine-1.crt",
                "engine-2.key",
                "engine-2.crt",
                "admin.key",
                "admin.crt",
                "alice.key",
                "alice.crt",
                "bob.key",
                "bob.crt"
            ]
        );
        assert_eq!(mode(&dir), 0o700);
        for p in &written {
            let want = if p.extension().unwrap() == "key" {
                0o600
            } else {
                0o644
            };
            assert_eq!(mode(p), want, "{}", p.display());
        }
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), written.len());
        // Every key is a PEM private key, and the CA is the CA.
        for p in written.iter().filter(|p| p.extension().unwrap() == "key") {
            PrivateKeyDer::from_pem_file(p).unwrap();
        }
        let ca = cert(&dir.join(CA_CERT));
        let (_, ca) = X509Certificate::from_der(&ca).unwrap();
        assert!(ca.is_ca());
        let cn: Vec<_> = ca
            .subject()
            .iter_common_name()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(cn, [CA_NAME]);

        let der = cert(&engine_files(&dir, 2).0);
        let engine = Caller::from_cert(&der, "admin").unwrap();
        assert_eq!(engine.engine, Some(2));
        assert_eq!(engine.user, "rsvc-engine-2");
        assert!(engine.admin && engine.authenticated);

        let admin = Caller::from_cert(&cert(&user_files(&dir, "admin").0), "admin").unwrap();
        assert_eq!(admin, Caller::client("admin", &["admin"], "admin"));
        let alice = Caller::from_cert(&cert(&user_files(&dir, "alice").0), "admin").unwrap();
        assert_eq!(alice, Caller::client("alice", &["staff", "ops"], "admin"));
        assert!(!alice.admin);
        // Another admin group makes another admin.
        assert!(
            Caller::from_cert(&cert(&user_files(&dir, "alice").0), "ops")
                .unwrap()
                .admin
        );
        let bob = Caller::from_cert(&cert(&user_files(&dir, "bob").0), "admin").unwrap();
        assert_eq!(bob, Caller::client("bob", &[], "admin"));
    }

    #[test]
    fn the_chain_verifies_for_its_purposes_and_not_against_another_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        generate(&CertSpec::new(&a).rank(1).user("alice", &["staff", "ops"])).unwrap();
        // Another directory: another, unrelated CA.
        generate(&CertSpec::new(&b).rank(1).user("alice", &["staff"])).unwrap();
        assert_ne!(
            fs::read(a.join(CA_CERT)).unwrap(),
            fs::read(b.join(CA_CERT)).unwrap()
        );

        let (alice, engine) = (user_files(&a, "alice").0, engine_files(&a, 1).0);
        verify_client(&a, &alice).unwrap();
        verify_client(&a, &engine).unwrap();
        for name in [ENGINE_NAME, "rank1.rsvc-engine", "localhost", "127.0.0.1"] {
            verify_server(&a, &engine, name).unwrap();
        }
        // Not another engine's name; a client certificate cannot serve.
        assert!(verify_server(&a, &engine, "rank2.rsvc-engine").is_err());
        assert!(verify_server(&a, &alice, ENGINE_NAME).is_err());

        for leaf in [user_files(&b, "alice").0, engine_files(&b, 1).0] {
            let e = verify_client(&a, &leaf).unwrap_err();
            assert_eq!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            );
            verify_client(&b, &leaf).unwrap();
        }
    }

    #[test]
    fn a_second_run_reuses_the_ca_and_overwrites_only_when_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        generate(&CertSpec::new(dir).rank(1).user("admin", &["admin"])).unwrap();
        let ca = fs::read(dir.join(CA_CERT)).unwrap();
        let ca_key = fs::read(dir.join(CA_KEY)).unwrap();

        // Adding an engine later: signed by the same CA, which is not written again.
        let written = generate(&CertSpec::new(dir).rank(3)).unwrap();
        assert_eq!(written, vec![engine_files(dir, 3).1, engine_files(dir, 3).0]);
        assert_eq!(fs::read(dir.join(CA_CERT)).unwrap(), ca);
        assert_eq!(fs::read(dir.join(CA_KEY)).unwrap(), ca_key);
        verify_client(dir, &engine_files(dir, 3).0).unwrap();

        // Existing files are refused, naming the file, and nothing is written.
        let (crt, key) = engine_files(dir, 1);
        let before = fs::read(&crt).unwrap();
        let e = generate(&CertSpec::new(dir).rank(1).user("new", &[])).unwrap_err();
        assert!(e.contains("engine-1.crt") && e.contains("force"), "{e}");
        assert!(!user_files(dir, "new").0.exists());
        let e = generate(&CertSpec::new(dir).user("admin", &["admin"])).unwrap_err();
        assert!(e.contains("admin.crt"), "{e}");

        // Forced: new certificate and key, same modes, same CA.
        let mut spec = CertSpec::new(dir).rank(1);
        spec.force = true;
        generate(&spec).unwrap();
        assert_ne!(fs::read(&crt).unwrap(), before);
        assert_eq!((mode(&crt), mode(&key)), (0o644, 0o600));
        assert_eq!(fs::read(dir.join(CA_CERT)).unwrap(), ca);
        verify_client(dir, &crt).unwrap();
    }

    #[test]
    fn a_ca_half_there_or_not_matching_its_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        generate(&CertSpec::new(&a).rank(1)).unwrap();
        generate(&CertSpec::new(&b).rank(1)).unwrap();

        fs::remove_file(a.join(CA_KEY)).unwrap();
        let e = generate(&CertSpec::new(&a).rank(2)).unwrap_err();
        assert!(e.contains("ca.crt exists but") && e.contains("ca.key"), "{e}");
        fs::copy(b.join(CA_KEY), a.join(CA_KEY)).unwrap();
        let e = generate(&CertSpec::new(&a).rank(2)).unwrap_err();
        assert!(e.contains("is not the key of"), "{e}");
        fs::remove_file(a.join(CA_CERT)).unwrap();
        let e = generate(&CertSpec::new(&a).rank(2)).unwrap_err();
        assert!(e.contains("ca.key exists but"), "{e}");
        // A CA that is not a CA.
        fs::copy(engine_files(&b, 1).0, a.join(CA_CERT)).unwrap();
        fs::copy(engine_files(&b, 1).1, a.join(CA_KEY)).unwrap();
        let e = generate(&CertSpec::new(&a).rank(2)).unwrap_err();
        assert!(e.contains("not a CA certificate"), "{e}");
        assert!(!engine_files(&a, 2).0.exists());
    }

    #[test]
    fn bad_names_and_empty_specs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let long = "x".repeat(65);
        for user in [
            "",
            "a/b",
            "..",
            ".hidden",
            "a b",
            "é",
            long.as_str(),
            "ca",
            "engine-7",
        ] {
            let e = generate(&CertSpec::new(&dir).user(user, &[])).unwrap_err();
            assert!(e.contains(&format!("{user:?}")), "{user:?}: {e}");
        }
        assert!(generate(&CertSpec::new(&dir).user(&"x".repeat(64), &[])).is_ok());
        let e = generate(&CertSpec::new(&dir).user("carol", &["a,b"])).unwrap_err();
        assert!(e.contains("group"), "{e}");
        let e = generate(&CertSpec::new(&dir).user("carol", &[]).user("carol", &[])).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = generate(&CertSpec::new(&dir).rank(4).rank(4)).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = generate(&CertSpec::new(&dir)).unwrap_err();
        assert!(e.contains("nothing to make"), "{e}");
        let mut spec = CertSpec::new(&dir).rank(1);
        spec.valid_for = Duration::ZERO;
        assert!(generate(&spec).is_err());
        assert!(!user_files(&dir, "carol").0.exists());

        assert_eq!(parse_user_spec("alice"), Ok(("alice".into(), vec![])));
        assert_eq!(
            parse_user_spec("alice:staff,ops"),
            Ok(("alice".into(), vec!["staff".into(), "ops".into()]))
        );
        for bad in [
            "alice:",
            "alice:staff,",
            ":admin",
            "a/b:admin",
            "alice:st:aff",
            "ca:admin",
        ] {
            assert!(parse_user_spec(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expired_certificates_ended_yesterday_under_a_valid_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut spec = CertSpec::new(dir).rank(1).user("alice", &["staff"]);
        spec.expired = true;
        generate(&spec).unwrap();
        let ca = cert(&dir.join(CA_CERT));
        let (_, ca) = X509Certificate::from_der(&ca).unwrap();
        assert!(ca.validity().not_after.timestamp() > now_secs() + 9 * 365 * 86_400);
        for leaf in [engine_files(dir, 1).0, user_files(dir, "alice").0] {
            let der = cert(&leaf);
            let (_, c) = X509Certificate::from_der(&der).unwrap();
            let v = c.validity();
            assert!(v.not_after.timestamp() < now_secs() - 86_000, "{}", v.not_after);
            assert!(v.not_before.timestamp() < v.not_after.timestamp());
            let e = verify_client(dir, &leaf).unwrap_err();
            assert!(
                matches!(
                    e,
                    rustls::Error::InvalidCertificate(
                        CertificateError::Expired | CertificateError::ExpiredContext { .. }
                    )
                ),
                "{e:?}"
            );
        }

        // And a valid one starts an hour ago and lasts `valid_for`.
        let mut spec = CertSpec::new(dir).rank(2);
        spec.valid_for = 30 * DAY;
        generate(&spec).unwrap();
        let der = cert(&engine_files(dir, 2).0);
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        let (nb, na) = (
            c.validity().not_before.timestamp(),
            c.validity().not_after.timestamp(),
        );
        assert!((now_secs() - 3_700..=now_secs() - 3_500).contains(&nb), "{nb}");
        assert!((na - now_secs() - 30 * 86_400).abs() < 100, "{na}");
    }
}
