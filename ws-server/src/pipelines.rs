//! The pipelines' own routes: trending, campaigns and engagement.
//!
//! Each reads every field it needs grouped by every tag of its measurement,
//! so nothing is merged in the store; merging happens here, from sums:
//! ratios (CTR, CVR, CPA, ROAS) come from the summed counts over the range
//! or step, and averages (session duration, events per session) are
//! weighted by the sessions they average over, never averaged from
//! per-minute ratios.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tidemark_model::{EventTime, Tier};
use tidemark_tsdb_writer::{Aggregate, MetricQuery, Store, StoreError};

use crate::rest::{bad, time_param};
use crate::{json_number, PathSegment, ServerError, ServerState};

/// The trending windows.
pub const TRENDING_WINDOWS: [&str; 3] = ["1m", "5m", "15m"];

/// The largest top-K kept per window.
pub const TRENDING_TOP: usize = 50;

/// How far back the newest trending window is looked for.
const NEWEST_LOOKBACK: Duration = Duration::from_secs(3600);

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

const TRENDING_FIELDS: [&str; 4] = ["rank", "score", "users", "events"];

pub(crate) const ADS_COUNTS: [&str; 6] = [
    "impressions",
    "clicks",
    "clicks_unattributed",
    "conversions",
    "spend",
    "revenue",
];
pub(crate) const ADS_TAGS: [&str; 3] = ["campaign_id", "country", "device"];

const ENGAGEMENT_FIELDS: [&str; 6] = [
    "sessions_started",
    "sessions_ended",
    "active_sessions",
    "engagement_score",
    "avg_session_seconds",
    "events_per_session",
];
const ENGAGEMENT_TAGS: [&str; 2] = ["country", "segment"];

/// Field values by field, of one tag combination at one time.
pub(crate) type Fields = BTreeMap<&'static str, f64>;

/// Values by (the tags' values in the order asked, time).
pub(crate) type Rows = BTreeMap<(Vec<String>, EventTime), Fields>;

/// Reads `fields` of `measurement`, one query per field (at once), grouped
/// by `tags`, so each row is one stored point.
pub(crate) async fn fetch(
    store: &dyn Store,
    measurement: &str,
    tier: Tier,
    (from, to): (EventTime, EventTime),
    filters: &[(&str, &str)],
    tags: &[&str],
    fields: &[&'static str],
) -> Result<Rows, StoreError> {
    let mut filters: Vec<(String, String)> = filters
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    filters.sort();
    let queries = fields.iter().map(|field| {
        let query = MetricQuery {
            measurement: measurement.to_string(),
            field: field.to_string(),
            tier,
            from,
            to,
            filters: filters.clone(),
            group_by: tags.iter().map(|t| t.to_string()).collect(),
            aggregate: Aggregate::Sum,
        };
        async move { store.query(&query).await.map(|series| (*field, series)) }
    });
    let mut rows = Rows::new();
    for (field, series) in futures::future::try_join_all(queries).await? {
        for s in series {
            let key: Vec<String> = tags
                .iter()
                .map(|t| s.tags.get(*t).cloned().unwrap_or_default())
                .collect();
            for (time, v) in s.points {
                rows.entry((key.clone(), time))
                    .or_default()
                    .insert(field, v);
            }
        }
    }
    Ok(rows)
}

fn params<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ServerError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ServerError::BadRequest(e.body_text()))
}

fn observe(state: &ServerState, started: Instant) {
    state
        .metrics
        .query_seconds
        .observe(started.elapsed().as_secs_f64());
}

fn window_param(window: Option<&str>) -> Result<(&'static str, Duration), ServerError> {
    let window = window.unwrap_or("5m");
    let i = TRENDING_WINDOWS
        .iter()
        .position(|w| *w == window)
        .ok_or_else(|| bad(format!("window must be 1m, 5m or 15m, got {window:?}")))?;
    Ok((TRENDING_WINDOWS[i], MINUTE * [1, 5, 15][i]))
}

/// A range from `from`/`to`, defaulting to `default` before `now`.
pub(crate) fn range(
    from: Option<&str>,
    to: Option<&str>,
    default: Duration,
    now: EventTime,
) -> Result<(EventTime, EventTime), ServerError> {
    let to = time_param("to", to)?.unwrap_or(now);
    let from = time_param("from", from)?.unwrap_or_else(|| to.minus(default));
    if from >= to {
        return Err(bad("from must be before to"));
    }
    Ok((from, to))
}

fn step_param(step: Option<&str>, tiers: &[Tier]) -> Result<Tier, ServerError> {
    let step = step.unwrap_or("1m");
    Tier::from_step(step)
        .filter(|t| tiers.contains(t))
        .ok_or_else(|| {
            let names: Vec<&str> = tiers.iter().map(|t| t.step_name()).collect();
            bad(format!("step must be {}, got {step:?}", names.join(" or ")))
        })
}

fn group_param(
    group_by: Option<&str>,
    allowed: &[&'static str],
) -> Result<Option<&'static str>, ServerError> {
    match group_by {
        None | Some("") => Ok(None),
        Some(g) => allowed
            .iter()
            .find(|a| **a == g)
            .copied()
            .map(Some)
            .ok_or_else(|| {
                bad(format!(
                    "group_by must be {}, got {g:?}",
                    allowed.join(" or ")
                ))
            }),
    }
}

/// `{label: value, ...fields}`.
fn labelled(label: &str, value: String, fields: Map<String, Value>) -> Value {
    let mut object = Map::new();
    object.insert(label.into(), Value::String(value));
    object.extend(fields);
    Value::Object(object)
}

/// The trending fields of a row, `null` where absent.
fn trending_fields(fields: &Fields) -> Map<String, Value> {
    TRENDING_FIELDS
        .iter()
        .map(|f| {
            let v = fields.get(f).map_or(Value::Null, |v| json_number(*v));
            (f.to_string(), v)
        })
        .collect()
}

fn ratio(numerator: f64, divisor: f64) -> Value {
    if divisor == 0.0 {
        Value::Null
    } else {
        json_number(numerator / divisor)
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct TrendingParams {
    window: Option<String>,
    at: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/trending?window=1m|5m|15m[&at=T][&limit=50]`: the top tags of
/// one window: the one starting at `at`'s minute, or the newest one.
pub(crate) async fn trending(
    State(state): State<Arc<ServerState>>,
    query: Result<Query<TrendingParams>, QueryRejection>,
) -> Result<Json<Value>, ServerError> {
    let p = params(query)?;
    let (window, length) = window_param(p.window.as_deref())?;
    let limit = p.limit.unwrap_or(TRENDING_TOP);
    if !(1..=TRENDING_TOP).contains(&limit) {
        return Err(bad(format!(
            "limit must be 1 to {TRENDING_TOP}, got {limit}"
        )));
    }
    let started = Instant::now();
    let store = state.reader();
    let start = match time_param("at", p.at.as_deref())? {
        Some(at) => Some(at.floor(MINUTE)),
        None => newest_trending(store.as_ref(), window).await?,
    };
    let tags = match start {
        None => Vec::new(),
        Some(start) => {
            let rows = fetch(
                store.as_ref(),
                "trending",
                Tier::Rt,
                (start, start.plus(MINUTE)),
                &[("window", window)],
                &["tag"],
                &TRENDING_FIELDS,
            )
            .await?;
            top_tags(rows, limit)
        }
    };
    observe(&state, started);
    Ok(Json(json!({
        "window": window,
        "start": start.map(|s| s.to_rfc3339()),
        "end": start.map(|s| s.plus(length).to_rfc3339()),
        // Windows reach the store once they are final.
        "final": start.is_some(),
        "tags": tags,
    })))
}

async fn newest_trending(store: &dyn Store, window: &str) -> Result<Option<EventTime>, StoreError> {
    let now = EventTime::now();
    let query = MetricQuery {
        measurement: "trending".to_string(),
        field: "rank".to_string(),
        tier: Tier::Rt,
        from: now.minus(NEWEST_LOOKBACK),
        to: now.plus(MINUTE),
        filters: vec![("window".to_string(), window.to_string())],
        group_by: Vec::new(),
        aggregate: Aggregate::Max,
    };
    let series = store.query(&query).await?;
    Ok(series
        .iter()
        .filter_map(|s| s.points.last().map(|(t, _)| *t))
        .max())
}

fn top_tags(rows: Rows, limit: usize) -> Vec<Value> {
    let mut tags: Vec<(f64, String, Fields)> = rows
        .into_iter()
        .filter_map(|((key, _), fields)| {
            let rank = *fields.get("rank")?;
            Some((rank, key.into_iter().next().unwrap_or_default(), fields))
        })
        .collect();
    tags.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    tags.truncate(limit);
    tags.into_iter()
        .map(|(_, tag, fields)| labelled("tag", tag, trending_fields(&fields)))
        .collect()
}

#[derive(Debug, Deserialize)]
pub(crate) struct RangeParams {
    window: Option<String>,
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
    group_by: Option<String>,
}

/// `GET /api/v1/trending/{tag}?window=5m&from=T&to=T` (default: the last
/// 6 hours): the tag's rank, score, users and events per window start, in
/// the minutes it was in the top list.
pub(crate) async fn trending_tag(
    State(state): State<Arc<ServerState>>,
    PathSegment(tag): PathSegment,
    query: Result<Query<RangeParams>, QueryRejection>,
) -> Result<Json<Value>, ServerError> {
    let p = params(query)?;
    let (window, _) = window_param(p.window.as_deref())?;
    let span = range(
        p.from.as_deref(),
        p.to.as_deref(),
        6 * HOUR,
        EventTime::now(),
    )?;
    let started = Instant::now();
    let store = state.reader();
    let rows = fetch(
        store.as_ref(),
        "trending",
        Tier::Rt,
        span,
        &[("window", window), ("tag", &tag)],
        &[],
        &TRENDING_FIELDS,
    )
    .await?;
    observe(&state, started);
    let points: Vec<Value> = rows
        .into_iter()
        .map(|((_, time), fields)| labelled("t", time.to_rfc3339(), trending_fields(&fields)))
        .collect();
    Ok(Json(json!({
        "tag": tag,
        "window": window,
        "from": span.0.to_rfc3339(),
        "to": span.1.to_rfc3339(),
        "points": points,
    })))
}

/// The finest tier of `tiers` that still holds `from`.
fn tier_holding(from: EventTime, tiers: &[Tier]) -> Tier {
    let age = Duration::from_millis(
        EventTime::now()
            .millis()
            .saturating_sub(from.millis())
            .max(0) as u64,
    );
    tiers
        .iter()
        .copied()
        .find(|t| age <= t.retention())
        .unwrap_or(*tiers.last().expect("at least one tier"))
}

/// Campaign totals: the summed counts and the ratios of the sums.
pub(crate) fn ads_fields(sums: &Fields) -> Map<String, Value> {
    let get = |f: &str| sums.get(f).copied().unwrap_or(0.0);
    let mut out = Map::new();
    for field in ADS_COUNTS {
        out.insert(field.into(), json_number(get(field)));
    }
    out.insert("ctr".into(), ratio(get("clicks"), get("impressions")));
    out.insert("cvr".into(), ratio(get("conversions"), get("clicks")));
    out.insert("cpa".into(), ratio(get("spend"), get("conversions")));
    out.insert("roas".into(), ratio(get("revenue"), get("spend")));
    out
}

pub(crate) fn add_into(sums: &mut Fields, fields: &Fields) {
    for (field, v) in fields {
        *sums.entry(field).or_default() += v;
    }
}

pub(crate) fn start_of_day(t: EventTime) -> EventTime {
    t.floor(24 * HOUR)
}

const ADS_TIERS: [Tier; 3] = [Tier::Rt, Tier::Hourly, Tier::Daily];

/// `GET /api/v1/campaigns?from=T&to=T` (default: today, UTC): every
/// campaign's totals over the range, from the finest tier holding it.
pub(crate) async fn campaigns(
    State(state): State<Arc<ServerState>>,
    query: Result<Query<RangeParams>, QueryRejection>,
) -> Result<Json<Value>, ServerError> {
    let p = params(query)?;
    let to = time_param("to", p.to.as_deref())?.unwrap_or_else(EventTime::now);
    let from = time_param("from", p.from.as_deref())?.unwrap_or_else(|| start_of_day(to));
    if from >= to {
        return Err(bad("from must be before to"));
    }
    let tier = tier_holding(from, &ADS_TIERS);
    let started = Instant::now();
    let store = state.reader();
    let rows = fetch(
        store.as_ref(),
        "ads",
        tier,
        (from, to),
        &[],
        &ADS_TAGS,
        &ADS_COUNTS,
    )
    .await?;
    observe(&state, started);
    let mut totals: BTreeMap<String, Fields> = BTreeMap::new();
    for ((key, _), fields) in &rows {
        add_into(totals.entry(key[0].clone()).or_default(), fields);
    }
    let campaigns: Vec<Value> = totals
        .iter()
        .map(|(id, sums)| labelled("campaign_id", id.clone(), ads_fields(sums)))
        .collect();
    Ok(Json(json!({
        "from": from.to_rfc3339(),
        "to": to.to_rfc3339(),
        "step": tier.step_name(),
        "campaigns": campaigns,
    })))
}

/// `GET /api/v1/campaigns/{id}?from=T&to=T&step=1m|1h|1d[&group_by=device|country]`
/// (default: the last hour at 1m): the campaign's fields per step.
pub(crate) async fn campaign(
    State(state): State<Arc<ServerState>>,
    PathSegment(id): PathSegment,
    query: Result<Query<RangeParams>, QueryRejection>,
) -> Result<Json<Value>, ServerError> {
    let p = params(query)?;
    let tier = step_param(p.step.as_deref(), &ADS_TIERS)?;
    let group = group_param(p.group_by.as_deref(), &["device", "country"])?;
    let span = range(p.from.as_deref(), p.to.as_deref(), HOUR, EventTime::now())?;
    let started = Instant::now();
    let store = state.reader();
    let rows = fetch(
        store.as_ref(),
        "ads",
        tier,
        span,
        &[("campaign_id", &id)],
        &ADS_TAGS,
        &ADS_COUNTS,
    )
    .await?;
    observe(&state, started);
    let series = merge_series(rows, group, &ADS_TAGS, ads_fields);
    Ok(Json(json!({
        "campaign_id": id,
        "step": tier.step_name(),
        "group_by": group,
        "series": series,
    })))
}

/// Sums rows per (value of `group`, time) and turns each sum into fields.
fn merge_series(
    rows: Rows,
    group: Option<&'static str>,
    tags: &[&str],
    finish: impl Fn(&Fields) -> Map<String, Value>,
) -> Vec<Value> {
    let position = group.and_then(|g| tags.iter().position(|t| *t == g));
    let mut merged: BTreeMap<Option<String>, BTreeMap<EventTime, Fields>> = BTreeMap::new();
    for ((key, time), fields) in rows {
        let value = position.map(|i| key[i].clone());
        add_into(
            merged.entry(value).or_default().entry(time).or_default(),
            &fields,
        );
    }
    merged
        .into_iter()
        .map(|(value, points)| {
            let mut tags = Map::new();
            if let (Some(group), Some(value)) = (group, value) {
                tags.insert(group.into(), Value::String(value));
            }
            let points: Vec<Value> = points
                .iter()
                .map(|(time, sums)| labelled("t", time.to_rfc3339(), finish(sums)))
                .collect();
            json!({ "tags": tags, "points": points })
        })
        .collect()
}

const ENGAGEMENT_TIERS: [Tier; 2] = [Tier::Rt, Tier::Hourly];

/// `GET /api/v1/engagement?from=T&to=T&step=1m|1h[&group_by=segment|country]`
/// (default: the last hour at 1m).
pub(crate) async fn engagement(
    State(state): State<Arc<ServerState>>,
    query: Result<Query<RangeParams>, QueryRejection>,
) -> Result<Json<Value>, ServerError> {
    let p = params(query)?;
    let tier = step_param(p.step.as_deref(), &ENGAGEMENT_TIERS)?;
    let group = group_param(p.group_by.as_deref(), &["segment", "country"])?;
    let span = range(p.from.as_deref(), p.to.as_deref(), HOUR, EventTime::now())?;
    let started = Instant::now();
    let store = state.reader();
    let mut rows = fetch(
        store.as_ref(),
        "engagement",
        tier,
        span,
        &[],
        &ENGAGEMENT_TAGS,
        &ENGAGEMENT_FIELDS,
    )
    .await?;
    observe(&state, started);
    // Averages become totals over the sessions that ended, so they add up.
    for fields in rows.values_mut() {
        let ended = fields.get("sessions_ended").copied().unwrap_or(0.0);
        for (average, total) in [
            ("avg_session_seconds", "session_seconds_total"),
            ("events_per_session", "session_events_total"),
        ] {
            if let Some(v) = fields.remove(average) {
                fields.insert(total, v * ended);
            }
        }
    }
    let series = merge_series(rows, group, &ENGAGEMENT_TAGS, |sums| {
        let get = |f: &str| sums.get(f).copied().unwrap_or(0.0);
        let ended = get("sessions_ended");
        let mut out = Map::new();
        for field in [
            "sessions_started",
            "sessions_ended",
            "active_sessions",
            "engagement_score",
        ] {
            out.insert(field.into(), json_number(get(field)));
        }
        out.insert(
            "avg_session_seconds".into(),
            ratio(get("session_seconds_total"), ended),
        );
        out.insert(
            "events_per_session".into(),
            ratio(get("session_events_total"), ended),
        );
        out
    });
    Ok(Json(json!({
        "step": tier.step_name(),
        "group_by": group,
        "series": series,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn campaign_ratios_come_from_summed_counts() {
        let mut sums = Fields::new();
        // Two minutes: 1 click of 10 impressions, then 9 of 10: the CTR
        // over both is 10/20, not the mean of 0.1 and 0.9 (also 0.5 here),
        // so make the weights differ.
        add_into(
            &mut sums,
            &Fields::from([("impressions", 10.0), ("clicks", 1.0)]),
        );
        add_into(
            &mut sums,
            &Fields::from([("impressions", 30.0), ("clicks", 9.0), ("spend", 4.0)]),
        );
        let out = ads_fields(&sums);
        assert_eq!(out["ctr"], json_number(0.25));
        assert_eq!(out["cvr"], json_number(0.0));
        assert_eq!(out["cpa"], Value::Null);
        assert_eq!(out["roas"], json_number(0.0));
    }

    #[test]
    fn parameters_are_checked() {
        assert!(window_param(Some("2m")).is_err());
        assert_eq!(window_param(None).unwrap().0, "5m");
        assert!(step_param(Some("1d"), &ENGAGEMENT_TIERS).is_err());
        assert!(group_param(Some("city"), &["device"]).is_err());
        assert!(range(Some("2000"), Some("1000"), HOUR, EventTime::now()).is_err());
    }
}
