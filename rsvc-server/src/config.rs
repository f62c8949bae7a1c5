//! Engine configuration: a TOML file, overridden by command-line flags, with every default in
//! [`FileConfig::default`].
//!
//! ```toml
//! rank = 1
//! listen = "0.0.0.0:7001"
//! advertise = "host1:7001"          # what peers and clients dial; default: the bound address
//! data_dir = "/var/lib/rsvc"
//! cluster = "rsvc"
//! access_points = ["1@host1:7001", "2@host2:7001", "3@host3:7001"]
//! metrics_listen = "0.0.0.0:9101"   # Prometheus text at /metrics; omit to disable
//! reconf_after_secs = 30            # move replicas off an engine down this long; 0: never
//! insecure = false                  # allow a non-loopback listener without TLS
//!
//! [tls]                             # mutual TLS; all three files, or none
//! ca = "/etc/rsvc/ca.crt"
//! cert = "/etc/rsvc/engine-1.crt"
//! key = "/etc/rsvc/engine-1.key"
//! admin_group = "admin"             # client certificates with this O may administer
//!
//! [raft]
//! heartbeat_ms = 50
//! election_timeout_min_ms = 150
//! election_timeout_max_ms = 300
//! append_timeout_ms = 2000          # deadline of an AppendEntries that carries entries
//! snapshot_every_entries = 10000
//! keep_log_behind_snapshot = 1000
//! no_append_free_bytes = 4194304
//! critical_free_bytes = 16384
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rdb::DbConfig;
use serde::Deserialize;

use crate::engine::EngineConfig;

/// rdb tunables as the file spells them.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSection {
    /// Leader heartbeat period.
    pub heartbeat_ms: u64,
    /// Election timeout, lower bound.
    pub election_timeout_min_ms: u64,
    /// Election timeout, upper bound.
    pub election_timeout_max_ms: u64,
    /// Snapshot (and purge the log) every this many entries.
    pub snapshot_every_entries: u64,
    /// Log entries kept behind a snapshot, for followers that lag a little.
    pub keep_log_behind_snapshot: u64,
    /// Refuse ordinary transactions below this much free space.
    pub no_append_free_bytes: u64,
    /// Refuse even critical transactions below this much free space.
    pub critical_free_bytes: u64,
    /// Deadline of an AppendEntries that carries entries (a heartbeat's is derived from the
    /// heartbeat period).
    pub append_timeout_ms: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        let d = DbConfig::default();
        RaftSection {
            heartbeat_ms: d.heartbeat.as_millis() as u64,
            election_timeout_min_ms: d.election_timeout.0.as_millis() as u64,
            election_timeout_max_ms: d.election_timeout.1.as_millis() as u64,
            append_timeout_ms: d.append_timeout.as_millis() as u64,
            snapshot_every_entries: d.snapshot_every_entries,
            keep_log_behind_snapshot: d.keep_log_behind_snapshot,
            no_append_free_bytes: d.no_append_free_bytes,
            critical_free_bytes: d.critical_free_bytes,
        }
    }
}

/// Mutual TLS as the file spells it.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// The cluster CA certificate (PEM).
    pub ca: Option<PathBuf>,
    /// This engine's certificate (PEM): SAN DNS `rsvc-engine` and `rank<N>.rsvc-engine`.
    pub cert: Option<PathBuf>,
    /// This engine's private key (PEM).
    pub key: Option<PathBuf>,
    /// Client certificates whose subject O holds this group may administer the system.
    pub admin_group: String,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            ca: None,
            cert: None,
            key: None,
            admin_group: "admin".into(),
        }
    }
}

/// The engine's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// This engine's rank (required: there is no sensible default).
    pub rank: Option<u32>,
    /// Listen address.
    pub listen: SocketAddr,
    /// Advertised address.
    pub advertise: Option<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// System name.
    pub cluster: String,
    /// `rank@host:port` of every access point.
    pub access_points: Vec<String>,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds an engine may be down before the management leader moves its replicas to a
    /// spare engine; 0 turns automatic reconfiguration off.
    pub reconf_after_secs: u64,
    /// Allow a non-loopback listener without TLS.
    pub insecure: bool,
    /// rdb tunables.
    pub raft: RaftSection,
    /// Mutual TLS.
    pub tls: TlsSection,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            rank: None,
            listen: "127.0.0.1:7001".parse().expect("literal"),
            advertise: None,
            data_dir: PathBuf::from("./rsvc-data"),
            cluster: "rsvc".into(),
            access_points: Vec::new(),
            metrics_listen: None,
            reconf_after_secs: 30,
            insecure: false,
            raft: RaftSection::default(),
            tls: TlsSection::default(),
        }
    }
}

/// Parses `rank@host:port`.
pub fn parse_access_point(s: &str) -> Result<(u32, String), String> {
    let (rank, addr) = s
        .split_once('@')
        .ok_or_else(|| format!("access point {s:?} is not rank@host:port"))?;
    let rank: u32 = rank
        .parse()
        .map_err(|_| format!("access point {s:?}: {rank:?} is not a rank"))?;
    if addr.is_empty() || !addr.contains(':') {
        return Err(format!("access point {s:?}: {addr:?} is not host:port"));
    }
    Ok((rank, addr.to_string()))
}

impl FileConfig {
    /// Reads a TOML file.
    pub fn load(path: &std::path::Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks the values and builds the engine's configuration.
    pub fn engine_config(&self) -> Result<EngineConfig, String> {
        let rank = self.rank.ok_or("rank is required (in the file or as --rank)")?;
        let r = &self.raft;
        if r.election_timeout_min_ms >= r.election_timeout_max_ms {
            return Err(format!(
                "election_timeout_min_ms ({}) must be below election_timeout_max_ms ({})",
                r.election_timeout_min_ms, r.election_timeout_max_ms
            ));
        }
        if r.heartbeat_ms == 0 || r.heartbeat_ms * 2 > r.election_timeout_min_ms {
            return Err(format!(
                "heartbeat_ms ({}) must be more than 0 and at most half of election_timeout_min_ms ({})",
                r.heartbeat_ms, r.election_timeout_min_ms
            ));
        }
        if r.append_timeout_ms == 0 {
            return Err("append_timeout_ms must be more than 0".into());
        }
        let db = DbConfig {
            heartbeat: Duration::from_millis(r.heartbeat_ms),
            election_timeout: (
                Duration::from_millis(r.election_timeout_min_ms),
                Duration::from_millis(r.election_timeout_max_ms),
            ),
            quorum_timeout: Duration::from_millis(r.election_timeout_max_ms),
            append_timeout: Duration::from_millis(r.append_timeout_ms),
            snapshot_every_entries: r.snapshot_every_entries,
            keep_log_behind_snapshot: r.keep_log_behind_snapshot,
            no_append_free_bytes: r.no_append_free_bytes,
            critical_free_bytes: r.critical_free_bytes,
            ..DbConfig::default()
        };
        let access_points: Result<Vec<_>, _> =
            self.access_points.iter().map(|s| parse_access_point(s)).collect();
        if self.cluster.is_empty() {
            return Err("cluster name must not be empty".into());
        }
        let t = &self.tls;
        let tls = match rsvc_client::tls::TlsPaths::from_parts(t.ca.clone(), t.cert.clone(), t.key.clone())? {
            None => None,
            Some(paths) => Some(rsvc_client::tls::TlsFiles::load(paths).map_err(|e| format!("TLS: {e}"))?),
        };
        if t.admin_group.is_empty() {
            return Err("admin_group must not be empty".into());
        }
        Ok(EngineConfig {
            rank,
            listen: self.listen,
            advertise: self.advertise.clone(),
            data_dir: self.data_dir.clone(),
            cluster: self.cluster.clone(),
            db,
            access_points: access_points?,
            reconf_after: (self.reconf_after_secs > 0).then(|| Duration::from_secs(self.reconf_after_secs)),
            limits: crate::engine::EngineLimits::default(),
            tls,
            admin_group: t.admin_group.clone(),
            insecure: self.insecure,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_errors() {
        let c: FileConfig = toml::from_str(
            r#"
            rank = 3
            listen = "127.0.0.1:0"
            access_points = ["1@a:1", "2@b:2"]
            [raft]
            heartbeat_ms = 40
            "#,
        )
        .unwrap();
        let e = c.engine_config().unwrap();
        assert_eq!(e.rank, 3);
        assert_eq!(
            e.access_points,
            vec![(1, "a:1".to_string()), (2, "b:2".to_string())]
        );
        assert_eq!(e.db.heartbeat, Duration::from_millis(40));
        assert_eq!(e.db.election_timeout.1, DbConfig::default().election_timeout.1);

        assert!(
            toml::from_str::<FileConfig>("rank = 1\nbogus = 2").is_err(),
            "unknown keys are errors"
        );
        assert!(FileConfig::default()
            .engine_config()
            .unwrap_err()
            .contains("rank is required"));
        let partial: FileConfig =
            toml::from_str("rank = 1\n[tls]\nca = \"/x/ca.crt\"\ncert = \"/x/e.crt\"").unwrap();
        let e = partial.engine_config().unwrap_err();
        assert!(e.contains("--tls-key missing"), "{e}");
        let absent: FileConfig = toml::from_str(
            "rank = 1\n[tls]\nca = \"/nonexistent/ca.crt\"\ncert = \"/x/e.crt\"\nkey = \"/x/e.key\"",
        )
        .unwrap();
        let e = absent.engine_config().unwrap_err();
        assert!(e.contains("/nonexistent/ca.crt"), "{e}");
        let insecure: FileConfig = toml::from_str("rank = 1\ninsecure = true").unwrap();
        assert!(insecure.engine_config().unwrap().insecure);
        assert!(parse_access_point("x@a:1").is_err());
        assert!(parse_access_point("1-a:1").is_err());
        assert!(parse_access_point("1@nohostport").is_err());
    }
}
