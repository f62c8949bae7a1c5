//! One child process that cannot outlive the harness.

use std::path::Path;
use std::process::Stdio;

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// A child process: killed (SIGKILL) when dropped, and by the kernel when the harness dies.
pub struct Proc {
    child: Child,
    /// Its stdout, line by line, if piped.
    pub stdout: Option<Lines<BufReader<ChildStdout>>>,
}

impl Proc {
    /// Starts `cmd` with stdout piped and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Result<Proc, String> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        cmd.stdout(Stdio::piped())
            .stderr(err)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: the closure runs in the child between fork and exec and only makes one
        // async-signal-safe system call (prctl).
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(Proc { child, stdout })
    }

    /// Waits for the next stdout line that contains `needle`, up to `deadline`.
    pub async fn line_with(&mut self, needle: &str, deadline: std::time::Duration) -> Result<String, String> {
        let lines = self.stdout.as_mut().ok_or("stdout is not piped")?;
        let read = async {
            loop {
                match lines.next_line().await {
                    Ok(Some(l)) if l.contains(needle) => return Ok(l),
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err(format!("exited before printing {needle:?}")),
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        tokio::time::timeout(deadline, read)
            .await
            .map_err(|_| format!("did not print {needle:?} within {deadline:?}"))?
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<Pid> {
        self.child.id().and_then(|p| Pid::from_raw(p as i32))
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: Signal) -> Result<(), String> {
        let pid = self.pid().ok_or("process has exited")?;
        rustix::process::kill_process(pid, sig).map_err(|e| format!("kill {sig:?}: {e}"))
    }

    /// SIGKILL, and reap it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then wait up to `deadline` for a clean exit (SIGKILL after that).
    pub async fn stop(mut self, deadline: std::time::Duration) -> Option<std::process::ExitStatus> {
        let _ = self.signal(Signal::TERM);
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(Ok(s)) => Some(s),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        }
    }
}
