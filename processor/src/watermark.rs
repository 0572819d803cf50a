//! Per-partition watermarks and the combined watermark.
//!
//! A partition's watermark is the largest event time it has delivered minus
//! the allowed out-of-orderness. The combined watermark is the minimum over
//! partitions that are not idle. Idleness depends on processing time, which
//! the caller passes in, so this module never reads a clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tidemark_model::{EventTime, Watermark};

/// Default allowed out-of-orderness.
pub const DEFAULT_OUT_OF_ORDERNESS: Duration = Duration::from_secs(5);
/// Default allowed lateness: how long a fired window still accepts events.
pub const DEFAULT_ALLOWED_LATENESS: Duration = Duration::from_secs(60);
/// Default time after which a caught-up partition without events is idle.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Identifies a partition: topic and partition number.
pub type PartitionKey = (String, u32);

/// What a checkpoint keeps of the watermarks: each partition's largest event time.
pub type WatermarkState = BTreeMap<PartitionKey, EventTime>;

#[derive(Debug, Clone)]
struct PartState {
    key: PartitionKey,
    max_event: Option<EventTime>,
    last_active: Option<Instant>,
    caught_up: bool,
}

/// Watermarks of a fixed set of partitions, addressed by slot (registration order).
#[derive(Debug, Clone)]
pub struct PartitionWatermarks {
    out_of_orderness: Duration,
    idle_timeout: Duration,
    parts: Vec<PartState>,
}

impl PartitionWatermarks {
    pub fn new(out_of_orderness: Duration, idle_timeout: Duration) -> Self {
        PartitionWatermarks {
            out_of_orderness,
            idle_timeout,
            parts: Vec::new(),
        }
    }

    /// Adds a partition (or finds it) and returns its slot.
    pub fn register(&mut self, topic: &str, partition: u32) -> usize {
        if let Some(i) = self.slot(topic, partition) {
            return i;
        }
        self.parts.push(PartState {
            key: (topic.to_string(), partition),
            max_event: None,
            last_active: None,
            caught_up: false,
        });
        self.parts.len() - 1
    }

    /// The slot of a registered partition.
    pub fn slot(&self, topic: &str, partition: u32) -> Option<usize> {
        self.parts
            .iter()
            .position(|p| p.key.0 == topic && p.key.1 == partition)
    }

    /// Number of registered partitions.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The partition of a slot.
    pub fn key(&self, slot: usize) -> Option<&PartitionKey> {
        self.parts.get(slot).map(|p| &p.key)
    }

    /// Records an event time delivered by the partition in `slot`.
    #[inline]
    pub fn observe(&mut self, slot: usize, ts: EventTime) {
        if let Some(p) = self.parts.get_mut(slot) {
            if p.max_event.is_none_or(|m| ts > m) {
                p.max_event = Some(ts);
            }
        }
    }

    /// Records that the partition delivered records (`caught_up == false`) or
    /// that a read found its end (`caught_up == true`) at processing time `now`.
    /// Idle time counts from the last read that delivered records.
    pub fn set_progress(&mut self, slot: usize, caught_up: bool, now: Instant) {
        if let Some(p) = self.parts.get_mut(slot) {
            if !caught_up || p.last_active.is_none() {
                p.last_active = Some(now);
            }
            p.caught_up = caught_up;
        }
    }

    /// The watermark of one partition (`EventTime::MIN` before any event).
    #[inline]
    pub fn partition_watermark(&self, slot: usize) -> Watermark {
        match self.parts.get(slot).and_then(|p| p.max_event) {
            Some(m) => m.minus(self.out_of_orderness),
            None => EventTime::MIN,
        }
    }

    /// Whether the partition is idle at `now`: caught up and without new
    /// records for the idle timeout.
    pub fn is_idle(&self, slot: usize, now: Instant) -> bool {
        self.parts.get(slot).is_some_and(|p| {
            p.caught_up
                && p.last_active
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.idle_timeout)
        })
    }

    /// The minimum watermark over non-idle partitions; when every partition is
    /// idle, the largest of them (all data has been seen).
    pub fn combined(&self, now: Instant) -> Watermark {
        self.min_except(|slot, _| self.is_idle(slot, now))
    }

    /// Like [`PartitionWatermarks::combined`] for a bounded input: a caught-up
    /// partition has delivered everything it will, so it holds nothing back.
    /// Depends on event time and read progress only.
    pub fn combined_bounded(&self) -> Watermark {
        self.min_except(|_, p| p.caught_up)
    }

    /// The minimum watermark over partitions not `left_out`; when every
    /// partition is left out, the largest of them.
    fn min_except(&self, left_out: impl Fn(usize, &PartState) -> bool) -> Watermark {
        let mut min_kept: Option<Watermark> = None;
        let mut max_left_out = EventTime::MIN;
        for (slot, p) in self.parts.iter().enumerate() {
            let wm = self.partition_watermark(slot);
            if left_out(slot, p) {
                max_left_out = max_left_out.max(wm);
            } else {
                min_kept = Some(min_kept.map_or(wm, |m| m.min(wm)));
            }
        }
        min_kept.unwrap_or(max_left_out)
    }

    /// The state a checkpoint keeps.
    pub fn state(&self) -> WatermarkState {
        self.parts
            .iter()
            .filter_map(|p| p.max_event.map(|m| (p.key.clone(), m)))
            .collect()
    }

    /// Restores the largest event times of registered partitions; idle
    /// tracking starts afresh.
    pub fn restore(&mut self, state: &WatermarkState) {
        for p in &mut self.parts {
            p.max_event = state.get(&p.key).copied();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wms() -> (PartitionWatermarks, usize, usize) {
        let mut w = PartitionWatermarks::new(DEFAULT_OUT_OF_ORDERNESS, DEFAULT_IDLE_TIMEOUT);
        let a = w.register("t", 0);
        let b = w.register("t", 1);
        (w, a, b)
    }

    #[test]
    fn combined_is_min_of_active_partitions() {
        let (mut w, a, b) = wms();
        let now = Instant::now();
        assert_eq!(w.combined(now), EventTime::MIN);
        w.observe(a, EventTime(100_000));
        assert_eq!(w.partition_watermark(a), EventTime(95_000));
        assert_eq!(w.combined(now), EventTime::MIN, "b has not been seen yet");
        w.observe(b, EventTime(50_000));
        w.observe(b, EventTime(40_000));
        assert_eq!(w.combined(now), EventTime(45_000));
    }

    #[test]
    fn caught_up_partition_goes_idle_after_timeout_only() {
        let (mut w, a, b) = wms();
        let t0 = Instant::now();
        w.observe(a, EventTime(100_000));
        w.set_progress(a, false, t0);
        w.set_progress(b, true, t0);
        assert_eq!(w.combined(t0 + Duration::from_secs(9)), EventTime::MIN);
        assert_eq!(w.combined(t0 + Duration::from_secs(10)), EventTime(95_000));
        // A partition that is behind never goes idle.
        w.set_progress(b, false, t0);
        assert_eq!(w.combined(t0 + Duration::from_secs(60)), EventTime::MIN);
        // Everyone idle: the largest watermark.
        w.set_progress(a, true, t0);
        w.set_progress(b, true, t0);
        w.observe(b, EventTime(10_000));
        assert_eq!(w.combined(t0 + Duration::from_secs(11)), EventTime(95_000));
    }

    #[test]
    fn state_round_trips() {
        let (mut w, a, _) = wms();
        w.observe(a, EventTime(7_000));
        let s = w.state();
        let (mut w2, a2, b2) = wms();
        w2.restore(&s);
        assert_eq!(w2.partition_watermark(a2), EventTime(2_000));
        assert_eq!(w2.partition_watermark(b2), EventTime::MIN);
    }
}
