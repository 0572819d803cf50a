//! Command-line interface: every flag also reads a `TIDEMARK_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::args::{shutdown_token, InfluxArgs, RateLimitArgs};
use crate::promote::{self, PromoteArgs};
use tidemark_bench::{self as bench, BenchArgs};
use tidemark_generator::{self as generator, GeneratorConfig, PostTarget};
use tidemark_replay::cli::{self as replay_cmd, ArchiveArgs, ReplayArgs};
use tidemark_standalone::{self as app, RunConfig};
use tidemark_ws_server::credentials::{
    self as access, AccessArgs, AuditCommand, TokenCommand, UserCommand,
};

/// tidemark: real-time analytics for a social network.
#[derive(Debug, Parser)]
#[command(name = "tidemark", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every stage in one process on the embedded log and store.
    Run(RunCommandArgs),
    /// `run` plus a built-in traffic generator; prints the dashboard URL.
    Demo(DemoArgs),
    /// Posts generated social-network traffic to an ingest endpoint.
    Generate(GenerateArgs),
    /// Measures a stage and prints one JSON line.
    Bench(BenchArgs),
    /// Scale-out: HTTP collector appending to Kafka.
    #[cfg(feature = "kafka")]
    Ingest(tidemark_services::ingest::IngestArgs),
    /// Scale-out: processor from Kafka into InfluxDB and the updates topic.
    #[cfg(feature = "kafka")]
    Process(tidemark_services::process::ProcessArgs),
    /// Scale-out: REST, WebSocket and dashboard from InfluxDB and the updates topic.
    #[cfg(feature = "kafka")]
    Serve(tidemark_services::serve::ServeArgs),
    /// Rebuilds a time range from the retained log through the same processor.
    Replay(ReplayArgs),
    /// Switches the serving layer to a database (a replay's target), or back.
    Promote(PromoteArgs),
    /// Writes log records older than a time to zstd archive files replay can read.
    Archive(ArchiveArgs),
    /// Users of the API and the dashboard (the users file).
    #[command(subcommand)]
    User(UserCommand),
    /// Service tokens: long-lived API keys with a role, for Grafana and scripts.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// Flags shared by `run` and `demo`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Folder for the embedded log, store and checkpoints.
    #[arg(long, env = "TIDEMARK_DATA_DIR", default_value = "tidemark-data")]
    pub data_dir: PathBuf,
    /// Address of the one HTTP listener (ingest, API, WebSocket, dashboard, /metrics).
    #[arg(long, env = "TIDEMARK_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// API key accepted by ingest (repeatable).
    #[arg(long = "api-key", env = "TIDEMARK_API_KEYS", value_delimiter = ',')]
    pub api_keys: Vec<String>,
    /// Foreign origin whose web pages may post events, e.g.
    /// `https://app.example.com` (repeatable; `*` for any). The collector's
    /// own origin always may.
    #[arg(
        long = "cors-origin",
        env = "TIDEMARK_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    #[command(flatten)]
    pub influx: InfluxArgs,
    /// Folder of the built web dashboard.
    #[arg(long, env = "TIDEMARK_WEB_DIR", default_value = "dashboards/web/dist")]
    pub web_dir: PathBuf,
    /// Stage-1 processor threads (each owns a share of the partitions); a
    /// checkpoint restores only into the same count.
    #[arg(long, env = "TIDEMARK_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// How often open windows' early results go to live clients (the
    /// store gets final windows only): shorter moves dashboards sooner and
    /// costs the combiner more work. 50 ms keeps event-to-screen p99 under
    /// 250 ms at 20,000 events/s (`tidemark bench latency`).
    #[arg(long, env = "TIDEMARK_EARLY_INTERVAL", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub early_interval: std::time::Duration,
    #[command(flatten)]
    pub access: AccessArgs,
    #[command(flatten)]
    pub rate_limit: RateLimitArgs,
    #[command(flatten)]
    pub alerts: tidemark_ws_server::alerting::AlertArgs,
}

#[derive(Debug, Args)]
pub struct RunCommandArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub tls: tidemark_ws_server::tls::TlsArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Generated events per second.
    #[arg(long, env = "TIDEMARK_DEMO_RATE", default_value_t = 5_000)]
    pub rate: u64,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Events per second.
    #[arg(long, env = "TIDEMARK_GENERATE_RATE", default_value_t = 5_000)]
    pub rate: u64,
    /// Base URL of ingest.
    #[arg(
        long,
        env = "TIDEMARK_GENERATE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// API key for ingest.
    #[arg(long, env = "TIDEMARK_GENERATE_KEY")]
    pub key: String,
    /// Stop after this many events.
    #[arg(long)]
    pub events: Option<u64>,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run_config(args: RunArgs, fallback_key: impl FnOnce() -> String) -> anyhow::Result<RunConfig> {
    let rate_limit = args.rate_limit.limit().map_err(anyhow::Error::msg)?;
    let store = args.influx.target(&args.data_dir);
    let keys = args.access.encryption.keys()?;
    let mut api_keys: Vec<String> = args
        .api_keys
        .into_iter()
        .filter(|k| !k.is_empty())
        .collect();
    if api_keys.is_empty() {
        api_keys.push(fallback_key());
    }
    Ok(RunConfig {
        data_dir: args.data_dir,
        api_keys,
        cors_origins: args.cors_origins,
        rate_limit,
        store,
        web_dir: Some(args.web_dir),
        workers: args.workers,
        early_interval: args.early_interval,
        access: args.access,
        keys,
        alerts: args.alerts,
    })
}

/// The admin `tidemark demo` makes (with a new password at every start).
pub const DEMO_USER: &str = "demo";

/// A random key for a run started without one, printed once so clients can use it.
fn random_key() -> String {
    use rand::Rng as _;
    let bytes: [u8; 16] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(RunCommandArgs { run: args, tls }) => {
            let listen = args.listen;
            let config = run_config(args, || {
                let key = random_key();
                println!("No --api-key given; ingest accepts this generated key: {key}");
                key
            })?;
            let listener = tls.listener(tokio::net::TcpListener::bind(listen).await?)?;
            println!("tidemark is running: dashboard {}/", listener.url()?);
            let users = config.access.users_file(&config.data_dir);
            let nobody = tidemark_ws_server::auth::UsersFile::new(&users)
                .current()
                .map(|u| u.users.is_empty())
                .unwrap_or(false);
            if nobody {
                println!(
                    "No users yet: add one with `tidemark user add NAME --role admin --users-file {}`",
                    users.display()
                );
            }
            app::run(config, listener, shutdown_token()).await
        }
        Command::Demo(args) => {
            let config = run_config(args.run.clone(), random_key)?;
            let listener = tokio::net::TcpListener::bind(args.run.listen).await?;
            let addr = listener.local_addr()?;
            let password = access::random_password();
            tidemark_ws_server::auth::UsersFile::new(config.access.users_file(&config.data_dir))
                .put_user(DEMO_USER, tidemark_ws_server::Role::Admin, &password)?;
            println!("tidemark demo: open the dashboard at http://{addr}/");
            println!("Log in as {DEMO_USER} with password {password} (an admin)");
            println!(
                "Generating {} events/s through http://{addr}/v1/events",
                args.rate
            );
            let cancel = shutdown_token();
            let target = PostTarget {
                url: format!("http://{addr}"),
                api_key: config.api_keys[0].clone(),
                rate: args.rate,
                batch: 100,
                limit: None,
            };
            let generator_cancel = cancel.clone();
            let generator = tokio::spawn(async move {
                if let Err(error) =
                    generator::post_events(target, GeneratorConfig::default(), generator_cancel)
                        .await
                {
                    tracing::error!(error = %error, "Traffic generator stopped");
                }
            });
            let result = app::run(config, listener, cancel).await;
            generator.abort();
            result
        }
        Command::Generate(args) => {
            let target = PostTarget {
                url: args.url,
                api_key: args.key,
                rate: args.rate,
                batch: args.batch,
                limit: args.events,
            };
            let config = GeneratorConfig {
                seed: args.seed,
                ..GeneratorConfig::default()
            };
            let sent = generator::post_events(target, config, shutdown_token()).await?;
            println!("{{\"events\":{sent}}}");
            Ok(())
        }
        Command::Bench(args) => {
            #[cfg(feature = "kafka")]
            let kafka: Option<bench::KafkaLogOpener> = Some(tidemark_services::bench_log);
            #[cfg(not(feature = "kafka"))]
            let kafka = None;
            bench::run(args, kafka).await
        }
        #[cfg(feature = "kafka")]
        Command::Ingest(args) => tidemark_services::ingest::main(args, shutdown_token()).await,
        #[cfg(feature = "kafka")]
        Command::Process(args) => tidemark_services::process::main(args, shutdown_token()).await,
        #[cfg(feature = "kafka")]
        Command::Serve(args) => tidemark_services::serve::main(args, shutdown_token()).await,
        Command::Replay(args) => replay_cmd::run(args, shutdown_token).await,
        Command::Promote(args) => promote::run(args).await,
        Command::Archive(args) => replay_cmd::archive(args).await,
        Command::User(command) => access::user(command),
        Command::Token(command) => access::token(command),
        Command::Audit(command) => access::audit(command),
    }
}
