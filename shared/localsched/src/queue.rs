//! The wait queue: priority groups by cache-hit ratio, so requests that reuse more of the cache
//! are admitted more often, while every non-empty group is served in every round (nobody
//! starves). First come, first served within a group.
//!
//! The paper's scheme: group `g` of `G` holds hit ratios in `(g/G, (g+1)/G]` (group 0 also holds
//! zero hits); a round admits up to `g + 1` requests from group `g`, highest group first.
//!
//! The other [`WaitOrder`]s, which comparisons need, use one group: first come, first served,
//! or sorted by prefix match before each batch.

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

/// The order in which waiting requests are admitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WaitOrder {
    /// Preble's priority groups by cache-hit ratio (this module's scheme).
    #[default]
    Priority,
    /// First come, first served.
    Fcfs,
    /// Longest prefix match, SGLang's cache-aware order (`--schedule-policy lpm`, the local
    /// order of the paper's SGLang baseline): before each batch is formed, the waiting requests
    /// are sorted, stably, by how many of their tokens the cache holds now, longest first;
    /// with more than [`LPM_MAX_SORTED`] waiting, SGLang skips the sort and keeps the order
    /// the queue already has, and so does this.
    LongestPrefix,
}

/// Longest wait queue SGLang still sorts by prefix match (its `_determine_active_policy`);
/// beyond it the queue keeps its order.
pub const LPM_MAX_SORTED: usize = 128;

impl WaitOrder {
    /// Every order's name, for `--help` and errors.
    pub const NAMES: [&'static str; 3] = ["priority", "fcfs", "lpm"];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            WaitOrder::Priority => "priority",
            WaitOrder::Fcfs => "fcfs",
            WaitOrder::LongestPrefix => "lpm",
        }
    }
}

impl fmt::Display for WaitOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WaitOrder {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "priority" => Ok(WaitOrder::Priority),
            "fcfs" => Ok(WaitOrder::Fcfs),
            "lpm" => Ok(WaitOrder::LongestPrefix),
            other => Err(format!(
                "unknown wait order {other:?}; expected one of {}",
                WaitOrder::NAMES.join(", ")
            )),
        }
    }
}

/// A priority-group queue of `T`.
#[derive(Clone, Debug)]
pub struct PriorityQueue<T> {
    groups: Vec<VecDeque<T>>,
    /// Admissions left to each group in the current round.
    quota: Vec<u32>,
    len: usize,
}

impl<T> PriorityQueue<T> {
    /// An empty queue with `groups` priority groups (at least one).
    pub fn new(groups: usize) -> Self {
        let groups = groups.max(1);
        Self {
            groups: (0..groups).map(|_| VecDeque::new()).collect(),
            quota: (1..=groups as u32).collect(),
            len: 0,
        }
    }

    /// The group of a hit ratio in `[0, 1]`.
    pub fn group_of(&self, hit_ratio: f64) -> usize {
        let g = self.groups.len();
        let ratio = if hit_ratio.is_finite() {
            hit_ratio.clamp(0.0, 1.0)
        } else {
            0.0
        };
        ((ratio * g as f64).ceil() as usize)
            .saturating_sub(1)
            .min(g - 1)
    }

    /// Queues `item` at the back of the group of `hit_ratio`.
    pub fn push(&mut self, item: T, hit_ratio: f64) {
        let g = self.group_of(hit_ratio);
        self.groups[g].push_back(item);
        self.len += 1;
    }

    /// Queues `item` at the front of the group of `hit_ratio` (a preempted request goes back
    /// first).
    pub fn push_front(&mut self, item: T, hit_ratio: f64) {
        let g = self.group_of(hit_ratio);
        self.groups[g].push_front(item);
        self.len += 1;
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The group whose turn it is: the highest non-empty group with admissions left in this
    /// round, starting a new round when every non-empty group has used its share.
    fn turn(&mut self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let pick = |q: &Self| {
            (0..q.groups.len())
                .rev()
                .find(|&g| q.quota[g] > 0 && !q.groups[g].is_empty())
        };
        if let Some(g) = pick(self) {
            return Some(g);
        }
        for (g, quota) in self.quota.iter_mut().enumerate() {
            *quota = g as u32 + 1;
        }
        pick(self)
    }

    /// The request whose turn it is, to look at before admitting it.
    pub fn peek_next(&mut self) -> Option<&mut T> {
        let g = self.turn()?;
        self.groups[g].front_mut()
    }

    /// Takes the request whose turn it is, counting it against its group's share.
    pub fn pop_next(&mut self) -> Option<T> {
        let g = self.turn()?;
        let item = self.groups[g].pop_front()?;
        self.quota[g] -= 1;
        self.len -= 1;
        Some(item)
    }

    /// Sorts each group by `key`, largest first, keeping the order of equal keys; `key` is
    /// called once per request.
    pub fn sort_by_key_descending(&mut self, mut key: impl FnMut(&mut T) -> u64) {
        for group in &mut self.groups {
            let mut keyed: Vec<(Reverse<u64>, T)> = group
                .drain(..)
                .map(|mut item| (Reverse(key(&mut item)), item))
                .collect();
            keyed.sort_by_key(|(k, _)| *k);
            group.extend(keyed.into_iter().map(|(_, item)| item));
        }
    }

    /// Removes the first request matching `pred`.
    pub fn remove_first(&mut self, mut pred: impl FnMut(&T) -> bool) -> Option<T> {
        for group in &mut self.groups {
            if let Some(i) = group.iter().position(&mut pred) {
                self.len -= 1;
                return group.remove(i);
            }
        }
        None
    }

    /// Every waiting request, highest group first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.groups.iter().rev().flatten()
    }

    /// Removes every waiting request.
    pub fn drain(&mut self) -> Vec<T> {
        self.len = 0;
        self.groups
            .iter_mut()
            .rev()
            .flat_map(|g| g.drain(..))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_the_papers_formula() {
        let q: PriorityQueue<()> = PriorityQueue::new(10);
        assert_eq!(q.group_of(0.0), 0);
        assert_eq!(q.group_of(0.05), 0);
        assert_eq!(q.group_of(0.1), 0);
        assert_eq!(q.group_of(0.11), 1);
        assert_eq!(q.group_of(0.95), 9);
        assert_eq!(q.group_of(1.0), 9);
        assert_eq!(q.group_of(f64::NAN), 0);
    }

    #[test]
    fn admissions_are_proportional_to_priority_and_never_zero() {
        let mut q = PriorityQueue::new(10);
        for i in 0..1000 {
            q.push((9, i), 1.0);
            q.push((4, i), 0.5);
            q.push((0, i), 0.0);
        }
        let mut counts = [0u32; 10];
        for _ in 0..(10 + 5 + 1) * 20 {
            let (g, _) = q.pop_next().unwrap();
            counts[g] += 1;
        }
        assert_eq!(counts[9], 200);
        assert_eq!(counts[4], 100);
        assert_eq!(counts[0], 20);
    }

    #[test]
    fn sorting_by_key_is_stable_and_largest_first() {
        let mut q = PriorityQueue::new(1);
        for (id, key) in [(0, 5), (1, 9), (2, 5), (3, 0), (4, 9)] {
            q.push((id, key), 0.0);
        }
        q.sort_by_key_descending(|&mut (_, key)| key);
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_next().map(|(id, _)| id)).collect();
        assert_eq!(order, [1, 4, 0, 2, 3]);
    }

    #[test]
    fn wait_orders_round_trip_by_name() {
        for name in WaitOrder::NAMES {
            assert_eq!(name.parse::<WaitOrder>().unwrap().name(), name);
        }
        assert!("lifo".parse::<WaitOrder>().unwrap_err().contains("lpm"));
    }

    #[test]
    fn fifo_within_a_group_and_front_for_preempted() {
        let mut q = PriorityQueue::new(4);
        q.push(1, 0.3);
        q.push(2, 0.3);
        q.push_front(0, 0.3);
        assert_eq!(q.pop_next(), Some(0));
        assert_eq!(q.pop_next(), Some(1));
        assert_eq!(q.remove_first(|&x| x == 2), Some(2));
        assert!(q.is_empty());
    }
}
