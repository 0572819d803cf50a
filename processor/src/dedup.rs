//! Per-partition duplicate detection by `event_id` within a bounded event-time
//! horizon. Ids are kept as 64-bit hashes in one-minute buckets of event time,
//! and whole buckets are evicted once the partition's watermark has moved
//! past them by the horizon.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashSet;
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tidemark_model::{EventTime, Watermark};

/// Default horizon within which duplicates are detected.
pub const DEFAULT_HORIZON: Duration = Duration::from_secs(600);

const BUCKET_MS: i64 = 60_000;
/// Ids per chunk of a [`Bucket`].
const CHUNK: usize = 16_384;

/// The ids of one minute of event time, in chunks shared with the snapshots
/// taken of them: a snapshot copies pointers, not ids, and a chunk a
/// snapshot holds is never written again (the next id starts a new one).
/// Encoded as one sequence of ids, as a plain vector would be.
#[derive(Debug, Clone, Default)]
pub struct Bucket(Vec<Arc<Vec<u64>>>);

impl Bucket {
    fn push(&mut self, h: u64) {
        if let Some(last) = self.0.last_mut() {
            if last.len() < CHUNK {
                if let Some(chunk) = Arc::get_mut(last) {
                    chunk.push(h);
                    return;
                }
            }
        }
        let mut chunk = Vec::with_capacity(CHUNK);
        chunk.push(h);
        self.0.push(Arc::new(chunk));
    }

    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|chunk| chunk.iter().copied())
    }

    fn len(&self) -> usize {
        self.0.iter().map(|chunk| chunk.len()).sum()
    }
}

impl PartialEq for Bucket {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Serialize for Bucket {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len()))?;
        for h in self.iter() {
            seq.serialize_element(&h)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Bucket {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let ids = Vec::<u64>::deserialize(deserializer)?;
        Ok(Bucket(
            ids.chunks(CHUNK).map(|c| Arc::new(c.to_vec())).collect(),
        ))
    }
}

/// The event ids seen recently on one partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "DedupSnapshot", into = "DedupSnapshot")]
pub struct PartitionDedup {
    seen: FxHashSet<u64>,
    buckets: BTreeMap<i64, Bucket>,
}

/// What a checkpoint keeps of a [`PartitionDedup`]: the buckets alone, from
/// which the set is rebuilt. Taking one shares the buckets' chunks, so the
/// worker waits at its barrier for no copy of the ids.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupSnapshot {
    buckets: BTreeMap<i64, Bucket>,
}

impl From<DedupSnapshot> for PartitionDedup {
    fn from(s: DedupSnapshot) -> Self {
        let seen = s.buckets.values().flat_map(Bucket::iter).collect();
        PartitionDedup {
            seen,
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

    /// Looks the hashes up without changing anything, so that a run of
    /// [`PartitionDedup::check_and_insert_hash`] after it finds them cached.
    pub fn warm(&self, hashes: &[u64]) {
        let found = hashes.iter().filter(|h| self.seen.contains(h)).count();
        std::hint::black_box(found);
    }

    /// [`PartitionDedup::check_and_insert`] by the id's [`PartitionDedup::hash`].
    #[inline]
    pub fn check_and_insert_hash(&mut self, h: u64, ts: EventTime) -> bool {
        if !self.seen.insert(h) {
            return false;
        }
        let bucket = ts.0.div_euclid(BUCKET_MS);
        match self.buckets.last_entry() {
            Some(mut e) if *e.key() == bucket => e.get_mut().push(h),
            _ => self.buckets.entry(bucket).or_default().push(h),
        }
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
            for h in e.remove().iter() {
                self.seen.remove(&h);
            }
        }
    }

    /// Number of remembered ids.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
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
    fn a_snapshot_shares_chunks_and_keeps_the_ids_it_was_taken_with() {
        let mut d = PartitionDedup::new();
        let n = CHUNK as u64 + 10;
        for i in 0..n {
            d.check_and_insert_hash(i, EventTime(5));
        }
        let snap = d.snapshot();
        for i in n..n + 5 {
            d.check_and_insert_hash(i, EventTime(5));
        }
        let bucket = &snap.buckets[&0];
        assert_eq!(bucket.len(), n as usize);
        assert!(Arc::ptr_eq(&bucket.0[0], &d.buckets[&0].0[0]));
        assert_eq!(d.buckets[&0].len(), n as usize + 5);
        // Encoded as one plain sequence, whatever the chunks.
        let plain: Vec<u64> = (0..n).collect();
        assert_eq!(
            bincode::serialize(bucket).unwrap(),
            bincode::serialize(&plain).unwrap()
        );
        let back: DedupSnapshot =
            bincode::deserialize(&bincode::serialize(&snap).unwrap()).unwrap();
        assert_eq!(back, snap);
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
