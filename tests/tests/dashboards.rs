//! The Grafana dashboards of `dashboards/grafana` are checked as code, since
//! no Grafana server can run here: their JSON is sane and names only
//! provisioned data sources; every InfluxQL target, with Grafana's macros and
//! template variables expanded the way Grafana's InfluxDB data source expands
//! them, returns a series from a real InfluxDB filled by a real `tidemark run`
//! under generated traffic; every PromQL target returns data from a real
//! Prometheus scraping that run, or, for the panels of the scale-out
//! services, scraping a real `ingest`, `process` and `serve` over tansu.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tidemark_tests::observability::PrometheusServer;
use tidemark_tests::services::{
    ingest_args, process_args, serve_args, OverviewClient, Service, TansuServer,
};
use tidemark_tests::{Generator, InfluxServer, KnownEvents, Tidemark};

/// Panels of metrics only the scale-out services (`ingest`, `process` with
/// Kafka) have: `run` cannot give them data, so the first test only checks
/// that Prometheus accepts their queries, and the second runs them against
/// the services.
const SCALE_OUT_ONLY: &[&str] = &[
    "Kafka produce latency p99 (scale-out)",
    "Updates dropped (scale-out)",
    "Combiner instance (scale-out)",
];

/// How long generated traffic gets to reach every panel.
const DATA_TIMEOUT: Duration = Duration::from_secs(150);

fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/grafana")
}

fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/prometheus/rules/tidemark.rules.yml")
}

struct Dashboard {
    file: String,
    json: Value,
}

fn dashboards() -> Vec<Dashboard> {
    let dir = grafana_dir().join("dashboards");
    let mut out: Vec<Dashboard> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable dashboard");
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()));
            Dashboard {
                file: p.file_name().unwrap().to_string_lossy().into_owned(),
                json,
            }
        })
        .collect();
    out.sort_by(|a, b| a.file.cmp(&b.file));
    assert!(out.len() >= 2, "the business and operations dashboards");
    out
}

/// The uid and type of every provisioned data source.
fn provisioned_datasources() -> BTreeMap<String, String> {
    let path = grafana_dir().join("provisioning/datasources/tidemark.yml");
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).expect("provisioning file"))
            .expect("provisioning YAML");
    yaml["datasources"]
        .as_sequence()
        .expect("a datasources list")
        .iter()
        .map(|d| {
            (
                d["uid"].as_str().expect("a uid").to_string(),
                d["type"].as_str().expect("a type").to_string(),
            )
        })
        .collect()
}

/// Every `datasource` object in a dashboard (panels, targets, variables).
fn datasource_refs(value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(ds)) = map.get("datasource") {
                out.push((
                    ds["uid"].as_str().unwrap_or_default().to_string(),
                    ds["type"].as_str().unwrap_or_default().to_string(),
                ));
            }
            map.values().for_each(|v| datasource_refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| datasource_refs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_json_is_sane() {
    let provisioned = provisioned_datasources();
    for d in dashboards() {
        let schema = d.json["schemaVersion"].as_i64().unwrap_or(0);
        assert!(
            (36..=41).contains(&schema),
            "{}: schemaVersion {schema} is not one Grafana 9 to 11 writes",
            d.file
        );
        assert!(d.json["uid"].is_string(), "{}: a stable uid", d.file);
        assert!(
            d.json["title"]
                .as_str()
                .is_some_and(|t| t.starts_with("tidemark — ")),
            "{}: title",
            d.file
        );
        let mut ids = BTreeSet::new();
        for panel in d.json["panels"].as_array().expect("panels") {
            let id = panel["id"].as_i64().expect("a panel id");
            assert!(ids.insert(id), "{}: panel id {id} twice", d.file);
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(!title.is_empty(), "{}: panel {id} has no title", d.file);
            assert!(
                panel["fieldConfig"]["defaults"]["unit"].is_string(),
                "{}: panel {title} has no unit",
                d.file
            );
            assert!(
                !panel["targets"].as_array().is_none_or(Vec::is_empty),
                "{}: panel {title} has no query",
                d.file
            );
        }
        let mut refs = Vec::new();
        datasource_refs(&d.json, &mut refs);
        assert!(!refs.is_empty(), "{}: names its data sources", d.file);
        for (uid, kind) in refs {
            assert_eq!(
                provisioned.get(&uid),
                Some(&kind),
                "{}: data source {uid} ({kind}) is not provisioned",
                d.file
            );
        }
    }
}

/// One query of a panel.
struct Target {
    dashboard: String,
    panel: String,
    query: String,
}

fn targets(kind: &str, field: &str) -> Vec<Target> {
    let mut out = Vec::new();
    for d in dashboards() {
        for panel in d.json["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let ds = if target["datasource"].is_object() {
                    &target["datasource"]
                } else {
                    &panel["datasource"]
                };
                if ds["type"] == kind {
                    out.push(Target {
                        dashboard: d.json["title"].as_str().unwrap_or_default().to_string(),
                        panel: panel["title"].as_str().unwrap_or_default().to_string(),
                        query: target[field].as_str().expect("a query").to_string(),
                    });
                }
            }
        }
    }
    out
}

/// A template variable's value, and whether Grafana treats it as a regex
/// value (multi-value or "All"), as its InfluxDB data source does.
struct VarValue {
    values: Vec<String>,
    regex: bool,
}

/// Grafana's `escapeRegex`.
fn escape_regex(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        if "[]{}()*+?.\\^$|/-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The values of a Prometheus query variable for a time range of `range_s`
/// seconds, as Grafana computes them: `query_result(EXPR)` evaluates EXPR
/// and renders each sample as `{label="value",...} value time`; the
/// variable's regex then picks the values. Only the regex form the
/// dashboards use, `/LABEL="(A|B|...)"/`, is understood (anything else
/// fails the test).
async fn prometheus_variable(
    prometheus: &PrometheusServer,
    var: &Value,
    range_s: u64,
) -> Vec<String> {
    let query = var["query"]["query"]
        .as_str()
        .or_else(|| var["query"].as_str())
        .expect("a variable query")
        .replace("$__range_s", &range_s.to_string());
    let expr = query
        .strip_prefix("query_result(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("a query_result(...) variable: {query}"));
    let regex = var["regex"].as_str().unwrap_or_default();
    let (label, alternatives) = regex
        .strip_prefix('/')
        .and_then(|r| r.strip_suffix(")\"/"))
        .and_then(|r| r.split_once("=\"("))
        .unwrap_or_else(|| panic!("a regex of the form /LABEL=\"(A|B)\"/: {regex}"));
    let alternatives: Vec<&str> = alternatives.split('|').collect();
    prometheus
        .query(expr)
        .await
        .iter()
        .filter_map(|sample| sample["metric"][label].as_str())
        .filter(|value| alternatives.contains(value))
        .map(str::to_string)
        .collect()
}

/// Expands a query as Grafana's InfluxDB data source does for the last hour
/// at a 1-minute interval (the data source's minimum): the macros, then each
/// variable as `$name` or `${name}`. A regex variable's single value is
/// regex-escaped, several become `(a|b)`; a plain variable's value is
/// inserted as it is.
fn expand_influxql(query: &str, vars: &BTreeMap<String, VarValue>) -> String {
    let mut q = query
        .replace("$timeFilter", "time >= now() - 1h")
        .replace("$__interval_ms", "60000")
        .replace("$__interval", "1m")
        .replace("$__range_ms", "3600000")
        .replace("$__range_s", "3600")
        .replace("$__range", "3600s");
    // Longer names first, so `$country_x` is never cut at `$country`.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        let v = &vars[name];
        let text = if !v.regex {
            v.values.join(",")
        } else if v.values.len() == 1 {
            escape_regex(&v.values[0])
        } else {
            let escaped: Vec<String> = v.values.iter().map(|s| escape_regex(s)).collect();
            format!("({})", escaped.join("|"))
        };
        q = q
            .replace(&format!("${{{name}}}"), &text)
            .replace(&format!("${name}"), &text);
    }
    // A `$` left before a name is a variable Grafana would have expanded (a
    // regex's `$` anchor is followed by `/`).
    let unexpanded = q
        .match_indices('$')
        .any(|(i, _)| q[i + 1..].starts_with(|c: char| c.is_alphabetic() || c == '_' || c == '{'));
    assert!(
        !unexpanded,
        "an unexpanded macro or variable in {query}: {q}"
    );
    q
}

/// The series of an InfluxQL query, or its error.
async fn influx_series(influx_url: &str, query: &str) -> Result<Vec<Value>, String> {
    let reply: Value = reqwest::Client::new()
        .get(format!("{influx_url}/query"))
        .query(&[("db", "tidemark"), ("epoch", "ms"), ("q", query)])
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let result = &reply["results"][0];
    if let Some(error) = result["error"].as_str().or(reply["error"].as_str()) {
        return Err(error.to_string());
    }
    Ok(result["series"].as_array().cloned().unwrap_or_default())
}

/// Whether another poll may wait a second: `DATA_TIMEOUT` since `start` has not passed.
async fn may_wait(start: Instant) -> bool {
    if start.elapsed() > DATA_TIMEOUT {
        return false;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    true
}

/// The states the dashboards' variables are checked in: every regex
/// variable at "All" (Grafana's `(a|b|…)` form), and for each of them one
/// state where it alone takes its first value (a user's single pick, whose
/// combination with the others' first values may well have no data). Other
/// variables take their first value.
async fn variable_states(
    influx_url: &str,
    prometheus: &PrometheusServer,
    start: Instant,
) -> Vec<BTreeMap<String, VarValue>> {
    let mut values_of = BTreeMap::new();
    for d in dashboards() {
        for var in d.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = var["name"].as_str().expect("a variable name").to_string();
            let regex = var["multi"] == true || var["includeAll"] == true;
            let values: Vec<String> = match var["type"].as_str() {
                Some("custom") => var["query"]
                    .as_str()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect(),
                Some("query") if var["datasource"]["type"] == "prometheus" => {
                    let values = prometheus_variable(prometheus, var, 3600).await;
                    assert_eq!(values, ["rt"], "{}: {name} over the last hour", d.file);
                    // The rule it encodes: `rt` up to 7 days, `hourly` beyond.
                    for (range_s, tier) in
                        [(604_800, "rt"), (604_801, "hourly"), (2_592_000, "hourly")]
                    {
                        let got = prometheus_variable(prometheus, var, range_s).await;
                        assert_eq!(got, [tier], "{}: {name} over {range_s} s", d.file);
                    }
                    values
                }
                Some("query") => {
                    let query = var["query"].as_str().expect("a variable query");
                    let values = loop {
                        let series = influx_series(influx_url, query)
                            .await
                            .unwrap_or_else(|e| panic!("variable {name}: {query}: {e}"));
                        let values: Vec<String> = series
                            .iter()
                            .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
                            .filter_map(|row| row[1].as_str().map(str::to_string))
                            .collect();
                        if !values.is_empty() || !may_wait(start).await {
                            break values;
                        }
                    };
                    let found = !values.is_empty();
                    assert!(found, "{}: variable {name} ({query}) has no values", d.file);
                    values
                }
                other => panic!("{}: variable {name} of type {other:?}", d.file),
            };
            assert!(
                !values.is_empty(),
                "{}: variable {name} has no values",
                d.file
            );
            values_of.insert(name, VarValue { values, regex });
        }
    }
    let at = |picked: Option<&str>| -> BTreeMap<String, VarValue> {
        values_of
            .iter()
            .map(|(name, v)| {
                let values = if v.regex && picked != Some(name.as_str()) {
                    v.values.clone()
                } else {
                    v.values[..1].to_vec()
                };
                (
                    name.clone(),
                    VarValue {
                        values,
                        regex: v.regex,
                    },
                )
            })
            .collect()
    };
    let mut states = vec![at(None)];
    for (name, v) in &values_of {
        if v.regex {
            states.push(at(Some(name)));
        }
    }
    states
}

/// Whether an instant query's answer holds a finite sample.
fn has_data(data: &Value) -> bool {
    let samples: Vec<&Value> = match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| &s["value"][1])
            .collect(),
        Some("scalar") => vec![&data["result"][1]],
        _ => Vec::new(),
    };
    samples
        .iter()
        .filter_map(|v| v.as_str()?.parse::<f64>().ok())
        .any(f64::is_finite)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_panel_query_returns_data() {
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let t = Tidemark::start_on_influx(dir.path(), &influx).await;
    let _generator = Generator::start(&t, 2_000);
    // Event-to-update latency is measured on updates leaving for a client,
    // and query latency on queries: a reading client and a query loop give
    // those panels data.
    let mut client = OverviewClient::connect(&t.base, &t.token).await;
    let reader = tokio::spawn(async move { client.until(DATA_TIMEOUT * 2, |_| false).await });
    let queries = {
        let base = t.base.clone();
        let token = t.token.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let _ = http
                    .get(format!(
                        "{base}/api/v1/metrics?name=traffic&field=events&step=1m"
                    ))
                    .bearer_auth(&token)
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // The recording rules the operations dashboard draws from.
    let rules = std::fs::read_to_string(rules_file()).expect("the shipped rules");
    let host = t.base.trim_start_matches("http://");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [tidemark.rules.yml]\n\
         scrape_configs:\n  - job_name: tidemark-run\n    authorization:\n      credentials: {token}\n    \
         static_configs:\n      - targets: ['{host}']\n",
        token = t.token
    );
    let prometheus = PrometheusServer::start(&config, &[("tidemark.rules.yml", &rules)]).await;

    let start = Instant::now();
    let states = variable_states(&influx.url, &prometheus, start).await;
    let mut failures = Vec::new();
    // A variable a query does not use gives the same query in several states.
    let mut influx_queries = Vec::new();
    let mut influx_checked = 0;
    for target in targets("influxdb", "query") {
        for vars in &states {
            let query = expand_influxql(&target.query, vars);
            if influx_queries.contains(&query) {
                continue;
            }
            influx_queries.push(query.clone());
            let (found, last) = loop {
                let last = influx_series(&influx.url, &query).await;
                let found = matches!(&last, Ok(series) if !series.is_empty());
                if found || !may_wait(start).await {
                    break (found, last);
                }
            };
            influx_checked += 1;
            if !found {
                failures.push(format!(
                    "{} / {}: {query} returned {:?}",
                    target.dashboard, target.panel, last
                ));
            }
        }
    }

    let mut prom_checked = 0;
    let mut prom_syntax_only = 0;
    for target in targets("prometheus", "expr") {
        if SCALE_OUT_ONLY.contains(&target.panel.as_str()) {
            // `query_data` panics with Prometheus' message when it refuses the expression.
            prometheus.query_data(&target.query).await;
            prom_syntax_only += 1;
            continue;
        }
        let (found, last) = loop {
            let last = prometheus.query_data(&target.query).await;
            let found = has_data(&last);
            if found || !may_wait(start).await {
                break (found, last);
            }
        };
        prom_checked += 1;
        if !found {
            failures.push(format!(
                "{} / {}: {} returned {last}",
                target.dashboard, target.panel, target.query
            ));
        }
    }
    reader.abort();
    queries.abort();
    println!(
        "dashboards: {influx_checked} InfluxQL target expansions and {prom_checked} PromQL targets \
         returned data, {prom_syntax_only} scale-out PromQL targets checked for syntax (for data below)"
    );
    assert!(
        failures.is_empty(),
        "panels without data:\n{}\nPrometheus log:\n{}",
        failures.join("\n"),
        prometheus.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_out_panels_return_data_from_the_services() {
    let tansu = TansuServer::start();
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let ingest = Service::start(&ingest_args(&tansu.brokers), dir.path()).await;
    let process = Service::start(
        &process_args(&tansu.brokers, &influx.url, &dir.path().join("process")),
        dir.path(),
    )
    .await;
    let serve = Service::start(&serve_args(&tansu.brokers, &influx.url), dir.path()).await;
    let host = |s: &Service| s.base.trim_start_matches("http://").to_string();
    // The job names of dashboards/prometheus/prometheus.yml.
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
         - job_name: tidemark-ingest\n  static_configs: [{{targets: ['{ingest}']}}]\n\
         - job_name: tidemark-process\n  static_configs: [{{targets: ['{process}']}}]\n\
         - job_name: tidemark-serve\n  authorization: {{credentials: {token}}}\n  static_configs: [{{targets: ['{serve}']}}]\n",
        ingest = host(&ingest),
        process = host(&process),
        serve = host(&serve),
        token = serve.token,
    );
    let prometheus = PrometheusServer::start(&config, &[]).await;
    let known = KnownEvents::new(30);
    for batch in &known.batches {
        let (status, _, reply) = ingest.post(batch).await;
        assert_eq!(status, 202, "{reply}");
    }

    let start = Instant::now();
    let mut checked = 0;
    for target in targets("prometheus", "expr") {
        if !SCALE_OUT_ONLY.contains(&target.panel.as_str()) {
            continue;
        }
        let (found, last) = loop {
            let last = prometheus.query_data(&target.query).await;
            let found = has_data(&last);
            if found || !may_wait(start).await {
                break (found, last);
            }
        };
        assert!(
            found,
            "{} / {}: {} returned {last}\nPrometheus log:\n{}",
            target.dashboard,
            target.panel,
            target.query,
            prometheus.output()
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        SCALE_OUT_ONLY.len(),
        "every scale-out panel has a target"
    );
    println!("dashboards: {checked} scale-out PromQL targets returned data from the services");
}
