//! A generator of realistic social-network traffic, posting through the real
//! HTTP ingest: zipf-distributed users, posts and hashtags, a few ad campaigns,
//! some out-of-order events and a trickle of invalid ones.

use std::time::Duration;

use anyhow::Context as _;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tidemark_model::EventTime;

pub const DEVICES: [&str; 3] = ["ios", "android", "web"];
pub const COUNTRIES: [&str; 10] = ["US", "BR", "IN", "DE", "JP", "KZ", "GB", "FR", "MX", "ID"];
const PAGES: [&str; 5] = ["/home", "/feed", "/profile", "/search", "/settings"];
/// Event types and their weights in the generated mix.
pub const MIX: [(&str, u32); 10] = [
    ("view", 40),
    ("like", 16),
    ("comment", 5),
    ("share", 3),
    ("post_created", 3),
    ("page_view", 14),
    ("login", 1),
    ("ad_impression", 15),
    ("ad_click", 2),
    ("ad_conversion", 1),
];

/// Shape of the generated traffic.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub users: usize,
    pub posts: usize,
    pub hashtags: usize,
    pub campaigns: usize,
    /// Share of events sent with an event time up to 4 s in the past.
    pub out_of_order: f64,
    /// Share of deliberately invalid events.
    pub invalid: f64,
    pub seed: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            users: 100_000,
            posts: 20_000,
            hashtags: 2_000,
            campaigns: 8,
            out_of_order: 0.05,
            invalid: 0.001,
            seed: 1,
        }
    }
}

/// Cumulative zipf weights: sampling is a binary search.
#[derive(Debug)]
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let cumulative = (1..=n.max(1))
            .map(|i| {
                acc += 1.0 / (i as f64).powf(s);
                acc
            })
            .collect();
        Zipf { cumulative }
    }

    fn sample(&self, rng: &mut SmallRng) -> usize {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let x = rng.gen::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c < x)
            .min(self.cumulative.len() - 1)
    }
}

/// Makes events; deterministic for a seed and a sequence of clock readings.
#[derive(Debug)]
pub struct EventFactory {
    config: GeneratorConfig,
    rng: SmallRng,
    users: Zipf,
    posts: Zipf,
    tags: Zipf,
    mix_total: u32,
    next_id: u64,
    recent_impressions: Vec<String>,
}

impl EventFactory {
    pub fn new(config: GeneratorConfig) -> EventFactory {
        EventFactory {
            rng: SmallRng::seed_from_u64(config.seed),
            users: Zipf::new(config.users, 0.9),
            posts: Zipf::new(config.posts, 1.0),
            tags: Zipf::new(config.hashtags, 1.05),
            mix_total: MIX.iter().map(|(_, w)| w).sum(),
            next_id: 0,
            recent_impressions: Vec::new(),
            config,
        }
    }

    /// One event happening at `now`, as the JSON a client would send.
    pub fn event(&mut self, now: EventTime) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        if self.rng.gen_bool(self.config.invalid.clamp(0.0, 1.0)) {
            return self.invalid_event(id, now);
        }
        let user = self.users.sample(&mut self.rng);
        let mut pick = self.rng.gen_range(0..self.mix_total);
        let event_type = MIX
            .iter()
            .find(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .map_or("view", |(t, _)| *t);
        let late_ms = if self.rng.gen_bool(self.config.out_of_order.clamp(0.0, 1.0)) {
            self.rng.gen_range(0..4_000)
        } else {
            0
        };
        let mut ev = json!({
            "event_id": format!("g{}-{id}", self.config.seed),
            "event_type": event_type,
            "user_id": format!("u{user}"),
            "timestamp": now.millis() - late_ms,
            "device": DEVICES[user % DEVICES.len()],
            "country": COUNTRIES[user % COUNTRIES.len()],
        });
        let obj = ev.as_object_mut().expect("built as an object");
        match event_type {
            "view" | "like" | "comment" | "share" | "post_created" => {
                let post = self.posts.sample(&mut self.rng);
                obj.insert("post_id".into(), json!(format!("p{post}")));
                // A post keeps its hashtags: derive them from the post number.
                let mut post_rng = SmallRng::seed_from_u64(post as u64 ^ self.config.seed);
                let tags: Vec<String> = (0..post_rng.gen_range(0..=3))
                    .map(|_| format!("t{}", self.tags.sample(&mut post_rng)))
                    .collect();
                obj.insert("hashtags".into(), json!(tags));
            }
            "page_view" => {
                obj.insert("page".into(), json!(PAGES[id as usize % PAGES.len()]));
                obj.insert("session_id".into(), json!(format!("s{user}")));
            }
            "ad_impression" | "ad_click" | "ad_conversion" => {
                let campaign = format!("c{}", user % self.config.campaigns.max(1));
                obj.insert("campaign_id".into(), json!(campaign));
                if event_type == "ad_impression" {
                    let impression = format!("i{}-{id}", self.config.seed);
                    obj.insert("ad_id".into(), json!(format!("{campaign}-a{}", id % 4)));
                    obj.insert("impression_id".into(), json!(impression));
                    obj.insert("cost".into(), json!(0.001 + (id % 97) as f64 / 10_000.0));
                    if self.recent_impressions.len() >= 5_000 {
                        self.recent_impressions.drain(..2_500);
                    }
                    self.recent_impressions.push(impression);
                } else {
                    let impression = if self.recent_impressions.is_empty() {
                        "none".to_string()
                    } else {
                        let i = self.rng.gen_range(0..self.recent_impressions.len());
                        self.recent_impressions[i].clone()
                    };
                    obj.insert("impression_id".into(), json!(impression));
                    if event_type == "ad_conversion" {
                        obj.insert("revenue".into(), json!(1.0 + (id % 4999) as f64 / 100.0));
                    }
                }
            }
            _ => {}
        }
        ev
    }

    fn invalid_event(&mut self, id: u64, now: EventTime) -> Value {
        match self.rng.gen_range(0..3) {
            0 => {
                json!({"event_id": format!("bad-{id}"), "event_type": "view", "user_id": "u1", "timestamp": now.millis()})
            }
            1 => {
                json!({"event_id": format!("bad-{id}"), "event_type": "teleport", "user_id": "u1", "timestamp": now.millis()})
            }
            _ => {
                json!({"event_id": format!("bad-{id}"), "event_type": "like", "user_id": 7, "post_id": "p1", "timestamp": now.millis()})
            }
        }
    }
}

/// Where and how fast to post.
#[derive(Debug, Clone)]
pub struct PostTarget {
    /// Base URL of ingest, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub api_key: String,
    /// Events per second.
    pub rate: u64,
    pub batch: usize,
    /// Stop after this many events (`None`: until cancelled).
    pub limit: Option<u64>,
}

/// Posts generated events at `target.rate` until `limit` or `cancel`.
/// Returns the number of events posted and acknowledged.
pub async fn post_events(
    target: PostTarget,
    config: GeneratorConfig,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<u64> {
    let client = reqwest::Client::new();
    let endpoint = format!("{}/v1/events", target.url.trim_end_matches('/'));
    let mut factory = EventFactory::new(config);
    let batch = target.batch.max(1);
    let per_batch = Duration::from_secs_f64(batch as f64 / target.rate.max(1) as f64);
    let mut ticker = tokio::time::interval(per_batch);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0u64;
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        if target.limit.is_some_and(|l| sent >= l) {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let n = target
            .limit
            .map_or(batch, |l| batch.min((l - sent) as usize));
        let now = EventTime::now();
        let body: Vec<Value> = (0..n).map(|_| factory.event(now)).collect();
        sent += n as u64;
        // Bounded concurrency: wait for the oldest request when too many are out.
        while in_flight.len() >= 8 {
            if let Some(res) = in_flight.join_next().await {
                res.context("posting task failed")??;
            }
        }
        let request = client
            .post(&endpoint)
            .bearer_auth(&target.api_key)
            .json(&body);
        in_flight.spawn(async move {
            let reply = request.send().await.context("ingest unreachable")?;
            let status = reply.status();
            if status.is_server_error() {
                tracing::warn!(%status, "Ingest refused a batch");
            }
            anyhow::Ok(())
        });
    }
    while let Some(res) = in_flight.join_next().await {
        res.context("posting task failed")??;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_events() {
        let mut a = EventFactory::new(GeneratorConfig::default());
        let mut b = EventFactory::new(GeneratorConfig::default());
        for _ in 0..1000 {
            assert_eq!(a.event(EventTime(1_000)), b.event(EventTime(1_000)));
        }
    }

    #[test]
    fn events_follow_the_contract() {
        let mut f = EventFactory::new(GeneratorConfig {
            invalid: 0.0,
            ..GeneratorConfig::default()
        });
        let now = EventTime::now();
        for _ in 0..2000 {
            let ev = f.event(now);
            let raw = serde_json::to_vec(&ev).unwrap();
            tidemark_model::Event::from_json(&raw, now, &tidemark_model::Limits::default())
                .unwrap_or_else(|e| panic!("generated event rejected: {e}: {ev}"));
        }
    }
}
