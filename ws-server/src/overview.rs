//! The overview: the last hour of 1-minute windows of `traffic` (events per
//! event type) and `active_users`, kept in memory from live updates, and the
//! `overview` channel that publishes it.
//!
//! [`Overview`] is plain data (what `ServerState::overview` copies out);
//! [`OverviewChannel`] is its [`Channel`]: data
//! `{"windows":{"<start>":{"window_start","final","traffic","active_users"}}}`,
//! each changed window sent whole, a window that ages out of the hour as
//! `null`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tidemark_model::{EventTime, Tier, Update};

use crate::channels::Channel;
use crate::json_number;

/// How many 1-minute windows the overview keeps: the last hour.
pub const OVERVIEW_WINDOWS: usize = 60;

const WINDOW: Duration = Duration::from_secs(60);

/// One 1-minute window of the overview channel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverviewWindow {
    /// Whether the window has closed.
    pub is_final: bool,
    /// Events per event type.
    pub traffic: BTreeMap<String, f64>,
    /// Distinct active users.
    pub active_users: f64,
}

/// The newest value of each of the last [`OVERVIEW_WINDOWS`] 1-minute windows,
/// built from `traffic` (field `events`, by `event_type`) and `active_users`
/// (field `users`) points of the real-time tier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overview {
    windows: BTreeMap<EventTime, OverviewWindow>,
}

impl Overview {
    /// Applies an update and returns the starts of the windows it changed that
    /// are still kept. A measurement present in the update replaces that
    /// measurement's value for the window; the others are left alone, since
    /// pipelines publish their updates separately.
    pub fn apply(&mut self, update: &Update) -> Vec<EventTime> {
        let mut traffic: BTreeMap<EventTime, BTreeMap<String, f64>> = BTreeMap::new();
        let mut users: BTreeMap<EventTime, f64> = BTreeMap::new();
        for p in update.points.iter().filter(|p| p.tier == Tier::Rt) {
            let start = p.time.floor(WINDOW);
            match p.measurement.as_str() {
                "traffic" => {
                    if let (Some(v), Some(kind)) = (p.field("events"), p.tag("event_type")) {
                        *traffic
                            .entry(start)
                            .or_default()
                            .entry(kind.to_string())
                            .or_default() += v.as_f64();
                    }
                }
                "active_users" => {
                    if let Some(v) = p.field("users") {
                        *users.entry(start).or_default() += v.as_f64();
                    }
                }
                _ => {}
            }
        }
        let mut touched: Vec<EventTime> = traffic.keys().chain(users.keys()).copied().collect();
        touched.sort();
        touched.dedup();
        for start in &touched {
            let w = self.windows.entry(*start).or_default();
            if let Some(t) = traffic.remove(start) {
                w.traffic = t;
            }
            if let Some(u) = users.remove(start) {
                w.active_users = u;
            }
            w.is_final |= update.is_final;
        }
        self.trim();
        touched.retain(|s| self.windows.contains_key(s));
        touched
    }

    fn trim(&mut self) {
        let Some(newest) = self.newest() else {
            return;
        };
        let oldest_kept = newest.minus(WINDOW * (OVERVIEW_WINDOWS as u32 - 1));
        self.windows = self.windows.split_off(&oldest_kept);
    }

    /// The kept windows, oldest first.
    pub fn windows(&self) -> impl Iterator<Item = (EventTime, &OverviewWindow)> {
        self.windows.iter().map(|(t, w)| (*t, w))
    }

    /// The start of the newest window kept.
    pub fn newest(&self) -> Option<EventTime> {
        self.windows.keys().next_back().copied()
    }

    fn window_json(start: EventTime, w: &OverviewWindow) -> Value {
        let traffic: Map<String, Value> = w
            .traffic
            .iter()
            .map(|(k, v)| (k.clone(), json_number(*v)))
            .collect();
        json!({
            "window_start": start.to_rfc3339(),
            "final": w.is_final,
            "traffic": traffic,
            "active_users": json_number(w.active_users),
        })
    }
}

/// The `overview` channel over an [`Overview`].
#[derive(Debug, Default)]
pub(crate) struct OverviewChannel(pub Overview);

impl OverviewChannel {
    /// The overview of the stored windows `seed` (updates of whole windows).
    pub fn seeded<'a>(seed: impl IntoIterator<Item = &'a Update>) -> OverviewChannel {
        let mut overview = Overview::default();
        for update in seed {
            overview.apply(update);
        }
        OverviewChannel(overview)
    }
}

impl Channel for OverviewChannel {
    fn name(&self) -> String {
        "overview".to_string()
    }

    fn snapshot(&self) -> Value {
        let windows: Map<String, Value> = self
            .0
            .windows()
            .map(|(start, w)| (start.to_rfc3339(), Overview::window_json(start, w)))
            .collect();
        json!({ "windows": windows })
    }

    fn apply(&mut self, update: &Update) -> Option<Map<String, Value>> {
        // At most an hour of small windows: a copy is cheaper than tracking
        // what trimming dropped.
        let before = self.0.windows.clone();
        let touched = self.0.apply(update);
        let mut windows = Map::new();
        for start in touched {
            let (Some(w), old) = (self.0.windows.get(&start), before.get(&start)) else {
                continue;
            };
            if old == Some(w) {
                continue;
            }
            // Whole, so a client may also take each window as it comes; an
            // event type the window no longer has is removed explicitly.
            let mut value = Overview::window_json(start, w);
            for kind in old.into_iter().flat_map(|o| o.traffic.keys()) {
                if !w.traffic.contains_key(kind) {
                    value["traffic"][kind] = Value::Null;
                }
            }
            windows.insert(start.to_rfc3339(), value);
        }
        for start in before.keys().filter(|s| !self.0.windows.contains_key(s)) {
            windows.insert(start.to_rfc3339(), Value::Null);
        }
        (!windows.is_empty()).then(|| {
            let mut data = Map::new();
            data.insert("windows".into(), Value::Object(windows));
            data
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_model::{FieldValue, Point};

    fn traffic(minute: i64, kind: &str, n: i64) -> Point {
        Point::new(
            "traffic",
            Tier::Rt,
            EventTime(minute * 60_000),
            vec![("event_type".into(), kind.into())],
            vec![("events".into(), FieldValue::Int(n))],
        )
    }

    fn update(minute: i64, is_final: bool, points: Vec<Point>) -> Update {
        Update {
            window_start: EventTime(minute * 60_000),
            is_final,
            newest_received_at: EventTime(0),
            points,
        }
    }

    #[test]
    fn changed_windows_go_whole_and_aged_out_ones_as_null() {
        let mut channel = OverviewChannel::default();
        let first = channel
            .apply(&update(0, false, vec![traffic(0, "like", 2)]))
            .unwrap();
        let start = EventTime(0).to_rfc3339();
        assert_eq!(
            Value::Object(first),
            json!({"windows": {start.clone(): {"window_start": start, "final": false,
                "traffic": {"like": 2}, "active_users": 0}}})
        );
        // The same values again change nothing.
        assert!(channel
            .apply(&update(0, false, vec![traffic(0, "like", 2)]))
            .is_none());
        // An hour on, the first window ages out.
        let later = OVERVIEW_WINDOWS as i64;
        let patch = channel
            .apply(&update(later, false, vec![traffic(later, "view", 1)]))
            .unwrap();
        assert_eq!(patch["windows"][&start], Value::Null);
        assert_eq!(channel.snapshot()["windows"].as_object().unwrap().len(), 1);
    }
}
