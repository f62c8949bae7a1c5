//! Leadership events: turning openraft's metrics into a strictly alternating stream of
//! `StepUp{term}` / `StepDown{term}`.
//!
//! Two pieces, kept apart so the rules can be tested without a cluster:
//! - [`leader_term`] reads one metrics sample and says whether this node is, by openraft's
//!   account, the leader of a term;
//! - [`Alternator`] turns a sequence of wanted states ("leading term t" or "not leading") into
//!   events, enforcing the invariants below.
//!
//! The watcher task in `db.rs` adds the part that needs a cluster: it only asks the alternator
//! for `Some(t)` once `ensure_linearizable` has proven, in term t, that a quorum follows this
//! node and that the term's first entry is applied; and it asks for `None` as soon as the
//! leader has not heard from a quorum within the quorum timeout (openraft 0.9 never steps a
//! partitioned leader down by itself).
//!
//! INVARIANTS (asserted):
//! - events alternate: StepUp, StepDown, StepUp, ... starting with StepUp;
//! - a StepDown carries the term of the StepUp before it;
//! - terms of successive StepUps never decrease. The same term can be stepped up again after a
//!   StepDown: a leader that lost its quorum (StepDown) and regains it before anyone else was
//!   elected proves its leadership afresh (StepUp, same term). That is safe because the proof
//!   is a ReadIndex round that a quorum which had moved on to a newer term would fail.

use serde::{Deserialize, Serialize};

use crate::types::TypeConfig;

/// A change of this replica's leadership, delivered in order, one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaderEvent {
    /// This replica now leads `term`: a quorum confirmed it and the term's first entry is applied.
    StepUp { term: u64 },
    /// This replica no longer leads `term` (deposed, partitioned, resigned or stopped).
    StepDown { term: u64 },
}

/// The term this node leads according to one metrics sample, if any.
///
/// Leading means: openraft's state is Leader and the vote is committed and names this node.
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
        out
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn random_sequences_keep_invariants() {
        let mut a = Alternator::default();
        let mut up: Option<u64> = None;
        let mut last_up = 0u64;
        for _ in 0..10_000u64 {
            let want = match rand::random::<u8>() % 4 {
                0 => None,
                1 => Some(last_up),
                2 => Some(last_up.saturating_sub(1)),
                _ => Some(last_up + 1),
            };
            for ev in a.transition(want) {
                match ev {
                    StepUp { term } => {
                        assert!(up.is_none(), "StepUp while up");
                        assert!(term >= last_up, "StepUp terms never decrease");
                        up = Some(term);
                        last_up = term;
                    }
                    StepDown { term } => {
                        assert_eq!(up, Some(term), "StepDown must match the StepUp");
                        up = None;
                    }
                }
            }
            assert_eq!(a.up(), up);
        }
    }
}
