//! Scale: many idle service instances (pools of 3 replicas) across 3 engines. How fast they are
//! created, and what they cost at rest: CPU per engine over a quiet window, and RSS per engine.
//! etcd has no counterpart (one etcd cluster is one raft group), so only rsvc's column is set.

use std::time::{Duration, Instant};

use rsvc_tests::rsvc::{EngineCmd, RsvcSystem, Timers};

use crate::report::{Better, Report};

/// CPU seconds (user + system) the process `pid` has used.
fn cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Some(ticks / hz)
}

/// Resident set size of `pid`, in MiB.
fn rss_mib(pid: i32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Creates instances up to each of `counts` in turn and measures after each.
pub(crate) async fn run(
    rep: &mut Report,
    dir: &std::path::Path,
    cmd: EngineCmd,
    counts: &[usize],
    window: Duration,
) -> Result<(), String> {
    let sys = RsvcSystem::start(&dir.join("rsvc-scale"), cmd, 3, Timers::defaults()).await?;
    let pids: Vec<i32> = (1..=3u32)
        .filter_map(|r| sys.pid(r).map(|p| p.as_raw_nonzero().get()))
        .collect();
    let mut have = 0usize;
    for &n in counts {
        let t = Instant::now();
        let made = n.saturating_sub(have);
        for i in have..n {
            if let Err(e) = sys.create_pool(&format!("idle{i:05}"), 3).await {
                let r = rep.row(
                    format!("scale: instances created before the first failure (of {n})"),
                    "count",
                    Better::Higher,
                );
                r.rsvc = Some(i as f64);
                let busy = pids.iter().filter_map(|p| cpu_secs(*p)).sum::<f64>();
                return Err(format!(
                    "{e} (the engines had used {busy:.0} CPU seconds in all; see {})",
                    sys.log(1).display()
                ));
            }
        }
        let create = t.elapsed();
        have = n;
        if made > 0 {
            let r = rep.row(
                format!("scale: create instances {}..{n}", n - made + 1),
                "per s",
                Better::Higher,
            );
            r.rsvc = Some(made as f64 / create.as_secs_f64());
        }
        let before: Vec<f64> = pids.iter().filter_map(|p| cpu_secs(*p)).collect();
        let t = Instant::now();
        tokio::time::sleep(window).await;
        let secs = t.elapsed().as_secs_f64();
        let after: Vec<f64> = pids.iter().filter_map(|p| cpu_secs(*p)).collect();
        let cores: Vec<f64> = after.iter().zip(&before).map(|(a, b)| (a - b) / secs).collect();
        let max_cores = cores.iter().copied().fold(0.0, f64::max);
        let r = rep.row(
            format!("scale: {n} idle instances, CPU of the busiest engine"),
            "cores",
            Better::Lower,
        );
        r.rsvc = Some(max_cores);
        // The three engines share this machine's cores: their sum against the core count
        // says when the machine, not an engine, is the limit.
        let r = rep.row(
            format!("scale: {n} idle instances, CPU of all 3 engines"),
            "cores",
            Better::Lower,
        );
        r.rsvc = Some(cores.iter().sum());
        let rss = pids.iter().filter_map(|p| rss_mib(*p)).fold(0.0, f64::max);
        let r = rep.row(
            format!("scale: {n} idle instances, RSS of the largest engine"),
            "MiB",
            Better::Lower,
        );
        r.rsvc = Some(rss);
    }
    Ok(())
}
