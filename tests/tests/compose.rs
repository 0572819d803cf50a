//! `docker-compose.yml` cannot be run here (no container engine), so it is
//! kept correct by construction: parsed as YAML, its tidemark services must
//! run the subcommands and flags the end-to-end tests run natively
//! (`tests/tests/services.rs`), plus what a container needs on top.

use std::collections::BTreeSet;
use std::path::Path;

use serde_yaml::Value;
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
    assert!(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../Dockerfile")
        .is_file());
}
