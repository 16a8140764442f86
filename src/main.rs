//! The `tollgate` command line: `serve`, `keys`, `config check`, `events tail`.
//! Everything it does is in the library; this file only parses arguments,
//! sets up logging and maps failures to exit codes (2 = bad configuration).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tollgate::config::{self, Config, ConfigError};
use tollgate::store::{Store, StoreError};

/// mimalloc instead of glibc's malloc: the gateway frees on one thread what
/// another allocated (request bodies, events, hyper buffers), and glibc then
/// takes the owning arena's lock; under load its workers slept on that lock
/// (BENCHMARKS.md, proxy overhead, 2026-12-02).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An AI gateway with a live event stream"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file; defaults to ./tollgate.toml if present, else built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Create, list and revoke API keys in the gateway's database.
    Keys {
        /// Configuration file naming the database (as for `serve`).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Watch the gateway's live event stream.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Print events as they happen, one line each; reconnects and resumes by itself.
    Tail {
        /// The stream, or the gateway's base URL (ws://, wss://, http://, https://).
        #[arg(long, default_value = tollgate::tail::DEFAULT_URL)]
        url: String,
        /// API key, sent as `Authorization: Bearer`.
        #[arg(long, env = "TOLLGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Only these topics (comma list): audit, usage, budget, circuit_breaker, system.
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
        /// Only these event types (comma list), such as usage.recorded.
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
        /// Replay the events the gateway still keeps after this id first.
        #[arg(long, value_name = "ID")]
        since: Option<String>,
        /// Print each event's JSON envelope as received.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key; the key is printed alone on the last line of stdout.
    Create {
        #[arg(long)]
        name: String,
        /// May use the admin API and see every key's events.
        #[arg(long)]
        admin: bool,
        /// Lifetime such as 30d, 12h or 90m; no expiry when omitted.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
        /// The key's own budget in USD per --budget-period; requests get 402 once it is spent.
        #[arg(long, value_name = "USD")]
        budget_usd: Option<f64>,
        /// daily, weekly, monthly or total.
        #[arg(
            long,
            value_name = "PERIOD",
            default_value = "monthly",
            requires = "budget_usd"
        )]
        budget_period: String,
        /// The user (OIDC subject) the key belongs to; they see its events in the console.
        #[arg(long, value_name = "SUBJECT")]
        owner: Option<String>,
    },
    /// List keys (never the keys themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or display prefix.
    Revoke {
        #[arg(value_name = "ID_OR_PREFIX")]
        key: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a file and print the effective configuration, secrets masked.
    Check { file: PathBuf },
}

/// A failure and the exit code it deserves.
enum Failure {
    Config(ConfigError),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Other(e.into())
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, matches!(cli.command, Command::Serve { .. }));
    // `serve` reads its configuration before the runtime starts: it says
    // how the request threads are scheduled.
    let (command, slice_us) = match cli.command {
        Command::Serve { config } => match load_config(config.as_deref()) {
            Ok((config, path)) => {
                let slice_us = config.server.request_thread_slice_us;
                (Run::Serve(Box::new(config), path), slice_us)
            }
            Err(failure) => return exit_code(Err(failure)),
        },
        command => (Run::Other(command), 0),
    };
    let runtime = match tollgate::sched::request_runtime(slice_us) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    exit_code(runtime.block_on(async {
        match command {
            Run::Serve(config, path) => serve(*config, path).await,
            Run::Other(command) => run(command).await,
        }
    }))
}

/// A command ready to run: `serve` with its configuration already loaded.
enum Run {
    Serve(Box<Config>, Option<PathBuf>),
    Other(Command),
}

fn exit_code(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        // `main` loads serve's configuration before the runtime exists
        // and runs it as `Run::Serve`.
        Command::Serve { .. } => unreachable!("serve is run with its configuration loaded"),
        Command::Keys { config, command } => keys(config.as_deref(), command).await,
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let config = config::load(Some(&file))?;
            print!("{}", config.to_masked_toml());
            eprintln!("{}: configuration is valid", file.display());
            Ok(())
        }
        Command::Events {
            command:
                EventsCommand::Tail {
                    url,
                    token,
                    topics,
                    types,
                    since,
                    json,
                },
        } => {
            let options = tollgate::tail::TailOptions {
                token,
                topics,
                types,
                since,
                json,
                ..tollgate::tail::TailOptions::new(url)
            };
            events_tail(options).await
        }
    }
}

/// `events tail`: every failure is exit code 1.
async fn events_tail(options: tollgate::tail::TailOptions) -> Result<(), Failure> {
    tollgate::tail::run(options, std::io::stdout(), std::io::stderr())
        .await
        .map_err(|e| Failure::Other(e.into()))
}

fn load_config(explicit: Option<&Path>) -> Result<(Config, Option<PathBuf>), Failure> {
    let path = config::resolve_path(explicit);
    let config = config::load(path.as_deref())?;
    Ok((config, path))
}

async fn serve(config: Config, path: Option<PathBuf>) -> Result<(), Failure> {
    match &path {
        Some(path) => tracing::info!(file = %path.display(), "configuration loaded"),
        None => tracing::info!("no configuration file; using built-in defaults"),
    }
    let server = tollgate::server::Server::bind(config, path).await?;
    if let Some(key) = &server.bootstrap_key {
        eprintln!(
            "\n  The database had no API keys, so an admin key named `bootstrap` was created.\n  It is shown this once and cannot be recovered; store it now:\n\n      {}\n",
            key.expose()
        );
    }
    server.run(tollgate::server::shutdown_signal()).await?;
    Ok(())
}

async fn keys(explicit: Option<&Path>, command: KeysCommand) -> Result<(), Failure> {
    let (config, _) = load_config(explicit)?;
    let store = Store::connect(&config.database.url).await?;
    let result = keys_command(&store, command).await;
    store.close().await;
    result
}

async fn keys_command(store: &Store, command: KeysCommand) -> Result<(), Failure> {
    match command {
        KeysCommand::Create {
            name,
            admin,
            expires_in,
            budget_usd,
            budget_period,
            owner,
        } => {
            let name = tollgate::auth::validate_key_name(&name).map_err(anyhow::Error::msg)?;
            let expires_at = expires_in
                .as_deref()
                .map(tollgate::auth::expiry_after)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let budget = budget_usd
                .map(|usd| tollgate::auth::key_budget(usd, &budget_period))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let spec = tollgate::auth::KeySpec {
                name: name.to_owned(),
                admin,
                expires_at,
                budget,
                owner: owner
                    .as_deref()
                    .map(tollgate::auth::validate_owner)
                    .transpose()
                    .map_err(anyhow::Error::msg)?
                    .map(str::to_owned),
            };
            let (record, secret) = tollgate::auth::issue_key(store, spec).await?;
            store
                .record_admin_action("cli", "key.created", &record.id.to_string(), false)
                .await?;
            println!(
                "created {} key `{}` (id {}, prefix {}){}",
                if record.admin { "admin" } else { "API" },
                record.name,
                record.id,
                record.prefix,
                record
                    .expires_at
                    .map(|at| format!(", expires {}", at.to_rfc3339()))
                    .unwrap_or_default()
            );
            println!("store it now: it cannot be shown again.");
            println!("{}", secret.expose());
        }
        KeysCommand::List { json } => {
            let keys = store.list_api_keys().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&keys).map_err(anyhow::Error::from)?
                );
            } else {
                println!(
                    "{:<36}  {:<14}  {:<5}  {:<8}  {:<20}  {:<16}  NAME",
                    "ID", "PREFIX", "ADMIN", "STATE", "CREATED", "OWNER"
                );
                let now = chrono::Utc::now();
                for key in keys {
                    let state = if key.is_revoked() {
                        "revoked"
                    } else if key.is_expired(now) {
                        "expired"
                    } else {
                        "active"
                    };
                    println!(
                        "{:<36}  {:<14}  {:<5}  {:<8}  {:<20}  {:<16}  {}",
                        key.id,
                        key.prefix,
                        if key.admin { "yes" } else { "no" },
                        state,
                        key.created_at.format("%Y-%m-%d %H:%M:%S"),
                        key.owner.as_deref().unwrap_or("-"),
                        key.name
                    );
                }
            }
        }
        KeysCommand::Revoke { key } => {
            let found = store.find_api_key_by_id_or_prefix(&key).await?;
            let record = store.revoke_api_key(found.id).await?;
            store
                .record_admin_action("cli", "key.revoked", &record.id.to_string(), false)
                .await?;
            println!(
                "revoked key `{}` (id {}, prefix {})",
                record.name, record.id, record.prefix
            );
        }
    }
    Ok(())
}
