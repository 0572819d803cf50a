//! Bounded memory of recently accepted `event_id`s.
//!
//! Ids are kept as 64-bit hashes (a collision would drop one event in about
//! 10^7 windows of a million ids, far below the rate of client retries it
//! protects against). Memory is bounded twice: entries older than the window
//! expire, and past `capacity` the oldest are evicted even inside the window.

use std::collections::VecDeque;
use std::time::Duration;

use rustc_hash::FxHashMap;
use tidemark_model::EventTime;

/// Hash of an `event_id` as the dedup set stores it.
pub fn id_hash(event_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(event_id.as_bytes())
}

/// Recently seen id hashes with the time they were accepted, oldest first.
#[derive(Debug)]
pub struct Dedup {
    window_ms: i64,
    capacity: usize,
    seen: FxHashMap<u64, i64>,
    order: VecDeque<(u64, i64)>,
}

impl Dedup {
    /// An empty set remembering ids for `window`, at most `capacity` of them.
    pub fn new(window: Duration, capacity: usize) -> Dedup {
        Dedup {
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            capacity: capacity.max(1),
            seen: FxHashMap::default(),
            order: VecDeque::new(),
        }
    }

    /// Whether `hash` was accepted within the window before `now`.
    pub fn contains(&self, hash: u64, now: EventTime) -> bool {
        self.seen
            .get(&hash)
            .is_some_and(|&at| now.millis().saturating_sub(at) < self.window_ms)
    }

    /// Records `hash` as accepted at `now`, evicting what has expired or overflows.
    pub fn insert(&mut self, hash: u64, now: EventTime) {
        let at = now.millis();
        self.seen.insert(hash, at);
        self.order.push_back((hash, at));
        self.evict(now);
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn evict(&mut self, now: EventTime) {
        let horizon = now.millis().saturating_sub(self.window_ms);
        while let Some(&(hash, at)) = self.order.front() {
            if at > horizon && self.order.len() <= self.capacity {
                break;
            }
            self.order.pop_front();
            // A hash inserted again later has a newer queue entry that still owns it.
            if self.seen.get(&hash) == Some(&at) {
                self.seen.remove(&hash);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_after_window() {
        let mut d = Dedup::new(Duration::from_secs(10), 100);
        d.insert(id_hash("a"), EventTime(1_000));
        assert!(d.contains(id_hash("a"), EventTime(10_999)));
        assert!(!d.contains(id_hash("a"), EventTime(11_000)));
        assert!(!d.contains(id_hash("b"), EventTime(1_000)));
        d.insert(id_hash("b"), EventTime(11_000));
        assert_eq!(d.len(), 1, "expired entry evicted on insert");
    }

    #[test]
    fn capacity_evicts_oldest() {
        let mut d = Dedup::new(Duration::from_secs(600), 3);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            d.insert(id_hash(id), EventTime(i as i64));
        }
        assert_eq!(d.len(), 3);
        assert!(!d.contains(id_hash("a"), EventTime(10)));
        assert!(d.contains(id_hash("d"), EventTime(10)));
    }

    #[test]
    fn reinsert_keeps_newest() {
        let mut d = Dedup::new(Duration::from_secs(10), 2);
        d.insert(id_hash("a"), EventTime(0));
        d.insert(id_hash("a"), EventTime(5_000));
        d.insert(id_hash("b"), EventTime(6_000));
        // The first "a" entry was evicted by capacity but must not remove the newer one.
        assert!(d.contains(id_hash("a"), EventTime(12_000)));
    }
}
