//! The leadership driver: feeds `leadership::Leadership` with metrics, proofs and
//! resignations, and carries out the actions it returns.

use super::*;

/// What the leadership driver is told besides metrics.
pub(super) enum LeaderCmd {
    Resign { until: Instant },
    Unresign,
}

/// What the leadership driver works with.
pub(super) struct Driver {
    pub(super) raft: Raft,
    pub(super) cfg: DbConfig,
    /// Publishes the term this replica serves as leader in.
    pub(super) up: watch::Sender<Option<u64>>,
    pub(super) events: mpsc::UnboundedSender<LeaderEvent>,
    pub(super) cmds: mpsc::UnboundedReceiver<LeaderCmd>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) me: ReplicaId,
    pub(super) lease: Arc<Mutex<Option<(u64, Instant)>>>,
}

/// One metrics sample as the policy sees it.
fn observe(m: &openraft::RaftMetrics<TypeConfig>) -> Observed {
    let leading = leader_term(m);
    let sole_voter = {
        let mut voters = m.membership_config.membership().voter_ids();
        voters.next() == Some(m.id) && voters.next().is_none()
    };
    let quorum_acked = match leading {
        Some(_) if sole_voter => Some(Instant::now()),
        Some(_) => m
            .last_quorum_acked
            .as_ref()
            .and_then(|at| Instant::now().checked_sub(openraft::Instant::elapsed(&**at))),
        None => None,
    };
    Observed {
        leading,
        other_leader: m.current_leader.is_some_and(|l| l != m.id),
        quorum_acked,
    }
}

/// Proves leadership of the current term: a ReadIndex round, then the whole log applied.
async fn prove(raft: Raft, cfg: DbConfig) -> bool {
    let confirmed = matches!(
        tokio::time::timeout(
            cfg.quorum_timeout,
            raft.ensure_linearizable(ReadPolicy::ReadIndex)
        )
        .await,
        Ok(Ok(_))
    );
    if !confirmed {
        return false;
    }
    // NB: a ReadIndex only covers the commit index this leader knows. Before serving,
    // everything in the log when it took office must be applied: the new term's first entry
    // (DAOS's debut entry) commits every entry before it. (Leaders never resume a term after a
    // restart without an election; see `DbConfig::raft_config`.)
    let target = raft.metrics().borrow_watched().last_log_index;
    raft.wait(Some(cfg.election_timeout.1))
        .applied_index_at_least(target, "leader applies its whole log")
        .await
        .is_ok()
}

/// How many times too slowly this replica's clock measures durations: 1 but under the fault
/// suite's `rdb::lease::slow_clock` failpoint (`return(8)`), which shows what the read lease
/// rests on. A leader whose clock runs slow holds its lease, and serves reads alone, longer
/// than its followers wait before they elect another: reads can then be stale. Builds without
/// the `failpoints` feature always answer 1.
fn clock_slowdown() -> f64 {
    fail::fail_point!("rdb::lease::slow_clock", |arg| {
        arg.and_then(|a| a.parse::<f64>().ok())
            .filter(|f| *f >= 1.0)
            .unwrap_or(1.0)
    });
    1.0
}

/// Feeds the leadership policy (see `leadership.rs`) and carries out what it decides.
pub(super) async fn run_leadership(d: Driver) {
    let Driver {
        raft,
        cfg,
        up,
        events,
        mut cmds,
        mut shutdown,
        me,
        lease,
    } = d;
    let base = Policy {
        read_lease: cfg.read_lease(),
        quorum_timeout: cfg.quorum_timeout,
        startup_hold: cfg.election_timeout.1,
        lease_reads: cfg.lease_reads,
    };
    let mut policy = Leadership::new(base);
    let mut metrics = raft.metrics();
    let (proof_tx, mut proofs) = mpsc::unbounded_channel::<(u64, bool)>();
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut input = Input::Started;
    loop {
        let prev = policy.up();
        let slow = clock_slowdown();
        policy.set_timers(base.read_lease.mul_f64(slow), base.quorum_timeout.mul_f64(slow));
        let actions = policy.step(Instant::now(), input);
        // Publish first: a service that hears StepUp can begin at once, and one that hears
        // StepDown finds nothing left to serve.
        *lease.lock().expect("lock") = policy.lease();
        if policy.up() != prev {
            up.send_replace(policy.up());
        }
        for a in actions {
            match a {
                Action::Event(ev) => {
                    match ev {
                        LeaderEvent::StepUp { term } => tracing::info!(replica = %me, term, "step up"),
                        LeaderEvent::StepDown { term } => tracing::info!(replica = %me, term, "step down"),
                    }
                    let _ = events.send(ev);
                }
                Action::Prove { id, .. } => {
                    let (raft, cfg, tx) = (raft.clone(), cfg.clone(), proof_tx.clone());
                    tokio::spawn(async move {
                        let _ = tx.send((id, prove(raft, cfg).await));
                    });
                }
                Action::Heartbeats(on) => raft.runtime_config().heartbeat(on),
                Action::Elections(on) => raft.runtime_config().elect(on),
            }
        }
        input = tokio::select! {
            _ = shutdown.changed() => break,
            r = metrics.changed() => {
                if r.is_err() {
                    break;
                }
                Input::Observe(observe(&metrics.borrow_watched()))
            }
            _ = tick.tick() => Input::Observe(observe(&metrics.borrow_watched())),
            Some(cmd) = cmds.recv() => match cmd {
                LeaderCmd::Resign { until } => Input::Resign { until },
                LeaderCmd::Unresign => Input::Unresign,
            },
            Some((id, ok)) = proofs.recv() => Input::ProofDone { id, ok },
        };
    }
    *lease.lock().expect("lock") = None;
    up.send_replace(None);
    if let Some(term) = policy.up() {
        tracing::info!(replica = %me, term, "step down");
        let _ = events.send(LeaderEvent::StepDown { term });
    }
}
