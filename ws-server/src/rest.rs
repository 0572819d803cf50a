//! `GET /api/v1/metrics`: one field of one measurement over a time range.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use tidemark_model::{EventTime, Tier};
use tidemark_tsdb_writer::{Aggregate, MetricQuery, Series};

use crate::{json_number, ServerError, ServerState};

/// The default range when `from` is omitted.
const DEFAULT_RANGE: Duration = Duration::from_secs(3600);

/// Parameters with a meaning of their own; every other one is a tag filter.
const RESERVED: [&str; 7] = ["name", "field", "from", "to", "step", "group_by", "agg"];

pub(crate) async fn metrics_query(
    State(state): State<Arc<ServerState>>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let params = match params {
        Ok(Query(p)) => p,
        Err(e) => return ServerError::BadRequest(e.body_text()).into_response(),
    };
    let query = match parse_query(&params, EventTime::now()) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let started = Instant::now();
    let store = state.reader();
    let result = store.query(&query).await;
    state
        .metrics
        .query_seconds
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(series) => Json(answer(&query, &series)).into_response(),
        Err(e) => {
            tracing::debug!(error = %e, "metric query failed");
            ServerError::from(e).into_response()
        }
    }
}

pub(crate) fn bad(msg: impl Into<String>) -> ServerError {
    ServerError::BadRequest(msg.into())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub(crate) fn checked_name(param: &str, value: &str) -> Result<String, ServerError> {
    if valid_name(value) {
        Ok(value.to_string())
    } else {
        Err(bad(format!(
            "{param} must match [A-Za-z0-9_]+, got {value:?}"
        )))
    }
}

pub(crate) fn time_param(
    param: &str,
    value: Option<&str>,
) -> Result<Option<EventTime>, ServerError> {
    match value {
        None => Ok(None),
        Some(v) => EventTime::parse(v).map(Some).ok_or_else(|| {
            bad(format!(
                "{param} must be RFC 3339 or epoch milliseconds, got {v:?}"
            ))
        }),
    }
}

/// Turns the query string into a store query; `now` is the default end.
pub(crate) fn parse_query(
    params: &[(String, String)],
    now: EventTime,
) -> Result<MetricQuery, ServerError> {
    let mut known: [Option<&str>; RESERVED.len()] = [None; RESERVED.len()];
    let mut filters: Vec<(String, String)> = Vec::new();
    for (key, value) in params {
        if let Some(i) = RESERVED.iter().position(|r| r == key) {
            if known[i].replace(value.as_str()).is_some() {
                return Err(bad(format!("parameter {key} given more than once")));
            }
        } else {
            let key = checked_name("tag filter name", key)?;
            if filters.iter().any(|(k, _)| *k == key) {
                return Err(bad(format!("tag filter {key} given more than once")));
            }
            filters.push((key, value.clone()));
        }
    }
    let [name, field, from, to, step, group_by, agg] = known;
    let measurement = checked_name("name", name.ok_or_else(|| bad("missing parameter name"))?)?;
    let field = checked_name(
        "field",
        field.ok_or_else(|| bad("missing parameter field"))?,
    )?;
    let to = time_param("to", to)?.unwrap_or(now);
    let from = time_param("from", from)?.unwrap_or_else(|| to.minus(DEFAULT_RANGE));
    if from >= to {
        return Err(bad("from must be before to"));
    }
    let step = step.unwrap_or("1m");
    let tier = Tier::from_step(step)
        .ok_or_else(|| bad(format!("step must be 1m, 1h or 1d, got {step:?}")))?;
    let group_by = match group_by {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| checked_name("group_by", s))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let aggregate = match agg {
        None | Some("sum") => Aggregate::Sum,
        Some("mean") => Aggregate::Mean,
        Some("max") => Aggregate::Max,
        Some(other) => return Err(bad(format!("agg must be sum, mean or max, got {other:?}"))),
    };
    filters.sort();
    Ok(MetricQuery {
        measurement,
        field,
        tier,
        from,
        to,
        filters,
        group_by,
        aggregate,
    })
}

fn answer(query: &MetricQuery, series: &[Series]) -> Value {
    let series: Vec<Value> = series
        .iter()
        .map(|s| {
            let tags: Map<String, Value> = s
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            let points: Vec<Value> = s
                .points
                .iter()
                .map(|(t, v)| json!({ "t": t.to_rfc3339(), "v": json_number(*v) }))
                .collect();
            json!({ "tags": tags, "points": points })
        })
        .collect();
    json!({
        "name": query.measurement,
        "field": query.field,
        "step": query.tier.step_name(),
        "series": series,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_cover_the_last_hour_at_one_minute() {
        let now = EventTime(10_000_000);
        let q = parse_query(&params(&[("name", "traffic"), ("field", "events")]), now).unwrap();
        assert_eq!(q.tier, Tier::Rt);
        assert_eq!(q.to, now);
        assert_eq!(q.from, EventTime(10_000_000 - 3_600_000));
        assert!(q.filters.is_empty() && q.group_by.is_empty());
        assert_eq!(q.aggregate, Aggregate::Sum);
    }

    #[test]
    fn rejects_bad_input() {
        let now = EventTime(10_000_000);
        let cases: &[&[(&str, &str)]] = &[
            &[("field", "events")],
            &[("name", "traffic")],
            &[("name", "traf fic"), ("field", "events")],
            &[("name", "traffic"), ("field", "events"), ("step", "5m")],
            &[
                ("name", "traffic"),
                ("field", "events"),
                ("from", "yesterday"),
            ],
            &[
                ("name", "traffic"),
                ("field", "events"),
                ("from", "2000"),
                ("to", "1000"),
            ],
            &[("name", "traffic"), ("field", "events"), ("agg", "median")],
            &[
                ("name", "traffic"),
                ("field", "events"),
                ("group_by", "a,b-c"),
            ],
            &[("name", "traffic"), ("field", "events"), ("bad-tag", "x")],
            &[("name", "traffic"), ("name", "other"), ("field", "events")],
        ];
        for case in cases {
            let err = parse_query(&params(case), now);
            assert!(
                matches!(err, Err(ServerError::BadRequest(_))),
                "{case:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn integral_values_are_json_integers() {
        assert_eq!(json_number(42.0).to_string(), "42");
        assert_eq!(json_number(0.5).to_string(), "0.5");
        assert_eq!(json_number(f64::NAN), Value::Null);
    }
}
