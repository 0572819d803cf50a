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
use tidemark_processor::alerts::{AlertRules, AlertState, MEASUREMENT};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

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

    /// Starts the Alertmanager sender when `--alertmanager-url` is given.
    pub fn spawn_sender(
        &self,
        rules: Arc<AlertRules>,
        updates: broadcast::Receiver<Update>,
        cancel: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let url = self.alertmanager_url.clone()?;
        let sender = Sender::new(&url, rules);
        Some(tokio::spawn(sender.run(updates, cancel)))
    }
}

/// Forwards alerts to one Alertmanager.
#[derive(Debug)]
pub struct Sender {
    endpoint: String,
    client: reqwest::Client,
    rules: Arc<AlertRules>,
    /// Firing alerts by their labels, as last sent.
    firing: BTreeMap<BTreeMap<String, String>, Value>,
    /// Resolved alerts not delivered yet.
    resolved: Vec<Value>,
}

impl Sender {
    /// A sender to the Alertmanager at `url` (its root, without `/api/v2`).
    pub fn new(url: &str, rules: Arc<AlertRules>) -> Sender {
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
        let summary = (self.rules.rules().iter())
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
        let mut sender = Sender::new("http://127.0.0.1:1/", Arc::new(rules));
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
}
