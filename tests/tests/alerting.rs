//! The shipped alert rules and Alertmanager routes, end to end: a real
//! `tidemark run` writing to a real InfluxDB, scraped by a real Prometheus
//! that sends to a real Alertmanager, which notifies the webhook receiver.
//! Only a test copy of the rules shortens `for`, and of the routes the
//! grouping waits; the shipped files stay as they are.

use std::time::{Duration, Instant};

use serde_json::Value;
use serde_yaml::Value as Yaml;
use tidemark_tests::observability::{
    prometheus_dir, AlertReceiver, AlertmanagerServer, PrometheusServer,
};
use tidemark_tests::{Generator, InfluxServer, Tidemark};

const ALERT: &str = "TidemarkStoreWritesFailing";

/// From the start to the store seen up: the first write comes when the
/// first minute closes (at most 60 s plus the 5 s out-of-orderness), then a
/// 1 s scrape.
const STORE_UP_TIMEOUT: Duration = Duration::from_secs(150);

/// From InfluxDB stopping to the alert in Alertmanager: the next write comes
/// when the next minute closes (at most 60 s plus the 5 s out-of-orderness),
/// fails at once, and Prometheus (1 s scrapes and evaluations) passes it on.
const FIRE_TIMEOUT: Duration = Duration::from_secs(150);

/// From InfluxDB back to the alert resolved: one writer backoff (at most
/// 5 s), then a scrape and an evaluation.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(60);

fn shipped(path: &str) -> String {
    std::fs::read_to_string(prometheus_dir().join(path))
        .unwrap_or_else(|e| panic!("dashboards/prometheus/{path}: {e}"))
}

/// The rules with every `for` shortened to 1 s.
fn fast_rules() -> String {
    shipped("rules/tidemark.rules.yml")
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 1s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The routes, sending to `receiver`, with grouping waits of 1 s.
fn fast_routes(receiver: &str) -> String {
    let text = shipped("alertmanager.yml").replace("http://alert-receiver:9099", receiver);
    assert!(text.contains(receiver), "the routes send to alert-receiver");
    let mut routes: Yaml = serde_yaml::from_str(&text).expect("alertmanager.yml is YAML");
    fn shorten(route: &mut Yaml) {
        for key in ["group_wait", "group_interval"] {
            if route.get(key).is_some() {
                route[key] = Yaml::from("1s");
            }
        }
        if let Some(children) = route.get_mut("routes").and_then(Yaml::as_sequence_mut) {
            children.iter_mut().for_each(shorten);
        }
    }
    shorten(&mut routes["route"]);
    serde_yaml::to_string(&routes).expect("YAML out")
}

/// The shipped scrape config with only the `run` job, aimed at `run_target`,
/// scraping and evaluating every second, alerting `alertmanager`.
fn test_scrape_config(run_target: &str, alertmanager: &str) -> String {
    let mut config: Yaml =
        serde_yaml::from_str(&shipped("prometheus.yml")).expect("prometheus.yml is YAML");
    config["global"]["scrape_interval"] = Yaml::from("1s");
    config["global"]["evaluation_interval"] = Yaml::from("1s");
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] =
        Yaml::Sequence(vec![Yaml::from(alertmanager)]);
    let jobs = config["scrape_configs"]
        .as_sequence_mut()
        .expect("scrape_configs");
    jobs.retain(|job| job["job_name"] == "tidemark-run");
    assert_eq!(jobs.len(), 1, "prometheus.yml scrapes tidemark-run");
    jobs[0]["static_configs"][0]["targets"] = Yaml::Sequence(vec![Yaml::from(run_target)]);
    serde_yaml::to_string(&config).expect("YAML out")
}

fn is_active(alert: &Value) -> bool {
    alert["labels"]["alertname"] == ALERT && alert["status"]["state"] == "active"
}

async fn await_alerts(
    what: &str,
    timeout: Duration,
    am: &AlertmanagerServer,
    prometheus: &PrometheusServer,
    done: impl Fn(&[Value]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let alerts = am.alerts().await;
        if done(&alerts) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{what} not within {timeout:?}; alerts: {alerts:?}\nPrometheus: {}\nAlertmanager: {}",
            prometheus.output(),
            am.output()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_store_fires_store_writes_failing_in_alertmanager_and_its_return_resolves_it() {
    let mut influx = InfluxServer::start().expect("influxd starts");
    let data = tempfile::tempdir().unwrap();
    let t = Tidemark::start_on_influx(data.path(), &influx).await;
    let _generator = Generator::start(&t, 200);
    let receiver = AlertReceiver::start().await;
    let am = AlertmanagerServer::start(&fast_routes(&receiver.url)).await;
    let am_target = am.url.trim_start_matches("http://").to_string();
    let run_target = format!("127.0.0.1:{}", t.port);
    let rules = fast_rules();
    let prometheus = PrometheusServer::start(
        &test_scrape_config(&run_target, &am_target),
        &[
            ("rules/tidemark.rules.yml", &rules),
            ("secrets/tidemark-token", &t.token),
        ],
    )
    .await;

    // Scraped with the token, and writing: the store is up.
    let up = "tidemark_writer_store_up == 1 and tidemark_writer_batches_total > 0";
    tidemark_tests::wait_until_else(
        "Prometheus to see the store up",
        STORE_UP_TIMEOUT,
        || async { !prometheus.query(up).await.is_empty() },
        || async {
            let metrics = t.metrics_text().await;
            let writer: Vec<&str> = (metrics.lines())
                .filter(|l| l.starts_with("tidemark_writer"))
                .collect();
            format!(
                "targets: {}\nthe run's metrics: {}\nPrometheus: {}",
                prometheus.targets().await,
                writer.join("\n"),
                prometheus.output()
            )
        },
    )
    .await;
    assert!(!am.alerts().await.iter().any(is_active));

    influx.stop();
    let fired = await_alerts("the alert", FIRE_TIMEOUT, &am, &prometheus, |alerts| {
        alerts.iter().any(|a| {
            is_active(a)
                && a["labels"]["severity"] == "critical"
                && a["labels"]["instance"] == run_target.as_str()
                && a["annotations"]["runbook_url"]
                    == "docs/operations.md#tidemarkstorewritesfailing"
        })
    })
    .await;
    tidemark_tests::wait_until(
        "the critical receiver to be notified",
        Duration::from_secs(30),
        || async {
            receiver.notifications().iter().any(|n| {
                n["alertname"] == ALERT && n["status"] == "firing" && n["receiver"] == "/critical"
            })
        },
    )
    .await;

    influx.restart().expect("influxd starts again");
    let resolved = await_alerts(
        "the alert to resolve",
        RESOLVE_TIMEOUT,
        &am,
        &prometheus,
        |alerts| !alerts.iter().any(is_active),
    )
    .await;
    tidemark_tests::wait_until(
        "the resolved notification",
        Duration::from_secs(30),
        || async {
            receiver
                .notifications()
                .iter()
                .any(|n| n["alertname"] == ALERT && n["status"] == "resolved")
        },
    )
    .await;
    eprintln!(
        "{ALERT} fired {fired:?} after InfluxDB stopped, resolved {resolved:?} after it came back"
    );
}
