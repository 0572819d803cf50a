//! A generated workload for replay: 80 minutes of event time around one
//! whole hour, with sessions that end, ad impressions, clicks and
//! conversions, hashtags, profiles, out-of-order, late, too-late and
//! duplicate events, and a last batch far enough ahead that live closes
//! every window and session of the workload.

use serde_json::{json, Value};

const COUNTRIES: [&str; 5] = ["US", "DE", "BR", "IN", "JP"];
const DEVICES: [&str; 3] = ["ios", "android", "web"];
const SEGMENTS: [&str; 3] = ["pro", "casual", "new"];
const USERS: u64 = 300;
const MINUTE: i64 = 60_000;

/// A small deterministic generator (64-bit LCG, high bits).
#[derive(Debug)]
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

/// The events to post, in order.
#[derive(Debug)]
pub struct Workload {
    /// Start of the whole hour in the middle of the workload: replay
    /// `[hour, hour + 1 h]` covers every tier but `daily`.
    pub hour: i64,
    pub batches: Vec<Vec<Value>>,
}

impl Workload {
    /// The workload around the whole hour starting at `hour`.
    pub fn new(hour: i64, seed: u64) -> Workload {
        let mut rng = Lcg(seed);
        let profiles: Vec<Value> = (0..USERS - 50)
            .map(|u| {
                json!({
                    "event_id": format!("profile-{u}"), "event_type": "profile_update",
                    "user_id": format!("u{u}"), "timestamp": hour - 15 * MINUTE,
                    "country": COUNTRIES[(u % 5) as usize], "age_band": "25-34",
                    "segment": SEGMENTS[(u % 3) as usize],
                })
            })
            .collect();
        let mut impressions: Vec<Vec<(String, String)>> = vec![Vec::new(); USERS as usize];
        let mut clicked: Vec<Vec<String>> = vec![Vec::new(); USERS as usize];
        let mut events = Vec::new();
        let (start, end) = (hour - 10 * MINUTE, hour + 70 * MINUTE);
        let mut n = 0u64;
        for ts in (start..end).step_by(100) {
            n += 1;
            // The first 100 users pause for 35 minutes: their sessions end.
            let mut u = rng.next(USERS);
            let pause = hour + 10 * MINUTE..hour + 45 * MINUTE;
            if u < 100 && pause.contains(&ts) {
                u += 100;
            }
            let user = format!("u{u}");
            let mut ev = json!({
                "event_id": format!("e{n}"), "user_id": user, "timestamp": ts,
            });
            if rng.next(10) != 0 {
                ev["device"] = json!(DEVICES[(u % 3) as usize]);
                ev["country"] = json!(COUNTRIES[(u % 5) as usize]);
            }
            let kind = match rng.next(100) {
                0..35 => "view",
                35..50 => "like",
                50..55 => "comment",
                55..58 => "share",
                58..60 => "post_created",
                60..75 => "page_view",
                75..90 => "ad_impression",
                90..96 => "ad_click",
                _ => "ad_conversion",
            };
            ev["event_type"] = json!(kind);
            match kind {
                "page_view" => ev["page"] = json!("/feed"),
                "ad_impression" => {
                    let campaign = format!("c{}", rng.next(3));
                    let id = format!("i{n}");
                    ev["campaign_id"] = json!(campaign);
                    ev["ad_id"] = json!(format!("{campaign}-a1"));
                    ev["impression_id"] = json!(id);
                    ev["cost"] = json!(0.01 * (1 + rng.next(5)) as f64);
                    impressions[u as usize].push((id, campaign));
                }
                "ad_click" => {
                    let (id, campaign) = impressions[u as usize]
                        .last()
                        .cloned()
                        .unwrap_or_else(|| (format!("none{n}"), "c0".into()));
                    ev["campaign_id"] = json!(campaign);
                    ev["impression_id"] = json!(id);
                    clicked[u as usize].push(id);
                }
                "ad_conversion" => {
                    let id = clicked[u as usize]
                        .last()
                        .cloned()
                        .unwrap_or_else(|| format!("none{n}"));
                    ev["campaign_id"] = json!("c0");
                    ev["impression_id"] = json!(id);
                    ev["revenue"] = json!(1.5);
                }
                _ => {
                    ev["post_id"] = json!(format!("p{}", rng.next(50)));
                    let tags: Vec<String> = (0..rng.next(3))
                        .map(|_| format!("t{}", rng.next(30)))
                        .collect();
                    ev["hashtags"] = json!(tags);
                }
            }
            events.push(ev);
        }
        // Out of order within 3 s.
        for chunk in events.chunks_mut(30) {
            for i in (1..chunk.len()).rev() {
                let j = rng.next(i as u64 + 1) as usize;
                chunk.swap(i, j);
            }
        }
        // Late within the allowed lateness (30 s), too late (200 s), and
        // duplicates resent 5 s later.
        let mut delayed: Vec<(usize, Value)> = Vec::new();
        let mut kept = Vec::with_capacity(events.len());
        for (i, ev) in events.into_iter().enumerate() {
            match rng.next(1000) {
                0..10 => delayed.push((i + 300, ev)),
                10..12 => delayed.push((i + 2000, ev)),
                12..17 => {
                    delayed.push((i + 50, ev.clone()));
                    kept.push((i, ev));
                }
                _ => kept.push((i, ev)),
            }
        }
        kept.extend(delayed);
        kept.sort_by_key(|(at, _)| *at);
        let mut batches = vec![profiles];
        batches.extend(
            kept.into_iter()
                .map(|(_, ev)| ev)
                .collect::<Vec<_>>()
                .chunks(500)
                .map(<[Value]>::to_vec),
        );
        // Far ahead on every partition: closes every window and session.
        let close = hour + 105 * MINUTE;
        batches.push(
            (0..USERS)
                .flat_map(|u| {
                    [
                        json!({"event_id": format!("close-v{u}"), "event_type": "view", "user_id": format!("u{u}"),
                               "post_id": "p0", "timestamp": close}),
                        json!({"event_id": format!("close-p{u}"), "event_type": "page_view", "user_id": format!("u{u}"),
                               "page": "/", "timestamp": close}),
                        json!({"event_id": format!("close-i{u}"), "event_type": "ad_impression", "user_id": format!("u{u}"),
                               "campaign_id": "c0", "ad_id": "c0-a1", "impression_id": format!("close-i{u}"),
                               "timestamp": close}),
                    ]
                })
                .collect(),
        );
        Workload { hour, batches }
    }

    /// The number of events in the batches.
    pub fn len(&self) -> usize {
        self.batches.iter().map(Vec::len).sum()
    }

    /// Whether there are no events.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
