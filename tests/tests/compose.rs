//! `docker-compose.yml` cannot be run here (no container engine), so it is
//! kept correct by construction: parsed as YAML, its tidemark services must
//! run the subcommands and flags the end-to-end tests run natively
//! (`tests/tests/services.rs`), plus what a container needs on top.

use std::collections::BTreeSet;
use std::path::Path;

use serde_yaml::Value;
use tidemark_tests::generator_args;
use tidemark_tests::services::{ingest_args, process_args, serve_args};

fn flags<'a>(args: impl IntoIterator<Item = &'a str>) -> BTreeSet<&'a str> {
    args.into_iter().filter(|a| a.starts_with("--")).collect()
}

#[test]
fn compose_services_run_the_commands_the_tests_run() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker-compose.yml");
    let text = std::fs::read_to_string(&path).expect("docker-compose.yml exists");
    let compose: Value = serde_yaml::from_str(&text).expect("docker-compose.yml is YAML");
    let services = &compose["services"];
    let tested = [
        ("ingest", ingest_args("kafka:9092"), vec!["--listen"]),
        (
            "generator",
            generator_args("http://ingest:8081", 200, "key"),
            vec![],
        ),
        (
            "process",
            process_args("kafka:9092", "http://influxdb:8086", Path::new("/data")),
            vec!["--listen"],
        ),
        (
            "serve",
            serve_args("kafka:9092", "http://influxdb:8086"),
            // Where the image keeps the dashboard; the folder `promote` writes.
            vec!["--listen", "--web-dir", "--data-dir"],
        ),
    ];
    for (name, args, container_flags) in tested {
        let command: Vec<&str> = services[name]["command"]
            .as_sequence()
            .unwrap_or_else(|| panic!("service {name} has a command list"))
            .iter()
            .map(|v| v.as_str().expect("command items are strings"))
            .collect();
        assert_eq!(command.first(), Some(&"tidemark"), "{name}: {command:?}");
        assert_eq!(
            command.get(1),
            Some(&args[0].as_str()),
            "{name}: {command:?}"
        );
        let mut expected = flags(args.iter().map(String::as_str));
        expected.extend(container_flags);
        assert_eq!(flags(command.iter().copied()), expected, "{name}'s flags");
        // Every flag has its value.
        for pair in command[2..].chunks(2) {
            assert!(
                pair.len() == 2 && pair[0].starts_with("--") && !pair[1].starts_with("--"),
                "{name}: {pair:?}"
            );
        }
        assert_eq!(
            services[name]["image"].as_str(),
            Some("tidemark"),
            "{name} runs the image built from the Dockerfile"
        );
        for needed in services[name]["depends_on"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let needed = needed.as_str().expect("service names");
            assert!(!services[needed].is_null(), "{name} depends on {needed}");
        }
        for volume in services[name]["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let named = volume.as_str().and_then(|v| v.split(':').next());
            let named = named.expect("volume mounts are NAME:PATH");
            assert!(
                compose["volumes"].get(named).is_some(),
                "{name} mounts the declared volume {named}"
            );
        }
    }
    assert_eq!(services["ingest"]["build"].as_str(), Some("."));
    // Prometheus' token is made by the command the tests make theirs with.
    let token = services["prometheus-token"]["command"][0]
        .as_str()
        .expect("the token service runs a shell line");
    assert!(
        token.contains("tidemark token create --role analyst")
            && token.contains("--data-dir /serving"),
        "{token}"
    );
    assert!(services["prometheus-token"]["volumes"]
        .as_sequence()
        .expect("volumes")
        .contains(&Value::from("serving:/serving")));
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile"))
            .expect("a Dockerfile");
    // The image installs and builds the dashboard as the scripts do.
    assert!(
        dockerfile.contains("scripts/setup.sh --web-only"),
        "{dockerfile}"
    );
    assert!(!dockerfile.contains("npm ci"), "{dockerfile}");
}

/// The bind mounts of a service: (file or folder of the repository, path in
/// the container).
fn binds(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .filter(|v| v.starts_with("./"))
        .map(|v| {
            let mut parts = v.split(':');
            let host = parts.next().unwrap_or_default().to_string();
            (host, parts.next().unwrap_or_default().to_string())
        })
        .collect()
}

#[test]
fn compose_monitoring_mounts_the_files_the_tests_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("docker-compose.yml")).expect("compose file");
    let compose: Value = serde_yaml::from_str(&text).expect("docker-compose.yml is YAML");
    let services = &compose["services"];
    // What tests/tests/alerting.rs, tests/tests/dashboards.rs and
    // scripts/check-alerting.sh read, by service.
    let expected: [(&str, &[(&str, &str)]); 4] = [
        (
            "prometheus",
            &[("./dashboards/prometheus", "/etc/prometheus")],
        ),
        (
            "alertmanager",
            &[(
                "./dashboards/prometheus/alertmanager.yml",
                "/etc/alertmanager/alertmanager.yml",
            )],
        ),
        (
            "alert-receiver",
            &[(
                "./dashboards/prometheus/alert-receiver.py",
                "/receiver/alert-receiver.py",
            )],
        ),
        (
            "grafana",
            &[
                (
                    "./dashboards/grafana/provisioning",
                    "/etc/grafana/provisioning",
                ),
                (
                    "./dashboards/grafana/dashboards",
                    "/var/lib/grafana/dashboards",
                ),
            ],
        ),
    ];
    for (name, mounts) in expected {
        let got = binds(&services[name]);
        for (host, container) in mounts {
            assert!(
                root.join(host).exists(),
                "{name} mounts {host}, which exists"
            );
            assert!(
                got.iter().any(|(h, c)| h == host && c == container),
                "{name} mounts {host} at {container}: {got:?}"
            );
        }
    }
    // The scrape config finds the token where the token service writes it.
    let prometheus = std::fs::read_to_string(root.join("dashboards/prometheus/prometheus.yml"))
        .expect("prometheus.yml");
    assert!(prometheus.contains("credentials_file: secrets/tidemark-token"));
    assert!(services["prometheus"]["volumes"]
        .as_sequence()
        .expect("volumes")
        .contains(&Value::from(
            "prometheus-secrets:/etc/prometheus/secrets:ro"
        )));
    // The receiver runs with the flags the alert test gives it.
    let receiver: Vec<&str> = services["alert-receiver"]["command"]
        .as_sequence()
        .expect("a command list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(receiver[..2], ["python3", "/receiver/alert-receiver.py"]);
    assert_eq!(flags(receiver), BTreeSet::from(["--listen"]));
    // Grafana keeps its admin behind a password and lets no one in anonymously.
    let grafana = &services["grafana"]["environment"];
    assert!(grafana["GF_SECURITY_ADMIN_PASSWORD"]
        .as_str()
        .is_some_and(|v| v.contains("GRAFANA_ADMIN_PASSWORD:?")));
    assert_eq!(grafana["GF_AUTH_ANONYMOUS_ENABLED"].as_str(), Some("false"));
}
