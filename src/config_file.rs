//! The services' optional TOML file: `--config FILE` (or `TIDEMARK_CONFIG`).
//!
//! Its keys are the flags' environment variables without `TIDEMARK_`, in
//! lower case (`kafka_brokers`, `influx_url`, `api_keys`, ...). A value
//! becomes that variable unless it is already set, so a flag beats the
//! environment, which beats the file. Arrays are joined with commas; a
//! table becomes `KEY=VALUE` pairs (`[kafka_options]` for librdkafka
//! properties, `[partitions]` for partition counts).
//!
//! ```toml
//! kafka_brokers = "kafka-1:9092,kafka-2:9092"
//! influx_url = "http://influxdb:8086"
//! api_keys = ["key-1", "key-2"]
//! [kafka_options]
//! "security.protocol" = "ssl"
//! [partitions]
//! user-events = 64
//! ```

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context as _};
use clap::CommandFactory as _;
use toml_edit::{DocumentMut, Item, Value};

use crate::cli::Cli;

const ENV_PREFIX: &str = "TIDEMARK_";

/// Reads the file named by `--config` (or `TIDEMARK_CONFIG`) in `args`, if
/// any, and sets the environment variables it defines that are not set yet.
/// Call before parsing the command line and before any thread starts.
pub fn apply(args: &[OsString]) -> anyhow::Result<()> {
    let Some(subcommand) = args.get(1).and_then(|a| a.to_str()) else {
        return Ok(());
    };
    let Some(path) = config_path(args).or_else(|| std::env::var_os("TIDEMARK_CONFIG")) else {
        return Ok(());
    };
    let known = known_env(subcommand);
    if known.is_empty() {
        return Ok(());
    }
    for (name, value) in read(Path::new(&path), &known)? {
        if std::env::var_os(&name).is_none() {
            std::env::set_var(name, value);
        }
    }
    Ok(())
}

fn config_path(args: &[OsString]) -> Option<OsString> {
    let mut it = args.iter().skip(2);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().cloned();
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(OsString::from(v));
        }
    }
    None
}

/// The environment variables of `subcommand`'s flags (empty for a
/// subcommand that takes no config file).
fn known_env(subcommand: &str) -> Vec<String> {
    let cli = Cli::command();
    let Some(cmd) = cli.find_subcommand(subcommand) else {
        return Vec::new();
    };
    if !cmd.get_arguments().any(|a| a.get_id() == "config") {
        return Vec::new();
    }
    cmd.get_arguments()
        .filter_map(|a| a.get_env())
        .filter_map(|e| e.to_str().map(str::to_string))
        .collect()
}

/// The variables `path` defines, checked against `known`.
fn read(path: &Path, known: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    parse(&text, known).with_context(|| format!("in the config file {}", path.display()))
}

fn parse(text: &str, known: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let doc: DocumentMut = text.parse().context("not valid TOML")?;
    let mut out = Vec::new();
    for (key, item) in doc.iter() {
        let name = format!("{ENV_PREFIX}{}", key.to_uppercase().replace('-', "_"));
        if !known.contains(&name) {
            bail!(
                "unknown key `{key}`; keys are these environment variables without `{ENV_PREFIX}`, in lower case: {}",
                known.join(", ")
            );
        }
        let value = match item {
            Item::Value(v) => value_text(v).with_context(|| format!("key `{key}`"))?,
            Item::Table(t) => {
                let mut pairs = Vec::new();
                for (k, v) in t.iter() {
                    let v = v
                        .as_value()
                        .and_then(|v| value_text(v).ok())
                        .with_context(|| format!("key `{key}.{k}` is not a plain value"))?;
                    pairs.push(format!("{k}={v}"));
                }
                pairs.join(",")
            }
            _ => bail!("key `{key}` has no usable value"),
        };
        out.push((name, value));
    }
    Ok(out)
}

fn value_text(v: &Value) -> anyhow::Result<String> {
    Ok(match v {
        Value::String(s) => s.value().clone(),
        Value::Integer(i) => i.value().to_string(),
        Value::Float(f) => f.value().to_string(),
        Value::Boolean(b) => b.value().to_string(),
        Value::Array(a) => a
            .iter()
            .map(value_text)
            .collect::<anyhow::Result<Vec<_>>>()?
            .join(","),
        Value::InlineTable(t) => t
            .iter()
            .map(|(k, v)| value_text(v).map(|v| format!("{k}={v}")))
            .collect::<anyhow::Result<Vec<_>>>()?
            .join(","),
        Value::Datetime(_) => bail!("dates are not supported"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Vec<String> {
        known_env("process")
    }

    #[test]
    fn keys_become_the_flags_variables() {
        let vars = parse(
            r#"
kafka_brokers = "a:9092,b:9092"
workers = 4
api_keys = ["k1", "k2"]
kafka_options = { "socket.timeout.ms" = 5000 }
[partitions]
user-events = 64
"#,
            &known(),
        );
        // api_keys is not a flag of `process`.
        assert!(vars.unwrap_err().to_string().contains("api_keys"));
        let vars = parse(
            r#"
kafka_brokers = "a:9092,b:9092"
workers = 4
kafka_options = { "socket.timeout.ms" = 5000 }
[partitions]
user-events = 64
"#,
            &known(),
        )
        .unwrap();
        assert_eq!(
            vars,
            vec![
                ("TIDEMARK_KAFKA_BROKERS".into(), "a:9092,b:9092".into()),
                ("TIDEMARK_WORKERS".into(), "4".into()),
                (
                    "TIDEMARK_KAFKA_OPTIONS".into(),
                    "socket.timeout.ms=5000".into()
                ),
                ("TIDEMARK_PARTITIONS".into(), "user-events=64".into()),
            ]
        );
    }

    #[test]
    fn only_service_subcommands_take_a_file() {
        assert!(known_env("run").is_empty());
        assert!(known_env("ingest").contains(&"TIDEMARK_API_KEYS".to_string()));
        assert_eq!(
            config_path(&["tidemark".into(), "serve".into(), "--config=x.toml".into()]),
            Some("x.toml".into())
        );
    }
}
