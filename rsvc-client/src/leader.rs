//! Leader search: DAOS's `dc_rsvc` algorithm as a plain state machine.
//!
//! The client keeps the sorted replica list of one service instance, the leader it believes in
//! with that leader's term, and an aliveness count for it. [`ReplicaSet::choose`] picks the
//! cached leader while it is believed alive and otherwise walks the list round-robin from a
//! random start. [`ReplicaSet::complete`] feeds back what a call to a replica said.
//!
//! INVARIANTS
//! - `ranks` is sorted and free of duplicates.
//! - The cached leader's term never decreases: a hint with an older term is ignored, so a stale
//!   hint can never replace a newer leader.
//! - A hinted rank that is not on the list is added (the replica set grew behind our back).
//! - A `NotLeader` reply whose hint names the replier itself carries no news: a replica that
//!   refuses to serve cannot be the leader to try next (an isolated old leader says exactly
//!   that). Its hint is ignored, so the search moves on to the other replicas.
//! - `NotReplica` and unreachable replicas are removed; an empty list must be refreshed from the
//!   management service before anything can be chosen.

/// Aliveness given to a leader confirmed by itself; DAOS counts down from here.
pub const ALIVENESS_MAX: u8 = 1;

/// A leader hint: who leads and in which term, as a replica reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hint {
    /// The leader's rank.
    pub rank: u32,
    /// Its term.
    pub term: u64,
}

/// What a call to one replica came back with, as far as leader search cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The replica answered as leader (success or a service error), with its hint.
    Answered(Option<Hint>),
    /// The replica is not (or no longer) the leader.
    NotLeader(Option<Hint>),
    /// The engine hosts no replica of this instance.
    NotReplica,
    /// The engine could not be reached or did not answer in time.
    Unreachable,
}

/// What the caller should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The call got its answer.
    Proceed,
    /// Choose again and retry.
    Rechoose,
}

/// The client-side view of one instance's replicas. See the module docs.
#[derive(Clone, Debug)]
pub struct ReplicaSet {
    ranks: Vec<u32>,
    /// The believed leader and its term.
    leader: Option<Hint>,
    /// The newest term any hint named; survives losing the leader, so that an older hint
    /// cannot win even then.
    term: u64,
    /// Whether the believed leader is still thought to answer (0 = try others).
    aliveness: u8,
    /// Round-robin cursor into `ranks`.
    next: usize,
}

impl ReplicaSet {
    /// A set over `ranks`, starting its round-robin walk at a random position.
    pub fn new(ranks: impl IntoIterator<Item = u32>) -> Self {
        let mut s = ReplicaSet {
            ranks: Vec::new(),
            leader: None,
            term: 0,
            aliveness: 0,
            next: 0,
        };
        s.reset(ranks);
        s
    }

    /// Replaces the replica list (e.g. after asking the management service), keeping the
    /// cached leader if it is still on it.
    pub fn reset(&mut self, ranks: impl IntoIterator<Item = u32>) {
        let mut r: Vec<u32> = ranks.into_iter().collect();
        r.sort_unstable();
        r.dedup();
        self.ranks = r;
        if let Some(l) = self.leader {
            if !self.ranks.contains(&l.rank) {
                self.leader = None;
                self.aliveness = 0;
            }
        }
        self.next = if self.ranks.is_empty() {
            0
        } else {
            rand::random::<u32>() as usize % self.ranks.len()
        };
    }

    /// The replica list, sorted.
    pub fn ranks(&self) -> &[u32] {
        &self.ranks
    }

    /// The believed leader and its term.
    pub fn leader(&self) -> Option<Hint> {
        self.leader
    }

    /// Whether the list is empty (it must be refreshed).
    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
    }

    /// The replica to call next, or `None` if the list is empty.
    pub fn choose(&mut self) -> Option<u32> {
        if self.ranks.is_empty() {
            return None;
        }
        if let Some(l) = self.leader {
            if self.aliveness > 0 {
                return Some(l.rank);
            }
        }
        let i = self.next % self.ranks.len();
        self.next = (i + 1) % self.ranks.len();
        Some(self.ranks[i])
    }

    /// Feeds back the outcome of a call to `rank`.
    pub fn complete(&mut self, rank: u32, outcome: Outcome) -> Next {
        match outcome {
            Outcome::Answered(hint) => {
                if let Some(h) = hint {
                    self.process_hint(rank, h, true);
                }
                Next::Proceed
            }
            Outcome::NotLeader(hint) => {
                self.leader_failed(rank);
                if let Some(h) = hint.filter(|h| h.rank != rank) {
                    self.process_hint(rank, h, false);
                }
                Next::Rechoose
            }
            Outcome::NotReplica | Outcome::Unreachable => {
                self.leader_failed(rank);
                self.remove(rank);
                Next::Rechoose
            }
        }
    }

    /// The cached leader did not serve: stop preferring it, and continue the walk from a
    /// random replica other than it.
    fn leader_failed(&mut self, rank: u32) {
        if self.leader.is_some_and(|l| l.rank == rank) && self.aliveness > 0 {
            self.aliveness = 0;
            let others: Vec<usize> = (0..self.ranks.len()).filter(|&i| self.ranks[i] != rank).collect();
            if !others.is_empty() {
                self.next = others[rand::random::<u32>() as usize % others.len()];
            }
        }
    }

    fn remove(&mut self, rank: u32) {
        if let Ok(i) = self.ranks.binary_search(&rank) {
            self.ranks.remove(i);
            if self.leader.is_some_and(|l| l.rank == rank) {
                self.leader = None;
                self.aliveness = 0;
            }
            // Keep the cursor on the element that followed the removed one.
            if i < self.next {
                self.next -= 1;
            }
            if self.next >= self.ranks.len() {
                self.next = 0;
            }
        }
    }

    /// Applies a hint reported by `from`. `from_leader`: `from` answered as the leader.
    fn process_hint(&mut self, from: u32, h: Hint, from_leader: bool) {
        if h.term < self.term {
            return; // stale: never let an older term win
        }
        if let Some(cur) = self.leader {
            if h.term == cur.term {
                if h.rank == cur.rank && (from_leader || from == h.rank) {
                    self.aliveness = ALIVENESS_MAX;
                }
                return;
            }
        }
        self.term = h.term;
        if let Err(i) = self.ranks.binary_search(&h.rank) {
            self.ranks.insert(i, h.rank);
            if i < self.next {
                self.next += 1;
            }
        }
        self.leader = Some(h);
        self.aliveness = if from_leader || from == h.rank {
            ALIVENESS_MAX
        } else {
            1
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranks: &[u32]) -> ReplicaSet {
        let mut s = ReplicaSet::new(ranks.iter().copied());
        s.next = 0;
        s
    }

    #[test]
    fn empty_list_chooses_nothing() {
        let mut s = set(&[]);
        assert_eq!(s.choose(), None);
        assert!(s.is_empty());
        let mut s = set(&[4]);
        assert_eq!(s.complete(4, Outcome::NotReplica), Next::Rechoose);
        assert_eq!(s.choose(), None, "the last replica was dropped");
    }

    #[test]
    fn round_robin_wraps() {
        let mut s = set(&[3, 1, 2, 2]);
        assert_eq!(s.ranks(), &[1, 2, 3], "sorted and unique");
        let picks: Vec<u32> = (0..5).map(|_| s.choose().unwrap()).collect();
        assert_eq!(picks, vec![1, 2, 3, 1, 2]);
    }

    #[test]
    fn leader_is_preferred_until_it_fails() {
        let mut s = set(&[1, 2, 3]);
        assert_eq!(
            s.complete(1, Outcome::NotLeader(Some(Hint { rank: 3, term: 5 }))),
            Next::Rechoose
        );
        assert_eq!(s.choose(), Some(3));
        assert_eq!(
            s.complete(3, Outcome::Answered(Some(Hint { rank: 3, term: 5 }))),
            Next::Proceed
        );
        assert_eq!(s.choose(), Some(3));
        // The leader lost its leadership without knowing a successor: walk the others.
        s.complete(3, Outcome::NotLeader(None));
        let next = s.choose().unwrap();
        assert_ne!(next, 3, "a failed leader is not chosen again right away");
    }

    #[test]
    fn not_leader_naming_itself_moves_the_search_on() {
        // Rank 1 is an old leader cut off from its peers: it refuses to serve, but its hint
        // still names itself, with a term above the real leader's.
        let mut s = set(&[1, 2, 3]);
        let mut tried = Vec::new();
        for _ in 0..6 {
            let r = s.choose().unwrap();
            tried.push(r);
            if r == 1 {
                s.complete(1, Outcome::NotLeader(Some(Hint { rank: 1, term: 9 })));
            } else {
                s.complete(r, Outcome::NotLeader(None));
            }
        }
        assert!(
            tried.contains(&2) && tried.contains(&3),
            "the search reached the other replicas: {tried:?}"
        );
        assert_eq!(s.leader(), None, "a self-naming refusal makes no leader");
        // The real leader, in a lower term than the isolated one's, is still believed.
        s.complete(2, Outcome::Answered(Some(Hint { rank: 2, term: 4 })));
        assert_eq!(s.leader(), Some(Hint { rank: 2, term: 4 }));
        assert_eq!(s.choose(), Some(2));
    }

    #[test]
    fn stale_hint_never_wins() {
        let mut s = set(&[1, 2, 3]);
        s.complete(1, Outcome::Answered(Some(Hint { rank: 1, term: 7 })));
        s.complete(2, Outcome::NotLeader(Some(Hint { rank: 3, term: 6 })));
        assert_eq!(
            s.leader(),
            Some(Hint { rank: 1, term: 7 }),
            "an older term must not replace the leader"
        );
        s.complete(2, Outcome::NotLeader(Some(Hint { rank: 3, term: 8 })));
        assert_eq!(s.leader(), Some(Hint { rank: 3, term: 8 }), "a newer term wins");
    }

    #[test]
    fn unknown_hinted_rank_is_added() {
        let mut s = set(&[1, 2]);
        s.complete(1, Outcome::NotLeader(Some(Hint { rank: 9, term: 2 })));
        assert_eq!(s.ranks(), &[1, 2, 9]);
        assert_eq!(s.choose(), Some(9));
    }

    #[test]
    fn subtract_below_at_and_above_the_cursor() {
        // Below the cursor: the cursor keeps pointing at the same next replica.
        let mut s = set(&[1, 2, 3, 4]);
        assert_eq!(s.choose(), Some(1));
        assert_eq!(s.choose(), Some(2)); // cursor now at 3
        s.complete(1, Outcome::NotReplica);
        assert_eq!(s.choose(), Some(3));
        // At the cursor: the next one moves up.
        let mut s = set(&[1, 2, 3, 4]);
        s.choose(); // cursor at 2
        s.complete(2, Outcome::Unreachable);
        assert_eq!(s.choose(), Some(3));
        // The last one while the cursor points at it: wrap to the start.
        let mut s = set(&[1, 2, 3]);
        s.choose();
        s.choose(); // cursor at 3
        s.complete(3, Outcome::NotReplica);
        assert_eq!(s.choose(), Some(1));
        // The leader itself is removed: no leader any more.
        let mut s = set(&[1, 2, 3]);
        s.complete(2, Outcome::Answered(Some(Hint { rank: 2, term: 1 })));
        s.complete(2, Outcome::NotReplica);
        assert_eq!(s.leader(), None);
        assert_eq!(s.ranks(), &[1, 3]);
    }

    #[test]
    fn reset_keeps_a_leader_still_listed() {
        let mut s = set(&[1, 2, 3]);
        s.complete(2, Outcome::Answered(Some(Hint { rank: 2, term: 4 })));
        s.reset([2, 5]);
        assert_eq!(s.choose(), Some(2));
        s.reset([5, 6]);
        assert_eq!(s.leader(), None);
        assert!(matches!(s.choose(), Some(5 | 6)));
        // Losing the leader does not forget its term.
        s.complete(5, Outcome::NotLeader(Some(Hint { rank: 6, term: 3 })));
        assert_eq!(
            s.leader(),
            None,
            "a hint older than a term already seen is ignored"
        );
    }

    #[test]
    fn random_feedback_keeps_invariants() {
        let mut s = ReplicaSet::new([1, 2, 3, 4, 5]);
        let mut max_term = 0;
        for _ in 0..20_000 {
            let Some(r) = s.choose() else {
                s.reset([1, 2, 3, 4, 5]);
                continue;
            };
            let h = Hint {
                rank: 1 + rand::random::<u32>() % 7,
                term: rand::random::<u64>() % 20,
            };
            let o = match rand::random::<u8>() % 5 {
                0 => Outcome::Answered(Some(h)),
                1 => Outcome::NotLeader(Some(h)),
                2 => Outcome::NotLeader(None),
                3 => Outcome::NotReplica,
                _ => Outcome::Unreachable,
            };
            s.complete(r, o);
            assert!(s.ranks.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
            if let Some(l) = s.leader() {
                assert!(
                    l.term >= max_term,
                    "leader term went back from {max_term} to {}",
                    l.term
                );
                assert!(s.ranks.contains(&l.rank), "the leader is on the list");
                max_term = l.term;
            }
            assert!(s.next < s.ranks.len().max(1));
        }
    }
}
