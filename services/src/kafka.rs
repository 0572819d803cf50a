//! What the services share about Kafka: connection flags (passed through to
//! librdkafka), topic provisioning and the broker metric.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use prometheus::{IntGauge, Registry};
use tidemark_log::kafka::rdkafka::ClientConfig;
use tidemark_log::kafka::{KafkaConfig, KafkaLog};
use tidemark_log::Log;
use tidemark_model::topic;
use tokio_util::sync::CancellationToken;

use super::topics::{PARTIALS_TOPIC, PROCESSOR_LEASE_TOPIC, UPDATES_TOPIC};

pub const BROKER_UP: &str = "tidemark_kafka_broker_up";

/// Connection to the Kafka cluster. Every librdkafka property can be set with
/// `--kafka-option`; the named TLS and SASL flags are shorthands for the
/// common ones.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    #[arg(long, env = "TIDEMARK_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Prefix of every client's `client.id` and of the consumer groups.
    #[arg(long, env = "TIDEMARK_KAFKA_CLIENT_ID", default_value = "tidemark")]
    pub kafka_client_id: String,
    /// A librdkafka property `KEY=VALUE` for every client (repeatable).
    #[arg(
        long = "kafka-option",
        env = "TIDEMARK_KAFKA_OPTIONS",
        value_delimiter = ',',
        value_parser = parse_key_value
    )]
    pub kafka_options: Vec<(String, String)>,
    /// `security.protocol`: plaintext, ssl, sasl_plaintext or sasl_ssl.
    #[arg(long, env = "TIDEMARK_KAFKA_SECURITY_PROTOCOL")]
    pub kafka_security_protocol: Option<String>,
    /// `ssl.ca.location`: CA certificate(s) to verify the brokers.
    #[arg(long, env = "TIDEMARK_KAFKA_SSL_CA_LOCATION")]
    pub kafka_ssl_ca_location: Option<String>,
    /// `ssl.certificate.location`: client certificate (mutual TLS).
    #[arg(long, env = "TIDEMARK_KAFKA_SSL_CERTIFICATE_LOCATION")]
    pub kafka_ssl_certificate_location: Option<String>,
    /// `ssl.key.location`: client private key (mutual TLS).
    #[arg(long, env = "TIDEMARK_KAFKA_SSL_KEY_LOCATION")]
    pub kafka_ssl_key_location: Option<String>,
    /// `ssl.key.password`.
    #[arg(long, env = "TIDEMARK_KAFKA_SSL_KEY_PASSWORD", hide_env_values = true)]
    pub kafka_ssl_key_password: Option<String>,
    /// `sasl.mechanism`: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, ...
    #[arg(long, env = "TIDEMARK_KAFKA_SASL_MECHANISM")]
    pub kafka_sasl_mechanism: Option<String>,
    /// `sasl.username`.
    #[arg(long, env = "TIDEMARK_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// `sasl.password`.
    #[arg(long, env = "TIDEMARK_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,
    /// How long an append may wait for the brokers to confirm it before it
    /// fails (ingest then answers 503).
    #[arg(long, env = "TIDEMARK_PRODUCE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub produce_timeout: Duration,
    #[command(flatten)]
    pub topics: TopicArgs,
}

/// How topics are created when they do not exist (existing ones are left alone).
#[derive(Debug, Clone, Args)]
pub struct TopicArgs {
    /// Partitions of a topic, `TOPIC=N` (repeatable); defaults: user-events
    /// 32, content-events 32, ad-events 16, user-profiles 8, others 4.
    #[arg(
        long = "partitions",
        env = "TIDEMARK_PARTITIONS",
        value_delimiter = ',',
        value_parser = parse_partitions
    )]
    pub partitions: Vec<(String, u32)>,
    /// `retention.ms` of created topics (compacted ones excepted).
    #[arg(long, env = "TIDEMARK_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Replication factor of created topics (default: the brokers' default).
    #[arg(long, env = "TIDEMARK_REPLICATION_FACTOR")]
    pub replication_factor: Option<u16>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

fn parse_partitions(s: &str) -> Result<(String, u32), String> {
    let (topic, n) = parse_key_value(s)?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("expected TOPIC=N with a whole number, got `{s}`"))?;
    if n == 0 {
        return Err(format!("topic `{topic}` needs at least one partition"));
    }
    Ok((topic, n))
}

impl KafkaArgs {
    /// The librdkafka properties from the named flags, then `--kafka-option`s
    /// (which win).
    pub fn properties(&self) -> Vec<(String, String)> {
        let named = [
            ("security.protocol", &self.kafka_security_protocol),
            ("ssl.ca.location", &self.kafka_ssl_ca_location),
            (
                "ssl.certificate.location",
                &self.kafka_ssl_certificate_location,
            ),
            ("ssl.key.location", &self.kafka_ssl_key_location),
            ("ssl.key.password", &self.kafka_ssl_key_password),
            ("sasl.mechanism", &self.kafka_sasl_mechanism),
            ("sasl.username", &self.kafka_sasl_username),
            ("sasl.password", &self.kafka_sasl_password),
        ];
        named
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
            .chain(self.kafka_options.iter().cloned())
            .collect()
    }

    /// The log's configuration; `role` suffixes the client id.
    pub fn log_config(&self, role: &str) -> KafkaConfig {
        let mut c = KafkaConfig::new(&self.kafka_brokers);
        c.client_id = format!("{}-{role}", self.kafka_client_id);
        c.properties = self.properties();
        c.partitions = self.topics.partitions.iter().cloned().collect();
        c.retention = Some(self.topics.retention);
        c.replication_factor = self.topics.replication_factor;
        c.produce_timeout = self.produce_timeout;
        c
    }

    /// A librdkafka client configuration with the same brokers and
    /// properties, for clients the log does not provide (consumer groups).
    pub fn client_config(&self, role: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.kafka_brokers)
            .set("client.id", format!("{}-{role}", self.kafka_client_id));
        for (k, v) in self.properties() {
            c.set(k, v);
        }
        c
    }
}

/// Every topic tidemark uses: `(name, partitions, compacted)`.
pub fn all_topics(config: &KafkaConfig) -> Vec<(&'static str, u32, bool)> {
    let partitions = |t: &str| config.partitions_for(t);
    let mut topics: Vec<(&'static str, u32, bool)> = topic::INPUT_TOPICS
        .iter()
        .chain([&topic::DEAD_LETTER, &UPDATES_TOPIC, &PARTIALS_TOPIC])
        .map(|&t| (t, partitions(t), t == topic::USER_PROFILES))
        .collect();
    // One partition, whoever is configured: its owner is the active processor.
    topics.push((PROCESSOR_LEASE_TOPIC, 1, false));
    topics
}

/// Connects to the brokers, waiting (with backoff) while they are
/// unreachable, and provisions every topic. A broker that refuses a topic
/// (or a bad property) is an error naming the cause: retrying cannot fix it.
pub async fn connect_and_provision(
    args: &KafkaArgs,
    role: &str,
    tune: impl Fn(&mut KafkaConfig),
    cancel: &CancellationToken,
) -> anyhow::Result<Arc<KafkaLog>> {
    let mut config = args.log_config(role);
    tune(&mut config);
    let mut backoff = Duration::from_millis(200);
    let log = loop {
        match KafkaLog::connect(config.clone()).await {
            Ok(log) => break log,
            Err(e) if e.is_retryable() && !cancel.is_cancelled() => {
                tracing::warn!(error = %e, "Kafka not reachable yet; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => bail!("cancelled while waiting for Kafka"),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("cannot connect to Kafka"),
        }
    };
    let topics = all_topics(log.config());
    log.provision(&topics)
        .await
        .context("cannot provision the Kafka topics")?;
    tracing::info!(topics = topics.len(), "Kafka topics provisioned");
    Ok(Arc::new(log))
}

/// Whether the brokers answered the last probe; shared with health handlers.
#[derive(Debug, Clone)]
pub struct BrokerHealth {
    up: IntGauge,
}

impl BrokerHealth {
    pub fn new(registry: &Registry) -> anyhow::Result<BrokerHealth> {
        let up = IntGauge::new(
            BROKER_UP,
            "1 when the Kafka brokers answered the last probe (every 2 s), else 0.",
        )?;
        registry.register(Box::new(up.clone()))?;
        up.set(1);
        Ok(BrokerHealth { up })
    }

    pub fn is_up(&self) -> bool {
        self.up.get() == 1
    }

    /// Probes the brokers every 2 s (a watermark request on `topic`/0) until `cancel`.
    pub async fn monitor(self, log: Arc<dyn Log>, topic: &'static str, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let probe = tokio::time::timeout(Duration::from_secs(3), log.end_offset(topic, 0));
            let up = matches!(probe.await, Ok(Ok(_)));
            if up != self.is_up() {
                if up {
                    tracing::info!("Kafka brokers answer again");
                } else {
                    tracing::warn!("Kafka brokers do not answer");
                }
            }
            self.up.set(i64::from(up));
        }
    }
}
