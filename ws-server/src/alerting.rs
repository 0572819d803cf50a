//! Business alerts on their way out: the flags naming the rules file and
//! Alertmanager, and the sender that forwards the `alerts` points of final
//! updates to Alertmanager's API v2.
//!
//! Alertmanager forgets an alert it has not heard of for its
//! `resolve_timeout`, so the sender repeats every firing alert each
//! [`RESEND_EVERY`]; a resolved one is sent once with its `endsAt`, and kept
//! for another try while Alertmanager cannot be reached.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use tidemark_model::{EventTime, Point, Tier, Update};
use tidemark_processor::alerts::{AlertRules, AlertState, Rule, RuleError, MEASUREMENT};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// The rules file in the data folder of `run` without `--alert-rules`.
pub const RULES_FILE: &str = "alert-rules.toml";
/// How often firing alerts are sent again (Alertmanager's default
/// `resolve_timeout` is 5 minutes).
pub const RESEND_EVERY: Duration = Duration::from_secs(60);
/// Resolved alerts kept for another try while Alertmanager is down.
const RESOLVED_KEPT: usize = 10_000;
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// The business alert flags of a service that runs the combiner.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AlertArgs {
    /// TOML file of business alert rules (`[[rule]]` tables, see
    /// docs/alerts.md), evaluated over every closed window.
    #[arg(long, env = "TIDEMARK_ALERT_RULES")]
    pub alert_rules: Option<PathBuf>,
    /// Alertmanager receiving the business alerts, e.g.
    /// `http://127.0.0.1:9093` (API v2; resolved alerts included).
    #[arg(long, env = "TIDEMARK_ALERTMANAGER_URL", value_parser = parse_url)]
    pub alertmanager_url: Option<String>,
}

fn parse_url(url: &str) -> Result<String, String> {
    let url = url.trim_end_matches('/');
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(url.to_string())
    } else {
        Err(format!("`{url}` is no http:// or https:// URL"))
    }
}

impl AlertArgs {
    /// The rules of `--alert-rules` (none without it), checked.
    pub fn rules(&self) -> anyhow::Result<Arc<AlertRules>> {
        let Some(path) = &self.alert_rules else {
            return Ok(Arc::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the alert rules {}", path.display()))?;
        let rules = AlertRules::from_toml(&text)
            .with_context(|| format!("in the alert rules {}", path.display()))?;
        Ok(Arc::new(rules))
    }

    /// The rules book of `--alert-rules`, or of `default` without it.
    pub fn book(&self, default: PathBuf) -> anyhow::Result<RulesBook> {
        RulesBook::open(self.alert_rules.clone().unwrap_or(default))
    }

    /// Starts the Alertmanager sender when `--alertmanager-url` is given.
    pub fn spawn_sender(
        &self,
        rules: watch::Receiver<Arc<AlertRules>>,
        updates: broadcast::Receiver<Update>,
        cancel: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let url = self.alertmanager_url.clone()?;
        let sender = Sender::new(&url, rules);
        Some(tokio::spawn(sender.run(updates, cancel)))
    }
}

/// The alert rules of one file, as the rules API changes them: each change
/// is written to the file (atomically) and handed to the processor, which
/// evaluates the new rules from the next closed window on.
#[derive(Debug)]
pub struct RulesBook {
    path: PathBuf,
    current: watch::Sender<Arc<AlertRules>>,
    /// One change at a time: read, change, write.
    writing: std::sync::Mutex<()>,
}

/// Why a change of the rules was not made.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    #[error(transparent)]
    Invalid(#[from] RuleError),
    #[error("cannot write the alert rules {path}: {error}")]
    Write { path: String, error: std::io::Error },
}

impl RulesBook {
    /// The rules of `path` (none while it does not exist), checked.
    pub fn open(path: PathBuf) -> anyhow::Result<RulesBook> {
        let rules = match std::fs::read_to_string(&path) {
            Ok(text) => AlertRules::from_toml(&text)
                .with_context(|| format!("in the alert rules {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AlertRules::default(),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read the alert rules {}", path.display()))
            }
        };
        Ok(RulesBook {
            path,
            current: watch::channel(Arc::new(rules)).0,
            writing: std::sync::Mutex::new(()),
        })
    }

    pub fn rules(&self) -> Arc<AlertRules> {
        self.current.borrow().clone()
    }

    /// The rules now and every change after.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AlertRules>> {
        self.current.subscribe()
    }

    /// Adds `rule`, or replaces the rule of its name; whether it is new.
    pub fn put(&self, rule: Rule) -> Result<bool, BookError> {
        self.change(
            |rules| match rules.iter().position(|r| r.name == rule.name) {
                Some(i) => {
                    rules[i] = rule;
                    false
                }
                None => {
                    rules.push(rule);
                    true
                }
            },
        )
    }

    /// Removes the rule `name`; whether there was one.
    pub fn delete(&self, name: &str) -> Result<bool, BookError> {
        self.change(|rules| {
            let before = rules.len();
            rules.retain(|r| r.name != name);
            rules.len() != before
        })
    }

    fn change(&self, edit: impl FnOnce(&mut Vec<Rule>) -> bool) -> Result<bool, BookError> {
        let _turn = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut rules = self.rules().rules().to_vec();
        let changed = edit(&mut rules);
        let rules = AlertRules::new(rules)?;
        let write_error = |error| BookError::Write {
            path: self.path.display().to_string(),
            error,
        };
        let tmp = self.path.with_extension("toml.tmp");
        std::fs::write(&tmp, to_toml(&rules)).map_err(write_error)?;
        std::fs::rename(&tmp, &self.path).map_err(write_error)?;
        self.current.send_replace(Arc::new(rules));
        Ok(changed)
    }
}

/// The rules as a file of `[[rule]]` tables, read back as the same rules.
pub fn to_toml(rules: &AlertRules) -> String {
    let mut tables = toml_edit::ArrayOfTables::new();
    for rule in rules.rules() {
        let mut table = toml_edit::Table::new();
        if let Ok(Value::Object(fields)) = serde_json::to_value(rule) {
            // Name and kind first, as people write them.
            let ordered = ["name", "kind"]
                .into_iter()
                .filter_map(|k| fields.get(k).map(|v| (k.to_string(), v)))
                .chain(
                    (fields.iter())
                        .filter(|(k, _)| *k != "name" && *k != "kind")
                        .map(|(k, v)| (k.clone(), v)),
                );
            for (key, value) in ordered {
                if let Some(value) = toml_value(value) {
                    table.insert(&key, toml_edit::Item::Value(value));
                }
            }
        }
        tables.push(table);
    }
    let mut doc = toml_edit::DocumentMut::new();
    doc.insert("rule", toml_edit::Item::ArrayOfTables(tables));
    format!("# Business alert rules (see docs/alerts.md); the rules API rewrites this file.\n{doc}")
}

fn toml_value(value: &Value) -> Option<toml_edit::Value> {
    Some(match value {
        Value::String(s) => s.as_str().into(),
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64()?.into(),
        },
        Value::Array(items) => {
            let mut array = toml_edit::Array::new();
            for item in items {
                array.push(toml_value(item)?);
            }
            array.into()
        }
        Value::Object(fields) => {
            let mut table = toml_edit::InlineTable::new();
            for (k, v) in fields {
                table.insert(k, toml_value(v)?);
            }
            table.into()
        }
        Value::Null => return None,
    })
}

fn book(state: &crate::ServerState) -> Result<&Arc<RulesBook>, crate::ServerError> {
    state.alert_rules().ok_or_else(|| {
        crate::ServerError::Unavailable(
            "this server keeps no alert rules: the process that runs the combiner does".into(),
        )
    })
}

fn audited(
    state: &crate::ServerState,
    principal: &crate::Principal,
    action: &str,
    detail: Value,
) -> Result<(), crate::ServerError> {
    // A change that cannot be recorded is not made.
    (state.access.audit)
        .append(&principal.actor(), action, None, detail)
        .map(|_| ())
        .map_err(|e| crate::ServerError::Unavailable(format!("cannot write the audit log: {e}")))
}

/// `GET /api/v1/alerts/rules`: `{"rules": [...]}`.
pub(crate) async fn list_rules(
    axum::extract::State(state): axum::extract::State<Arc<crate::ServerState>>,
) -> Result<axum::Json<Value>, crate::ServerError> {
    let rules = book(&state)?.rules();
    Ok(axum::Json(json!({ "rules": rules.rules() })))
}

/// `PUT /api/v1/alerts/rules/{name}`: 201 with the rule when new, 200 when
/// it replaced one; 400 naming the field of a bad rule.
pub(crate) async fn put_rule(
    axum::extract::State(state): axum::extract::State<Arc<crate::ServerState>>,
    axum::Extension(principal): axum::Extension<crate::Principal>,
    crate::PathSegment(name): crate::PathSegment,
    body: Result<axum::Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<axum::response::Response, crate::ServerError> {
    use axum::response::IntoResponse as _;
    let axum::Json(body) = body.map_err(|e| crate::ServerError::BadRequest(e.body_text()))?;
    let rule = Rule::from_json(&body, Some(&name))
        .map_err(|e| crate::ServerError::BadRequest(e.to_string()))?;
    let book = book(&state)?;
    audited(
        &state,
        &principal,
        "alert_rule_put",
        json!({ "name": name, "rule": rule }),
    )?;
    let created = book.put(rule.clone()).map_err(book_error)?;
    let status = if created {
        axum::http::StatusCode::CREATED
    } else {
        axum::http::StatusCode::OK
    };
    Ok((status, axum::Json(json!(rule))).into_response())
}

/// `DELETE /api/v1/alerts/rules/{name}`: 204, or 404 when there is none.
pub(crate) async fn delete_rule(
    axum::extract::State(state): axum::extract::State<Arc<crate::ServerState>>,
    axum::Extension(principal): axum::Extension<crate::Principal>,
    crate::PathSegment(name): crate::PathSegment,
) -> Result<axum::response::Response, crate::ServerError> {
    use axum::response::IntoResponse as _;
    let book = book(&state)?;
    if !book.rules().rules().iter().any(|r| r.name == name) {
        return Err(crate::ServerError::NotFound(format!(
            "no alert rule {name:?}"
        )));
    }
    audited(
        &state,
        &principal,
        "alert_rule_delete",
        json!({ "name": name }),
    )?;
    book.delete(&name).map_err(book_error)?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct HistoryParams {
    from: Option<String>,
    to: Option<String>,
    rule: Option<String>,
}

/// The most alert points one history answer holds (the newest).
const HISTORY_LIMIT: usize = 5_000;

/// `GET /api/v1/alerts?from=T&to=T&rule=R` (default: the last 24 hours):
/// the stored `alerts` points, newest first, as `{"alerts": [{"time",
/// "rule", "tags", "state", "value", "threshold"}], "truncated"}`.
pub(crate) async fn history(
    axum::extract::State(state): axum::extract::State<Arc<crate::ServerState>>,
    query: Result<axum::extract::Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Value>, crate::ServerError> {
    let axum::extract::Query(p) =
        query.map_err(|e| crate::ServerError::BadRequest(e.body_text()))?;
    let (from, to) = crate::pipelines::range(
        p.from.as_deref(),
        p.to.as_deref(),
        Duration::from_secs(24 * 3600),
        EventTime::now(),
    )?;
    let points = state
        .reader()
        .points(Tier::Rt, MEASUREMENT, from, to)
        .await?;
    let mut alerts: Vec<&Point> = (points.iter())
        .filter(|p| p.time >= from && p.time < to)
        .filter(|pt| p.rule.as_deref().is_none_or(|r| pt.tag("rule") == Some(r)))
        .collect();
    alerts.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.tags.cmp(&b.tags)));
    let truncated = alerts.len() > HISTORY_LIMIT;
    let alerts: Vec<Value> = (alerts.iter().take(HISTORY_LIMIT))
        .map(|pt| {
            let tags: serde_json::Map<String, Value> = (pt.tags.iter())
                .filter(|(k, _)| k != "rule")
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            let state = pt
                .field("state")
                .and_then(|s| AlertState::from_code(s.as_f64() as i64))
                .map(AlertState::name);
            let number = |f: &str| pt.field(f).map(|v| crate::json_number(v.as_f64()));
            json!({
                "time": pt.time.to_rfc3339(),
                "rule": pt.tag("rule").unwrap_or(""),
                "tags": tags,
                "state": state,
                "value": number("value"),
                "threshold": number("threshold"),
            })
        })
        .collect();
    Ok(axum::Json(
        json!({ "alerts": alerts, "truncated": truncated }),
    ))
}

fn book_error(e: BookError) -> crate::ServerError {
    match e {
        BookError::Invalid(e) => crate::ServerError::BadRequest(e.to_string()),
        BookError::Write { .. } => crate::ServerError::Unavailable(e.to_string()),
    }
}

/// Forwards alerts to one Alertmanager.
#[derive(Debug)]
pub struct Sender {
    endpoint: String,
    client: reqwest::Client,
    rules: watch::Receiver<Arc<AlertRules>>,
    /// Firing alerts by their labels, as last sent.
    firing: BTreeMap<BTreeMap<String, String>, Value>,
    /// Resolved alerts not delivered yet.
    resolved: Vec<Value>,
}

impl Sender {
    /// A sender to the Alertmanager at `url` (its root, without `/api/v2`).
    pub fn new(url: &str, rules: watch::Receiver<Arc<AlertRules>>) -> Sender {
        Sender {
            endpoint: format!("{}/api/v2/alerts", url.trim_end_matches('/')),
            client: reqwest::Client::builder()
                .timeout(POST_TIMEOUT)
                .build()
                .unwrap_or_default(),
            rules,
            firing: BTreeMap::new(),
            resolved: Vec::new(),
        }
    }

    /// Sends until `cancel` or until the updates end.
    pub async fn run(
        mut self,
        mut updates: broadcast::Receiver<Update>,
        cancel: CancellationToken,
    ) {
        let mut resend = tokio::time::interval(RESEND_EVERY);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = resend.tick() => true,
                update = updates.recv() => match update {
                    Ok(update) => self.take(&update),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // A firing alert's next window brings it back.
                        tracing::warn!(missed, "The Alertmanager sender fell behind the updates");
                        false
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if due {
                self.send().await;
            }
        }
    }

    /// Takes the alerts of a final update; whether any changed.
    pub fn take(&mut self, update: &Update) -> bool {
        if !update.is_final {
            return false;
        }
        let mut changed = false;
        for p in &update.points {
            if p.measurement != MEASUREMENT || p.tier != Tier::Rt {
                continue;
            }
            let state = p
                .field("state")
                .and_then(|s| AlertState::from_code(s.as_f64() as i64));
            let labels = self.labels(p);
            match state {
                Some(AlertState::Firing) => {
                    let starts_at = match self.firing.get(&labels) {
                        Some(old) => old["startsAt"].clone(),
                        None => json!(p.time.to_rfc3339()),
                    };
                    let alert = json!({
                        "labels": labels,
                        "annotations": self.annotations(p),
                        "startsAt": starts_at,
                    });
                    changed |= self.firing.get(&labels) != Some(&alert);
                    self.firing.insert(labels, alert);
                }
                Some(AlertState::Resolved) => {
                    let Some(mut alert) = self.firing.remove(&labels) else {
                        continue;
                    };
                    // The window's end, unless that is still ahead of the
                    // clock (Alertmanager would keep it firing till then).
                    let ends = EventTime(p.time.0.saturating_add(60_000)).min(EventTime::now());
                    alert["endsAt"] = json!(ends.to_rfc3339());
                    alert["annotations"] = self.annotations(p);
                    if self.resolved.len() < RESOLVED_KEPT {
                        self.resolved.push(alert);
                    }
                    changed = true;
                }
                Some(AlertState::Pending) | None => {}
            }
        }
        changed
    }

    /// What goes out now: every firing alert and the undelivered resolved ones.
    pub fn outgoing(&self) -> Vec<Value> {
        self.firing
            .values()
            .chain(&self.resolved)
            .cloned()
            .collect()
    }

    async fn send(&mut self) {
        let alerts = self.outgoing();
        if alerts.is_empty() {
            return;
        }
        let sent = self.client.post(&self.endpoint).json(&alerts).send().await;
        match sent.and_then(reqwest::Response::error_for_status) {
            Ok(_) => self.resolved.clear(),
            Err(e) => tracing::warn!(
                error = %e,
                endpoint = %self.endpoint,
                "Cannot send alerts to Alertmanager; trying again"
            ),
        }
    }

    /// `alertname` (the rule), the series' tags and the rule's own labels.
    fn labels(&self, p: &Point) -> BTreeMap<String, String> {
        let rule = p.tag("rule").unwrap_or("");
        let mut labels: BTreeMap<String, String> = self
            .rules
            .borrow()
            .rules()
            .iter()
            .find(|r| r.name == rule)
            .map(|r| r.labels.clone())
            .unwrap_or_default();
        labels.extend(
            (p.tags.iter())
                .filter(|(k, _)| k != "rule")
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        labels.insert("alertname".into(), rule.to_string());
        labels.insert("source".into(), "tidemark".into());
        labels
    }

    fn annotations(&self, p: &Point) -> Value {
        let rule = p.tag("rule").unwrap_or("");
        let field = |name: &str| p.field(name).map(|v| v.as_f64());
        let (value, threshold) = (field("value"), field("threshold"));
        let shown = |v: Option<f64>| v.map_or("none".to_string(), |v| format!("{v}"));
        let summary = (self.rules.borrow().rules().iter())
            .find(|r| r.name == rule)
            .and_then(|r| r.summary.clone())
            .unwrap_or_else(|| {
                format!(
                    "{rule}: {} against {} in the window of {}",
                    shown(value),
                    shown(threshold),
                    p.time.to_rfc3339()
                )
            });
        json!({
            "summary": summary,
            "value": shown(value),
            "threshold": shown(threshold),
            "window": p.time.to_rfc3339(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_model::FieldValue;

    fn point(minute: i64, state: AlertState, value: f64) -> Point {
        Point::new(
            MEASUREMENT,
            Tier::Rt,
            EventTime(minute * 60_000),
            vec![
                ("rule".into(), "low".into()),
                ("country".into(), "de".into()),
            ],
            vec![
                ("state".into(), FieldValue::Int(state as i64)),
                ("value".into(), FieldValue::Float(value)),
                ("threshold".into(), FieldValue::Float(100.0)),
            ],
        )
    }

    fn update(points: Vec<Point>) -> Update {
        Update {
            window_start: points[0].time,
            is_final: true,
            newest_received_at: EventTime(0),
            points,
        }
    }

    #[test]
    fn firing_is_repeated_and_a_resolution_sent_once_with_its_end() {
        let rules = AlertRules::from_toml(
            "[[rule]]\nname = \"low\"\nkind = \"threshold\"\nmeasurement = \"traffic\"\nfield = \"events\"\nop = \"<\"\nvalue = 100\nsummary = \"Likes are low\"\nlabels = { severity = \"page\" }\n",
        )
        .unwrap();
        let (_keep, rules) = watch::channel(Arc::new(rules));
        let mut sender = Sender::new("http://127.0.0.1:1/", rules);
        assert_eq!(sender.endpoint, "http://127.0.0.1:1/api/v2/alerts");
        assert!(!sender.take(&update(vec![point(0, AlertState::Pending, 90.0)])));
        assert!(sender.take(&update(vec![point(1, AlertState::Firing, 80.0)])));
        assert!(sender.take(&update(vec![point(2, AlertState::Firing, 70.0)])));
        let out = sender.outgoing();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["labels"]["alertname"], "low");
        assert_eq!(out[0]["labels"]["country"], "de");
        assert_eq!(out[0]["labels"]["severity"], "page");
        assert_eq!(out[0]["startsAt"], EventTime(60_000).to_rfc3339());
        assert_eq!(out[0]["annotations"]["summary"], "Likes are low");
        assert_eq!(out[0]["annotations"]["value"], "70");
        assert!(out[0].get("endsAt").is_none());

        assert!(sender.take(&update(vec![point(3, AlertState::Resolved, 120.0)])));
        let out = sender.outgoing();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["endsAt"], EventTime(4 * 60_000).to_rfc3339());
        // A resolution of nothing firing sends nothing.
        assert!(!sender.take(&update(vec![point(4, AlertState::Resolved, 120.0)])));
    }

    #[test]
    fn the_book_writes_each_change_to_its_file_and_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        let book = RulesBook::open(path.clone()).unwrap();
        assert!(book.rules().is_empty());
        let changes = book.subscribe();
        let rule = |value: i64| {
            Rule::from_json(
                &json!({"kind": "threshold", "measurement": "traffic", "field": "events",
                    "where": {"event_type": "like"}, "group_by": ["country"],
                    "op": "<", "value": value, "for": 3, "labels": {"severity": "page"}}),
                Some("likes_low"),
            )
            .unwrap()
        };
        assert!(book.put(rule(100)).unwrap(), "new");
        assert!(changes.has_changed().unwrap());
        assert!(!book.put(rule(50)).unwrap(), "replaced");
        let reread = RulesBook::open(path.clone()).unwrap();
        assert_eq!(reread.rules().rules(), [rule(50)]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("[[rule]]\nname = \"likes_low\"\nkind = \"threshold\""),
            "{text}"
        );
        assert!(book.delete("likes_low").unwrap());
        assert!(!book.delete("likes_low").unwrap());
        assert!(RulesBook::open(path).unwrap().rules().is_empty());
        std::fs::write(dir.path().join("bad.toml"), "[[rule]]\nname = 1\n").unwrap();
        assert!(RulesBook::open(dir.path().join("bad.toml")).is_err());
    }
}
