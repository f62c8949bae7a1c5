//! Leadership policy as a plain state machine: when a replica serves as leader, when it stops,
//! its read lease, and when openraft may campaign or send heartbeats.
//!
//! [`Leadership::step`] takes an [`Input`] (the time, what openraft's metrics say, the result of
//! a proof the driver ran, an operator's resign) and returns [`Action`]s (leadership events,
//! proofs to run, openraft switches). It does no I/O and reads no clock, so every rule below is
//! tested with golden scripts (`golden/*.txt`, run by the tests at the bottom). The async driver
//! in `db` only feeds it and carries out what it returns.
//!
//! RULES
//! - StepUp{t} needs three things: openraft leads term t (a committed vote naming this replica,
//!   state Leader, core running); a proof in term t succeeded (a ReadIndex round, then the
//!   whole log applied: the term's first entry for a fresh leader, and everything written
//!   before a crash for a restored one); and a quorum acknowledged this leader within the
//!   quorum timeout (openraft's `last_quorum_acked`, the send time of the newest RPC a quorum
//!   answered).
//! - StepDown as soon as any of these fails: deposed, stopped, resigned, or no quorum
//!   acknowledgement within the quorum timeout. A leader that regains its quorum in the same
//!   term steps up again without a new proof: the acknowledgements are in that term, and a
//!   quorum that had moved on would refuse them.
//! - The read lease lasts `read_lease` from the quorum acknowledgement, not from when it was
//!   seen, and only while stepped up. Followers refuse votes for `election_timeout_max` after
//!   they last heard from their leader; `read_lease` is half of that, so the lease ends well
//!   before anyone can be elected (clock rates would have to differ by 2x to break this).
//! - After start, elections stay off for `startup_hold` (one maximum election timeout: a
//!   replica that forgot whom it followed must not campaign, or it inflates terms).
//! - While resigned (until its deadline, or until another replica leads), the replica serves
//!   nothing, sends no heartbeats and starts no elections. A proof that was issued before a
//!   resignation never steps up after it (race fixed before in the async loop), and the end
//!   of the startup hold never turns elections on during a resignation (the other race).
//!
//! INVARIANTS (asserted in [`Leadership::step`] and [`Alternator::transition`]):
//! - events alternate StepUp, StepDown, ... starting with StepUp, and a StepDown carries its
//!   StepUp's term; StepUp terms never decrease;
//! - while stepped up in term t: openraft leads t, a proof of t succeeded, the replica is not
//!   resigned, and the lease (if any) is for t and ends within `read_lease` of an
//!   acknowledgement.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::types::TypeConfig;

/// A change of this replica's leadership, delivered in order, one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaderEvent {
    /// This replica now leads `term`: a quorum confirmed it and the term's first entry is applied.
    StepUp {
        /// The raft term now led; never below the previous StepUp's.
        term: u64,
    },
    /// This replica no longer leads `term` (deposed, partitioned, resigned or stopped).
    StepDown {
        /// The term of the StepUp this ends.
        term: u64,
    },
}

/// The term this node leads according to one metrics sample, if any.
///
/// Leading means: openraft's state is Leader, its core runs, and the (flushed) vote is
/// committed and names this node.
pub(crate) fn leader_term(m: &openraft::RaftMetrics<TypeConfig>) -> Option<u64> {
    let vote = &m.vote;
    let leads = m.state == openraft::ServerState::Leader
        && m.running_state.is_ok()
        && vote.committed
        && vote.leader_id.node_id == m.id;
    leads.then_some(vote.leader_id.term)
}

/// Enforces the alternation invariants; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Alternator {
    up: Option<u64>,
    last_up: u64,
}

impl Alternator {
    /// The term this replica currently reports as leading.
    pub(crate) fn up(&self) -> Option<u64> {
        self.up
    }

    /// Moves to `want` and returns the events that get there, in order.
    ///
    /// A StepUp for a term below the last StepUp's is refused: terms never go back.
    pub(crate) fn transition(&mut self, want: Option<u64>) -> Vec<LeaderEvent> {
        let mut out = Vec::new();
        if self.up == want {
            return out;
        }
        if let Some(t) = self.up.take() {
            out.push(LeaderEvent::StepDown { term: t });
        }
        if let Some(t) = want {
            if t >= self.last_up {
                self.up = Some(t);
                self.last_up = t;
                out.push(LeaderEvent::StepUp { term: t });
            }
        }
        assert!(
            out.len() <= 2
                && out
                    .windows(2)
                    .all(|w| matches!(w, [LeaderEvent::StepDown { .. }, LeaderEvent::StepUp { .. }])),
            "leadership events must alternate: {out:?}"
        );
        out
    }
}

/// The timers the policy works with (see [`crate::DbConfig`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    /// How long a quorum acknowledgement lets the leader answer reads alone.
    pub read_lease: Duration,
    /// A leader without a quorum acknowledgement this recent stops serving.
    pub quorum_timeout: Duration,
    /// Elections stay off this long after start.
    pub startup_hold: Duration,
    /// Whether reads may use the lease at all.
    pub lease_reads: bool,
}

/// What one sample of openraft's metrics says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Observed {
    /// The term openraft says this replica leads (see [`leader_term`]).
    pub leading: Option<u64>,
    /// openraft knows of a leader, and it is another replica.
    pub other_leader: bool,
    /// When a quorum last acknowledged this leader, if it leads; for a sole voter, the sample
    /// time.
    pub quorum_acked: Option<Instant>,
}

/// What the policy is told.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Input {
    /// The replica started (elections are off until the startup hold is over).
    Started,
    /// A fresh metrics sample (or just the passing of time: the driver also ticks).
    Observe(Observed),
    /// The proof `id` ended.
    ProofDone { id: u64, ok: bool },
    /// Stop leading and stay out until `until`, or until another replica leads.
    Resign { until: Instant },
    /// End a resignation early (a failed transfer, an explicit campaign, a transfer to us).
    Unresign,
}

/// What the driver must do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Deliver a leadership event.
    Event(LeaderEvent),
    /// Prove leadership of `term` (ReadIndex, then apply the whole log); answer with
    /// [`Input::ProofDone`] carrying `id`.
    Prove { id: u64, term: u64 },
    /// Switch openraft's heartbeats on or off.
    Heartbeats(bool),
    /// Switch openraft's elections on or off.
    Elections(bool),
}

/// The policy's state; see the module docs.
#[derive(Debug)]
pub(crate) struct Leadership {
    policy: Policy,
    alt: Alternator,
    obs: Observed,
    /// When the startup hold ends (`None` before [`Input::Started`]).
    hold_until: Option<Instant>,
    resign_until: Option<Instant>,
    /// The term in which a proof succeeded.
    proven: Option<u64>,
    /// The proof in flight: (id, term).
    proving: Option<(u64, u64)>,
    /// The last proof failed: the next one waits for a fresh observation.
    proof_failed: bool,
    next_proof: u64,
    /// Bumped by every resignation: a proof from an older generation never counts.
    generation: u64,
    proof_generation: u64,
    /// What openraft was last told.
    heartbeats: bool,
    elections: bool,
    /// The read lease: (term, valid until).
    lease: Option<(u64, Instant)>,
}

impl Leadership {
    /// Replaces the lease and quorum timers (the fault suite's slow clock; see `driver`).
    pub(crate) fn set_timers(&mut self, read_lease: Duration, quorum_timeout: Duration) {
        self.policy.read_lease = read_lease;
        self.policy.quorum_timeout = quorum_timeout;
    }

    /// A replica that has not started yet: not leading, heartbeats on, and elections off (the
    /// driver switches them off before openraft can campaign; the end of the startup hold
    /// turns them on).
    pub(crate) fn new(policy: Policy) -> Self {
        Leadership {
            policy,
            alt: Alternator::default(),
            obs: Observed::default(),
            hold_until: None,
            resign_until: None,
            proven: None,
            proving: None,
            proof_failed: false,
            next_proof: 0,
            generation: 0,
            proof_generation: 0,
            heartbeats: true,
            elections: false,
            lease: None,
        }
    }

    /// The term this replica serves as leader in.
    pub(crate) fn up(&self) -> Option<u64> {
        self.alt.up()
    }

    /// The read lease, if this replica holds one: (term, valid until).
    pub(crate) fn lease(&self) -> Option<(u64, Instant)> {
        self.lease
    }

    fn resigned(&self, now: Instant) -> bool {
        self.resign_until.is_some_and(|u| now < u)
    }

    /// Feeds one input at time `now`; returns what to do.
    pub(crate) fn step(&mut self, now: Instant, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Started => self.hold_until = Some(now + self.policy.startup_hold),
            Input::Observe(o) => {
                self.obs = o;
                self.proof_failed = false;
            }
            Input::ProofDone { id, ok } => {
                if let Some((pid, term)) = self.proving {
                    if pid == id {
                        self.proving = None;
                        // NB: a proof issued before a resignation says nothing about now.
                        if ok && self.proof_generation == self.generation && self.obs.leading == Some(term) {
                            self.proven = Some(term);
                        }
                        self.proof_failed = !ok;
                    }
                }
            }
            Input::Resign { until } => {
                self.resign_until = Some(until);
                self.generation += 1;
            }
            Input::Unresign => self.resign_until = None,
        }
        // A resignation ends at its deadline or once someone else leads.
        if self.resign_until.is_some() && (!self.resigned(now) || self.obs.other_leader) {
            self.resign_until = None;
        }
        let resigned = self.resigned(now);

        let heartbeats = !resigned;
        if heartbeats != self.heartbeats {
            self.heartbeats = heartbeats;
            out.push(Action::Heartbeats(heartbeats));
        }
        let held = self.hold_until.is_none_or(|h| now < h);
        let elections = !resigned && !held;
        if elections != self.elections {
            self.elections = elections;
            out.push(Action::Elections(elections));
        }

        let mut want = None;
        if let (false, Some(t)) = (resigned, self.obs.leading) {
            if self.proven == Some(t) {
                let fresh = self
                    .obs
                    .quorum_acked
                    .is_some_and(|at| now.saturating_duration_since(at) <= self.policy.quorum_timeout);
                if fresh {
                    want = Some(t);
                }
            } else if !self.proof_failed && self.proving.is_none_or(|(_, pt)| pt != t) {
                let id = self.next_proof;
                self.next_proof += 1;
                self.proving = Some((id, t));
                self.proof_generation = self.generation;
                out.push(Action::Prove { id, term: t });
            }
        }
        out.extend(self.alt.transition(want).into_iter().map(Action::Event));

        self.lease = match (self.alt.up(), self.obs.quorum_acked) {
            (Some(t), Some(at)) if self.policy.lease_reads => Some((t, at + self.policy.read_lease)),
            _ => None,
        };

        if let Some(t) = self.alt.up() {
            assert_eq!(
                self.obs.leading,
                Some(t),
                "stepped up in a term openraft does not lead"
            );
            assert_eq!(self.proven, Some(t), "stepped up without a proof in the term");
            assert!(!resigned, "stepped up while resigned");
        }
        if let Some((t, until)) = self.lease {
            assert_eq!(Some(t), self.alt.up(), "a lease outside the term served");
            let at = self.obs.quorum_acked.expect("a lease needs an acknowledgement");
            assert!(
                until <= at + self.policy.read_lease,
                "a lease longer than read_lease"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use LeaderEvent::*;

    #[test]
    fn alternates_and_never_goes_back() {
        let mut a = Alternator::default();
        assert_eq!(a.transition(None), vec![]);
        assert_eq!(a.transition(Some(3)), vec![StepUp { term: 3 }]);
        assert_eq!(a.transition(Some(3)), vec![]);
        // Deposed straight into a newer term of our own: down first, then up.
        assert_eq!(
            a.transition(Some(5)),
            vec![StepDown { term: 3 }, StepUp { term: 5 }]
        );
        assert_eq!(a.transition(None), vec![StepDown { term: 5 }]);
        assert_eq!(a.transition(None), vec![]);
        // Quorum regained in the same term: up again.
        assert_eq!(a.transition(Some(5)), vec![StepUp { term: 5 }]);
        // An older term is never taken up.
        assert_eq!(a.transition(Some(4)), vec![StepDown { term: 5 }]);
        assert_eq!(a.up(), None);
        assert_eq!(a.transition(Some(6)), vec![StepUp { term: 6 }]);
    }

    /// Runs a golden script: each input line is echoed, followed by the actions it produced
    /// (`> ...`) and, when it changed, the state (`= up ... lease ...`).
    ///
    /// Inputs (times in ms since the script's epoch):
    ///   `start @T`
    ///   `observe @T [lead=N] [other] [acked=T]`
    ///   `proved @T id=N ok|fail`
    ///   `resign @T until=T`
    ///   `unresign @T`
    fn run_script(script: &str) -> String {
        let epoch = Instant::now();
        let at = |ms: &str| epoch + Duration::from_millis(ms.parse().expect("time in ms"));
        let mut l = Leadership::new(Policy {
            read_lease: Duration::from_millis(500),
            quorum_timeout: Duration::from_millis(1000),
            startup_hold: Duration::from_millis(2000),
            lease_reads: true,
        });
        let mut out = String::new();
        let mut shown = String::new();
        for line in script.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('>') || line.starts_with('=') {
                continue;
            }
            out.push_str(line);
            out.push('\n');
            if line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let cmd = words.next().expect("command");
            let now = at(words.next().and_then(|w| w.strip_prefix('@')).expect("@time"));
            let args: Vec<&str> = words.collect();
            let arg = |k: &str| args.iter().find_map(|a| a.strip_prefix(&format!("{k}=")));
            let input = match cmd {
                "start" => Input::Started,
                "observe" => Input::Observe(Observed {
                    leading: arg("lead").map(|t| t.parse().expect("term")),
                    other_leader: args.contains(&"other"),
                    quorum_acked: arg("acked").map(at),
                }),
                "proved" => Input::ProofDone {
                    id: arg("id").expect("id").parse().expect("id"),
                    ok: args.contains(&"ok"),
                },
                "resign" => Input::Resign {
                    until: at(arg("until").expect("until")),
                },
                "unresign" => Input::Unresign,
                other => panic!("unknown command {other}"),
            };
            for a in l.step(now, input) {
                let _ = match a {
                    Action::Event(StepUp { term }) => writeln!(out, "> step-up {term}"),
                    Action::Event(StepDown { term }) => writeln!(out, "> step-down {term}"),
                    Action::Prove { id, term } => writeln!(out, "> prove id={id} term={term}"),
                    Action::Heartbeats(on) => writeln!(out, "> heartbeats {}", if on { "on" } else { "off" }),
                    Action::Elections(on) => writeln!(out, "> elections {}", if on { "on" } else { "off" }),
                };
            }
            let state = format!(
                "= up {} lease {}",
                l.up().map_or("-".into(), |t| t.to_string()),
                l.lease()
                    .map_or("-".into(), |(t, u)| format!("{t}@{}", (u - epoch).as_millis()))
            );
            if state != shown {
                out.push_str(&state);
                out.push('\n');
                shown = state;
            }
        }
        out
    }

    /// Compares each script's transcript with the file; `UPDATE_GOLDEN=1` rewrites the files.
    #[test]
    fn golden_scripts() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/golden");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .expect("golden dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        names.sort();
        assert!(!names.is_empty(), "no golden scripts in {}", dir.display());
        for path in names {
            let want = std::fs::read_to_string(&path).expect("read script");
            let got = run_script(&want);
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::write(&path, &got).expect("write script");
            } else {
                assert_eq!(got, want, "golden script {} differs", path.display());
            }
        }
    }

    /// Random inputs never break the invariants (the asserts in `step` fire otherwise).
    #[test]
    fn random_inputs_keep_invariants() {
        let epoch = Instant::now();
        let mut l = Leadership::new(Policy {
            read_lease: Duration::from_millis(50),
            quorum_timeout: Duration::from_millis(100),
            startup_hold: Duration::from_millis(200),
            lease_reads: true,
        });
        let mut now = epoch;
        let mut term = 1u64;
        let mut up: Option<u64> = None;
        let mut last_up = 0;
        for _ in 0..20_000u32 {
            now += Duration::from_millis(rand::random::<u64>() % 40);
            if rand::random::<u8>().is_multiple_of(8) {
                term += 1;
            }
            let input = match rand::random::<u8>() % 6 {
                0 => Input::Started,
                1 => Input::ProofDone {
                    id: rand::random::<u64>() % (l.next_proof + 1),
                    ok: rand::random(),
                },
                2 => Input::Resign {
                    until: now + Duration::from_millis(rand::random::<u64>() % 300),
                },
                3 => Input::Unresign,
                _ => Input::Observe(Observed {
                    leading: rand::random::<bool>().then_some(term),
                    other_leader: rand::random::<u8>().is_multiple_of(4),
                    quorum_acked: rand::random::<bool>()
                        .then(|| now - Duration::from_millis(rand::random::<u64>() % 200)),
                }),
            };
            for a in l.step(now, input) {
                match a {
                    Action::Event(StepUp { term }) => {
                        assert!(up.is_none() && term >= last_up);
                        up = Some(term);
                        last_up = term;
                    }
                    Action::Event(StepDown { term }) => {
                        assert_eq!(up, Some(term));
                        up = None;
                    }
                    _ => {}
                }
            }
            assert_eq!(l.up(), up);
        }
    }
}
