//! A linearizability checker for histories of registers (read, write, compare-and-set).
//!
//! The search is Wing and Gong's, with Lowe's memoisation as Porcupine does it: walk the
//! history's call and return events in time order; at a call, try to linearize that operation
//! now (apply it to the model state, and remember the pair (set of linearized operations,
//! state) so that the same configuration is never explored twice); at a return whose call was
//! not linearized yet, backtrack. A history is linearizable when every event is consumed.
//!
//! Registers are independent, so a history is split by key and each key is checked alone
//! (linearizability is compositional).
//!
//! **Indeterminate operations.** A mutation whose call failed or timed out may have taken effect
//! at any time after its invocation, or never. It is recorded with no return time: its return
//! event sits after every other event, so the search may linearize it anywhere after its
//! call, and placing it last is the same as "never" for everything that observed the register.
//! A read that failed observed nothing and is left out.
//!
//! CAVEATS: the search is exponential in the worst case (many concurrent or indeterminate
//! operations on one key). [`check_key`] gives up after a step budget and says so
//! ([`Outcome::Unknown`]) rather than hang; keep the number of indeterminate operations per
//! key small by spreading the workload over keys.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

/// A register value. `None` is the register's initial, absent state.
pub type Value = Option<u64>;

/// One operation on a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A read that returned the value.
    Read(Value),
    /// A write of a value.
    Write(u64),
    /// A compare-and-set from `expect` to `new`; `swapped` is what it answered (ignored when
    /// the operation is indeterminate).
    Cas {
        /// The value it expected.
        expect: Value,
        /// The value it set.
        new: u64,
        /// Whether it answered that it swapped.
        swapped: bool,
    },
}

/// One operation of a history: who, when (ns since the run started), and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The client that ran it.
    pub client: u32,
    /// The register.
    pub key: String,
    /// When it was invoked.
    pub call: u64,
    /// When it returned; `None`: indeterminate (failed or timed out after it may have applied).
    pub ret: Option<u64>,
    /// What it did.
    pub op: Op,
}

/// What checking one key found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The key's history is linearizable.
    Ok,
    /// It is not; the message shows the history.
    Violation(String),
    /// The step budget ran out before the search ended.
    Unknown,
}

/// Applies `op` to the register state `s`: the state after it, or `None` if the operation's
/// answer cannot follow from `s`.
fn step(s: Value, op: &Op, determinate: bool) -> Option<Value> {
    match *op {
        Op::Read(v) => (v == s).then_some(s),
        Op::Write(v) => Some(Some(v)),
        Op::Cas { expect, new, swapped } => {
            let would = s == expect;
            if !determinate {
                // It may have applied (then it swapped exactly when the value matched).
                return Some(if would { Some(new) } else { s });
            }
            if would != swapped {
                return None;
            }
            Some(if swapped { Some(new) } else { s })
        }
    }
}

/// Checks every key of `history`; returns the outcome of each key that is not [`Outcome::Ok`].
///
/// Before the search, each key's indeterminate mutations whose value nobody observed (no
/// read returned it, no compare-and-set expected it) are left out: placing such a mutation
/// last, that is never, explains everything that placing it anywhere else does, because
/// nothing depends on its value. It assumes every mutation writes a value of its own, as the
/// suite's workload does. That keeps the search small when a fault leaves many calls without
/// an answer.
pub fn check(history: &[Event], budget_per_key: u64) -> BTreeMap<String, Outcome> {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in history {
        by_key.entry(&e.key).or_default().push(e);
    }
    by_key
        .into_iter()
        .map(|(k, evs)| {
            let observed: HashSet<u64> = evs
                .iter()
                .filter_map(|e| match e.op {
                    Op::Read(v) => v,
                    Op::Cas { expect, .. } => expect,
                    Op::Write(_) => None,
                })
                .collect();
            let kept: Vec<&Event> = evs
                .into_iter()
                .filter(|e| match e.op {
                    _ if e.ret.is_some() => true,
                    Op::Write(v) | Op::Cas { new: v, .. } => observed.contains(&v),
                    Op::Read(_) => true,
                })
                .collect();
            (k.to_string(), check_key(&kept, budget_per_key))
        })
        .filter(|(_, o)| *o != Outcome::Ok)
        .collect()
}

/// Checks the history of one register, starting from the absent state.
pub fn check_key(ops: &[&Event], budget: u64) -> Outcome {
    let n = ops.len();
    if n == 0 {
        return Outcome::Ok;
    }
    // Events: (time, is_return, op). Calls sort before returns at the same instant, which
    // only lets more histories pass as concurrent; indeterminate returns go last.
    let mut evs: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in ops.iter().enumerate() {
        evs.push((e.call, false, i));
        evs.push((e.ret.unwrap_or(u64::MAX), true, i));
    }
    evs.sort_by_key(|&(t, is_ret, i)| (t, is_ret, i));
    // A doubly linked list over the events, with a head sentinel at index 2n.
    let head = 2 * n;
    let mut next = vec![usize::MAX; 2 * n + 1];
    let mut prev = vec![usize::MAX; 2 * n + 1];
    let mut call_at = vec![0; n];
    let mut ret_at = vec![0; n];
    let mut last = head;
    for (pos, &(_, is_ret, i)) in evs.iter().enumerate() {
        next[last] = pos;
        prev[pos] = last;
        last = pos;
        if is_ret {
            ret_at[i] = pos;
        } else {
            call_at[i] = pos;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, p: usize| {
        let (a, b) = (prev[p], next[p]);
        next[a] = b;
        if b != usize::MAX {
            prev[b] = a;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, p: usize| {
        let (a, b) = (prev[p], next[p]);
        next[a] = p;
        if b != usize::MAX {
            prev[b] = p;
        }
    };
    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut memo: HashSet<(Vec<u64>, Value)> = HashSet::new();
    let mut stack: Vec<(usize, Value)> = Vec::new();
    let mut state: Value = None;
    let mut cur = next[head];
    let mut steps = 0u64;
    let mut deepest = 0;
    let mut stuck = (0usize, 0usize);
    while next[head] != usize::MAX {
        steps += 1;
        if steps > budget {
            return Outcome::Unknown;
        }
        let (_, is_ret, i) = evs[cur];
        if !is_ret {
            let e = ops[i];
            let tried = step(state, &e.op, e.ret.is_some()).and_then(|s2| {
                linearized[i / 64] |= 1 << (i % 64);
                let fresh = memo.insert((linearized.clone(), s2));
                if !fresh {
                    linearized[i / 64] &= !(1 << (i % 64));
                }
                fresh.then_some(s2)
            });
            match tried {
                Some(s2) => {
                    stack.push((i, state));
                    deepest = deepest.max(stack.len());
                    state = s2;
                    unlink(&mut next, &mut prev, call_at[i]);
                    unlink(&mut next, &mut prev, ret_at[i]);
                    cur = next[head];
                }
                None => cur = next[cur],
            }
        } else {
            // The return of an operation not yet linearized: undo the last choice. The deepest
            // such dead end is where the history breaks, for the report.
            if stack.len() >= stuck.0 {
                stuck = (stack.len(), i);
            }
            let Some((j, s0)) = stack.pop() else {
                return Outcome::Violation(dump(ops, stuck.1, deepest));
            };
            linearized[j / 64] &= !(1 << (j % 64));
            state = s0;
            relink(&mut next, &mut prev, ret_at[j]);
            relink(&mut next, &mut prev, call_at[j]);
            cur = next[call_at[j]];
        }
    }
    Outcome::Ok
}

/// A readable dump of where one key's history breaks: the operation that could not be
/// linearized before it returned, with the operations around it (times in ms).
fn dump(ops: &[&Event], culprit: usize, deepest: usize) -> String {
    let c = ops[culprit];
    let end = c.ret.unwrap_or(u64::MAX);
    let mut near: Vec<&&Event> = ops
        .iter()
        .filter(|e| e.ret.is_none_or(|r| r + 1_000_000_000 >= c.call) && e.call <= end)
        .collect();
    near.sort_by_key(|e| e.call);
    let skipped = near.len().saturating_sub(40);
    let mut s = format!(
        "not linearizable: {} operations on {:?}; the search linearized at most {deepest}; \
         no order explains `{}` by client {} ({} ms .. {} ms). The operations up to 1 s around it{}:\n",
        ops.len(),
        c.key,
        show(&c.op),
        c.client,
        c.call / 1_000_000,
        end / 1_000_000,
        if skipped > 0 {
            format!(" (the last 40 of {})", near.len())
        } else {
            String::new()
        },
    );
    let ms = |t: u64| t as f64 / 1e6;
    for e in near.into_iter().skip(skipped) {
        let ret = e
            .ret
            .map_or("   (indeterminate)".to_string(), |r| format!("{:>10.3}", ms(r)));
        let mark = if std::ptr::eq(*e, c) { "   <== here" } else { "" };
        let _ = writeln!(
            s,
            "  client {:>4} {:>10.3} .. {ret}  {}{mark}",
            e.client,
            ms(e.call),
            show(&e.op)
        );
    }
    s
}

/// An operation with values as `client:n` (the workload's values are `client << 32 | n`).
fn show(op: &Op) -> String {
    let v = |x: u64| format!("{}:{}", x >> 32, x & 0xffff_ffff);
    let o = |x: Value| x.map_or("absent".to_string(), v);
    match *op {
        Op::Read(x) => format!("read {}", o(x)),
        Op::Write(x) => format!("write {}", v(x)),
        Op::Cas { expect, new, swapped } => {
            format!(
                "cas {} -> {} ({})",
                o(expect),
                v(new),
                if swapped { "swapped" } else { "not swapped" }
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(client: u32, call: u64, ret: Option<u64>, op: Op) -> Event {
        Event {
            client,
            key: "k".into(),
            call,
            ret,
            op,
        }
    }

    fn verdict(h: &[Event]) -> Outcome {
        let refs: Vec<&Event> = h.iter().collect();
        check_key(&refs, 1_000_000)
    }

    #[test]
    fn sequential_and_concurrent_histories_pass() {
        let h = [
            ev(1, 0, Some(10), Op::Write(1)),
            ev(2, 20, Some(30), Op::Read(Some(1))),
            ev(
                1,
                40,
                Some(50),
                Op::Cas {
                    expect: Some(1),
                    new: 2,
                    swapped: true,
                },
            ),
            ev(
                2,
                60,
                Some(70),
                Op::Cas {
                    expect: Some(1),
                    new: 3,
                    swapped: false,
                },
            ),
            ev(3, 80, Some(90), Op::Read(Some(2))),
        ];
        assert_eq!(verdict(&h), Outcome::Ok);
        // A read concurrent with a write may see either value.
        for seen in [None, Some(1)] {
            let h = [
                ev(1, 0, Some(100), Op::Write(1)),
                ev(2, 10, Some(20), Op::Read(seen)),
            ];
            assert_eq!(verdict(&h), Outcome::Ok);
        }
    }

    #[test]
    fn a_stale_read_is_a_violation() {
        let h = [
            ev(1, 0, Some(10), Op::Write(1)),
            ev(1, 20, Some(30), Op::Write(2)),
            ev(2, 40, Some(50), Op::Read(Some(1))),
        ];
        assert!(matches!(verdict(&h), Outcome::Violation(_)));
    }

    #[test]
    fn a_lost_write_is_a_violation() {
        let h = [
            ev(1, 0, Some(10), Op::Write(1)),
            ev(2, 20, Some(30), Op::Read(None)),
        ];
        assert!(matches!(verdict(&h), Outcome::Violation(_)));
    }

    #[test]
    fn an_indeterminate_write_may_apply_late_or_never_but_not_revert() {
        // It may never apply...
        let h = [
            ev(1, 0, Some(10), Op::Write(1)),
            ev(2, 20, None, Op::Write(2)),
            ev(3, 30, Some(40), Op::Read(Some(1))),
        ];
        assert_eq!(verdict(&h), Outcome::Ok);
        // ...or apply long after its call...
        let h = [
            ev(2, 0, None, Op::Write(2)),
            ev(1, 10, Some(20), Op::Write(1)),
            ev(3, 30, Some(40), Op::Read(Some(1))),
            ev(3, 50, Some(60), Op::Read(Some(2))),
        ];
        assert_eq!(verdict(&h), Outcome::Ok);
        // ...but once seen, it cannot be undone.
        let h = [
            ev(1, 0, Some(10), Op::Write(1)),
            ev(2, 20, None, Op::Write(2)),
            ev(3, 30, Some(40), Op::Read(Some(2))),
            ev(3, 50, Some(60), Op::Read(Some(1))),
        ];
        assert!(matches!(verdict(&h), Outcome::Violation(_)));
    }

    #[test]
    fn a_write_applied_twice_shows_as_a_violation() {
        // A retried write of 1 that applied again after 2 overwrote it.
        let h = [
            ev(1, 0, Some(100), Op::Write(1)),
            ev(2, 10, Some(20), Op::Read(Some(1))),
            ev(2, 30, Some(40), Op::Write(2)),
            ev(2, 50, Some(60), Op::Read(Some(2))),
            ev(2, 70, Some(80), Op::Read(Some(1))),
        ];
        assert!(matches!(verdict(&h), Outcome::Violation(_)));
    }

    #[test]
    fn a_wrong_cas_answer_is_a_violation() {
        let h = [
            ev(1, 0, Some(10), Op::Write(1)),
            ev(
                2,
                20,
                Some(30),
                Op::Cas {
                    expect: Some(1),
                    new: 2,
                    swapped: false,
                },
            ),
        ];
        assert!(matches!(verdict(&h), Outcome::Violation(_)));
        let h = [
            ev(1, 0, Some(10), Op::Write(1)),
            ev(
                2,
                20,
                Some(30),
                Op::Cas {
                    expect: None,
                    new: 2,
                    swapped: true,
                },
            ),
        ];
        assert!(matches!(verdict(&h), Outcome::Violation(_)));
    }

    #[test]
    fn unobserved_indeterminate_writes_are_left_out_and_observed_ones_kept() {
        // Hundreds of unanswered writes that nobody saw: decided at once.
        let mut h = vec![ev(1, 0, Some(10), Op::Write(1))];
        for i in 0..300 {
            h.push(ev(2 + i, 20 + i as u64, None, Op::Write(1000 + i as u64)));
        }
        h.push(ev(1, 1000, Some(1010), Op::Read(Some(1))));
        assert!(check(&h, 100_000).is_empty());
        // One of them was seen, then "reverted": still a violation.
        h.push(ev(1, 1020, Some(1030), Op::Read(Some(1007))));
        h.push(ev(1, 1040, Some(1050), Op::Read(Some(1))));
        let found = check(&h, 100_000);
        assert!(matches!(found["k"], Outcome::Violation(_)), "{found:?}");
    }

    #[test]
    fn many_keys_are_checked_apart_and_the_budget_is_honoured() {
        let mut h = vec![
            ev(1, 0, Some(10), Op::Write(1)),
            ev(2, 20, Some(30), Op::Read(Some(1))),
        ];
        let mut bad = ev(3, 0, Some(10), Op::Read(Some(9)));
        bad.key = "other".into();
        h.push(bad);
        let found = check(&h, 1_000_000);
        assert_eq!(found.len(), 1);
        assert!(matches!(found["other"], Outcome::Violation(_)));
        // Many overlapping writes and reads: a budget of one step cannot decide.
        let h: Vec<Event> = (0..20)
            .map(|i| ev(i, i as u64, Some(1000 + i as u64), Op::Write(i as u64)))
            .collect();
        let refs: Vec<&Event> = h.iter().collect();
        assert_eq!(check_key(&refs, 1), Outcome::Unknown);
        assert_eq!(check_key(&refs, 10_000_000), Outcome::Ok);
    }
}
