//! Live channels with sequence numbers: `trending:1m|5m|15m`, `engagement`
//! and `alerts`.
//!
//! A [`Channel`] is a name, a snapshot of its state, and how an update
//! changes that state (returning only the keys that changed). The [`Hub`]
//! keeps one state per channel, fed once per update by the task that
//! follows the served database, and publishes each change once, already
//! serialised, to every subscriber: `{"type":"update","channel":..,
//! "seq":N,"data":{changed keys}}`. `seq` goes up by one per change of the
//! channel; a subscription takes the snapshot and its `seq` under the same
//! lock that publishing takes, so updates follow it without a gap.
//!
//! A new channel is one type implementing [`Channel`] and a line in
//! [`Hub::channels`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Map, Value};
use tidemark_model::{EventTime, Tier, Update};
use tokio::sync::broadcast;

use crate::auth::Permission;
use crate::json_number;

/// Messages a channel keeps for a subscriber that is behind; one further
/// behind starts over from a snapshot.
const BACKLOG: usize = 256;

/// A live channel's state.
pub(crate) trait Channel: Send {
    /// What subscribers name it.
    fn name(&self) -> String;
    /// What a role needs to subscribe.
    fn permission(&self) -> Permission {
        Permission::ReadMetrics
    }
    /// The whole state.
    fn snapshot(&self) -> Value;
    /// Applies an update; the changed keys and their new values, if any.
    fn apply(&mut self, update: &Update) -> Option<Map<String, Value>>;
}

/// A change on its way to subscribers.
#[derive(Debug)]
pub(crate) struct Published {
    pub seq: u64,
    pub text: String,
}

struct Entry {
    channel: Box<dyn Channel>,
    seq: u64,
    sender: broadcast::Sender<Arc<Published>>,
}

/// A subscription's start: the snapshot message and where updates follow.
pub(crate) struct Subscribed {
    pub snapshot: String,
    pub seq: u64,
    pub updates: broadcast::Receiver<Arc<Published>>,
}

/// Every channel's state.
pub(crate) struct Hub {
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Default for Hub {
    fn default() -> Hub {
        let entries = Hub::channels()
            .into_iter()
            .map(|channel| {
                let (sender, _) = broadcast::channel(BACKLOG);
                let entry = Entry {
                    channel,
                    seq: 0,
                    sender,
                };
                (entry.channel.name(), entry)
            })
            .collect();
        Hub {
            entries: Mutex::new(entries),
        }
    }
}

impl Hub {
    /// The channels, empty.
    fn channels() -> Vec<Box<dyn Channel>> {
        let mut channels: Vec<Box<dyn Channel>> = crate::pipelines::TRENDING_WINDOWS
            .iter()
            .map(|w| Box::new(Trending::new(w)) as Box<dyn Channel>)
            .collect();
        channels.push(Box::new(Engagement::default()));
        channels.push(Box::new(Alerts));
        channels
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // Plain data: a panic elsewhere cannot leave it half-changed.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `name` is one of these channels.
    pub fn permission(&self, name: &str) -> Option<Permission> {
        self.lock().get(name).map(|e| e.channel.permission())
    }

    /// Applies `update` to every channel and publishes what changed.
    pub fn publish(&self, update: &Update) {
        for (name, entry) in self.lock().iter_mut() {
            if let Some(changed) = entry.channel.apply(update) {
                entry.seq += 1;
                let text = json!({
                    "type": "update",
                    "channel": name,
                    "seq": entry.seq,
                    "data": changed,
                })
                .to_string();
                let _ = entry.sender.send(Arc::new(Published {
                    seq: entry.seq,
                    text,
                }));
            }
        }
    }

    /// Starts every channel over empty (another database is served); the
    /// sequence numbers go on, and subscribers get a snapshot through a
    /// `reset` of the updates they follow.
    pub fn reset(&self) {
        let mut entries = self.lock();
        for channel in Hub::channels() {
            if let Some(entry) = entries.get_mut(&channel.name()) {
                entry.channel = channel;
                entry.seq += 1;
                let text = json!({
                    "type": "snapshot",
                    "channel": entry.channel.name(),
                    "seq": entry.seq,
                    "data": entry.channel.snapshot(),
                })
                .to_string();
                let _ = entry.sender.send(Arc::new(Published {
                    seq: entry.seq,
                    text,
                }));
            }
        }
    }

    /// Subscribes to `name`.
    pub fn subscribe(&self, name: &str) -> Option<Subscribed> {
        let entries = self.lock();
        let entry = entries.get(name)?;
        let snapshot = json!({
            "type": "snapshot",
            "channel": name,
            "seq": entry.seq,
            "data": entry.channel.snapshot(),
        })
        .to_string();
        Some(Subscribed {
            snapshot,
            seq: entry.seq,
            updates: entry.sender.subscribe(),
        })
    }
}

/// `trending:<window>`: the top tags of the newest window of that size, as
/// `GET /api/v1/trending` answers them: `{"window","start","end","final","tags"}`.
struct Trending {
    window: &'static str,
    length_ms: i64,
    start: Option<EventTime>,
    is_final: bool,
    tags: Vec<Value>,
}

impl Trending {
    fn new(window: &'static str) -> Trending {
        let minutes = match window {
            "1m" => 1,
            "5m" => 5,
            _ => 15,
        };
        Trending {
            window,
            length_ms: minutes * 60_000,
            start: None,
            is_final: false,
            tags: Vec::new(),
        }
    }

    fn state(&self) -> Map<String, Value> {
        let mut state = Map::new();
        state.insert("window".into(), json!(self.window));
        state.insert("start".into(), json!(self.start.map(|s| s.to_rfc3339())));
        state.insert(
            "end".into(),
            json!(self
                .start
                .map(|s| EventTime(s.millis() + self.length_ms).to_rfc3339())),
        );
        state.insert("final".into(), json!(self.is_final));
        state.insert("tags".into(), Value::Array(self.tags.clone()));
        state
    }
}

impl Channel for Trending {
    fn name(&self) -> String {
        format!("trending:{}", self.window)
    }

    fn snapshot(&self) -> Value {
        Value::Object(self.state())
    }

    fn apply(&mut self, update: &Update) -> Option<Map<String, Value>> {
        let mut rows: Vec<(i64, Value)> = update
            .points
            .iter()
            .filter(|p| {
                p.measurement == "trending"
                    && p.tier == Tier::Rt
                    && p.tag("window") == Some(self.window)
                    && p.time == update.window_start
            })
            .filter_map(|p| {
                let rank = p.field("rank")?.as_f64() as i64;
                let mut row = Map::new();
                row.insert("tag".into(), json!(p.tag("tag")?));
                for field in ["rank", "score", "users", "events"] {
                    let v = p
                        .field(field)
                        .map_or(Value::Null, |v| json_number(v.as_f64()));
                    row.insert(field.into(), v);
                }
                Some((rank, Value::Object(row)))
            })
            .collect();
        // An older window's correction does not replace the newest window.
        if rows.is_empty() || self.start.is_some_and(|s| update.window_start < s) {
            return None;
        }
        rows.sort_by_key(|(rank, _)| *rank);
        let before = self.state();
        self.start = Some(update.window_start);
        self.is_final = update.is_final;
        self.tags = rows.into_iter().map(|(_, row)| row).collect();
        changed(&before, self.state())
    }
}

/// The keys of `after` whose values differ from `before`'s.
fn changed(before: &Map<String, Value>, after: Map<String, Value>) -> Option<Map<String, Value>> {
    let diff: Map<String, Value> = after
        .into_iter()
        .filter(|(k, v)| before.get(k) != Some(v))
        .collect();
    (!diff.is_empty()).then_some(diff)
}

/// `engagement`: the newest minute's engagement per country and segment,
/// keyed `"<country>/<segment>"`, plus `"minute"` and `"final"`.
#[derive(Default)]
struct Engagement {
    minute: Option<EventTime>,
    is_final: bool,
    by_group: BTreeMap<String, Value>,
}

impl Engagement {
    fn state(&self) -> Map<String, Value> {
        let mut state = Map::new();
        state.insert("minute".into(), json!(self.minute.map(|m| m.to_rfc3339())));
        state.insert("final".into(), json!(self.is_final));
        state.insert(
            "groups".into(),
            Value::Object(self.by_group.clone().into_iter().collect()),
        );
        state
    }
}

impl Channel for Engagement {
    fn name(&self) -> String {
        "engagement".to_string()
    }

    fn snapshot(&self) -> Value {
        Value::Object(self.state())
    }

    fn apply(&mut self, update: &Update) -> Option<Map<String, Value>> {
        let points: Vec<_> = update
            .points
            .iter()
            .filter(|p| {
                p.measurement == "engagement" && p.tier == Tier::Rt && p.time == update.window_start
            })
            .collect();
        if points.is_empty() || self.minute.is_some_and(|m| update.window_start < m) {
            return None;
        }
        let new_minute = self.minute != Some(update.window_start);
        if new_minute {
            self.by_group.clear();
            self.minute = Some(update.window_start);
        }
        let mut groups = Map::new();
        for p in points {
            let key = format!(
                "{}/{}",
                p.tag("country").unwrap_or("unknown"),
                p.tag("segment").unwrap_or("unknown")
            );
            let fields: Value = p
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), json_number(v.as_f64())))
                .collect::<Map<String, Value>>()
                .into();
            if self.by_group.get(&key) != Some(&fields) {
                groups.insert(key.clone(), fields.clone());
                self.by_group.insert(key, fields);
            }
        }
        let final_changed = self.is_final != update.is_final;
        self.is_final = update.is_final;
        if new_minute {
            return Some(self.state());
        }
        let mut diff = Map::new();
        if final_changed {
            diff.insert("final".into(), json!(self.is_final));
        }
        if !groups.is_empty() {
            diff.insert("groups".into(), Value::Object(groups));
        }
        (!diff.is_empty()).then_some(diff)
    }
}

/// `alerts`: reserved for business alerts; its snapshot is empty.
struct Alerts;

impl Channel for Alerts {
    fn name(&self) -> String {
        "alerts".to_string()
    }

    fn snapshot(&self) -> Value {
        json!({ "alerts": [] })
    }

    fn apply(&mut self, _: &Update) -> Option<Map<String, Value>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_model::{FieldValue, Point};

    fn trending(start: i64, window: &str, tag: &str, rank: i64) -> Point {
        Point::new(
            "trending",
            Tier::Rt,
            EventTime(start),
            vec![("tag".into(), tag.into()), ("window".into(), window.into())],
            vec![
                ("events".into(), FieldValue::Int(10)),
                ("rank".into(), FieldValue::Int(rank)),
                ("score".into(), FieldValue::Float(1.5)),
                ("users".into(), FieldValue::Int(4)),
            ],
        )
    }

    fn update(start: i64, is_final: bool, points: Vec<Point>) -> Update {
        Update {
            window_start: EventTime(start),
            is_final,
            newest_received_at: EventTime(0),
            points,
        }
    }

    #[test]
    fn trending_follows_the_newest_window_and_numbers_its_changes() {
        let hub = Hub::default();
        let mut sub = hub.subscribe("trending:5m").unwrap();
        assert_eq!(sub.seq, 0);
        let snapshot: Value = serde_json::from_str(&sub.snapshot).unwrap();
        assert_eq!(snapshot["data"]["tags"], json!([]));

        let t0 = 60_000 * 1000;
        hub.publish(&update(
            t0,
            false,
            vec![
                trending(t0, "5m", "b", 2),
                trending(t0, "5m", "a", 1),
                trending(t0, "1m", "z", 1),
            ],
        ));
        let first = sub.updates.try_recv().unwrap();
        assert_eq!(first.seq, 1);
        let msg: Value = serde_json::from_str(&first.text).unwrap();
        assert_eq!(msg["type"], "update");
        let tags: Vec<&str> = msg["data"]["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tag"].as_str().unwrap())
            .collect();
        assert_eq!(tags, ["a", "b"]);
        assert_eq!(msg["data"]["start"], EventTime(t0).to_rfc3339());
        assert!(
            msg["data"].get("final").is_none(),
            "unchanged keys are left out"
        );

        // The same list, now final: only `final` changed.
        hub.publish(&update(
            t0,
            true,
            vec![trending(t0, "5m", "a", 1), trending(t0, "5m", "b", 2)],
        ));
        let second: Value = serde_json::from_str(&sub.updates.try_recv().unwrap().text).unwrap();
        assert_eq!(second["seq"], 2);
        assert_eq!(second["data"], json!({"final": true}));

        // An older window's correction changes nothing; nothing for this
        // window size either.
        hub.publish(&update(
            t0 - 60_000,
            true,
            vec![trending(t0 - 60_000, "5m", "x", 1)],
        ));
        hub.publish(&update(t0, true, vec![trending(t0, "1m", "y", 1)]));
        assert!(sub.updates.try_recv().is_err());

        // A late subscriber's snapshot carries the state and the seq so far.
        let late = hub.subscribe("trending:5m").unwrap();
        assert_eq!(late.seq, 2);
        let snapshot: Value = serde_json::from_str(&late.snapshot).unwrap();
        assert_eq!(snapshot["data"]["tags"][0]["tag"], "a");
        assert_eq!(snapshot["data"]["final"], true);
        assert!(hub.subscribe("trending:2m").is_none());
        assert_eq!(hub.permission("alerts"), Some(Permission::ReadMetrics));
    }
}
