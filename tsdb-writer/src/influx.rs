//! InfluxDB 1.x over HTTP.
//!
//! Each [`Tier`] is a retention policy of one database (`rt` 7 days and the
//! default, `hourly` 400 days, `daily` 5 years), so InfluxDB itself expires
//! old points. Writes use line protocol at millisecond precision; reads use
//! InfluxQL with `epoch=ms`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Client, RequestBuilder, StatusCode};
use serde::Deserialize;
use tidemark_model::{EventTime, FieldValue, Point, Tier};

use crate::{Aggregate, MetricQuery, Series, Store, StoreError, DEFAULT_DATABASE};

/// Where and how to reach InfluxDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfluxConfig {
    /// Base URL, e.g. `http://127.0.0.1:8086`.
    pub url: String,
    pub database: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Timeout of each HTTP request.
    pub timeout: Duration,
    /// PEM file of a CA to trust for `https://` besides the system's roots.
    pub ca: Option<std::path::PathBuf>,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        InfluxConfig {
            url: "http://127.0.0.1:8086".into(),
            database: DEFAULT_DATABASE.into(),
            username: None,
            password: None,
            timeout: Duration::from_secs(10),
            ca: None,
        }
    }
}

/// The InfluxDB 1.x store.
#[derive(Debug, Clone)]
pub struct InfluxStore {
    client: Client,
    base: String,
    config: InfluxConfig,
    /// Points InfluxDB dropped as older than their retention policy keeps.
    beyond_retention: Arc<AtomicU64>,
}

/// How InfluxDB 1.x answers a write some of whose points are older than
/// the retention policy: 400, the other points written.
const BEYOND_RETENTION: &str = "partial write: points beyond retention policy dropped=";

/// The number of points dropped, when `body` is InfluxDB's answer that it
/// dropped points beyond the retention policy and nothing else.
fn dropped_beyond_retention(body: &str) -> Option<u64> {
    let message = serde_json::from_str::<ErrorBody>(body).ok()?.error?;
    message.trim().strip_prefix(BEYOND_RETENTION)?.parse().ok()
}

/// The certificates of the PEM file `path`, at least one.
fn ca_certificates(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, StoreError> {
    let unusable = |detail: String| {
        StoreError::Rejected(format!(
            "cannot use {} as --influx-ca: {detail}",
            path.display()
        ))
    };
    let pem = std::fs::read(path).map_err(|e| unusable(e.to_string()))?;
    let certificates =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| unusable(e.to_string()))?;
    if certificates.is_empty() {
        return Err(unusable("no PEM certificate in it".into()));
    }
    Ok(certificates)
}

/// InfluxDB's timestamps are nanoseconds in an i64; query bounds are clamped to that range.
const MAX_MILLIS: i64 = i64::MAX / 1_000_000;
const MIN_MILLIS: i64 = i64::MIN / 1_000_000;

impl InfluxStore {
    /// Builds the HTTP client; does not contact the server.
    pub fn new(config: InfluxConfig) -> Result<InfluxStore, StoreError> {
        validate_name("database", &config.database)?;
        if !(config.url.starts_with("http://") || config.url.starts_with("https://")) {
            return Err(StoreError::Rejected(format!(
                "InfluxDB URL must be http(s): {}",
                config.url
            )));
        }
        let mut client = Client::builder().timeout(config.timeout);
        if let Some(ca) = &config.ca {
            for certificate in ca_certificates(ca)? {
                client = client.add_root_certificate(certificate);
            }
        }
        let client = client
            .build()
            .map_err(|e| StoreError::Rejected(format!("cannot build HTTP client: {e}")))?;
        let base = config.url.trim_end_matches('/').to_string();
        Ok(InfluxStore {
            client,
            base,
            config,
            beyond_retention: Arc::default(),
        })
    }

    /// The configuration this store was built with.
    pub fn config(&self) -> &InfluxConfig {
        &self.config
    }

    fn auth(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.config.username {
            Some(user) => request.basic_auth(user, self.config.password.as_ref()),
            None => request,
        }
    }

    /// The server's databases.
    pub async fn databases(&self) -> Result<Vec<String>, StoreError> {
        let result = self.select("SHOW DATABASES").await?;
        if let Some(e) = result.error {
            return Err(StoreError::Rejected(format!("SHOW DATABASES: {e}")));
        }
        Ok(result
            .series
            .iter()
            .flat_map(|s| &s.values)
            .filter_map(|row| row.first()?.as_str().map(str::to_string))
            .collect())
    }

    /// Runs one read-only InfluxQL statement (GET /query, times in ms).
    async fn select(&self, statement: &str) -> Result<QueryResult, StoreError> {
        let request = self
            .auth(self.client.get(format!("{}/query", self.base)))
            .query(&[
                ("db", self.config.database.as_str()),
                ("epoch", "ms"),
                ("q", statement),
            ]);
        let response = request.send().await.map_err(transport_error)?;
        parse_query_response(response).await
    }

    /// Runs one InfluxQL statement that changes state (POST /query).
    async fn execute(&self, statement: &str) -> Result<QueryResult, StoreError> {
        let request = self
            .auth(self.client.post(format!("{}/query", self.base)))
            .form(&[("q", statement)]);
        let response = request.send().await.map_err(transport_error)?;
        parse_query_response(response).await
    }

    async fn ensure_policy(&self, tier: Tier, duration: &str) -> Result<(), StoreError> {
        let db = quote_ident(&self.config.database);
        let rp = quote_ident(tier.name());
        let default = if tier == Tier::Rt { " DEFAULT" } else { "" };
        let create = format!(
            "CREATE RETENTION POLICY {rp} ON {db} DURATION {duration} REPLICATION 1{default}"
        );
        match self.execute(&create).await?.error {
            None => Ok(()),
            // Exists with other settings: bring it to ours.
            Some(e) if e.contains("already exists") => {
                let alter = format!("ALTER RETENTION POLICY {rp} ON {db} DURATION {duration} REPLICATION 1{default}");
                match self.execute(&alter).await?.error {
                    None => Ok(()),
                    Some(e) => Err(StoreError::Rejected(format!("{alter}: {e}"))),
                }
            }
            Some(e) => Err(StoreError::Rejected(format!("{create}: {e}"))),
        }
    }
}

fn retention_duration(tier: Tier) -> &'static str {
    match tier {
        Tier::Rt => "7d",
        Tier::Hourly => "400d",
        Tier::Daily => "1825d",
    }
}

fn transport_error(e: reqwest::Error) -> StoreError {
    StoreError::Unavailable(format!("InfluxDB request failed: {e}"))
}

/// Maps a non-success status: server trouble and throttling are retryable,
/// other client errors are not.
fn status_error(status: StatusCode, body: &str) -> StoreError {
    let message = serde_json::from_str::<ErrorBody>(body)
        .ok()
        .and_then(|b| b.error)
        .unwrap_or_else(|| body.trim().chars().take(500).collect());
    let text = format!("InfluxDB answered {status}: {message}");
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        StoreError::Unavailable(text)
    } else {
        StoreError::Rejected(text)
    }
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct QueryResponse {
    #[serde(default)]
    results: Vec<QueryResult>,
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct QueryResult {
    #[serde(default)]
    series: Vec<RawSeries>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawSeries {
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    values: Vec<Vec<serde_json::Value>>,
}

async fn parse_query_response(response: reqwest::Response) -> Result<QueryResult, StoreError> {
    let status = response.status();
    let body = response.text().await.map_err(transport_error)?;
    if !status.is_success() {
        return Err(status_error(status, &body));
    }
    let parsed: QueryResponse = serde_json::from_str(&body)
        .map_err(|e| StoreError::Unavailable(format!("unreadable InfluxDB answer: {e}")))?;
    if let Some(e) = parsed.error {
        return Err(StoreError::Rejected(e));
    }
    Ok(parsed.results.into_iter().next().unwrap_or_default())
}

/// Names reach InfluxQL only quoted, but control characters are refused
/// outright: they are never legitimate and make errors unreadable.
fn validate_name(what: &str, name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(StoreError::InvalidQuery(format!(
            "invalid {what} name {name:?}"
        )));
    }
    Ok(())
}

/// A double-quoted InfluxQL identifier.
fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A single-quoted InfluxQL string literal.
fn quote_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The InfluxQL statement answering `query` in database `db`.
pub fn build_query(db: &str, query: &MetricQuery) -> Result<String, StoreError> {
    validate_name("database", db)?;
    validate_name("measurement", &query.measurement)?;
    validate_name("field", &query.field)?;
    for (k, v) in &query.filters {
        validate_name("tag", k)?;
        if v.chars().any(char::is_control) {
            return Err(StoreError::InvalidQuery(format!("invalid tag value {v:?}")));
        }
    }
    for k in &query.group_by {
        validate_name("tag", k)?;
    }
    if query.from >= query.to {
        return Err(StoreError::InvalidQuery(format!(
            "empty time range {}..{}",
            query.from, query.to
        )));
    }
    let function = match query.aggregate {
        Aggregate::Sum => "sum",
        Aggregate::Mean => "mean",
        Aggregate::Max => "max",
    };
    let from = query.from.millis().clamp(MIN_MILLIS, MAX_MILLIS);
    let to = query.to.millis().clamp(MIN_MILLIS, MAX_MILLIS);
    let mut q = format!(
        "SELECT {function}({}) FROM {}.{}.{} WHERE time >= {from}ms AND time < {to}ms",
        quote_ident(&query.field),
        quote_ident(db),
        quote_ident(query.tier.name()),
        quote_ident(&query.measurement),
    );
    for (k, v) in &query.filters {
        let _ = write!(q, " AND {}={}", quote_ident(k), quote_string(v));
    }
    let _ = write!(q, " GROUP BY time({})", query.tier.step_name());
    for k in &query.group_by {
        let _ = write!(q, ",{}", quote_ident(k));
    }
    q.push_str(" fill(none)");
    Ok(q)
}

fn to_series(raw: Vec<RawSeries>, group_by: &[String]) -> Result<Vec<Series>, StoreError> {
    let mut out = Vec::with_capacity(raw.len());
    for s in raw {
        let mut points = Vec::with_capacity(s.values.len());
        for row in s.values {
            let (Some(t), Some(v)) = (row.first().and_then(|t| t.as_i64()), row.get(1)) else {
                return Err(StoreError::Unavailable(format!(
                    "unexpected InfluxDB row {row:?}"
                )));
            };
            if let Some(v) = v.as_f64() {
                points.push((EventTime(t), v));
            }
        }
        if points.is_empty() {
            continue;
        }
        points.sort_by_key(|(t, _)| *t);
        // Keep exactly the requested group-by tags, absent ones as "".
        let tags = group_by
            .iter()
            .map(|k| (k.clone(), s.tags.get(k).cloned().unwrap_or_default()))
            .collect();
        out.push(Series { tags, points });
    }
    out.sort_by(|a, b| a.tags.cmp(&b.tags));
    Ok(out)
}

#[async_trait]
impl Store for InfluxStore {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        let create = format!("CREATE DATABASE {}", quote_ident(&self.config.database));
        if let Some(e) = self.execute(&create).await?.error {
            return Err(StoreError::Rejected(format!("{create}: {e}")));
        }
        for tier in Tier::ALL {
            self.ensure_policy(tier, retention_duration(tier)).await?;
        }
        Ok(())
    }

    async fn write(&self, points: &[Point]) -> Result<(), StoreError> {
        for tier in Tier::ALL {
            let mut body = String::new();
            for p in points.iter().filter(|p| p.tier == tier) {
                p.write_line_protocol(&mut body);
                body.push('\n');
            }
            if body.is_empty() {
                continue;
            }
            let request = self
                .auth(self.client.post(format!("{}/write", self.base)))
                .query(&[
                    ("db", self.config.database.as_str()),
                    ("rp", tier.name()),
                    ("precision", "ms"),
                ])
                .body(body);
            let response = request.send().await.map_err(transport_error)?;
            let status = response.status();
            if status != StatusCode::NO_CONTENT && !status.is_success() {
                let text = response.text().await.unwrap_or_default();
                if status == StatusCode::BAD_REQUEST {
                    if let Some(dropped) = dropped_beyond_retention(&text) {
                        // The tier's other points are written; the next
                        // tiers keep older points and must be written too.
                        self.beyond_retention.fetch_add(dropped, Ordering::Relaxed);
                        continue;
                    }
                }
                return Err(status_error(status, &text));
            }
        }
        Ok(())
    }

    fn points_beyond_retention(&self) -> u64 {
        self.beyond_retention.load(Ordering::Relaxed)
    }

    async fn query(&self, query: &MetricQuery) -> Result<Vec<Series>, StoreError> {
        if query.from >= query.to {
            return Ok(Vec::new());
        }
        let statement = build_query(&self.config.database, query)?;
        let result = self.select(&statement).await?;
        if let Some(e) = result.error {
            return Err(StoreError::InvalidQuery(format!("{statement}: {e}")));
        }
        to_series(result.series, &query.group_by)
    }

    async fn points(
        &self,
        tier: Tier,
        measurement: &str,
        from: EventTime,
        to: EventTime,
    ) -> Result<Vec<Point>, StoreError> {
        validate_name("measurement", measurement)?;
        if from >= to {
            return Ok(Vec::new());
        }
        // GROUP BY * puts the tags in each series, so the columns are fields.
        let statement = format!(
            "SELECT * FROM {}.{}.{} WHERE time >= {}ms AND time < {}ms GROUP BY *",
            quote_ident(&self.config.database),
            quote_ident(tier.name()),
            quote_ident(measurement),
            from.millis().clamp(MIN_MILLIS, MAX_MILLIS),
            to.millis().clamp(MIN_MILLIS, MAX_MILLIS),
        );
        let result = self.select(&statement).await?;
        match result.error {
            // A database or measurement never written holds no points.
            Some(e) if e.contains("not found") => return Ok(Vec::new()),
            Some(e) => return Err(StoreError::InvalidQuery(format!("{statement}: {e}"))),
            None => {}
        }
        let mut out = Vec::new();
        for s in result.series {
            for row in &s.values {
                let Some(time) = row.first().and_then(serde_json::Value::as_i64) else {
                    return Err(StoreError::Unavailable(format!(
                        "unexpected InfluxDB row {row:?}"
                    )));
                };
                let fields: Vec<(String, FieldValue)> = s
                    .columns
                    .iter()
                    .zip(row)
                    .skip(1)
                    .filter_map(|(name, v)| {
                        let value = match v.as_i64() {
                            Some(i) => FieldValue::Int(i),
                            None => FieldValue::Float(v.as_f64()?),
                        };
                        Some((name.clone(), value))
                    })
                    .collect();
                if fields.is_empty() {
                    continue;
                }
                let tags = s
                    .tags
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                out.push(Point::new(measurement, tier, EventTime(time), tags, fields));
            }
        }
        Ok(out)
    }

    fn kind(&self) -> &'static str {
        "influxdb"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_escaped_query() {
        let q = MetricQuery {
            measurement: "traffic".into(),
            field: "ev\"ents".into(),
            tier: Tier::Hourly,
            from: EventTime(0),
            to: EventTime(3_600_000),
            filters: vec![("country".into(), "o'hare\\".into())],
            group_by: vec!["device".into()],
            aggregate: Aggregate::Mean,
        };
        let s = build_query("tidemark", &q).unwrap();
        assert_eq!(
            s,
            "SELECT mean(\"ev\\\"ents\") FROM \"tidemark\".\"hourly\".\"traffic\" WHERE time >= 0ms AND time < 3600000ms \
             AND \"country\"='o\\'hare\\\\' GROUP BY time(1h),\"device\" fill(none)"
        );
    }

    #[test]
    fn rejects_bad_names() {
        let mut q = MetricQuery {
            measurement: "m\n".into(),
            field: "f".into(),
            tier: Tier::Rt,
            from: EventTime(0),
            to: EventTime(1),
            filters: vec![],
            group_by: vec![],
            aggregate: Aggregate::Sum,
        };
        assert!(matches!(
            build_query("db", &q),
            Err(StoreError::InvalidQuery(_))
        ));
        q.measurement = "m".into();
        q.group_by = vec![String::new()];
        assert!(matches!(
            build_query("db", &q),
            Err(StoreError::InvalidQuery(_))
        ));
    }

    #[test]
    fn maps_statuses() {
        assert!(status_error(StatusCode::SERVICE_UNAVAILABLE, "").is_retryable());
        assert!(status_error(StatusCode::TOO_MANY_REQUESTS, "").is_retryable());
        let e = status_error(
            StatusCode::BAD_REQUEST,
            r#"{"error":"field type conflict"}"#,
        );
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("field type conflict"));
    }
}
