//! A known event set over three closed minutes, with the exact answers every
//! pipeline must give for it: traffic and active users, trending tags,
//! campaign funnels and engagement.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::JsonApi;

const MINUTE: i64 = 60_000;
/// The trending pipeline's default baseline decay per slide.
const BASELINE_DECAY: f64 = 0.5;
/// The engagement pipeline's default score per action.
const WEIGHTS: [(&str, i64); 3] = [("view", 1), ("like", 2), ("comment", 4)];

/// Exact ad counts of one (minute, campaign, device).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdCounts {
    pub impressions: u64,
    pub clicks: u64,
    pub conversions: u64,
    pub spend_micros: i64,
    pub revenue_micros: i64,
}

impl AdCounts {
    fn add(&mut self, other: &AdCounts) {
        self.impressions += other.impressions;
        self.clicks += other.clicks;
        self.conversions += other.conversions;
        self.spend_micros += other.spend_micros;
        self.revenue_micros += other.revenue_micros;
    }
}

/// One tag of a trending window, as the REST API ranks it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrendingRow {
    pub tag: String,
    pub rank: u64,
    pub users: u64,
    pub events: u64,
    pub score: f64,
}

/// Sessions of one (group value, minute) of the engagement pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngagementCounts {
    pub sessions_started: u64,
    pub sessions_ended: u64,
    pub active_sessions: u64,
    pub engagement_score: i64,
}

/// One user's profile update, at the start of the first minute.
struct Profile {
    segment: &'static str,
    country: Option<&'static str>,
}

fn profile_of(user: i64) -> Option<Profile> {
    match user % 3 {
        0 => Some(Profile {
            segment: "creator",
            country: Some("FR"),
        }),
        1 => Some(Profile {
            segment: "viewer",
            country: None,
        }),
        _ => None,
    }
}

/// The hashtags of the `j`-th post action of a minute: overlapping sets of
/// different sizes, so tags rank by distinct users, not by events.
fn hashtags_of(j: i64) -> Vec<&'static str> {
    [
        ("rust", j % 2 == 0),
        ("kafka", j % 3 == 0),
        ("tide", j % 7 == 1),
        ("wasm", j % 11 == 4),
    ]
    .into_iter()
    .filter_map(|(tag, on)| on.then_some(tag))
    .collect()
}

/// A known event set over three closed minutes, with the exact answers.
#[derive(Debug)]
pub struct KnownEvents {
    /// Start of the first minute.
    pub base: i64,
    /// Batches to post, in order: out-of-order within 4 s, duplicates and
    /// invalid events mixed in, and a final batch that closes the three minutes.
    pub batches: Vec<Vec<Value>>,
    /// Expected `traffic` events per (minute start, event_type, country, device).
    pub traffic: BTreeMap<(i64, String, String, String), u64>,
    /// Expected distinct users per minute start.
    pub users: BTreeMap<i64, u64>,
    /// Number of invalid events in the batches.
    pub invalid: usize,
    /// Distinct users and events per (minute start, hashtag).
    pub tags: BTreeMap<(i64, String), (BTreeSet<String>, u64)>,
    /// Ad counts per (minute start, campaign, device).
    pub ads: BTreeMap<(i64, String, String), AdCounts>,
    /// Engagement per (`segment` or `country`, its value, minute start).
    pub engagement: BTreeMap<(String, String, i64), EngagementCounts>,
}

/// One accepted action of the set, as the engagement pipeline sees it.
struct Action {
    ts: i64,
    user: i64,
    country: String,
    weight: i64,
}

impl KnownEvents {
    /// Builds the set for minutes starting `minutes_ago` minutes before now.
    pub fn new(minutes_ago: i64) -> KnownEvents {
        let now = tidemark_model::EventTime::now().millis();
        let base = (now - minutes_ago * MINUTE).div_euclid(MINUTE) * MINUTE;
        let types = ["view", "like", "page_view", "ad_impression", "comment"];
        let devices = ["ios", "android", "web"];
        let countries = ["US", "DE"];
        let mut events = Vec::new();
        let mut traffic = BTreeMap::new();
        let mut users: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
        let mut tags: BTreeMap<(i64, String), (BTreeSet<String>, u64)> = BTreeMap::new();
        let mut ads: BTreeMap<(i64, String, String), AdCounts> = BTreeMap::new();
        let mut actions = Vec::new();
        let mut count = |ev: &Value| {
            let ts = ev["timestamp"].as_i64().expect("a timestamp");
            let window = ts.div_euclid(MINUTE) * MINUTE;
            let text = |k: &str| ev[k].as_str().unwrap_or("unknown").to_string();
            *traffic
                .entry((window, text("event_type"), text("country"), text("device")))
                .or_insert(0) += 1;
            users.entry(window).or_default().insert(text("user_id"));
        };
        // Two thirds of the users have a profile in effect from the start.
        for user in 0..90 {
            let Some(profile) = profile_of(user) else {
                continue;
            };
            let mut ev = json!({
                "event_id": format!("kp{user}"), "event_type": "profile_update",
                "user_id": format!("u{user}"), "timestamp": base, "segment": profile.segment,
            });
            if let Some(country) = profile.country {
                ev["country"] = json!(country);
            }
            count(&ev);
            events.push(ev);
        }
        for minute in 0..3i64 {
            for j in 0..120i64 {
                let ts = base + minute * MINUTE + j * 500;
                let t = types[(j % 5) as usize];
                let user = (j * 7 + minute * 13) % 90;
                let mut ev = json!({
                    "event_id": format!("k{minute}-{j}"), "event_type": t, "user_id": format!("u{user}"),
                    "timestamp": ts, "device": devices[(j % 3) as usize],
                    "country": countries[(j % 2) as usize],
                });
                // Every tenth event arrives without device and country.
                if j % 10 == 9 {
                    let o = ev.as_object_mut().expect("object");
                    o.remove("device");
                    o.remove("country");
                }
                let mut follow_ups = Vec::new();
                match t {
                    "view" | "like" | "comment" => {
                        ev["post_id"] = json!(format!("p{}", j % 11));
                        let hashtags = hashtags_of(j);
                        for tag in &hashtags {
                            let entry = tags.entry((base + minute * MINUTE, tag.to_string()));
                            let (tag_users, tag_events) = entry.or_default();
                            tag_users.insert(format!("u{user}"));
                            *tag_events += 1;
                        }
                        if !hashtags.is_empty() {
                            ev["hashtags"] = json!(hashtags);
                        }
                    }
                    "ad_impression" => {
                        let (campaign, cost) = if (j / 5) % 2 == 0 {
                            ("c1", 0.01_f64)
                        } else {
                            ("c2", 0.02)
                        };
                        ev["campaign_id"] = json!(campaign);
                        ev["ad_id"] = json!(format!("{campaign}-a1"));
                        ev["impression_id"] = json!(format!("i{minute}-{j}"));
                        ev["cost"] = json!(cost);
                        let device = ev["device"].as_str().unwrap_or("unknown").to_string();
                        let counts = ads
                            .entry((base + minute * MINUTE, campaign.to_string(), device))
                            .or_default();
                        counts.impressions += 1;
                        counts.spend_micros += (cost * 1e6).round() as i64;
                        // Two of three impressions are clicked a quarter second
                        // later, and three of four clicks convert.
                        if j % 3 != 2 {
                            counts.clicks += 1;
                            let mut click = ev.clone();
                            click["event_id"] = json!(format!("kc{minute}-{j}"));
                            click["event_type"] = json!("ad_click");
                            click["timestamp"] = json!(ts + 250);
                            click.as_object_mut().expect("object").remove("cost");
                            follow_ups.push(click);
                            if j % 4 != 0 {
                                counts.conversions += 1;
                                counts.revenue_micros += 2_500_000;
                                let mut conversion = follow_ups[0].clone();
                                conversion["event_id"] = json!(format!("kv{minute}-{j}"));
                                conversion["event_type"] = json!("ad_conversion");
                                conversion["timestamp"] = json!(ts + 400);
                                conversion["revenue"] = json!(2.5);
                                follow_ups.push(conversion);
                            }
                        }
                    }
                    _ => ev["page"] = json!("/home"),
                }
                for ev in std::iter::once(ev).chain(follow_ups) {
                    count(&ev);
                    let kind = ev["event_type"].as_str().expect("a type");
                    actions.push(Action {
                        ts: ev["timestamp"].as_i64().expect("a timestamp"),
                        user,
                        country: ev["country"].as_str().unwrap_or("unknown").to_string(),
                        weight: WEIGHTS
                            .iter()
                            .find(|(k, _)| *k == kind)
                            .map_or(0, |(_, w)| *w),
                    });
                    events.push(ev);
                }
            }
        }
        // Out of order within 4 s: reverse every run of 8 events (at most
        // 4 s of event time).
        for chunk in events.chunks_mut(8) {
            chunk.reverse();
        }
        let mut batches: Vec<Vec<Value>> = events.chunks(25).map(<[Value]>::to_vec).collect();
        // Duplicates: resend earlier events in later batches.
        for (i, batch) in batches.iter_mut().enumerate().skip(2) {
            let dup = events[(i * 17) % events.len().min(i * 25)].clone();
            batch.push(dup);
        }
        // Invalid events: each gets a reason, none is counted.
        let invalid = vec![
            json!({"event_id": "bad-1", "event_type": "view", "user_id": "u1", "timestamp": base}),
            json!({"event_id": "bad-2", "event_type": "teleport", "user_id": "u1", "timestamp": base}),
            json!({"event_id": "bad-3", "event_type": "like", "user_id": 5, "post_id": "p", "timestamp": base}),
            json!({"event_id": "bad-4", "event_type": "like", "user_id": "u1", "post_id": "p", "timestamp": now + 3_600_000}),
        ];
        let invalid_count = invalid.len();
        for (i, bad) in invalid.into_iter().enumerate() {
            batches[i * 3 + 1].push(bad);
        }
        // Close the three minutes on every topic: event time well past their end.
        let closing: Vec<Value> = (0..90)
            .flat_map(|u| {
                let ts = base + 4 * MINUTE + 10_000;
                [
                    json!({"event_id": format!("close-l{u}"), "event_type": "login", "user_id": format!("u{u}"), "timestamp": ts}),
                    json!({"event_id": format!("close-v{u}"), "event_type": "view", "user_id": format!("u{u}"), "post_id": "p0", "timestamp": ts}),
                    json!({"event_id": format!("close-a{u}"), "event_type": "ad_impression", "user_id": format!("u{u}"),
                           "campaign_id": "c1", "ad_id": "c1-a1", "impression_id": format!("ic{u}"), "timestamp": ts}),
                ]
            })
            .collect();
        batches.push(closing);
        KnownEvents {
            base,
            batches,
            traffic,
            users: users
                .into_iter()
                .map(|(k, v)| (k, v.len() as u64))
                .collect(),
            invalid: invalid_count,
            tags,
            ads,
            engagement: engagement_of(&actions),
        }
    }

    /// The expected ranking of the trending window of `minutes` minutes that
    /// ends at `end`: score against the decayed baseline of the earlier
    /// windows of that size, ties broken by more users, then by tag.
    pub fn trending(&self, minutes: i64, end: i64) -> Vec<TrendingRow> {
        let names: BTreeSet<&String> = self.tags.keys().map(|(_, tag)| tag).collect();
        let in_window = |tag: &str, end: i64| {
            let mut users = BTreeSet::new();
            let mut events = 0;
            for minute in (end - minutes * MINUTE..end).step_by(MINUTE as usize) {
                if let Some((u, e)) = self.tags.get(&(minute, tag.to_string())) {
                    users.extend(u.iter().cloned());
                    events += e;
                }
            }
            (users.len() as u64, events)
        };
        let mut rows: Vec<TrendingRow> = names
            .into_iter()
            .filter_map(|tag| {
                let (users, events) = in_window(tag, end);
                if events == 0 {
                    return None;
                }
                // The baseline after every earlier window, from before the set.
                let mut baseline = 0.0;
                for earlier in (self.base + MINUTE..end).step_by(MINUTE as usize) {
                    let (u, _) = in_window(tag, earlier);
                    baseline = BASELINE_DECAY * baseline + (1.0 - BASELINE_DECAY) * u as f64;
                    if baseline < 0.01 {
                        baseline = 0.0;
                    }
                }
                Some(TrendingRow {
                    tag: tag.clone(),
                    rank: 0,
                    users,
                    events,
                    score: (users as f64 - baseline) / (baseline + 1.0).sqrt(),
                })
            })
            .collect();
        rows.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(b.users.cmp(&a.users))
                .then_with(|| a.tag.cmp(&b.tag))
        });
        for (i, row) in rows.iter_mut().enumerate() {
            row.rank = i as u64 + 1;
        }
        rows
    }

    /// Ad counts per campaign over the three minutes.
    pub fn campaign_totals(&self) -> BTreeMap<String, AdCounts> {
        let mut out: BTreeMap<String, AdCounts> = BTreeMap::new();
        for ((_, campaign, _), counts) in &self.ads {
            out.entry(campaign.clone()).or_default().add(counts);
        }
        out
    }

    /// `traffic` per (minute, event_type, country, device) as the REST API answers it.
    pub async fn read_traffic(
        &self,
        t: &impl JsonApi,
    ) -> BTreeMap<(i64, String, String, String), u64> {
        let reply = t
            .get_json(&format!(
                "/api/v1/metrics?name=traffic&field=events&step=1m&from={}&to={}&group_by=event_type,country,device",
                self.base,
                self.base + 3 * MINUTE
            ))
            .await;
        let mut out = BTreeMap::new();
        for series in reply["series"].as_array().into_iter().flatten() {
            let tag = |k: &str| series["tags"][k].as_str().unwrap_or("").to_string();
            for p in series["points"].as_array().into_iter().flatten() {
                out.insert(
                    (
                        point_time(p),
                        tag("event_type"),
                        tag("country"),
                        tag("device"),
                    ),
                    p["v"].as_f64().unwrap_or(0.0) as u64,
                );
            }
        }
        out
    }

    /// `active_users` per minute as the REST API answers it.
    pub async fn read_users(&self, t: &impl JsonApi) -> BTreeMap<i64, u64> {
        let reply = t
            .get_json(&format!(
                "/api/v1/metrics?name=active_users&field=users&step=1m&from={}&to={}",
                self.base,
                self.base + 3 * MINUTE
            ))
            .await;
        let mut out = BTreeMap::new();
        for series in reply["series"].as_array().into_iter().flatten() {
            for p in series["points"].as_array().into_iter().flatten() {
                out.insert(point_time(p), p["v"].as_f64().unwrap_or(0.0) as u64);
            }
        }
        out
    }

    /// Expected `traffic` events per (minute start, event_type), as the
    /// dashboard's overview channel shows them.
    pub fn traffic_by_type(&self) -> BTreeMap<i64, BTreeMap<String, u64>> {
        let mut out: BTreeMap<i64, BTreeMap<String, u64>> = Default::default();
        for ((minute, event_type, _, _), n) in &self.traffic {
            *out.entry(*minute)
                .or_default()
                .entry(event_type.clone())
                .or_default() += n;
        }
        out
    }

    /// Waits until the REST API answers exactly the expected traffic, then checks users within 2 %.
    pub async fn assert_results(&self, t: &impl JsonApi) {
        self.assert_results_within(t, Duration::from_secs(60)).await;
    }

    /// [`assert_results`](Self::assert_results), waiting up to `timeout`.
    pub async fn assert_results_within(&self, t: &impl JsonApi, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut seen = Default::default();
        while Instant::now() < deadline {
            seen = self.read_traffic(t).await;
            if seen == self.traffic {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            seen, self.traffic,
            "per-minute traffic counts through the REST API"
        );
        let users = self.read_users(t).await;
        assert_eq!(
            users.len(),
            self.users.len(),
            "one active_users point per minute: {users:?}"
        );
        for (minute, expected) in &self.users {
            let got = users.get(minute).copied().unwrap_or(0) as f64;
            let error = (got - *expected as f64).abs() / *expected as f64;
            assert!(
                error <= 0.02,
                "active_users at {minute}: {got} vs {expected}"
            );
        }
    }
}

/// Sessions of the actions: with a 30-minute gap every user has one session,
/// tagged with the country of its first action (else the profile's) and the
/// profile's segment, counted per minute.
fn engagement_of(actions: &[Action]) -> BTreeMap<(String, String, i64), EngagementCounts> {
    let mut first: BTreeMap<i64, &Action> = BTreeMap::new();
    for a in actions {
        let entry = first.entry(a.user).or_insert(a);
        if a.ts < entry.ts {
            *entry = a;
        }
    }
    let tags_of = |user: i64| {
        let profile = profile_of(user);
        let country = match first[&user].country.as_str() {
            "unknown" => profile
                .as_ref()
                .and_then(|p| p.country)
                .unwrap_or("unknown"),
            known => known,
        };
        (country, profile.map_or("unknown", |p| p.segment))
    };
    let mut out: BTreeMap<(String, String, i64), EngagementCounts> = BTreeMap::new();
    let mut active: BTreeSet<(i64, i64)> = BTreeSet::new();
    for a in actions {
        let minute = a.ts.div_euclid(MINUTE) * MINUTE;
        let (country, segment) = tags_of(a.user);
        let newly_active = active.insert((minute, a.user));
        let started = first[&a.user].ts == a.ts;
        for (group, value) in [("country", country), ("segment", segment)] {
            let counts = out
                .entry((group.to_string(), value.to_string(), minute))
                .or_default();
            counts.engagement_score += a.weight;
            counts.active_sessions += u64::from(newly_active);
            counts.sessions_started += u64::from(started);
        }
    }
    out
}

/// The `t` of a REST point, in epoch milliseconds.
pub fn point_time(p: &Value) -> i64 {
    p["t"]
        .as_str()
        .and_then(tidemark_model::EventTime::parse)
        .map_or(0, |t| t.millis())
}
