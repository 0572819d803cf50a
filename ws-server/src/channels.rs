//! Live channels with sequence numbers: `overview`, `trending:1m|5m|15m`,
//! `engagement`, `campaigns`, `campaign:<id>` and `alerts`.
//!
//! A [`Channel`] is a name, a snapshot of its state, and how an update
//! changes that state (returning only what changed, as a JSON merge patch,
//! RFC 7396). The [`Hub`] keeps one state per channel, fed once per update
//! by the task that follows the served database, and publishes each change
//! once, already serialised, to every subscriber: `{"type":"update",
//! "channel":..,"seq":N,"data":{patch}}`. `seq` goes up by one per change of
//! the channel; a subscription takes the snapshot and its `seq` under the
//! same lock that publishing takes, so updates follow it without a gap.
//!
//! Channel data holds no `null`: a patch's `null` removes a key, so a value
//! the REST API answers as `null` (a ratio whose divisor is 0) is left out,
//! and the data a client merges equals the snapshot a later subscriber gets.
//!
//! A new channel is one type implementing [`Channel`] and a line in
//! [`Hub::channels`]. A channel may head a family of channels made on first
//! subscription ([`Channel::child`]: `campaigns` makes `campaign:<id>`);
//! those are dropped again when nobody follows them.

mod campaigns;

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use serde_json::{json, Map, Value};
use tidemark_model::{EventTime, Tier, Update};
use tokio::sync::broadcast;

use crate::auth::Permission;
use crate::json_number;
use crate::overview::{Overview, OverviewChannel};

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
    /// Applies an update; the merge patch of what changed, if anything did.
    fn apply(&mut self, update: &Update) -> Option<Map<String, Value>>;
    /// The channel `name` of the family this one heads, starting from this
    /// one's state; `None` if `name` is not of its family.
    fn child(&self, _name: &str) -> Option<Box<dyn Channel>> {
        None
    }
    /// For reading a channel's own state ([`Hub::overview`]).
    fn as_any(&self) -> &dyn Any;
}

/// What channels that show more than live updates start from when the hub
/// starts over: what the served database holds.
#[derive(Debug, Default)]
pub(crate) struct Seed {
    /// The overview's stored windows, one update each.
    pub overview: Vec<Update>,
    /// The UTC day (its midnight) the campaign totals are of, and its
    /// stored `ads` counts of the real-time tier so far, keyed by
    /// `[campaign_id, country, device]` and minute.
    pub ads: Option<(EventTime, crate::pipelines::Rows)>,
}

/// A change on its way to subscribers.
#[derive(Debug)]
pub(crate) struct Published {
    pub seq: u64,
    /// Shared by every subscriber's send: cloning it copies no bytes.
    pub text: Utf8Bytes,
    /// The newest ingest time among the events of the update it comes
    /// from; 0 for a snapshot.
    pub received_at: EventTime,
}

struct Entry {
    channel: Box<dyn Channel>,
    seq: u64,
    sender: broadcast::Sender<Arc<Published>>,
    /// Made on subscription by another channel; dropped when unfollowed.
    child: bool,
}

impl Entry {
    fn new(channel: Box<dyn Channel>, child: bool) -> Entry {
        let (sender, _) = broadcast::channel(BACKLOG);
        Entry {
            channel,
            seq: 0,
            sender,
            child,
        }
    }

    fn snapshot_message(&self) -> String {
        json!({
            "type": "snapshot",
            "channel": self.channel.name(),
            "seq": self.seq,
            "data": self.channel.snapshot(),
        })
        .to_string()
    }

    /// Takes `channel` as the state from now on; subscribers get its
    /// snapshot under the next `seq` unless it shows the same data.
    fn replace(&mut self, channel: Box<dyn Channel>) {
        let unchanged = channel.snapshot() == self.channel.snapshot();
        self.channel = channel;
        if !unchanged {
            self.seq += 1;
            let _ = self.sender.send(Arc::new(Published {
                seq: self.seq,
                text: self.snapshot_message().into(),
                received_at: EventTime(0),
            }));
        }
    }
}

/// A subscription's start: the snapshot message and where updates follow.
pub(crate) struct Subscribed {
    pub snapshot: String,
    pub seq: u64,
    pub updates: broadcast::Receiver<Arc<Published>>,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No such channel.
    Unknown,
    /// The role lacks the permission the channel needs.
    Forbidden(Permission),
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
        Hub::new(&Seed::default())
    }
}

impl Hub {
    /// Every channel, from `seed`.
    pub fn new(seed: &Seed) -> Hub {
        let entries = Hub::channels(seed)
            .into_iter()
            .map(|channel| (channel.name(), Entry::new(channel, false)))
            .collect();
        Hub {
            entries: Mutex::new(entries),
        }
    }

    /// The channels (not their children), from `seed`.
    fn channels(seed: &Seed) -> Vec<Box<dyn Channel>> {
        let mut channels: Vec<Box<dyn Channel>> = crate::pipelines::TRENDING_WINDOWS
            .iter()
            .map(|w| Box::new(Trending::new(w)) as Box<dyn Channel>)
            .collect();
        channels.push(Box::new(OverviewChannel::seeded(&seed.overview)));
        channels.push(Box::new(Engagement::default()));
        channels.push(Box::new(match &seed.ads {
            Some((day, rows)) => campaigns::Campaigns::seeded(*day, rows),
            None => campaigns::Campaigns::default(),
        }));
        channels.push(Box::new(Alerts::default()));
        channels
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // Plain data: a panic elsewhere cannot leave it half-changed.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A channel of the family one of `entries` heads.
    fn child(entries: &BTreeMap<String, Entry>, name: &str) -> Option<Box<dyn Channel>> {
        entries
            .values()
            .filter(|e| !e.child)
            .find_map(|e| e.channel.child(name))
    }

    /// Whether `name` is a channel (or one that a subscription would make).
    pub fn knows(&self, name: &str) -> bool {
        let entries = self.lock();
        entries.contains_key(name) || Hub::child(&entries, name).is_some()
    }

    /// Applies `update` to every channel and publishes what changed.
    pub fn publish(&self, update: &Update) {
        let mut entries = self.lock();
        // Children nobody follows any more; a new subscription makes them
        // again from their family's state.
        entries.retain(|_, e| !e.child || e.sender.receiver_count() > 0);
        for (name, entry) in entries.iter_mut() {
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
                    text: text.into(),
                    received_at: update.newest_received_at,
                }));
            }
        }
    }

    /// Starts every channel over from `seed` (another database is served,
    /// or updates were missed). The sequence numbers go on, and subscribers
    /// of a channel whose data this changes get its new snapshot through
    /// the updates they follow.
    pub fn reset(&self, seed: &Seed) {
        let mut entries = self.lock();
        for channel in Hub::channels(seed) {
            if let Some(entry) = entries.get_mut(&channel.name()) {
                entry.replace(channel);
            }
        }
        let children: Vec<String> = entries
            .iter()
            .filter(|(_, e)| e.child)
            .map(|(name, _)| name.clone())
            .collect();
        for name in children {
            match Hub::child(&entries, &name) {
                Some(channel) => {
                    if let Some(entry) = entries.get_mut(&name) {
                        entry.replace(channel);
                    }
                }
                None => {
                    entries.remove(&name);
                }
            }
        }
    }

    /// Subscribes to `name` if `allowed` grants what it needs, making it if
    /// it is a child not made yet.
    pub fn subscribe(
        &self,
        name: &str,
        allowed: impl Fn(Permission) -> bool,
    ) -> Result<Subscribed, Refused> {
        let mut entries = self.lock();
        if !entries.contains_key(name) {
            let channel = Hub::child(&entries, name).ok_or(Refused::Unknown)?;
            if !allowed(channel.permission()) {
                return Err(Refused::Forbidden(channel.permission()));
            }
            entries.insert(name.to_string(), Entry::new(channel, true));
        }
        let entry = entries.get(name).ok_or(Refused::Unknown)?;
        let needs = entry.channel.permission();
        if !allowed(needs) {
            return Err(Refused::Forbidden(needs));
        }
        Ok(Subscribed {
            snapshot: entry.snapshot_message(),
            seq: entry.seq,
            updates: entry.sender.subscribe(),
        })
    }

    /// A copy of the overview channel's windows.
    pub fn overview(&self) -> Overview {
        self.lock()
            .get("overview")
            .and_then(|e| e.channel.as_any().downcast_ref::<OverviewChannel>())
            .map(|c| c.0.clone())
            .unwrap_or_default()
    }
}

/// The JSON merge patch (RFC 7396) that turns `before` into `after`, if they
/// differ: objects compared key by key, a key `after` lacks as `null`, any
/// other value whole.
pub(crate) fn diff(before: &Value, after: &Value) -> Option<Value> {
    match (before, after) {
        (Value::Object(old), Value::Object(new)) => {
            let mut patch = Map::new();
            for (key, value) in new {
                let change = match old.get(key) {
                    Some(was) => diff(was, value),
                    None => Some(value.clone()),
                };
                if let Some(change) = change {
                    patch.insert(key.clone(), change);
                }
            }
            for key in old.keys().filter(|k| !new.contains_key(*k)) {
                patch.insert(key.clone(), Value::Null);
            }
            (!patch.is_empty()).then_some(Value::Object(patch))
        }
        _ if before == after => None,
        _ => Some(after.clone()),
    }
}

/// [`diff`] of two channel states, as a patch's top level.
fn changed(before: &Map<String, Value>, after: &Map<String, Value>) -> Option<Map<String, Value>> {
    match diff(
        &Value::Object(before.clone()),
        &Value::Object(after.clone()),
    )? {
        Value::Object(patch) => Some(patch),
        _ => None,
    }
}

/// Fields as JSON numbers, leaving out values that have none (non-finite).
fn numbers<'a>(fields: impl Iterator<Item = (&'a str, f64)>) -> Map<String, Value> {
    fields
        .map(|(k, v)| (k.to_string(), json_number(v)))
        .filter(|(_, v)| !v.is_null())
        .collect()
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
        if let Some(start) = self.start {
            state.insert("start".into(), json!(start.to_rfc3339()));
            let end = EventTime(start.millis() + self.length_ms);
            state.insert("end".into(), json!(end.to_rfc3339()));
        }
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
                row.extend(numbers(
                    ["rank", "score", "users", "events"]
                        .into_iter()
                        .filter_map(|field| Some((field, p.field(field)?.as_f64()))),
                ));
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
        changed(&before, &self.state())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `engagement`: the newest minute's engagement per country and segment:
/// `{"minute","final","groups":{"<country>/<segment>":{fields}}}`. A new
/// minute replaces every group; within a minute an update changes the
/// groups it carries.
#[derive(Default)]
struct Engagement {
    minute: Option<EventTime>,
    is_final: bool,
    by_group: BTreeMap<String, Value>,
}

impl Engagement {
    fn state(&self) -> Map<String, Value> {
        let mut state = Map::new();
        if let Some(minute) = self.minute {
            state.insert("minute".into(), json!(minute.to_rfc3339()));
        }
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
        let mut patch = Map::new();
        let new_minute = self.minute != Some(update.window_start);
        // Only the groups this update touches are compared, except when a
        // new minute drops the old minute's groups.
        let old = if new_minute {
            self.minute = Some(update.window_start);
            patch.insert("minute".into(), json!(update.window_start.to_rfc3339()));
            std::mem::take(&mut self.by_group)
        } else {
            BTreeMap::new()
        };
        let mut groups = Map::new();
        for p in points {
            let key = format!(
                "{}/{}",
                p.tag("country").unwrap_or("unknown"),
                p.tag("segment").unwrap_or("unknown")
            );
            let fields = Value::Object(numbers(
                p.fields.iter().map(|(k, v)| (k.as_str(), v.as_f64())),
            ));
            let previous = if new_minute {
                old.get(&key)
            } else {
                self.by_group.get(&key)
            };
            let change = match previous {
                Some(was) => diff(was, &fields),
                None => Some(fields.clone()),
            };
            if let Some(change) = change {
                groups.insert(key.clone(), change);
            }
            self.by_group.insert(key, fields);
        }
        for key in old.keys().filter(|k| !self.by_group.contains_key(*k)) {
            groups.insert(key.clone(), Value::Null);
        }
        if self.is_final != update.is_final {
            self.is_final = update.is_final;
            patch.insert("final".into(), json!(self.is_final));
        }
        if !groups.is_empty() {
            patch.insert("groups".into(), Value::Object(groups));
        }
        (!patch.is_empty()).then_some(patch)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `alerts`: the business alerts pending or firing now, keyed by rule and
/// series (`<rule>` or `<rule>{tag=value,...}`), from the points of
/// measurement `alerts`: `{"alerts": {key: {"rule", "tags", "state",
/// "value", "threshold", "since", "window"}}}`. A resolved alert's key goes
/// (`null` in the patch). After a restart an alert still firing reappears
/// with its next window's point.
#[derive(Default)]
struct Alerts {
    active: BTreeMap<String, Value>,
}

/// The key of an alert's series in the `alerts` channel.
fn alert_key(p: &tidemark_model::Point) -> String {
    let rule = p.tag("rule").unwrap_or("");
    let tags: Vec<String> = (p.tags.iter())
        .filter(|(k, _)| k != "rule")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if tags.is_empty() {
        rule.to_string()
    } else {
        format!("{rule}{{{}}}", tags.join(","))
    }
}

impl Channel for Alerts {
    fn name(&self) -> String {
        "alerts".to_string()
    }

    fn snapshot(&self) -> Value {
        json!({ "alerts": Value::Object(self.active.clone().into_iter().collect()) })
    }

    fn apply(&mut self, update: &Update) -> Option<Map<String, Value>> {
        let mut changed = Map::new();
        let points = (update.points.iter())
            .filter(|p| p.measurement == "alerts" && p.tier == Tier::Rt && update.is_final);
        for p in points {
            let key = alert_key(p);
            let state = match p.field("state").map(|v| v.as_f64() as i64) {
                Some(1) => "pending",
                Some(2) => "firing",
                _ => {
                    if self.active.remove(&key).is_some() {
                        changed.insert(key, Value::Null);
                    }
                    continue;
                }
            };
            let window = p.time.to_rfc3339();
            let since = match self.active.get(&key) {
                Some(old) if old["state"] == state => old["since"].clone(),
                _ => json!(window),
            };
            let tags: Map<String, Value> = (p.tags.iter())
                .filter(|(k, _)| k != "rule")
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            let mut alert = Map::new();
            alert.insert("rule".into(), json!(p.tag("rule").unwrap_or("")));
            alert.insert("tags".into(), Value::Object(tags));
            alert.insert("state".into(), json!(state));
            alert.extend(numbers(
                ["value", "threshold"]
                    .into_iter()
                    .filter_map(|f| p.field(f).map(|v| (f, v.as_f64()))),
            ));
            alert.insert("since".into(), since);
            alert.insert("window".into(), json!(window));
            let alert = Value::Object(alert);
            if self.active.get(&key) != Some(&alert) {
                self.active.insert(key.clone(), alert.clone());
                changed.insert(key, alert);
            }
        }
        if changed.is_empty() {
            return None;
        }
        let mut patch = Map::new();
        patch.insert("alerts".into(), Value::Object(changed));
        Some(patch)
    }

    fn as_any(&self) -> &dyn Any {
        self
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
        let mut sub = hub.subscribe("trending:5m", |_| true).unwrap();
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
        let late = hub.subscribe("trending:5m", |_| true).unwrap();
        assert_eq!(late.seq, 2);
        let snapshot: Value = serde_json::from_str(&late.snapshot).unwrap();
        assert_eq!(snapshot["data"]["tags"][0]["tag"], "a");
        assert_eq!(snapshot["data"]["final"], true);
        assert_eq!(
            hub.subscribe("trending:2m", |_| true).err(),
            Some(Refused::Unknown)
        );
        assert_eq!(
            hub.subscribe("alerts", |p| p != Permission::ReadMetrics)
                .err(),
            Some(Refused::Forbidden(Permission::ReadMetrics))
        );
    }

    fn alert(minute: i64, rule: &str, country: Option<&str>, state: i64, value: f64) -> Point {
        let mut tags = vec![("rule".to_string(), rule.to_string())];
        tags.extend(country.map(|c| ("country".to_string(), c.to_string())));
        Point::new(
            "alerts",
            Tier::Rt,
            EventTime(minute * 60_000),
            tags,
            vec![
                ("state".into(), FieldValue::Int(state)),
                ("value".into(), FieldValue::Float(value)),
                ("threshold".into(), FieldValue::Float(100.0)),
            ],
        )
    }

    #[test]
    fn the_alerts_channel_holds_what_is_pending_or_firing() {
        let hub = Hub::default();
        let mut sub = hub.subscribe("alerts", |_| true).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&sub.snapshot).unwrap()["data"],
            json!({"alerts": {}})
        );
        hub.publish(&update(0, true, vec![alert(0, "low", None, 1, 60.0)]));
        hub.publish(&update(
            60_000,
            true,
            vec![
                alert(1, "low", None, 2, 40.0),
                alert(1, "busy", Some("de"), 2, 7.5),
            ],
        ));
        hub.publish(&update(
            120_000,
            true,
            vec![alert(2, "low", None, 0, 150.0)],
        ));
        let patches: Vec<Value> = std::iter::from_fn(|| sub.updates.try_recv().ok())
            .map(|m| serde_json::from_str::<Value>(&m.text).unwrap()["data"].clone())
            .collect();
        let t = |m: i64| EventTime(m * 60_000).to_rfc3339();
        assert_eq!(
            patches,
            [
                json!({"alerts": {"low": {"rule": "low", "tags": {}, "state": "pending",
                    "value": 60, "threshold": 100, "since": t(0), "window": t(0)}}}),
                json!({"alerts": {
                    "low": {"rule": "low", "tags": {}, "state": "firing",
                        "value": 40, "threshold": 100, "since": t(1), "window": t(1)},
                    "busy{country=de}": {"rule": "busy", "tags": {"country": "de"},
                        "state": "firing", "value": 7.5, "threshold": 100,
                        "since": t(1), "window": t(1)}}}),
                json!({"alerts": {"low": null}}),
            ]
        );
        let late = hub.subscribe("alerts", |_| true).unwrap();
        let snapshot: Value = serde_json::from_str(&late.snapshot).unwrap();
        let keys: Vec<&String> = snapshot["data"]["alerts"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert_eq!(keys, ["busy{country=de}"]);
    }

    #[test]
    fn patches_merge_into_the_next_state() {
        let before = json!({"a": 1, "o": {"x": 1, "y": [1]}, "gone": true});
        let after = json!({"a": 1, "o": {"x": 2, "y": [1]}, "new": "n"});
        assert_eq!(
            diff(&before, &after),
            Some(json!({"o": {"x": 2}, "new": "n", "gone": null}))
        );
        assert_eq!(diff(&after, &after), None);
    }

    #[test]
    fn children_are_made_on_subscription_and_dropped_when_unfollowed() {
        let hub = Hub::default();
        assert!(hub.knows("campaign:c1"));
        assert!(!hub.knows("campaign:"));
        let sub = hub.subscribe("campaign:c1", |_| true).unwrap();
        let snapshot: Value = serde_json::from_str(&sub.snapshot).unwrap();
        assert_eq!(snapshot["data"]["campaign_id"], "c1");
        assert!(hub.lock().contains_key("campaign:c1"));
        drop(sub);
        hub.publish(&update(0, false, Vec::new()));
        assert!(!hub.lock().contains_key("campaign:c1"));
        // A switch to a database with the same (empty) data says nothing.
        let mut overview = hub.subscribe("overview", |_| true).unwrap();
        hub.reset(&Seed::default());
        assert!(overview.updates.try_recv().is_err());
    }
}
