//! `campaigns` and `campaign:<id>`: the ads pipeline's newest minute and
//! today's totals, of every campaign or of one (that one also by device and
//! by country).
//!
//! Today's totals are sums of the day's *final* minutes (`rt` tier), as
//! `GET /api/v1/campaigns` sums the stored ones, and the ratios come from
//! those sums with the same helpers ([`ads_fields`]). The hub seeds them from
//! the served database ([`Campaigns::seeded`]), so a server started mid-day
//! shows the whole day; live final updates then add minutes. The processor
//! re-emits a minute whole when a late event corrects it, and the server may
//! also see a minute both in the store and in an update (`serve` reads the
//! last hour of updates on start): so each minute's values are kept per
//! tags, and a minute seen again replaces them instead of adding to them.
//! Minutes more than [`CORRECTABLE`] behind the newest final one (far
//! beyond the processor's allowed lateness) are folded into per-tags sums,
//! which bounds memory by the tags seen today rather than by minutes.
//!
//! The day is the UTC day of the newest ads minute seen (early or final),
//! starting from the seed's: event time, like everything downstream of the
//! processor. A minute of a later day starts that day's totals afresh; a
//! final minute of an earlier day is not counted (the REST answer for
//! "today" does not hold it either).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tidemark_model::{EventTime, Tier, Update};

use super::{changed, diff, Channel};
use crate::pipelines::{add_into, ads_fields, Fields, Rows, ADS_COUNTS};

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// How far behind the newest final minute a minute is still kept on its
/// own, so a correction of it replaces its values.
pub(crate) const CORRECTABLE: Duration = Duration::from_secs(3600);

/// What names a per-campaign channel: `campaign:<id>`.
const CHILD_PREFIX: &str = "campaign:";

/// The longest campaign id a subscription may name (each subscribed name
/// holds a channel while followed).
const MAX_ID_LEN: usize = 256;

/// An ads point's tags: campaign, country, device (the order of
/// `ADS_TAGS`, so a campaign's rows are one range of a map).
type Tags = (String, String, String);

/// The campaign fields of summed counts, leaving out the ratios whose
/// divisor is 0 (channel data holds no `null`).
fn fields_json(sums: &Fields) -> Value {
    Value::Object(
        ads_fields(sums)
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .collect(),
    )
}

/// The rows of `campaign` in a map keyed by tags.
fn rows_of<'a>(
    rows: &'a BTreeMap<Tags, Fields>,
    campaign: &'a str,
) -> impl Iterator<Item = (&'a Tags, &'a Fields)> + 'a {
    rows.range((campaign.to_string(), String::new(), String::new())..)
        .take_while(move |(tags, _)| tags.0 == campaign)
}

/// The ads results a campaign channel follows, of every campaign or of one.
#[derive(Debug, Clone, Default)]
struct Ads {
    /// The campaign followed; `None` for every one.
    only: Option<String>,
    /// Midnight (UTC) of the day totalled.
    day: Option<EventTime>,
    /// The day's final minutes that may still be corrected: each one's
    /// values per tags.
    recent: BTreeMap<EventTime, BTreeMap<Tags, Fields>>,
    /// The sums of the day's older final minutes per tags, and which
    /// minutes they hold.
    settled: BTreeMap<Tags, Fields>,
    settled_minutes: BTreeSet<EventTime>,
    /// The newest minute with ads results, whether it is final, and its
    /// values per tags.
    minute: Option<EventTime>,
    is_final: bool,
    current: BTreeMap<Tags, Fields>,
}

/// What an update changed in [`Ads`].
#[derive(Debug, Default)]
struct Changes {
    /// Campaigns whose values it carried.
    campaigns: BTreeSet<String>,
    /// The minute or the day moved on, which changes every campaign.
    all: bool,
}

impl Ads {
    /// Starts on `day` with its stored final minutes (rows keyed by
    /// `[campaign_id, country, device]`).
    fn seeded(only: Option<String>, day: EventTime, rows: &Rows) -> Ads {
        let mut ads = Ads {
            only,
            day: Some(day),
            ..Ads::default()
        };
        let mut by_minute: BTreeMap<EventTime, Vec<(Tags, Fields)>> = BTreeMap::new();
        for ((key, time), fields) in rows {
            if let [campaign, country, device] = &key[..] {
                let tags = (campaign.clone(), country.clone(), device.clone());
                by_minute
                    .entry(time.floor(MINUTE))
                    .or_default()
                    .push((tags, fields.clone()));
            }
        }
        let mut changes = Changes::default();
        for (minute, rows) in by_minute {
            ads.apply_minute(minute, rows, true, &mut changes);
        }
        ads
    }

    /// The same, for `campaign` only.
    fn only(&self, campaign: &str) -> Ads {
        let keep = |rows: &BTreeMap<Tags, Fields>| -> BTreeMap<Tags, Fields> {
            rows_of(rows, campaign)
                .map(|(t, f)| (t.clone(), f.clone()))
                .collect()
        };
        Ads {
            only: Some(campaign.to_string()),
            day: self.day,
            // Every minute, even one without this campaign, so both settle
            // the same minutes.
            recent: self.recent.iter().map(|(m, r)| (*m, keep(r))).collect(),
            settled: keep(&self.settled),
            settled_minutes: self.settled_minutes.clone(),
            minute: self.minute,
            is_final: self.is_final,
            current: keep(&self.current),
        }
    }

    /// Applies the ads points of `update`; `None` when it has none.
    fn apply(&mut self, update: &Update) -> Option<Changes> {
        let mut by_minute: BTreeMap<EventTime, Vec<(Tags, Fields)>> = BTreeMap::new();
        for p in update
            .points
            .iter()
            .filter(|p| p.measurement == "ads" && p.tier == Tier::Rt)
        {
            let Some(campaign) = p.tag("campaign_id") else {
                continue;
            };
            let tags = (
                campaign.to_string(),
                p.tag("country").unwrap_or("unknown").to_string(),
                p.tag("device").unwrap_or("unknown").to_string(),
            );
            // Counts only: ratios are computed from the sums.
            let counts: Fields = ADS_COUNTS
                .iter()
                .filter_map(|f| Some((*f, p.field(f)?.as_f64())))
                .collect();
            by_minute
                .entry(p.time.floor(MINUTE))
                .or_default()
                .push((tags, counts));
        }
        if by_minute.is_empty() {
            return None;
        }
        let mut changes = Changes::default();
        for (minute, rows) in by_minute {
            self.apply_minute(minute, rows, update.is_final, &mut changes);
        }
        Some(changes)
    }

    /// Applies one minute's rows of every campaign (the minute and the day
    /// follow them all; values are kept for the campaign followed).
    fn apply_minute(
        &mut self,
        minute: EventTime,
        rows: Vec<(Tags, Fields)>,
        is_final: bool,
        changes: &mut Changes,
    ) {
        let day = minute.floor(DAY);
        if self.day.is_none_or(|d| day > d) {
            self.day = Some(day);
            self.recent.clear();
            self.settled.clear();
            self.settled_minutes.clear();
            changes.all = true;
        }
        if self.minute.is_none_or(|m| minute > m) {
            self.minute = Some(minute);
            self.is_final = false;
            self.current.clear();
            changes.all = true;
        }
        let rows: Vec<(Tags, Fields)> = match &self.only {
            Some(only) => rows.into_iter().filter(|(t, _)| &t.0 == only).collect(),
            None => rows,
        };
        if self.minute == Some(minute) {
            self.is_final |= is_final;
            for (tags, fields) in &rows {
                changes.campaigns.insert(tags.0.clone());
                self.current.insert(tags.clone(), fields.clone());
            }
        }
        if !is_final || Some(day) != self.day {
            return;
        }
        if self.settled_minutes.contains(&minute) {
            // Its values are in the sums, no longer on their own.
            tracing::warn!(
                %minute,
                "A correction of an ads minute more than an hour old is left out of today's campaign totals"
            );
            return;
        }
        let values = self.recent.entry(minute).or_default();
        for (tags, fields) in rows {
            changes.campaigns.insert(tags.0.clone());
            // A minute seen again replaces what it said before.
            values.insert(tags, fields);
        }
        self.settle();
    }

    /// Folds the minutes more than [`CORRECTABLE`] behind the newest final
    /// one into the sums.
    fn settle(&mut self) {
        let Some(newest) = self.recent.keys().next_back().copied() else {
            return;
        };
        let kept = self.recent.split_off(&newest.minus(CORRECTABLE));
        for (minute, rows) in std::mem::replace(&mut self.recent, kept) {
            self.settled_minutes.insert(minute);
            for (tags, fields) in rows {
                add_into(self.settled.entry(tags).or_default(), &fields);
            }
        }
    }

    /// Today's final values of `campaign`, per tags (a tags may come more
    /// than once: sum them).
    fn today_of<'a>(&'a self, campaign: &'a str) -> impl Iterator<Item = (&'a Tags, &'a Fields)> {
        rows_of(&self.settled, campaign).chain(
            self.recent
                .values()
                .flat_map(move |rows| rows_of(rows, campaign)),
        )
    }

    /// Every campaign with values today or in the newest minute.
    fn campaigns(&self) -> BTreeSet<String> {
        self.settled
            .keys()
            .chain(self.recent.values().flat_map(|r| r.keys()))
            .chain(self.current.keys())
            .map(|t| t.0.clone())
            .collect()
    }

    /// `day`, `minute` and `final`.
    fn meta(&self) -> Map<String, Value> {
        let mut meta = Map::new();
        if let Some(day) = self.day {
            meta.insert("day".into(), json!(day.to_rfc3339()));
        }
        if let Some(minute) = self.minute {
            meta.insert("minute".into(), json!(minute.to_rfc3339()));
        }
        meta.insert("final".into(), json!(self.is_final));
        meta
    }
}

/// The sum of `rows`, if there are any.
fn total<'a>(rows: impl Iterator<Item = (&'a Tags, &'a Fields)>) -> Option<Fields> {
    let mut sums: Option<Fields> = None;
    for (_, fields) in rows {
        add_into(sums.get_or_insert_with(Fields::new), fields);
    }
    sums
}

/// `campaigns`: `{"day","minute","final","campaigns":{"<id>":{"current":
/// {fields},"today":{fields}}}}`.
#[derive(Debug, Default)]
pub(crate) struct Campaigns {
    ads: Ads,
    /// Each campaign's data as last published, so an update compares only
    /// the campaigns it touched.
    entries: BTreeMap<String, Value>,
}

impl Campaigns {
    /// Today's (`day`'s) totals from its stored final minutes.
    pub fn seeded(day: EventTime, rows: &Rows) -> Campaigns {
        let mut channel = Campaigns {
            ads: Ads::seeded(None, day, rows),
            entries: BTreeMap::new(),
        };
        for id in channel.ads.campaigns() {
            if let Some(entry) = channel.entry(&id) {
                channel.entries.insert(id, entry);
            }
        }
        channel
    }

    fn entry(&self, campaign: &str) -> Option<Value> {
        let mut entry = Map::new();
        if let Some(sums) = total(rows_of(&self.ads.current, campaign)) {
            entry.insert("current".into(), fields_json(&sums));
        }
        if let Some(sums) = total(self.ads.today_of(campaign)) {
            entry.insert("today".into(), fields_json(&sums));
        }
        (!entry.is_empty()).then_some(Value::Object(entry))
    }
}

impl Channel for Campaigns {
    fn name(&self) -> String {
        "campaigns".to_string()
    }

    fn snapshot(&self) -> Value {
        let mut data = self.ads.meta();
        data.insert(
            "campaigns".into(),
            Value::Object(self.entries.clone().into_iter().collect()),
        );
        Value::Object(data)
    }

    fn apply(&mut self, update: &Update) -> Option<Map<String, Value>> {
        let meta = self.ads.meta();
        let changes = self.ads.apply(update)?;
        let touched: BTreeSet<String> = if changes.all {
            self.entries
                .keys()
                .cloned()
                .chain(self.ads.campaigns())
                .collect()
        } else {
            changes.campaigns
        };
        let mut campaigns = Map::new();
        for id in touched {
            let after = self.entry(&id);
            let change = match (self.entries.get(&id), &after) {
                (Some(before), Some(after)) => diff(before, after),
                (None, Some(after)) => Some(after.clone()),
                (Some(_), None) => Some(Value::Null),
                (None, None) => None,
            };
            if let Some(change) = change {
                campaigns.insert(id.clone(), change);
            }
            match after {
                Some(after) => self.entries.insert(id, after),
                None => self.entries.remove(&id),
            };
        }
        let mut patch = changed(&meta, &self.ads.meta()).unwrap_or_default();
        if !campaigns.is_empty() {
            patch.insert("campaigns".into(), Value::Object(campaigns));
        }
        (!patch.is_empty()).then_some(patch)
    }

    fn child(&self, name: &str) -> Option<Box<dyn Channel>> {
        let id = name.strip_prefix(CHILD_PREFIX)?;
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return None;
        }
        let ads = self.ads.only(id);
        let data = Campaign::data(id, &ads);
        Some(Box::new(Campaign {
            id: id.to_string(),
            ads,
            data,
        }))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// `campaign:<id>`: `{"campaign_id","day","minute","final","current":
/// {"total","by_device","by_country"},"today":{...}}`.
#[derive(Debug)]
struct Campaign {
    id: String,
    ads: Ads,
    /// The data as last published.
    data: Map<String, Value>,
}

impl Campaign {
    fn data(id: &str, ads: &Ads) -> Map<String, Value> {
        let mut data = Map::new();
        data.insert("campaign_id".into(), json!(id));
        data.extend(ads.meta());
        if let Some(split) = split(rows_of(&ads.current, id)) {
            data.insert("current".into(), split);
        }
        if let Some(split) = split(ads.today_of(id)) {
            data.insert("today".into(), split);
        }
        data
    }
}

/// `{"total","by_device","by_country"}` of `rows`, if there are any.
fn split<'a>(rows: impl Iterator<Item = (&'a Tags, &'a Fields)>) -> Option<Value> {
    let mut all: Option<Fields> = None;
    let mut by_device: BTreeMap<&str, Fields> = BTreeMap::new();
    let mut by_country: BTreeMap<&str, Fields> = BTreeMap::new();
    for ((_, country, device), fields) in rows {
        add_into(all.get_or_insert_with(Fields::new), fields);
        add_into(by_device.entry(device).or_default(), fields);
        add_into(by_country.entry(country).or_default(), fields);
    }
    let json_of = |groups: BTreeMap<&str, Fields>| -> Value {
        groups
            .into_iter()
            .map(|(k, sums)| (k.to_string(), fields_json(&sums)))
            .collect::<Map<String, Value>>()
            .into()
    };
    all.map(|all| {
        json!({
            "total": fields_json(&all),
            "by_device": json_of(by_device),
            "by_country": json_of(by_country),
        })
    })
}

impl Channel for Campaign {
    fn name(&self) -> String {
        format!("{CHILD_PREFIX}{}", self.id)
    }

    fn snapshot(&self) -> Value {
        Value::Object(self.data.clone())
    }

    fn apply(&mut self, update: &Update) -> Option<Map<String, Value>> {
        self.ads.apply(update)?;
        let data = Campaign::data(&self.id, &self.ads);
        let patch = changed(&self.data, &data);
        self.data = data;
        patch
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_model::{FieldValue, Point};

    const T: i64 = 1_796_256_000_000; // 2026-12-03T00:00:00Z

    fn ads(minute: i64, campaign: &str, device: &str, impressions: i64, clicks: i64) -> Point {
        Point::new(
            "ads",
            Tier::Rt,
            EventTime(T + minute * 60_000),
            vec![
                ("campaign_id".into(), campaign.into()),
                ("country".into(), "DE".into()),
                ("device".into(), device.into()),
            ],
            vec![
                ("impressions".into(), FieldValue::Int(impressions)),
                ("clicks".into(), FieldValue::Int(clicks)),
                ("spend".into(), FieldValue::Float(impressions as f64 / 4.0)),
                // Stored ratios are ignored: they do not add up.
                ("ctr".into(), FieldValue::Float(0.99)),
            ],
        )
    }

    fn update(minute: i64, is_final: bool, points: Vec<Point>) -> Update {
        Update {
            window_start: EventTime(T + minute * 60_000),
            is_final,
            newest_received_at: EventTime(0),
            points,
        }
    }

    /// Merges a patch as a client does (RFC 7396).
    fn merge(target: &mut Value, patch: &Value) {
        match patch {
            Value::Object(patch) => {
                if !target.is_object() {
                    *target = json!({});
                }
                let object = target.as_object_mut().unwrap();
                for (k, v) in patch {
                    if v.is_null() {
                        object.remove(k);
                    } else {
                        merge(object.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            other => *target = other.clone(),
        }
    }

    #[test]
    fn totals_replace_a_corrected_minute_and_restart_with_a_new_day() {
        let mut channel = Campaigns::default();
        let mut data = channel.snapshot();
        let mut send = |channel: &mut Campaigns, u: Update| {
            if let Some(patch) = channel.apply(&u) {
                merge(&mut data, &Value::Object(patch));
            }
            assert_eq!(data, channel.snapshot(), "patches add up to the snapshot");
            data.clone()
        };
        send(
            &mut channel,
            update(0, false, vec![ads(0, "c1", "ios", 4, 1)]),
        );
        let d = send(
            &mut channel,
            update(0, true, vec![ads(0, "c1", "ios", 8, 2)]),
        );
        assert_eq!(d["campaigns"]["c1"]["today"]["impressions"], 8);
        assert_eq!(d["campaigns"]["c1"]["today"]["ctr"], 0.25);
        // The same minute corrected: replaced, not added.
        let d = send(
            &mut channel,
            update(
                0,
                true,
                vec![ads(0, "c1", "ios", 12, 2), ads(0, "c2", "web", 4, 0)],
            ),
        );
        assert_eq!(d["campaigns"]["c1"]["today"]["impressions"], 12);
        assert_eq!(d["campaigns"]["c2"]["today"]["spend"], 1);
        assert!(d["campaigns"]["c2"]["today"].get("cvr").is_none(), "{d}");
        // A new minute: c2 has no current values any more.
        let d = send(
            &mut channel,
            update(1, false, vec![ads(1, "c1", "ios", 1, 0)]),
        );
        assert_eq!(d["minute"], EventTime(T + 60_000).to_rfc3339());
        assert!(d["campaigns"]["c2"].get("current").is_none(), "{d}");
        assert_eq!(d["campaigns"]["c1"]["today"]["impressions"], 12);
        // Many final minutes later, the first ones are folded into sums
        // and still counted.
        for minute in 1..=90 {
            send(
                &mut channel,
                update(minute, true, vec![ads(minute, "c1", "ios", 1, 0)]),
            );
        }
        assert!(
            channel.ads.recent.len() <= 61,
            "{}",
            channel.ads.recent.len()
        );
        let d = send(
            &mut channel,
            update(90, true, vec![ads(90, "c1", "ios", 1, 0)]),
        );
        assert_eq!(d["campaigns"]["c1"]["today"]["impressions"], 12 + 90);
        // A minute of the next day starts the totals over.
        let next_day = 24 * 60;
        let d = send(
            &mut channel,
            update(next_day, false, vec![ads(next_day, "c2", "ios", 1, 0)]),
        );
        assert_eq!(d["day"], EventTime(T + 86_400_000).to_rfc3339());
        assert!(d["campaigns"].get("c1").is_none(), "{d}");
        assert!(d["campaigns"]["c2"].get("today").is_none(), "{d}");
    }

    #[test]
    fn a_campaign_channel_is_made_from_the_totals_and_splits_them() {
        let mut rows = Rows::new();
        let key = |device: &str| vec!["c1".to_string(), "DE".to_string(), device.to_string()];
        rows.insert(
            (key("ios"), EventTime(T)),
            Fields::from([("impressions", 10.0), ("clicks", 1.0)]),
        );
        rows.insert(
            (key("web"), EventTime(T)),
            Fields::from([("impressions", 30.0), ("clicks", 9.0)]),
        );
        let parent = Campaigns::seeded(EventTime(T), &rows);
        assert_eq!(
            parent.snapshot()["campaigns"]["c1"]["today"]["impressions"],
            40
        );
        let mut child = parent.child("campaign:c1").unwrap();
        assert_eq!(child.name(), "campaign:c1");
        let data = child.snapshot();
        assert_eq!(data["today"]["total"]["ctr"], 0.25);
        assert_eq!(data["today"]["by_device"]["web"]["clicks"], 9);
        assert_eq!(data["today"]["by_country"]["DE"]["impressions"], 40);
        assert_eq!(
            data["current"], data["today"],
            "the seeded minute is current"
        );
        // Another campaign's minute moves this one's minute on too.
        let patch = child
            .apply(&update(1, false, vec![ads(1, "c9", "ios", 1, 0)]))
            .unwrap();
        assert_eq!(patch["current"], Value::Null);
        assert!(parent.child("campaign:").is_none());
        assert!(parent.child("trending:1m").is_none());
        let unseen = parent.child("campaign:c404").unwrap().snapshot();
        assert_eq!(
            unseen,
            json!({"campaign_id": "c404", "day": EventTime(T).to_rfc3339(),
                   "minute": EventTime(T).to_rfc3339(), "final": true})
        );
    }
}
