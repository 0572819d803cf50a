//! Stage-1 tumbling windows of one tier: the bookkeeping every windowed
//! pipeline shares.
//!
//! A window is held from its first event until the watermark passed its end
//! plus how long it may still change (the allowed lateness, or more for a
//! pipeline whose results change later). It fires once when the watermark
//! reaches its end; a change after that marks it dirty, so the next
//! watermark emits it again as a correction. Open windows are the early
//! results. Pipelines keep only their own aggregate `S` per window.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tidemark_model::Tier;

use crate::partial::WindowId;

/// A duration in milliseconds of event time, saturating at `i64::MAX`.
pub fn millis(d: std::time::Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// One window's aggregate and whether it was emitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Slot<S> {
    pub state: S,
    /// Emitted when the watermark passed its end.
    pub fired: bool,
    /// Changed since it fired.
    pub dirty: bool,
}

impl<S> Slot<S> {
    /// The state, for a change: a fired window becomes a correction.
    #[inline]
    pub fn change(&mut self) -> &mut S {
        self.dirty |= self.fired;
        &mut self.state
    }
}

/// The held windows of one tier, by start.
#[derive(Debug, Clone)]
pub struct Tumbling<S> {
    /// The pipeline's number for this family ([`WindowId::kind`]).
    kind: u8,
    tier: Tier,
    size_ms: i64,
    windows: BTreeMap<i64, Slot<S>>,
}

impl<S: Default> Tumbling<S> {
    /// No windows yet; each is `tier.step()` long and has
    /// [`WindowId::kind`] `kind`.
    pub fn new(kind: usize, tier: Tier) -> Self {
        Tumbling {
            kind: kind as u8,
            tier,
            size_ms: millis(tier.step()),
            windows: BTreeMap::new(),
        }
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    pub fn size_ms(&self) -> i64 {
        self.size_ms
    }

    /// The start of the window holding `ts`.
    #[inline]
    pub fn start_of(&self, ts: i64) -> i64 {
        ts.saturating_sub(ts.rem_euclid(self.size_ms))
    }

    /// The id of the window starting at `start` (`WindowId::pipeline` is
    /// set by the worker).
    pub fn id(&self, start: i64) -> WindowId {
        WindowId {
            end: start.saturating_add(self.size_ms),
            pipeline: 0,
            kind: self.kind,
            start,
        }
    }

    /// The state of the window holding `ts` for a change, or `None` when
    /// that window ended at or before `horizon` (it was dropped: the worker
    /// filters such events, this keeps a stray one from overwriting a
    /// complete result).
    #[inline]
    pub fn change_at(&mut self, ts: i64, horizon: i64) -> Option<&mut S> {
        let start = self.start_of(ts);
        if start.saturating_add(self.size_ms) <= horizon {
            return None;
        }
        Some(self.windows.entry(start).or_default().change())
    }

    /// The window starting at `start`, if held.
    pub fn get_mut(&mut self, start: i64) -> Option<&mut Slot<S>> {
        self.windows.get_mut(&start)
    }

    /// The window starting at `start`, held from now on.
    pub fn entry(&mut self, start: i64) -> &mut Slot<S> {
        self.windows.entry(start).or_default()
    }

    pub fn contains(&self, start: i64) -> bool {
        self.windows.contains_key(&start)
    }

    /// Holds a window taken from a snapshot.
    pub fn insert(&mut self, start: i64, slot: Slot<S>) {
        self.windows.insert(start, slot);
    }

    /// Windows held (open, or fired and still changeable).
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Every held window, by start.
    pub fn iter(&self) -> impl Iterator<Item = (i64, &Slot<S>)> {
        self.windows.iter().map(|(&start, slot)| (start, slot))
    }

    /// At watermark `wm`: hands every window ending at or before it that was
    /// not emitted yet, or changed since, to `emit`; marks them fired; and
    /// drops the windows that ended `keep_ms` or longer before `wm`.
    pub fn fire(&mut self, wm: i64, keep_ms: i64, mut emit: impl FnMut(WindowId, &S)) {
        let size = self.size_ms;
        for (&start, slot) in &self.windows {
            if start.saturating_add(size) > wm {
                break;
            }
            if !slot.fired || slot.dirty {
                emit(self.id(start), &slot.state);
            }
        }
        self.windows.retain(|&start, slot| {
            let end = start.saturating_add(size);
            if end <= wm {
                slot.fired = true;
                slot.dirty = false;
            }
            end.saturating_add(keep_ms) > wm
        });
    }

    /// Hands every window that has not fired yet to `emit` (early results).
    pub fn early(&self, mut emit: impl FnMut(WindowId, &S)) {
        for (&start, slot) in &self.windows {
            if !slot.fired {
                emit(self.id(start), &slot.state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(w: &mut Tumbling<i64>, wm: i64, keep: i64) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        w.fire(wm, keep, |id, n| out.push((id.start, *n)));
        out
    }

    #[test]
    fn fires_once_then_corrections_until_the_horizon() {
        let mut w = Tumbling::<i64>::new(0, Tier::Rt);
        assert_eq!(w.size_ms(), 60_000);
        *w.change_at(10_000, i64::MIN).unwrap() += 1;
        *w.change_at(70_000, i64::MIN).unwrap() += 1;
        assert_eq!(fired(&mut w, 59_999, 60_000), []);
        assert_eq!(fired(&mut w, 60_000, 60_000), [(0, 1)]);
        assert_eq!(fired(&mut w, 60_500, 60_000), [], "fired once");
        *w.change_at(59_000, 0).unwrap() += 1;
        let mut early = Vec::new();
        w.early(|id, n| early.push((id.start, *n)));
        assert_eq!(early, [(60_000, 1)], "only the open window is early");
        assert_eq!(fired(&mut w, 61_000, 60_000), [(0, 2)], "the correction");
        assert_eq!(fired(&mut w, 120_000, 60_000), [(60_000, 1)]);
        assert_eq!(w.len(), 1, "minute 0 is past its horizon");
        assert!(
            w.change_at(30_000, 60_000).is_none(),
            "dropped stays dropped"
        );
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn windows_follow_the_tier_step_and_negative_times() {
        let w = Tumbling::<i64>::new(1, Tier::Hourly);
        assert_eq!(w.start_of(3_600_000 + 5), 3_600_000);
        assert_eq!(w.start_of(-1), -3_600_000);
        let id = w.id(3_600_000);
        assert_eq!((id.start, id.end, id.kind), (3_600_000, 7_200_000, 1));
        assert_eq!(Tumbling::<i64>::new(2, Tier::Daily).size_ms(), 86_400_000);
    }
}
