//! The ads join's keys and touches, shared by the joins in memory and the
//! spilled runs.

use serde::{Deserialize, Serialize};
use smallvec::{smallvec, SmallVec};
use xxhash_rust::xxh3::xxh3_128;

use crate::intern::Names;

/// Tag value of an ad event without a campaign.
pub(super) const UNKNOWN_CAMPAIGN: &str = "unknown";
/// Interned number of [`UNKNOWN_CAMPAIGN`].
pub(super) const UNKNOWN_CAMPAIGN_ID: u32 = 0;

/// The 128-bit XXH3 hash of an impression id: the join key (see the ads module
/// documentation). Two halves rather than a `u128`, whose 16-byte alignment
/// would pad every map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(super) struct ImpKey(pub(super) u64, pub(super) u64);

pub(super) fn imp_key(id: &str) -> ImpKey {
    let h = xxh3_128(id.as_bytes());
    ImpKey((h >> 64) as u64, h as u64)
}

/// Campaign ids interned to numbers; number 0 is [`UNKNOWN_CAMPAIGN`].
#[derive(Debug, Clone)]
pub(super) struct Campaigns(Names);

impl Default for Campaigns {
    fn default() -> Self {
        Campaigns(Names::with_unknown(UNKNOWN_CAMPAIGN))
    }
}

impl Campaigns {
    pub(super) fn intern(&mut self, name: &str) -> u32 {
        self.0.intern(name)
    }

    pub(super) fn intern_opt(&mut self, name: Option<&str>) -> u32 {
        name.map_or(UNKNOWN_CAMPAIGN_ID, |n| self.intern(n))
    }

    pub(super) fn name(&self, id: u32) -> &str {
        self.0.name(id)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

/// One impression or attributed click of an impression id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Touch {
    pub(super) time: i64,
    pub(super) campaign: u32,
}

/// The impressions (or clicks) of one impression id, ascending by time and
/// with distinct times; nearly always one, which is kept inline.
#[derive(Debug, Clone)]
pub(super) struct Touches(SmallVec<[Touch; 1]>);

impl Touches {
    pub(super) fn one(t: Touch) -> Self {
        Touches(smallvec![t])
    }

    pub(super) fn as_slice(&self) -> &[Touch] {
        &self.0
    }

    /// Adds `t`, keeping the newest `cap` (at least 2). A repeat of a time
    /// already held is ignored. Whether `t` was added.
    pub(super) fn add(&mut self, t: Touch, cap: usize) -> bool {
        let held = &mut self.0;
        match held.binary_search_by_key(&t.time, |x| x.time) {
            Ok(_) => false,
            // Older than every one of a full set: it would go first.
            Err(0) if held.len() >= cap.max(2) => false,
            Err(pos) => {
                held.insert(pos, t);
                if held.len() > cap.max(2) {
                    held.remove(0);
                }
                true
            }
        }
    }

    /// The latest touch at a time in `lo..=hi`.
    pub(super) fn latest_in(&self, lo: i64, hi: i64) -> Option<Touch> {
        let s = self.as_slice();
        let end = s.partition_point(|x| x.time <= hi);
        s[..end].last().filter(|x| x.time >= lo).copied()
    }

    /// Drops the touches whose time is `expired`; whether none is left.
    pub(super) fn evict(&mut self, expired: impl Fn(i64) -> bool) -> bool {
        self.0.retain(|t| !expired(t.time));
        if self.0.spilled() && self.0.len() <= 1 {
            self.0.shrink_to_fit();
        }
        self.0.is_empty()
    }
}
