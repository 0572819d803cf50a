//! Per-partition duplicate detection by `event_id` within a bounded event-time
//! horizon. Ids are kept as 64-bit hashes in one set per minute of event
//! time, and whole minutes are forgotten once the partition's watermark has
//! moved past them by the horizon.
//!
//! One set per minute, rather than one set of every id plus a list per
//! minute, keeps each id once, and keeps memory flat once the horizon is
//! full: a minute's set is built as the minute fills and dropped whole, where
//! one big set doubled its table whenever the ids of the horizon outgrew it,
//! and never gave the room back. A lookup probes every minute's set (the
//! horizon's eleven or so), newest first.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashSet;
use serde::de::{SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tidemark_model::{EventTime, Watermark};

/// Default horizon within which duplicates are detected.
pub const DEFAULT_HORIZON: Duration = Duration::from_secs(600);

const BUCKET_MS: i64 = 60_000;

/// The ids of one minute of event time, shared with the snapshots taken of
/// them: a snapshot copies a pointer, and the first id added to the minute
/// after a snapshot copies that minute's set alone (the current one, and
/// rarely the one before). Encoded as one sequence of ids.
#[derive(Debug, Clone, Default, PartialEq)]
struct Ids(Arc<FxHashSet<u64>>);

impl Ids {
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl Serialize for Ids {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for h in self.0.iter() {
            seq.serialize_element(h)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Ids {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdsVisitor;
        impl<'de> Visitor<'de> for IdsVisitor {
            type Value = Ids;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence of event id hashes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ids, A::Error> {
                // Capped: a damaged length must not reserve gigabytes.
                let hint = seq.size_hint().unwrap_or(0).min(1 << 20);
                let mut set = FxHashSet::with_capacity_and_hasher(hint, rustc_hash::FxBuildHasher);
                while let Some(h) = seq.next_element::<u64>()? {
                    set.insert(h);
                }
                Ok(Ids(Arc::new(set)))
            }
        }
        deserializer.deserialize_seq(IdsVisitor)
    }
}

/// The event ids seen recently on one partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "DedupSnapshot", into = "DedupSnapshot")]
pub struct PartitionDedup {
    /// By minute of event time (epoch minutes).
    buckets: BTreeMap<i64, Ids>,
    len: usize,
}

/// What a checkpoint keeps of a [`PartitionDedup`]: its minutes, shared, so
/// the worker waits at its barrier for no copy of the ids.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupSnapshot {
    buckets: BTreeMap<i64, Ids>,
}

impl From<DedupSnapshot> for PartitionDedup {
    fn from(s: DedupSnapshot) -> Self {
        PartitionDedup {
            len: s.buckets.values().map(Ids::len).sum(),
            buckets: s.buckets,
        }
    }
}

impl From<PartitionDedup> for DedupSnapshot {
    fn from(d: PartitionDedup) -> Self {
        DedupSnapshot { buckets: d.buckets }
    }
}

impl PartitionDedup {
    pub fn new() -> Self {
        Self::default()
    }

    /// The ids remembered now, for a checkpoint.
    pub fn snapshot(&self) -> DedupSnapshot {
        DedupSnapshot {
            buckets: self.buckets.clone(),
        }
    }

    /// Records `event_id` at event time `ts`; `true` if it is new, `false` if
    /// it is a duplicate of one still remembered.
    #[inline]
    pub fn check_and_insert(&mut self, event_id: &str, ts: EventTime) -> bool {
        self.check_and_insert_hash(Self::hash(event_id), ts)
    }

    /// The hash an event id is remembered by.
    #[inline]
    pub fn hash(event_id: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64(event_id.as_bytes())
    }

    #[inline]
    fn contains(&self, h: u64) -> bool {
        // Newest first: a retried event is usually a recent one.
        self.buckets.values().rev().any(|ids| ids.0.contains(&h))
    }

    /// Looks the hashes up without changing anything, so that a run of
    /// [`PartitionDedup::check_and_insert_hash`] after it finds them cached.
    pub fn warm(&self, hashes: &[u64]) {
        let found = hashes.iter().filter(|&&h| self.contains(h)).count();
        std::hint::black_box(found);
    }

    /// [`PartitionDedup::check_and_insert`] by the id's [`PartitionDedup::hash`].
    #[inline]
    pub fn check_and_insert_hash(&mut self, h: u64, ts: EventTime) -> bool {
        if self.contains(h) {
            return false;
        }
        let bucket = ts.0.div_euclid(BUCKET_MS);
        let ids = match self.buckets.last_entry() {
            Some(e) if *e.key() == bucket => e.into_mut(),
            _ => self.buckets.entry(bucket).or_default(),
        };
        Arc::make_mut(&mut ids.0).insert(h);
        self.len += 1;
        true
    }

    /// Forgets ids whose whole bucket lies before `wm - horizon`.
    pub fn evict(&mut self, wm: Watermark, horizon: Duration) {
        let cutoff = wm.minus(horizon).0;
        while let Some(e) = self.buckets.first_entry() {
            let bucket_end = e.key().saturating_add(1).saturating_mul(BUCKET_MS);
            if bucket_end > cutoff {
                break;
            }
            self.len -= e.remove().len();
        }
    }

    /// Number of remembered ids.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_duplicates_and_evicts_old_ids() {
        let mut d = PartitionDedup::new();
        assert!(d.check_and_insert("a", EventTime(1_000)));
        assert!(!d.check_and_insert("a", EventTime(1_000)));
        assert!(d.check_and_insert("b", EventTime(700_000)));
        d.evict(EventTime(650_000), DEFAULT_HORIZON);
        assert_eq!(d.len(), 2, "bucket of `a` ends at 60 s, cutoff is 50 s");
        d.evict(EventTime(661_000), DEFAULT_HORIZON);
        assert_eq!(d.len(), 1);
        assert!(d.check_and_insert("a", EventTime(1_000)));
        assert!(!d.check_and_insert("b", EventTime(700_000)));
    }

    #[test]
    fn a_snapshot_shares_minutes_and_keeps_the_ids_it_was_taken_with() {
        let mut d = PartitionDedup::new();
        for i in 0..100 {
            d.check_and_insert_hash(i, EventTime(5));
            d.check_and_insert_hash(1_000 + i, EventTime(60_005));
        }
        let snap = d.snapshot();
        for i in 200..205 {
            d.check_and_insert_hash(i, EventTime(60_005));
        }
        // The minute written after the snapshot was copied; the other is shared.
        assert!(Arc::ptr_eq(&snap.buckets[&0].0, &d.buckets[&0].0));
        assert!(!Arc::ptr_eq(&snap.buckets[&1].0, &d.buckets[&1].0));
        assert_eq!((snap.buckets[&1].len(), d.buckets[&1].len()), (100, 105));
        assert_eq!(d.len(), 205);
        let back: DedupSnapshot =
            bincode::deserialize(&bincode::serialize(&snap).unwrap()).unwrap();
        assert_eq!(back, snap);
    }

    #[test]
    fn a_minute_reads_from_the_encoding_of_a_plain_list_of_ids() {
        // The encoding of earlier versions, which kept each minute as a list.
        let older: BTreeMap<i64, Vec<u64>> = [(0, vec![7, 8]), (1, vec![9])].into();
        let d: PartitionDedup = bincode::deserialize(&bincode::serialize(&older).unwrap()).unwrap();
        assert_eq!(d.len(), 3);
        let mut d = d;
        assert!(!d.check_and_insert_hash(9, EventTime(5)));
        assert!(d.check_and_insert_hash(10, EventTime(5)));
    }

    #[test]
    fn serde_round_trip_keeps_ids() {
        let mut d = PartitionDedup::new();
        d.check_and_insert("x", EventTime(5));
        let back: PartitionDedup = bincode::deserialize(&bincode::serialize(&d).unwrap()).unwrap();
        let mut back = back;
        assert!(!back.check_and_insert("x", EventTime(5)));
        assert!(back.check_and_insert("y", EventTime(5)));
    }
}
