//! Business alert rules, evaluated in stage 2 over closed windows.
//!
//! A rule reads one measurement's real-time points of each window once the
//! window can no longer change (the combiner's close, see
//! [`crate::Finisher::on_closed`]), so early results never fire and a replay
//! of the same events evaluates the same windows in the same order. Each
//! rule × series keeps a small state (pending, firing; how many windows the
//! condition held or failed; a change rule's baseline), checkpointed with
//! the combiner. The engine writes its verdicts as points of measurement
//! `alerts` beside the pipelines' own, which the store keeps, the live
//! `alerts` channel shows and the Alertmanager sender forwards.
//!
//! Rules are written in TOML (`--alert-rules`) or JSON (the rules API); both
//! go through [`Rule::from_json`], which names the rule and the field of any
//! mistake.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tidemark_model::{EventTime, FieldValue, Point, Tier};

use crate::error::ProcessorError;

/// The measurement the engine writes.
pub const MEASUREMENT: &str = "alerts";

/// What the `state` field of an `alerts` point holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlertState {
    /// The alert fired and its resolve condition now holds (written once).
    Resolved = 0,
    /// The condition holds, for fewer windows than the rule's `for`.
    Pending = 1,
    /// The condition held for `for` windows and has not resolved.
    Firing = 2,
}

impl AlertState {
    /// The state a `state` field holds, if it is one.
    pub fn from_code(code: i64) -> Option<AlertState> {
        match code {
            0 => Some(AlertState::Resolved),
            1 => Some(AlertState::Pending),
            2 => Some(AlertState::Firing),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AlertState::Resolved => "resolved",
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
        }
    }
}

/// A bad rule: which one, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("alert rule `{rule}`: `{field}` {problem}")]
pub struct RuleError {
    pub rule: String,
    pub field: String,
    pub problem: String,
}

/// A comparison of a value with a rule's `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "<")]
    Below,
    #[serde(rename = "<=")]
    AtMost,
    #[serde(rename = ">")]
    Above,
    #[serde(rename = ">=")]
    AtLeast,
}

impl Op {
    fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Below => value < threshold,
            Op::AtMost => value <= threshold,
            Op::Above => value > threshold,
            Op::AtLeast => value >= threshold,
        }
    }
}

/// Which way a change rule looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Drop,
    Spike,
}

/// What a trending rule compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrendingMetric {
    Score,
    Rank,
}

/// What a campaign rule compares: the ratios of the `ads` measurement,
/// computed from the window's summed counts of the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignMetric {
    Ctr,
    Cvr,
    Cpa,
    Roas,
}

/// What a rule tests, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleKind {
    /// A field summed per window over the points matching `where`, per
    /// `group_by` series, compared with `value`.
    Threshold {
        measurement: String,
        field: String,
        #[serde(rename = "where", default, skip_serializing_if = "BTreeMap::is_empty")]
        filter: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        group_by: Vec<String>,
        op: Op,
        value: f64,
    },
    /// The same sum against the mean of the series' previous `baseline`
    /// windows: a `drop` or `spike` of at least `percent`, once that mean
    /// (or, for a spike, the window) reaches `min_volume`.
    Change {
        measurement: String,
        field: String,
        #[serde(rename = "where", default, skip_serializing_if = "BTreeMap::is_empty")]
        filter: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        group_by: Vec<String>,
        direction: Direction,
        percent: f64,
        baseline: u32,
        #[serde(default)]
        min_volume: f64,
    },
    /// A tag's score or rank in the trending windows of one size.
    Trending {
        window: String,
        metric: TrendingMetric,
        op: Op,
        value: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
    },
    /// A campaign's ratio, once the window has enough volume.
    Campaign {
        metric: CampaignMetric,
        op: Op,
        value: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        campaign_id: Option<String>,
        #[serde(default)]
        min_impressions: u64,
        #[serde(default)]
        min_clicks: u64,
    },
}

/// One alert rule, as written (TOML or JSON) and as the rules API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    #[serde(flatten)]
    pub kind: RuleKind,
    /// Consecutive windows the condition must hold before the alert fires.
    #[serde(rename = "for", default = "one")]
    pub for_windows: u32,
    /// Consecutive windows it must fail before a firing alert resolves.
    #[serde(default = "one")]
    pub resolve_for: u32,
    /// Sent to Alertmanager as the `summary` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Extra Alertmanager labels (`severity`, `team`...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

/// The keys each kind accepts, besides the common ones.
fn kind_fields(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "threshold" => &["measurement", "field", "where", "group_by", "op", "value"],
        "change" => &[
            "measurement",
            "field",
            "where",
            "group_by",
            "direction",
            "percent",
            "baseline",
            "min_volume",
        ],
        "trending" => &["window", "metric", "op", "value", "tag"],
        "campaign" => &[
            "metric",
            "op",
            "value",
            "campaign_id",
            "min_impressions",
            "min_clicks",
        ],
        _ => return None,
    })
}

const COMMON_FIELDS: [&str; 6] = ["name", "kind", "for", "resolve_for", "summary", "labels"];
const TRENDING_WINDOWS: [&str; 3] = ["1m", "5m", "15m"];
const NAME_MAX: usize = 100;

impl Rule {
    /// A rule from its JSON form (a TOML table converts to it), checked.
    /// `name` names the rule in errors when the object has none.
    pub fn from_json(value: &Value, name: Option<&str>) -> Result<Rule, RuleError> {
        let shown = value
            .get("name")
            .and_then(Value::as_str)
            .or(name)
            .unwrap_or("?")
            .to_string();
        let error = |field: &str, problem: String| RuleError {
            rule: shown.clone(),
            field: field.to_string(),
            problem,
        };
        let Value::Object(object) = value else {
            return Err(error("rule", "must be a table".into()));
        };
        let mut object = object.clone();
        if let Some(name) = name {
            match object.get("name") {
                Some(Value::String(given)) if given != name => {
                    return Err(error("name", format!("is `{given}`, not `{name}`")));
                }
                _ => {
                    object.insert("name".into(), Value::String(name.into()));
                }
            }
        }
        let kind = match object.get("kind") {
            Some(Value::String(kind)) => kind.clone(),
            Some(_) => return Err(error("kind", "must be a string".into())),
            None => return Err(error("kind", "is missing".into())),
        };
        let Some(allowed) = kind_fields(&kind) else {
            return Err(error(
                "kind",
                format!("is `{kind}`; one of threshold, change, trending, campaign"),
            ));
        };
        if let Some(unknown) = object
            .keys()
            .find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !allowed.contains(&k.as_str()))
        {
            return Err(error(
                unknown,
                format!(
                    "is not a field of a {kind} rule (it has: {})",
                    allowed.join(", ")
                ),
            ));
        }
        // Each field on its own, so that a mistake names the field.
        for (key, field) in &object {
            probe_field(&kind, key, field).map_err(|problem| error(key, problem))?;
        }
        let rule: Rule = serde_json::from_value(Value::Object(object)).map_err(|e| {
            missing_field(&e.to_string()).map_or_else(
                || error("rule", e.to_string()),
                |field| error(&field, "is missing".into()),
            )
        })?;
        rule.check()
            .map_err(|(field, problem)| error(field, problem))?;
        Ok(rule)
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= NAME_MAX
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
        if !name_ok {
            return Err((
                "name",
                format!("must be 1 to {NAME_MAX} letters, digits, `_`, `-` or `.`"),
            ));
        }
        if self.for_windows == 0 || self.for_windows > 1440 {
            return Err(("for", "must be 1 to 1440 windows".into()));
        }
        if self.resolve_for == 0 || self.resolve_for > 1440 {
            return Err(("resolve_for", "must be 1 to 1440 windows".into()));
        }
        match &self.kind {
            RuleKind::Threshold {
                measurement, value, ..
            } => {
                check_measurement(measurement)?;
                check_finite("value", *value)
            }
            RuleKind::Change {
                measurement,
                percent,
                baseline,
                min_volume,
                direction,
                ..
            } => {
                check_measurement(measurement)?;
                check_finite("min_volume", *min_volume)?;
                let most = if *direction == Direction::Drop {
                    100.0
                } else {
                    1e6
                };
                if !(percent.is_finite() && *percent > 0.0 && *percent <= most) {
                    return Err(("percent", format!("must be above 0 and at most {most}")));
                }
                if *baseline == 0 || *baseline > 1440 {
                    return Err(("baseline", "must be 1 to 1440 windows".into()));
                }
                Ok(())
            }
            RuleKind::Trending { window, value, .. } => {
                if !TRENDING_WINDOWS.contains(&window.as_str()) {
                    return Err(("window", format!("is `{window}`; one of 1m, 5m, 15m")));
                }
                check_finite("value", *value)
            }
            RuleKind::Campaign { value, .. } => check_finite("value", *value),
        }
    }

    /// The measurement the rule reads.
    pub fn measurement(&self) -> &str {
        match &self.kind {
            RuleKind::Threshold { measurement, .. } | RuleKind::Change { measurement, .. } => {
                measurement
            }
            RuleKind::Trending { .. } => "trending",
            RuleKind::Campaign { .. } => "ads",
        }
    }

    /// How many windows back its state can reach: what a replay must run
    /// before its range for the rule to start from the same state.
    fn windows_back(&self) -> u32 {
        let baseline = match &self.kind {
            RuleKind::Change { baseline, .. } => *baseline,
            _ => 0,
        };
        baseline + self.for_windows + self.resolve_for + self.forget_after()
    }

    /// Windows without a point after which a grouped series is forgotten.
    fn forget_after(&self) -> u32 {
        let baseline = match &self.kind {
            RuleKind::Change { baseline, .. } => *baseline,
            _ => 0,
        };
        self.for_windows.max(self.resolve_for).max(baseline) + 1
    }

    /// The threshold an `alerts` point reports when no baseline applies.
    fn fixed_threshold(&self) -> Option<f64> {
        match &self.kind {
            RuleKind::Threshold { value, .. }
            | RuleKind::Trending { value, .. }
            | RuleKind::Campaign { value, .. } => Some(*value),
            RuleKind::Change { .. } => None,
        }
    }
}

fn check_measurement(measurement: &str) -> Result<(), (&'static str, String)> {
    if measurement.is_empty() || measurement == MEASUREMENT {
        return Err((
            "measurement",
            format!("must name a pipeline's measurement, not `{measurement}`"),
        ));
    }
    Ok(())
}

fn check_finite(field: &'static str, value: f64) -> Result<(), (&'static str, String)> {
    if value.is_finite() {
        Ok(())
    } else {
        Err((field, "must be a finite number".into()))
    }
}

/// Checks one field's JSON type, so that serde's message (which names no
/// field for a wrong type inside a flattened enum) is never what a user sees.
fn probe_field(kind: &str, key: &str, value: &Value) -> Result<(), String> {
    let string = || {
        value
            .as_str()
            .map(|_| ())
            .ok_or_else(|| "must be a string".to_string())
    };
    let number = || {
        value
            .as_f64()
            .map(|_| ())
            .ok_or_else(|| "must be a number".to_string())
    };
    let count = || {
        value
            .as_u64()
            .filter(|n| *n <= u64::from(u32::MAX))
            .map(|_| ())
            .ok_or_else(|| "must be a whole number of 0 or more".to_string())
    };
    let one_of = |names: &[&str]| match value.as_str() {
        Some(s) if names.contains(&s) => Ok(()),
        _ => Err(format!("must be one of {}", names.join(", "))),
    };
    let string_map = || match value {
        Value::Object(m) if m.values().all(Value::is_string) => Ok(()),
        _ => Err("must be a table of strings".to_string()),
    };
    match key {
        "name" | "kind" | "summary" | "measurement" | "field" | "window" | "tag"
        | "campaign_id" => string(),
        "value" | "percent" | "min_volume" => number(),
        "for" | "resolve_for" | "baseline" | "min_impressions" | "min_clicks" => count(),
        "op" => one_of(&["<", "<=", ">", ">="]),
        "direction" => one_of(&["drop", "spike"]),
        "metric" if kind == "trending" => one_of(&["score", "rank"]),
        "metric" => one_of(&["ctr", "cvr", "cpa", "roas"]),
        "where" | "labels" => string_map(),
        "group_by" => match value {
            Value::Array(a) if a.iter().all(Value::is_string) => Ok(()),
            _ => Err("must be a list of tag names".to_string()),
        },
        _ => Ok(()),
    }
}

/// The field serde reports missing, from its message.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// A checked list of rules, names unique.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertRules {
    rules: Vec<Rule>,
}

impl AlertRules {
    /// Checks that names are unique.
    pub fn new(rules: Vec<Rule>) -> Result<AlertRules, RuleError> {
        for (i, rule) in rules.iter().enumerate() {
            if rules[..i].iter().any(|r| r.name == rule.name) {
                return Err(RuleError {
                    rule: rule.name.clone(),
                    field: "name".into(),
                    problem: "is used by another rule".into(),
                });
            }
        }
        Ok(AlertRules { rules })
    }

    /// Rules from a TOML document of `[[rule]]` tables.
    pub fn from_toml(text: &str) -> Result<AlertRules, RuleError> {
        let file_error = |problem: String| RuleError {
            rule: "(file)".into(),
            field: "rule".into(),
            problem,
        };
        let doc: toml_edit::DocumentMut = text
            .parse()
            .map_err(|e: toml_edit::TomlError| file_error(format!("is not valid TOML: {e}")))?;
        if let Some((key, _)) = doc.iter().find(|(k, _)| *k != "rule") {
            return Err(RuleError {
                rule: "(file)".into(),
                field: key.to_string(),
                problem: "is not a rules file's key; write rules as [[rule]] tables".into(),
            });
        }
        let mut rules = Vec::new();
        if let Some(item) = doc.get("rule") {
            let Some(tables) = item.as_array_of_tables() else {
                return Err(file_error("must be [[rule]] tables".into()));
            };
            for table in tables.iter() {
                let value = table_to_json(table).map_err(|(field, problem)| RuleError {
                    rule: table
                        .get("name")
                        .and_then(|n| n.as_str())
                        .unwrap_or("?")
                        .to_string(),
                    field,
                    problem,
                })?;
                rules.push(Rule::from_json(&value, None)?);
            }
        }
        AlertRules::new(rules)
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// How far back in event time the rules' state reaches: their windows,
    /// plus the longest trending window a point's time starts.
    pub fn reach_back(&self) -> Duration {
        let windows = self.rules.iter().map(Rule::windows_back).max().unwrap_or(0);
        if windows == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs(60 * u64::from(windows) + 15 * 60)
    }
}

fn table_to_json(table: &toml_edit::Table) -> Result<Value, (String, String)> {
    let mut out = Map::new();
    for (key, item) in table.iter() {
        let value = match item {
            toml_edit::Item::Value(v) => toml_value(v).map_err(|p| (key.to_string(), p))?,
            toml_edit::Item::Table(t) => table_to_json(t)?,
            _ => return Err((key.to_string(), "must be a value or a table".into())),
        };
        out.insert(key.to_string(), value);
    }
    Ok(Value::Object(out))
}

fn toml_value(value: &toml_edit::Value) -> Result<Value, String> {
    use toml_edit::Value as T;
    Ok(match value {
        T::String(s) => Value::String(s.value().clone()),
        T::Integer(i) => Value::from(*i.value()),
        T::Float(f) => serde_json::Number::from_f64(*f.value())
            .map(Value::Number)
            .ok_or("must be a finite number")?,
        T::Boolean(b) => Value::Bool(*b.value()),
        T::Array(a) => Value::Array(a.iter().map(toml_value).collect::<Result<_, _>>()?),
        T::InlineTable(t) => {
            let mut out = Map::new();
            for (k, v) in t.iter() {
                out.insert(k.to_string(), toml_value(v)?);
            }
            Value::Object(out)
        }
        T::Datetime(_) => return Err("must not be a date".into()),
    })
}

/// Tags naming one series of a rule, sorted by key.
type SeriesKey = Vec<(String, String)>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Series {
    firing: bool,
    /// Consecutive windows the condition held.
    held: u32,
    /// Consecutive windows it failed.
    failed: u32,
    /// Consecutive evaluations without a point of the series.
    absent: u32,
    /// A change rule's previous values, oldest first.
    history: VecDeque<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct RuleState {
    /// The start of the newest window evaluated.
    last: Option<i64>,
    series: BTreeMap<SeriesKey, Series>,
}

#[derive(Serialize, Deserialize)]
struct EngineState {
    /// (rule as JSON, its state): a state is kept across a restart only for
    /// a rule whose definition did not change.
    rules: Vec<(String, RuleState)>,
}

/// A series' value in one window, and what it is compared with.
struct Reading {
    value: Option<f64>,
    threshold: Option<f64>,
    holds: bool,
}

/// Evaluates the rules over closed windows; see the module documentation.
#[derive(Clone)]
pub struct AlertEngine {
    rules: Arc<AlertRules>,
    states: Vec<RuleState>,
}

impl fmt::Debug for AlertEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertEngine")
            .field("rules", &self.rules.rules.len())
            .field("firing", &self.firing().values().sum::<usize>())
            .finish()
    }
}

impl AlertEngine {
    pub fn new(rules: Arc<AlertRules>) -> AlertEngine {
        AlertEngine {
            states: vec![RuleState::default(); rules.rules.len()],
            rules,
        }
    }

    /// Whether any rule reads `measurement`.
    pub fn reads(&self, measurement: &str) -> bool {
        self.rules
            .rules
            .iter()
            .any(|r| r.measurement() == measurement)
    }

    /// Series firing now, per rule (every rule listed, 0 included).
    pub fn firing(&self) -> BTreeMap<&str, usize> {
        self.rules
            .rules
            .iter()
            .zip(&self.states)
            .map(|(r, s)| {
                (
                    r.name.as_str(),
                    s.series.values().filter(|s| s.firing).count(),
                )
            })
            .collect()
    }

    /// Evaluates every rule whose measurement has real-time points among
    /// `points`, the final points of one closed window, and writes their
    /// `alerts` points to `out`.
    pub fn on_closed(&mut self, points: &[Point], out: &mut Vec<Point>) {
        let Some(time) = points.iter().find(|p| p.tier == Tier::Rt).map(|p| p.time) else {
            return;
        };
        for (rule, state) in self.rules.rules.iter().zip(&mut self.states) {
            let in_scope: Vec<&Point> = points
                .iter()
                .filter(|p| {
                    p.tier == Tier::Rt && p.time == time && p.measurement == rule.measurement()
                })
                .filter(|p| match &rule.kind {
                    RuleKind::Trending { window, .. } => p.tag("window") == Some(window.as_str()),
                    _ => true,
                })
                .collect();
            if in_scope.is_empty() || state.last.is_some_and(|last| time.0 <= last) {
                continue;
            }
            state.last = Some(time.0);
            evaluate(rule, state, time, &in_scope, out);
        }
    }

    /// The engine's state, for a checkpoint.
    pub fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
        let rules = self
            .rules
            .rules
            .iter()
            .zip(&self.states)
            .map(|(rule, state)| Ok((rule_key(rule)?, state.clone())))
            .collect::<Result<_, ProcessorError>>()?;
        bincode::serialize(&EngineState { rules })
            .map_err(|e| ProcessorError::Snapshot(format!("alert state: {e}")))
    }

    /// Restores a snapshot: the state of each rule defined as it was then.
    pub fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let saved: EngineState = bincode::deserialize(state)
            .map_err(|e| ProcessorError::CorruptCheckpoint(format!("alert state: {e}")))?;
        for (rule, state) in self.rules.rules.iter().zip(&mut self.states) {
            let key = rule_key(rule)?;
            *state = match saved.rules.iter().find(|(k, _)| *k == key) {
                Some((_, s)) => s.clone(),
                None => RuleState::default(),
            };
        }
        Ok(())
    }
}

fn rule_key(rule: &Rule) -> Result<String, ProcessorError> {
    serde_json::to_string(rule).map_err(|e| ProcessorError::Snapshot(format!("alert rule: {e}")))
}

/// Sums `field` of the points passing `filter`, per `group_by` series.
fn sums(
    points: &[&Point],
    field: &str,
    filter: &BTreeMap<String, String>,
    group_by: &[String],
) -> BTreeMap<SeriesKey, f64> {
    let mut out: BTreeMap<SeriesKey, f64> = BTreeMap::new();
    for p in points {
        if !filter.iter().all(|(k, v)| p.tag(k) == Some(v.as_str())) {
            continue;
        }
        let Some(value) = p.field(field) else {
            continue;
        };
        *out.entry(series_key(p, group_by)).or_default() += value.as_f64();
    }
    out
}

fn series_key(p: &Point, tags: &[String]) -> SeriesKey {
    let mut key: SeriesKey = tags
        .iter()
        .map(|t| (t.clone(), p.tag(t).unwrap_or("").to_string()))
        .collect();
    key.sort();
    key
}

/// The window's values of each series the rule reads.
fn readings_of(rule: &Rule, points: &[&Point]) -> BTreeMap<SeriesKey, Option<f64>> {
    match &rule.kind {
        RuleKind::Threshold {
            field,
            filter,
            group_by,
            ..
        }
        | RuleKind::Change {
            field,
            filter,
            group_by,
            ..
        } => {
            let mut out: BTreeMap<SeriesKey, Option<f64>> = sums(points, field, filter, group_by)
                .into_iter()
                .map(|(k, v)| (k, Some(v)))
                .collect();
            // One series over everything is there in every window, if only
            // as 0: "likes < 100" must fire when likes stop.
            if group_by.is_empty() {
                out.entry(Vec::new()).or_insert(Some(0.0));
            }
            out
        }
        RuleKind::Trending { metric, tag, .. } => points
            .iter()
            .filter(|p| tag.as_deref().is_none_or(|t| p.tag("tag") == Some(t)))
            .map(|p| {
                let field = match metric {
                    TrendingMetric::Score => "score",
                    TrendingMetric::Rank => "rank",
                };
                (
                    series_key(p, &["tag".to_string()]),
                    p.field(field).map(FieldValue::as_f64),
                )
            })
            .collect(),
        RuleKind::Campaign {
            metric,
            campaign_id,
            min_impressions,
            min_clicks,
            ..
        } => {
            let group = ["campaign_id".to_string()];
            let filter: BTreeMap<String, String> = campaign_id
                .iter()
                .map(|c| ("campaign_id".to_string(), c.clone()))
                .collect();
            let sum = |field: &str| sums(points, field, &filter, &group);
            let [impressions, clicks, conversions, spend, revenue] =
                ["impressions", "clicks", "conversions", "spend", "revenue"].map(sum);
            let get =
                |m: &BTreeMap<SeriesKey, f64>, k: &SeriesKey| m.get(k).copied().unwrap_or(0.0);
            let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
            impressions
                .keys()
                .chain(clicks.keys())
                .chain(spend.keys())
                .map(|k| {
                    let (i, c) = (get(&impressions, k), get(&clicks, k));
                    let enough = i >= *min_impressions as f64 && c >= *min_clicks as f64;
                    let value = match metric {
                        CampaignMetric::Ctr => ratio(c, i),
                        CampaignMetric::Cvr => ratio(get(&conversions, k), c),
                        CampaignMetric::Cpa => ratio(get(&spend, k), get(&conversions, k)),
                        CampaignMetric::Roas => ratio(get(&revenue, k), get(&spend, k)),
                    };
                    (k.clone(), value.filter(|_| enough))
                })
                .collect()
        }
    }
}

fn evaluate(
    rule: &Rule,
    state: &mut RuleState,
    time: EventTime,
    points: &[&Point],
    out: &mut Vec<Point>,
) {
    let mut readings = readings_of(rule, points);
    let sums_rule = matches!(
        rule.kind,
        RuleKind::Threshold { .. } | RuleKind::Change { .. }
    );
    for key in state.series.keys() {
        // A known series without a point: a sum of nothing is 0.
        readings
            .entry(key.clone())
            .or_insert(if sums_rule { Some(0.0) } else { None });
    }
    let present = |k: &SeriesKey, points: &[&Point]| -> bool {
        match &rule.kind {
            RuleKind::Threshold {
                filter, group_by, ..
            }
            | RuleKind::Change {
                filter, group_by, ..
            } => {
                group_by.is_empty()
                    || points.iter().any(|p| {
                        filter.iter().all(|(f, v)| p.tag(f) == Some(v.as_str()))
                            && series_key(p, group_by) == *k
                    })
            }
            RuleKind::Trending { .. } => points
                .iter()
                .any(|p| series_key(p, &["tag".to_string()]) == *k),
            RuleKind::Campaign { .. } => points
                .iter()
                .any(|p| series_key(p, &["campaign_id".to_string()]) == *k),
        }
    };
    for (key, value) in readings {
        let series = state.series.entry(key.clone()).or_default();
        series.absent = if present(&key, points) {
            0
        } else {
            series.absent + 1
        };
        if series.absent >= rule.forget_after() {
            // Gone for longer than any condition looks back: forgotten, and
            // a firing alert on it resolved.
            if series.firing {
                let gone = Reading {
                    value: None,
                    threshold: rule.fixed_threshold(),
                    holds: false,
                };
                out.push(alert_point(rule, &key, time, AlertState::Resolved, &gone));
            }
            state.series.remove(&key);
            continue;
        }
        let reading = read(rule, series, value);
        if let Some(verdict) = step(rule, series, reading.holds) {
            out.push(alert_point(rule, &key, time, verdict, &reading));
        }
        if !series.firing && series.held == 0 && series.history.is_empty() {
            state.series.remove(&key);
        }
    }
}

/// The series' reading in this window (a change rule also records it into
/// the baseline of the windows after).
fn read(rule: &Rule, series: &mut Series, value: Option<f64>) -> Reading {
    match &rule.kind {
        RuleKind::Change {
            direction,
            percent,
            baseline,
            min_volume,
            ..
        } => {
            let full = series.history.len() >= *baseline as usize;
            let mean =
                full.then(|| series.history.iter().sum::<f64>() / series.history.len() as f64);
            let reading = match (mean, value) {
                (Some(mean), Some(v)) => {
                    let (bound, holds) = match direction {
                        Direction::Drop => {
                            let bound = mean * (1.0 - percent / 100.0);
                            (bound, mean >= *min_volume && v <= bound)
                        }
                        Direction::Spike => {
                            let bound = mean * (1.0 + percent / 100.0);
                            (bound, v >= *min_volume && v >= bound && v > mean)
                        }
                    };
                    Reading {
                        value: Some(v),
                        threshold: Some(bound),
                        holds,
                    }
                }
                _ => Reading {
                    value,
                    threshold: None,
                    holds: false,
                },
            };
            if let Some(v) = value {
                series.history.push_back(v);
                while series.history.len() > *baseline as usize {
                    series.history.pop_front();
                }
            }
            reading
        }
        RuleKind::Threshold { op, .. }
        | RuleKind::Trending { op, .. }
        | RuleKind::Campaign { op, .. } => {
            let threshold = rule.fixed_threshold().unwrap_or(0.0);
            Reading {
                value,
                threshold: Some(threshold),
                holds: value.is_some_and(|v| op.holds(v, threshold)),
            }
        }
    }
}

/// Advances a series' lifecycle by one window; the state to write, if any.
fn step(rule: &Rule, series: &mut Series, holds: bool) -> Option<AlertState> {
    if holds {
        series.held = series.held.saturating_add(1);
        series.failed = 0;
        if series.held >= rule.for_windows {
            series.firing = true;
        }
        return Some(if series.firing {
            AlertState::Firing
        } else {
            AlertState::Pending
        });
    }
    series.held = 0;
    series.failed = series.failed.saturating_add(1);
    if !series.firing {
        return None;
    }
    if series.failed >= rule.resolve_for {
        series.firing = false;
        return Some(AlertState::Resolved);
    }
    Some(AlertState::Firing)
}

fn alert_point(
    rule: &Rule,
    key: &SeriesKey,
    time: EventTime,
    state: AlertState,
    reading: &Reading,
) -> Point {
    let mut tags = vec![("rule".to_string(), rule.name.clone())];
    tags.extend(key.iter().filter(|(k, _)| k != "rule").cloned());
    let mut fields = vec![("state".to_string(), FieldValue::Int(state as i64))];
    if let Some(v) = reading.value {
        fields.push(("value".to_string(), FieldValue::Float(v)));
    }
    if let Some(t) = reading.threshold {
        fields.push(("threshold".to_string(), FieldValue::Float(t)));
    }
    Point::new(MEASUREMENT, Tier::Rt, time, tags, fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic(minute: i64, event_type: &str, country: &str, events: i64) -> Point {
        Point::new(
            "traffic",
            Tier::Rt,
            EventTime(minute * 60_000),
            vec![
                ("country".into(), country.into()),
                ("device".into(), "ios".into()),
                ("event_type".into(), event_type.into()),
            ],
            vec![("events".into(), FieldValue::Int(events))],
        )
    }

    fn rules(toml: &str) -> Arc<AlertRules> {
        Arc::new(AlertRules::from_toml(toml).expect("valid rules"))
    }

    /// (minute, state, value) of each alert point.
    fn states(out: &[Point]) -> Vec<(i64, i64, Option<f64>)> {
        out.iter()
            .map(|p| {
                (
                    p.time.0 / 60_000,
                    match p.field("state") {
                        Some(FieldValue::Int(s)) => s,
                        _ => -1,
                    },
                    p.field("value").map(FieldValue::as_f64),
                )
            })
            .collect()
    }

    const LIKES_LOW: &str = r#"
        [[rule]]
        name = "likes_low"
        kind = "threshold"
        measurement = "traffic"
        field = "events"
        where = { event_type = "like" }
        op = "<"
        value = 100
        for = 3
        resolve_for = 2
    "#;

    #[test]
    fn a_threshold_goes_pending_firing_and_resolved_by_its_windows() {
        let mut engine = AlertEngine::new(rules(LIKES_LOW));
        let likes = [150, 60, 40, 20, 10, 120, 30, 130, 140, 150];
        let mut out = Vec::new();
        for (minute, &n) in likes.iter().enumerate() {
            let minute = minute as i64;
            // Two countries: the rule sums them.
            let window = [
                traffic(minute, "like", "de", n / 2),
                traffic(minute, "like", "fr", n - n / 2),
                traffic(minute, "view", "de", 1_000),
            ];
            engine.on_closed(&window, &mut out);
        }
        let (p, f, r) = (1, 2, 0);
        assert_eq!(
            states(&out),
            [
                (1, p, Some(60.0)),
                (2, p, Some(40.0)),
                (3, f, Some(20.0)),
                (4, f, Some(10.0)),
                // One good window is not enough to resolve (resolve_for = 2)...
                (5, f, Some(120.0)),
                (6, f, Some(30.0)),
                (7, f, Some(130.0)),
                // ...two are.
                (8, r, Some(140.0)),
            ]
        );
        assert!(out.iter().all(|p| p.tag("rule") == Some("likes_low")
            && p.field("threshold") == Some(FieldValue::Float(100.0))));
        assert_eq!(engine.firing()["likes_low"], 0);
    }

    #[test]
    fn a_window_without_matching_points_counts_as_zero_and_others_are_ignored() {
        let mut engine = AlertEngine::new(rules(LIKES_LOW.replace("for = 3", "for = 1").as_str()));
        let mut out = Vec::new();
        engine.on_closed(&[traffic(0, "view", "de", 10)], &mut out);
        assert_eq!(states(&out), [(0, 2, Some(0.0))]);
        // Another measurement's window, or an hourly one, is no evaluation.
        let mut hourly = traffic(1, "like", "de", 500);
        hourly.tier = Tier::Hourly;
        engine.on_closed(&[hourly], &mut out);
        assert_eq!(out.len(), 1);
        // The same window twice (a restart's overlap) is evaluated once.
        engine.on_closed(&[traffic(0, "like", "de", 500)], &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(engine.firing()["likes_low"], 1);
    }

    #[test]
    fn a_change_rule_compares_with_the_trailing_mean_above_a_volume() {
        let toml = r#"
            [[rule]]
            name = "traffic_drop"
            kind = "change"
            measurement = "traffic"
            field = "events"
            group_by = ["country"]
            direction = "drop"
            percent = 50
            baseline = 3
            min_volume = 100
        "#;
        let mut engine = AlertEngine::new(rules(toml));
        let mut out = Vec::new();
        let de = [1000, 1000, 1000, 400, 1000, 1000];
        // fr is too small to alert on, however much it drops.
        let fr = [50, 50, 50, 1, 50, 50];
        for minute in 0..6 {
            let i = minute as usize;
            engine.on_closed(
                &[
                    traffic(minute, "view", "de", de[i]),
                    traffic(minute, "view", "fr", fr[i]),
                ],
                &mut out,
            );
        }
        assert_eq!(states(&out), [(3, 2, Some(400.0)), (4, 0, Some(1000.0))]);
        assert_eq!(out[0].tag("country"), Some("de"));
        assert_eq!(out[0].field("threshold"), Some(FieldValue::Float(500.0)));
    }

    fn ads(minute: i64, campaign: &str, impressions: i64, clicks: i64) -> Point {
        Point::new(
            "ads",
            Tier::Rt,
            EventTime(minute * 60_000),
            vec![
                ("campaign_id".into(), campaign.into()),
                ("country".into(), "de".into()),
                ("device".into(), "ios".into()),
            ],
            vec![
                ("impressions".into(), FieldValue::Int(impressions)),
                ("clicks".into(), FieldValue::Int(clicks)),
            ],
        )
    }

    #[test]
    fn a_campaign_rule_waits_for_volume_and_is_per_campaign() {
        let toml = r#"
            [[rule]]
            name = "ctr_collapse"
            kind = "campaign"
            metric = "ctr"
            op = "<"
            value = 0.01
            min_impressions = 1000
        "#;
        let mut engine = AlertEngine::new(rules(toml));
        let mut out = Vec::new();
        // c1 collapses with volume; c2 collapses without (900 impressions).
        engine.on_closed(&[ads(0, "c1", 2000, 100), ads(0, "c2", 900, 0)], &mut out);
        engine.on_closed(&[ads(1, "c1", 2000, 10), ads(1, "c2", 900, 0)], &mut out);
        engine.on_closed(&[ads(2, "c1", 2000, 60)], &mut out);
        assert_eq!(states(&out), [(1, 2, Some(0.005)), (2, 0, Some(0.03))]);
        assert!(out.iter().all(|p| p.tag("campaign_id") == Some("c1")));
    }

    fn trending(minute: i64, window: &str, tag: &str, score: f64) -> Point {
        Point::new(
            "trending",
            Tier::Rt,
            EventTime(minute * 60_000),
            vec![("tag".into(), tag.into()), ("window".into(), window.into())],
            vec![
                ("score".into(), FieldValue::Float(score)),
                ("rank".into(), FieldValue::Int(1)),
            ],
        )
    }

    #[test]
    fn a_trending_rule_reads_its_window_size_and_a_tag_leaving_the_top_resolves() {
        let toml = r#"
            [[rule]]
            name = "tag_explodes"
            kind = "trending"
            window = "5m"
            metric = "score"
            op = ">"
            value = 8
        "#;
        let mut engine = AlertEngine::new(rules(toml));
        let mut out = Vec::new();
        engine.on_closed(&[trending(0, "1m", "#cats", 50.0)], &mut out);
        assert!(out.is_empty(), "a 1m window is not the rule's");
        engine.on_closed(&[trending(0, "5m", "#cats", 9.5)], &mut out);
        engine.on_closed(&[trending(1, "5m", "#dogs", 2.0)], &mut out);
        assert_eq!(states(&out), [(0, 2, Some(9.5)), (1, 0, None)]);
        assert_eq!(out[1].tag("tag"), Some("#cats"));
    }

    #[test]
    fn a_grouped_series_without_points_is_forgotten_resolving_its_alert() {
        let toml = r#"
            [[rule]]
            name = "country_busy"
            kind = "threshold"
            measurement = "traffic"
            field = "events"
            group_by = ["country"]
            op = ">="
            value = 0
        "#;
        let mut engine = AlertEngine::new(rules(toml));
        let mut out = Vec::new();
        engine.on_closed(
            &[traffic(0, "view", "de", 5), traffic(0, "view", "fr", 5)],
            &mut out,
        );
        for minute in 1..4 {
            engine.on_closed(&[traffic(minute, "view", "de", 5)], &mut out);
        }
        let fr: Vec<_> = out
            .iter()
            .filter(|p| p.tag("country") == Some("fr"))
            .map(|p| (p.time.0 / 60_000, p.field("state")))
            .collect();
        // Absent fr is 0 (still >= 0) once, then forgotten after 2 windows.
        assert_eq!(
            fr,
            [
                (0, Some(FieldValue::Int(2))),
                (1, Some(FieldValue::Int(2))),
                (2, Some(FieldValue::Int(0)))
            ]
        );
        assert_eq!(engine.firing()["country_busy"], 1);
    }

    #[test]
    fn state_survives_a_snapshot_and_a_changed_rule_starts_over() {
        let mut engine = AlertEngine::new(rules(LIKES_LOW));
        let mut out = Vec::new();
        engine.on_closed(&[traffic(0, "like", "de", 1)], &mut out);
        engine.on_closed(&[traffic(1, "like", "de", 1)], &mut out);
        let taken = engine.snapshot().unwrap();
        let mut restored = AlertEngine::new(rules(LIKES_LOW));
        restored.restore(&taken).unwrap();
        let mut after = Vec::new();
        restored.on_closed(&[traffic(2, "like", "de", 1)], &mut after);
        assert_eq!(states(&after), [(2, 2, Some(1.0))], "third window fires");

        let changed = LIKES_LOW.replace("value = 100", "value = 50");
        let mut other = AlertEngine::new(rules(&changed));
        other.restore(&taken).unwrap();
        let mut after = Vec::new();
        other.on_closed(&[traffic(2, "like", "de", 1)], &mut after);
        assert_eq!(states(&after), [(2, 1, Some(1.0))], "starts over: pending");
        assert!(AlertEngine::new(rules(LIKES_LOW)).restore(b"junk").is_err());
    }

    #[test]
    fn mistakes_name_the_rule_and_the_field() {
        let cases = [
            (
                "kind = \"threshold\"\nname = \"a\"\nmeasurement = \"traffic\"\nfield = \"events\"\nop = \"<\"",
                "alert rule `a`: `value` is missing",
            ),
            (
                "kind = \"threshold\"\nname = \"a\"\nmeasurement = \"traffic\"\nfield = \"events\"\nop = \"=\"\nvalue = 1",
                "alert rule `a`: `op` must be one of <, <=, >, >=",
            ),
            (
                "kind = \"trending\"\nname = \"t\"\nwindow = \"2m\"\nmetric = \"score\"\nop = \">\"\nvalue = 1",
                "alert rule `t`: `window` is `2m`; one of 1m, 5m, 15m",
            ),
            (
                "kind = \"campaign\"\nname = \"c\"\nmetric = \"ctr\"\nop = \"<\"\nvalue = 1\nfield = \"x\"",
                "alert rule `c`: `field` is not a field of a campaign rule (it has: metric, op, value, campaign_id, min_impressions, min_clicks)",
            ),
            (
                "kind = \"change\"\nname = \"d\"\nmeasurement = \"traffic\"\nfield = \"events\"\ndirection = \"drop\"\npercent = 150\nbaseline = 5",
                "alert rule `d`: `percent` must be above 0 and at most 100",
            ),
            (
                "kind = \"threshold\"\nname = \"bad name\"\nmeasurement = \"traffic\"\nfield = \"events\"\nop = \"<\"\nvalue = 1",
                "alert rule `bad name`: `name` must be 1 to 100 letters, digits, `_`, `-` or `.`",
            ),
            (
                "kind = \"threshold\"\nname = \"a\"\nmeasurement = \"traffic\"\nfield = \"events\"\nop = \"<\"\nvalue = 1\nfor = 0",
                "alert rule `a`: `for` must be 1 to 1440 windows",
            ),
            (
                "kind = \"threshold\"\nname = \"a\"\nmeasurement = \"traffic\"\nfield = \"events\"\nop = \"<\"\nvalue = \"1\"",
                "alert rule `a`: `value` must be a number",
            ),
        ];
        for (table, expected) in cases {
            let err = AlertRules::from_toml(&format!("[[rule]]\n{table}\n")).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
        let twice = format!("{LIKES_LOW}\n{LIKES_LOW}");
        assert_eq!(
            AlertRules::from_toml(&twice).unwrap_err().to_string(),
            "alert rule `likes_low`: `name` is used by another rule"
        );
        assert!(AlertRules::from_toml("rules = 1").is_err());
    }

    #[test]
    fn a_rule_reads_back_as_it_was_written() {
        let all = rules(LIKES_LOW);
        let rule = &all.rules()[0];
        let json = serde_json::to_value(rule).unwrap();
        assert_eq!(json["kind"], "threshold");
        assert_eq!(json["where"]["event_type"], "like");
        assert_eq!(json["for"], 3);
        assert_eq!(&Rule::from_json(&json, Some("likes_low")).unwrap(), rule);
        assert!(Rule::from_json(&json, Some("other")).is_err());
    }
}
