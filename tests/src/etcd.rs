//! A real etcd cluster (Debian's `etcd-server`, 3.4) of processes on loopback, for side-by-side
//! comparisons. Each member has its own data directory under the harness's, fsync on (etcd's
//! default; nothing here turns it off).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::process::Command;

use crate::proc::Proc;
use crate::{free_port, wait_for, DEADLINE};

/// One member.
pub struct Member {
    /// Its name, `n1`...
    pub name: String,
    /// Its client URL.
    pub client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    /// `--initial-cluster-state`: `new` for the founders, `existing` for a member added later.
    state: &'static str,
    /// The running process, if it runs.
    pub proc: Option<Proc>,
}

/// A 3-member (or N-member) etcd cluster. Dropping it kills the members.
pub struct EtcdCluster {
    dir: PathBuf,
    program: PathBuf,
    /// `--heartbeat-interval` and `--election-timeout`, in ms.
    pub timers: (u64, u64),
    /// Further flags for every member.
    pub extra: Vec<String>,
    /// Members by index 1..=n.
    pub members: BTreeMap<u32, Member>,
}

/// Where etcd is: `$ETCD`, else `etcd` on the PATH.
pub fn etcd_program() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ETCD") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err("etcd not found: install Debian's etcd-server (apt-get install etcd-server) or set ETCD".into())
}

impl EtcdCluster {
    /// Starts `n` members with heartbeat `hb_ms` and election timeout `election_ms`, data
    /// under `dir`, and waits until the cluster has a leader.
    pub async fn start(dir: &Path, n: u32, hb_ms: u64, election_ms: u64) -> Result<EtcdCluster, String> {
        Self::start_with(dir, n, hb_ms, election_ms, Vec::new()).await
    }

    /// [`start`](Self::start) with further flags for every member (e.g. `--snapshot-count`).
    pub async fn start_with(
        dir: &Path,
        n: u32,
        hb_ms: u64,
        election_ms: u64,
        extra: Vec<String>,
    ) -> Result<EtcdCluster, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let program = etcd_program()?;
        let mut members = BTreeMap::new();
        for i in 1..=n {
            members.insert(
                i,
                Member {
                    name: format!("n{i}"),
                    client_url: format!("http://127.0.0.1:{}", free_port()?),
                    peer_url: format!("http://127.0.0.1:{}", free_port()?),
                    data_dir: dir.join(format!("etcd{i}")),
                    state: "new",
                    proc: None,
                },
            );
        }
        let mut c = EtcdCluster {
            dir: dir.to_path_buf(),
            program,
            timers: (hb_ms, election_ms),
            extra,
            members,
        };
        for i in 1..=n {
            c.spawn(i)?;
        }
        c.leader(DEADLINE).await?;
        Ok(c)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .values()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: u32) -> Result<(), String> {
        let initial = self.initial_cluster();
        let m = self.members.get_mut(&i).ok_or("no such member")?;
        let mut cmd = Command::new(&self.program);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(&m.client_url)
            .arg("--advertise-client-urls")
            .arg(&m.client_url)
            .arg("--listen-peer-urls")
            .arg(&m.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&m.peer_url)
            .arg("--initial-cluster")
            .arg(&initial)
            .arg("--initial-cluster-state")
            .arg(m.state)
            .arg("--initial-cluster-token")
            .arg("rsvc-bench")
            .arg("--heartbeat-interval")
            .arg(self.timers.0.to_string())
            .arg("--election-timeout")
            .arg(self.timers.1.to_string())
            .arg("--log-level")
            .arg("warn")
            .args(&self.extra);
        m.proc = Some(Proc::spawn(cmd, &self.dir.join(format!("etcd{i}.log")))?);
        Ok(())
    }

    /// Client URLs of the running members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.proc.is_some())
            .map(|m| m.client_url.clone())
            .collect()
    }

    /// A client of the running members (requests balance over them).
    pub async fn client(&self) -> Result<Client, String> {
        Self::connect(
            &self.endpoints(),
            rsvc_client::ClientConfig::default().rpc_timeout,
        )
        .await
    }

    /// A client of the running members whose requests each give up after `timeout`.
    pub async fn client_with_timeout(&self, timeout: Duration) -> Result<Client, String> {
        Self::connect(&self.endpoints(), timeout).await
    }

    /// A client of one member.
    pub async fn client_of(&self, i: u32) -> Result<Client, String> {
        let m = self.members.get(&i).ok_or("no such member")?;
        Self::connect(
            std::slice::from_ref(&m.client_url),
            rsvc_client::ClientConfig::default().rpc_timeout,
        )
        .await
    }

    async fn connect(endpoints: &[String], timeout: Duration) -> Result<Client, String> {
        // NB: the same connect policy as rsvc's client (ClientConfig's defaults).
        let d = rsvc_client::ClientConfig::default();
        let opts = ConnectOptions::new()
            .with_connect_timeout(d.connect_timeout)
            .with_timeout(timeout);
        Client::connect(endpoints, Some(opts))
            .await
            .map_err(|e| e.to_string())
    }

    /// The member that leads, as the running members report it, waiting up to `deadline`.
    pub async fn leader(&self, deadline: Duration) -> Result<u32, String> {
        wait_for("an etcd leader", deadline, Duration::from_millis(10), || async {
            self.leader_now().await
        })
        .await
    }

    /// The leading member now, if a running member reports one that runs.
    pub async fn leader_now(&self) -> Option<u32> {
        for (i, m) in &self.members {
            if m.proc.is_none() {
                continue;
            }
            let Ok(mut c) = self.client_of(*i).await else {
                continue;
            };
            let Ok(Ok(st)) = tokio::time::timeout(Duration::from_millis(300), c.status()).await else {
                continue;
            };
            let Ok(Ok(list)) = tokio::time::timeout(Duration::from_millis(300), c.member_list()).await else {
                continue;
            };
            let name = list
                .members()
                .iter()
                .find(|x| x.id() == st.leader())
                .map(|x| x.name().to_string());
            if let Some((j, _)) = self
                .members
                .iter()
                .find(|(_, m)| Some(&m.name) == name.as_ref() && m.proc.is_some())
            {
                return Some(*j);
            }
        }
        None
    }

    /// The etcd member id of member `i`.
    pub async fn member_id(&self, i: u32) -> Result<u64, String> {
        let name = &self.members.get(&i).ok_or("no such member")?.name;
        let mut c = self.client().await?;
        let list = c.member_list().await.map_err(|e| e.to_string())?;
        list.members()
            .iter()
            .find(|m| m.name() == name)
            .map(|m| m.id())
            .ok_or_else(|| format!("member {name} not listed"))
    }

    /// Asks the leader `from` to hand leadership to member `to` (etcdctl move-leader).
    pub async fn move_leader(&self, from: u32, to: u32) -> Result<(), String> {
        let id = self.member_id(to).await?;
        let mut c = self.client_of(from).await?;
        c.move_leader(id).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Adds a new member (etcd's `member add`, then the member started with
    /// `--initial-cluster-state existing`) and returns its index. It is started, not caught up.
    pub async fn add_member(&mut self) -> Result<u32, String> {
        let i = self.members.keys().max().copied().unwrap_or(0) + 1;
        let m = Member {
            name: format!("n{i}"),
            client_url: format!("http://127.0.0.1:{}", free_port()?),
            peer_url: format!("http://127.0.0.1:{}", free_port()?),
            data_dir: self.dir.join(format!("etcd{i}")),
            state: "existing",
            proc: None,
        };
        let mut c = self.client().await?;
        // NB: etcd refuses a member add ("unhealthy cluster") until every member has been
        // connected for a few seconds (its strict reconfiguration check), so a fresh cluster is
        // asked again until it agrees.
        let url = m.peer_url.clone();
        wait_for(
            "etcd to accept a new member",
            DEADLINE,
            Duration::from_millis(200),
            || {
                let (mut c, url) = (c.clone(), url.clone());
                async move { c.member_add([url.as_str()], None).await.ok().map(|_| ()) }
            },
        )
        .await?;
        let _ = &mut c;
        self.members.insert(i, m);
        self.spawn(i)?;
        Ok(i)
    }

    /// The raft index member `i` has applied, if it answers.
    pub async fn applied_index(&self, i: u32) -> Option<u64> {
        let mut c = self.client_of(i).await.ok()?;
        let st = tokio::time::timeout(Duration::from_millis(500), c.status())
            .await
            .ok()?
            .ok()?;
        Some(st.raft_applied_index())
    }

    /// kill -9 of member `i`.
    pub async fn kill(&mut self, i: u32) -> Result<(), String> {
        let p = self
            .members
            .get_mut(&i)
            .and_then(|m| m.proc.take())
            .ok_or("not running")?;
        p.kill().await;
        Ok(())
    }

    /// SIGTERM of member `i`, waiting for its exit.
    pub async fn stop(&mut self, i: u32) -> Result<(), String> {
        let p = self
            .members
            .get_mut(&i)
            .and_then(|m| m.proc.take())
            .ok_or("not running")?;
        p.stop(Duration::from_secs(30)).await;
        Ok(())
    }

    /// Starts member `i` again on its data, and waits until it answers.
    pub async fn restart(&mut self, i: u32) -> Result<(), String> {
        self.spawn(i)?;
        wait_for(
            &format!("etcd member {i} to answer"),
            DEADLINE,
            Duration::from_millis(20),
            || async {
                let mut c = self.client_of(i).await.ok()?;
                tokio::time::timeout(Duration::from_millis(300), c.status())
                    .await
                    .ok()?
                    .ok()
                    .map(|_| ())
            },
        )
        .await
    }
}
