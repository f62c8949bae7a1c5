//! A real full disk: three engines whose data share one small tmpfs, driven through the CLI
//! as an operator meets it. Needs root to mount the tmpfs (CI runs as root).

mod common;

use std::path::Path;
use std::time::Instant;

use common::{System, POOL_SVC};
use tempfile::TempDir;

/// A tmpfs mounted on a temporary directory; unmounted (lazily) when dropped.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = TempDir::new().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs and needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, mib: u64) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    fn free(&self) -> u64 {
        let st = rustix::fs::statvfs(self.path()).unwrap();
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.path())
            .status();
    }
}

/// Three engines with their data directories on `fs`.
async fn system_on(fs: &Tmpfs) -> System {
    System::start_with_data(3, fs.path()).await
}

fn create(sys: &System, label: &str) {
    sys.create_pool(label, 3);
}

/// Runs `pool set-attr`; its exit code and how long it took.
fn set_attr(sys: &System, label: &str, name: &str, value: &str) -> (Option<i32>, f64) {
    let t = Instant::now();
    let out = sys.run(POOL_SVC, &["pool", "set-attr", "--label", label, name, value]);
    (out.status.code(), t.elapsed().as_secs_f64())
}

/// Waits (with the harness's deadline) until a write to `tank` is acknowledged again, with no
/// restart, and reports how long that took after `since_what`.
fn writes_resume(sys: &System, since_what: &str) {
    let t = Instant::now();
    sys.wait_for("writes to resume", || {
        (set_attr(sys, "tank", "resumed", "x").0 == Some(0)).then_some(())
    });
    eprintln!(
        "writes resumed {:.3} s after {since_what}",
        t.elapsed().as_secs_f64()
    );
}

/// No engine log says a raft core quit.
fn no_core_quit(sys: &System) {
    for rank in 1..=3 {
        let log = std::fs::read_to_string(sys.rsvc.log(rank)).unwrap_or_default();
        assert!(
            !log.contains("quit RaftCore"),
            "engine {rank}'s raft core quit: {}",
            log.lines()
                .find(|l| l.contains("quit RaftCore"))
                .unwrap_or_default()
        );
    }
}

/// Nearly full from outside (a ballast file), below the no-append threshold: ordinary writes
/// are refused with NoSpace (exit 4) at once, a critical operation (destroying a pool)
/// passes, and writes resume without a restart when the ballast goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_threshold_writes_get_nospace_at_once_and_critical_ops_pass() {
    let fs = Tmpfs::mount(96);
    let sys = system_on(&fs).await;
    create(&sys, "tank");
    create(&sys, "spare");
    assert_eq!(set_attr(&sys, "tank", "before", "1").0, Some(0));

    let ballast = fs.path().join("ballast");
    let size = fs.free().saturating_sub(2800 << 10);
    std::fs::write(&ballast, vec![0u8; size as usize]).unwrap();
    eprintln!("free with the ballast: {} KiB", fs.free() >> 10);
    // A write may still pass on a free-space reading taken before the ballast (readings are
    // cached for 250 ms); after that, every one is refused with NoSpace, never a deadline.
    let secs = sys.wait_for("a write refused with NoSpace", || {
        match set_attr(&sys, "tank", "refused", "x") {
            (Some(0), _) => None,
            (Some(4), secs) => Some(secs),
            (code, _) => panic!("exit {code:?}: neither acknowledged nor NoSpace"),
        }
    });
    eprintln!("set-attr below the threshold: exit 4 after {secs:.3} s");
    assert_eq!(set_attr(&sys, "tank", "refused", "x").0, Some(4));
    sys.json(POOL_SVC, &["pool", "destroy", "--label", "spare", "--json"]);
    no_core_quit(&sys);

    std::fs::remove_file(&ballast).unwrap();
    writes_resume(&sys, "the ballast went");
    let got = sys.json(
        POOL_SVC,
        &["pool", "get-attr", "--label", "tank", "before", "--json"],
    );
    assert!(got.to_string().contains('1'), "{got}");
    drop(sys);
}

/// The leader has room, but both followers share one nearly full filesystem: no quorum can
/// hold an ordinary write, so the leader refuses it with NoSpace at once (the followers report
/// their space on every heartbeat reply) instead of appending what the followers would meet
/// ENOSPC on. Critical operations pass, and writes resume when the followers have room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_short_of_space_make_the_leader_refuse_at_once() {
    let fs = Tmpfs::mount(96);
    let sys = System::start_with_data_of(3, |rank| {
        (rank != 1).then(|| fs.path().join(format!("engine{rank}")))
    })
    .await;
    create(&sys, "tank");
    create(&sys, "spare");
    if sys.pool_leader("tank") != 1 {
        sys.transfer_leader("tank", 1);
    }
    assert_eq!(set_attr(&sys, "tank", "before", "1").0, Some(0));

    let ballast = fs.path().join("ballast");
    let size = fs.free().saturating_sub(2800 << 10);
    std::fs::write(&ballast, vec![0u8; size as usize]).unwrap();
    eprintln!("free on the followers' filesystem: {} KiB", fs.free() >> 10);
    let secs = sys.wait_for("a write refused with NoSpace", || {
        match set_attr(&sys, "tank", "refused", "x") {
            (Some(0), _) => None,
            (Some(4), secs) => Some(secs),
            (code, _) => panic!("exit {code:?}: neither acknowledged nor NoSpace"),
        }
    });
    eprintln!("set-attr with both followers short: exit 4 after {secs:.3} s");
    let out = sys.run(POOL_SVC, &["pool", "set-attr", "--label", "tank", "refused", "x"]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("space"), "the error says why: {err}");
    sys.json(POOL_SVC, &["pool", "destroy", "--label", "spare", "--json"]);
    no_core_quit(&sys);

    std::fs::remove_file(&ballast).unwrap();
    writes_resume(&sys, "the followers' ballast went");
    let got = sys.json(
        POOL_SVC,
        &["pool", "get-attr", "--label", "tank", "before", "--json"],
    );
    assert!(got.to_string().contains('1'), "{got}");
    drop(sys);
}

/// Filled by its own writes: the replicas refuse with NoSpace before the disk is full, so no
/// snapshot or append meets ENOSPC and no raft core quits; every acknowledged write reads back,
/// and once the filesystem grows, writes resume without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filled_by_writes_refuses_before_enospc_and_resumes_when_space_grows() {
    let fs = Tmpfs::mount(96);
    let sys = system_on(&fs).await;
    create(&sys, "tank");
    let value = "v".repeat(64 << 10);
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..2000 {
        let name = format!("a{i:05}");
        match set_attr(&sys, "tank", &name, &value) {
            (Some(0), _) => acked.push(name),
            (Some(4), secs) => {
                refused = Some((i, secs));
                break;
            }
            (code, _) => panic!("write {i}: exit {code:?}, neither acknowledged nor NoSpace"),
        }
    }
    let (at, secs) = refused.expect("the disk never filled");
    eprintln!(
        "{} writes of 64 KiB acknowledged; write {at} refused with NoSpace after {secs:.3} s; {} KiB free",
        acked.len(),
        fs.free() >> 10
    );
    no_core_quit(&sys);
    for name in acked.iter().step_by(17).chain(acked.last()) {
        let out = sys.run(POOL_SVC, &["pool", "get-attr", "--label", "tank", name]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout.len(), value.len() + 1, "{name}");
    }

    fs.resize(256);
    writes_resume(&sys, "the filesystem grew");
    no_core_quit(&sys);
    drop(sys);
}

/// Fills the filesystem at `dir` with a ballast file until ENOSPC; returns its path.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 1 << 20];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => break,
            Err(e) => panic!("ballast: {e}"),
        }
    }
    // Whatever a partial write left: fill it byte-wise.
    while f.write(&[0u8; 4096]).is_ok_and(|n| n > 0) {}
    let _ = f.sync_all();
    path
}

/// One follower's filesystem (its own tmpfs) fills up from outside. Its replicas meet a real
/// ENOSPC (followers do not admit; only leaders do), their raft cores stop, and the group goes
/// on with the other two: every write is acknowledged. When the ballast goes, the engine
/// reopens the stopped replicas by itself, with no restart, they catch up, and every
/// acknowledged write reads back from the replica that was full once it leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_on_a_full_filesystem_stops_then_reopens_by_itself() {
    use rsvc_tests::wait_for;
    let fs = Tmpfs::mount(48);
    let sys = System::start_with_data_of(3, |rank| (rank == 3).then(|| fs.path().join("engine3"))).await;
    create(&sys, "tank");
    // Rank 3 must follow: a full leader refuses writes at once (admission), which is the
    // other tests' scenario.
    if sys.pool_leader("tank") == 3 {
        sys.transfer_leader("tank", 1);
    }
    let ballast = fill(fs.path());
    let value = "v".repeat(16 << 10);
    let mut acked = Vec::new();
    let log3 = sys.rsvc.log(3);
    let t = Instant::now();
    // Write until rank 3 reports the storage error (its log fills), and then some.
    let mut after_stop = 0;
    for i in 0..2000 {
        let name = format!("f{i:05}");
        let (code, _) = set_attr(&sys, "tank", &name, &value);
        assert_eq!(
            code,
            Some(0),
            "write {i} with one follower's disk full was not acknowledged"
        );
        acked.push(name);
        let stopped = std::fs::read_to_string(&log3)
            .unwrap_or_default()
            .contains("replica stopped by a storage error");
        if stopped {
            after_stop += 1;
            if after_stop > 10 {
                break;
            }
        }
    }
    assert!(
        after_stop > 10,
        "rank 3 never met ENOSPC in {} writes",
        acked.len()
    );
    eprintln!(
        "rank 3 stopped by ENOSPC after {:.2} s; {} writes acknowledged, all by the other two",
        t.elapsed().as_secs_f64(),
        acked.len()
    );

    std::fs::remove_file(&ballast).unwrap();
    let freed = Instant::now();
    let leader = sys.pool_leader("tank") as u32;
    let key = ("pool".to_string(), "tank".to_string());
    let target = sys
        .rsvc
        .replica_metric(leader, "rsvc_replica_last_log_index")
        .await
        .unwrap()[&key];
    wait_for(
        "rank 3 to reopen its replica and catch up",
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(50),
        || async {
            let applied = sys
                .rsvc
                .replica_metric(3, "rsvc_replica_applied_index")
                .await
                .ok()?;
            (applied.get(&key).copied()? >= target).then_some(())
        },
    )
    .await
    .unwrap();
    eprintln!(
        "rank 3 reopened and caught up {:.2} s after the ballast went",
        freed.elapsed().as_secs_f64()
    );
    let log = wait_for(
        "rank 3 to report its replicas running again",
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(100),
        || async {
            let log = std::fs::read_to_string(&log3).unwrap_or_default();
            let down = log.matches("replica stopped by a storage error").count();
            let up = log.matches("replica runs again after a storage error").count();
            (down > 0 && up == down).then_some(log)
        },
    )
    .await
    .unwrap();
    for l in log.lines().filter(|l| l.contains("storage error")) {
        eprintln!("rank 3: {l}");
    }
    assert!(
        log.matches("replica stopped by a storage error").count() <= 2,
        "the outage is reported once per replica (pool and management), not per attempt"
    );

    // Rank 3 leads, and every acknowledged write reads back from it.
    sys.transfer_leader("tank", 3);
    for name in &acked {
        let out = sys.run(POOL_SVC, &["pool", "get-attr", "--label", "tank", name]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout.len(), value.len() + 1, "{name}");
    }
    writes_resume(&sys, "rank 3 took over");
    drop(sys);
}
