//! The `trellis` command. Thin on purpose: it parses flags, builds settings and calls the
//! libraries; everything it runs can also be started inside a test.

mod client;
mod demo;
mod deploy;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use trellis_admin::{Node, Settings};

/// mimalloc in place of glibc's allocator. A node's request path allocates and frees many
/// small blocks of a few sizes; glibc serves the sizes a request has not used lately from
/// its shared bins, sorting and merging free chunks as it goes (`_int_malloc`,
/// `malloc_consolidate`), which made a traced request at sampling 0.1 cost more than one at
/// 1.0 (see the README's performance section). mimalloc keeps a free list per size class
/// and page, with no merging on the way. Built without transparent huge pages
/// (`no_thp`): with them an idle node held 35 MB resident instead of 28 MB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Trellis: microservices that find each other, talk safely, stay consistent and ship.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: the admin API over the registry, configuration, health and metrics, and
    /// the gateway when the settings have a [gateway] table.
    Up(UpArgs),
    /// Run the API gateway alone (the settings file must have a [gateway] table).
    Gateway(GatewayArgs),
    /// Registered services.
    Services {
        #[command(subcommand)]
        command: ServicesCommand,
    },
    /// Service configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Sagas: list, inspect, retry or abort (through the admin API).
    Sagas {
        #[command(subcommand)]
        command: SagasCommand,
    },
    /// Publish and consume events.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Service-mesh resources.
    Mesh {
        #[command(subcommand)]
        command: MeshCommand,
    },
    /// Deploy a service on local, kubernetes, docker or ecs; `deploy blue-green` switches
    /// versions on the local platform.
    Deploy(Box<deploy::DeployArgs>),
    /// The seed's story end to end: a node, four example services on the local platform,
    /// every feature exercised and narrated; then the dashboard until Ctrl-C. `--check`
    /// runs it headless and exits non-zero when a step's expectation failed.
    Demo(Box<demo::DemoArgs>),
}

#[derive(Debug, Subcommand)]
enum MeshCommand {
    /// Print one policy as the provider's resources (YAML).
    Render {
        /// istio, linkerd or consul.
        #[arg(long)]
        provider: String,
        /// Service name.
        #[arg(long)]
        service: String,
        /// Policy file (TOML: [retry_policy], [circuit_breaker], [connection_pool]);
        /// defaults to the seed's policy.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
}

/// Which event bus and store.
#[derive(Debug, Args, Clone)]
struct BusArgs {
    /// `embedded` (the durable log inside the store) or `kafka://host:port,…`.
    #[arg(long, env = "TRELLIS_BUS", default_value = "embedded")]
    bus: String,
    /// Store URL (holds the embedded log) [default: sqlite://./trellis-data/trellis.db].
    #[arg(long, env = "TRELLIS_STORE", value_name = "URL")]
    store: Option<String>,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Publish one JSON event to TOPIC.
    Publish {
        /// Topic name.
        topic: String,
        /// The event: any JSON value.
        json: String,
        /// Ordering key: events with one key keep their order.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Consume TOPIC in a consumer group; one JSON envelope per line on stdout.
    Consume {
        /// Topic name.
        topic: String,
        /// Consumer group.
        #[arg(long)]
        group: String,
        /// Start at the oldest event when the group has no committed offset.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after N events.
        #[arg(long, value_name = "N")]
        max: Option<u64>,
        #[command(flatten)]
        bus: BusArgs,
    },
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Store URL [default: sqlite://./trellis-data/trellis.db].
    #[arg(long, env = "TRELLIS_STORE", value_name = "URL")]
    store: Option<String>,
    /// Admin server address [default: 127.0.0.1:9901].
    #[arg(long, env = "TRELLIS_ADMIN_LISTEN", value_name = "ADDR")]
    admin: Option<String>,
    /// Settings file (TOML).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Token the admin API requires (mandatory beyond loopback).
    #[arg(
        long,
        env = "TRELLIS_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
}

#[derive(Debug, Args)]
struct GatewayArgs {
    /// Settings file (TOML) with a [gateway] table.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Store URL holding the registry [default: the settings' or sqlite://./trellis-data/trellis.db].
    #[arg(long, env = "TRELLIS_STORE", value_name = "URL")]
    store: Option<String>,
}

/// Where a running admin server is.
#[derive(Debug, Args, Clone)]
struct Remote {
    /// Admin server: `HOST:PORT` or an `http://` URL.
    #[arg(
        long,
        env = "TRELLIS_ADMIN",
        default_value = "127.0.0.1:9901",
        global = true
    )]
    admin: String,
    /// Token for an admin server that requires one.
    #[arg(
        long,
        env = "TRELLIS_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    admin_token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ServicesCommand {
    /// List services with their instance counts.
    Ls {
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum SagasCommand {
    /// List sagas, newest first (one page; filter by state to page further).
    Ls {
        /// running, compensating, completed, compensated, needs_attention or aborted.
        #[arg(long)]
        state: Option<String>,
        /// Most sagas to list.
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        remote: Remote,
    },
    /// One saga with its step history, timings and errors.
    Show {
        /// Saga id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Ask the orchestrator owning a saga in needs_attention to try its compensations again.
    Retry {
        /// Saga id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Give up on a saga in needs_attention: nothing more is attempted.
    Abort {
        /// Saga id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the current configuration of a service.
    Get {
        /// Service name.
        service: String,
        /// Environment [default: the server's].
        #[arg(long)]
        env: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Store a new configuration version (a JSON object).
    Set {
        /// Service name.
        service: String,
        /// The JSON document; omit it to use --file.
        json: Option<String>,
        /// Read the JSON document from a file.
        #[arg(long, conflicts_with = "json")]
        file: Option<PathBuf>,
        /// Environment [default: the server's].
        #[arg(long)]
        env: Option<String>,
        /// Fail with a conflict unless the current version is this one.
        #[arg(long)]
        expected_version: Option<u64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print every stored version.
    History {
        /// Service name.
        service: String,
        /// Environment [default: the server's].
        #[arg(long)]
        env: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Restore an old version as a new one.
    Rollback {
        /// Service name.
        service: String,
        /// The version to restore.
        #[arg(value_name = "VERSION")]
        target: u64,
        /// Environment [default: the server's].
        #[arg(long)]
        env: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let command = match cli.command {
        // Bad input to `trellis deploy` exits with code 2: it returns its own exit code.
        Command::Deploy(args) => return runtime.block_on(deploy::run(*args)),
        // The demo's exit code says whether every step held (and 2 for bad input).
        Command::Demo(args) => return runtime.block_on(demo::run(*args)),
        command => command,
    };
    let result = runtime.block_on(run(Cli { command }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Up(args) => up(args).await,
        Command::Gateway(args) => gateway(args).await,
        Command::Services {
            command: ServicesCommand::Ls { remote },
        } => {
            client::Client::new(&remote.admin, remote.admin_token)?
                .services_ls()
                .await
        }
        Command::Config { command } => config(command).await,
        Command::Sagas { command } => sagas(command).await,
        Command::Events { command } => events(command).await,
        Command::Mesh {
            command:
                MeshCommand::Render {
                    provider,
                    service,
                    policy,
                },
        } => mesh_render(&provider, &service, policy.as_deref()),
        // main() runs it with its own exit codes; this is the same without them.
        Command::Deploy(args) => deploy::run_result(*args).await,
        Command::Demo(args) => {
            if demo::run(*args).await == ExitCode::SUCCESS {
                Ok(())
            } else {
                Err("trellis demo: a step failed".into())
            }
        }
    }
}

async fn sagas(command: SagasCommand) -> Result<(), String> {
    use trellis_saga::cli::{SagaAdminClient, format_action, format_list, format_saga};
    let connect = |remote: Remote| {
        SagaAdminClient::new(&remote.admin, remote.admin_token).map_err(|e| e.to_string())
    };
    let text = match command {
        SagasCommand::Ls {
            state,
            limit,
            remote,
        } => format_list(
            &connect(remote)?
                .list(state.as_deref(), limit)
                .await
                .map_err(|e| e.to_string())?,
        ),
        SagasCommand::Show { id, remote } => format_saga(
            &connect(remote)?
                .show(&id)
                .await
                .map_err(|e| e.to_string())?,
        ),
        SagasCommand::Retry { id, remote } => format_action(
            &connect(remote)?
                .retry(&id)
                .await
                .map_err(|e| e.to_string())?,
        ),
        SagasCommand::Abort { id, remote } => format_action(
            &connect(remote)?
                .abort(&id)
                .await
                .map_err(|e| e.to_string())?,
        ),
    };
    println!("{}", text.trim_end());
    Ok(())
}

async fn up(args: UpArgs) -> Result<(), String> {
    let mut settings = match &args.config {
        Some(path) => Settings::load(path).map_err(|e| e.to_string())?,
        None => Settings::default(),
    };
    if let Some(store) = args.store {
        settings.store.url = store;
    }
    if let Some(admin) = args.admin {
        settings.admin.listen = admin;
    }
    if let Some(token) = args.admin_token {
        settings.admin.token = Some(token);
    }
    let telemetry = init_telemetry(&settings)?;
    let node = match &telemetry {
        Some((guard, buffer)) => {
            Node::start_with_tracer(settings, guard.tracer().clone(), buffer.clone()).await
        }
        None => Node::start(settings).await,
    }
    .map_err(|e| e.to_string())?;
    // One line on stdout, for people and for scripts that wait for it.
    match node.gateway_addr() {
        Some(gateway) => println!(
            "trellis up: admin API on http://{}, gateway on http://{gateway}",
            node.admin_addr()
        ),
        None => println!("trellis up: admin API on http://{}", node.admin_addr()),
    }
    shutdown_signal().await;
    node.shutdown().await.map_err(|e| e.to_string())
}

async fn gateway(args: GatewayArgs) -> Result<(), String> {
    let mut settings = Settings::load(&args.config).map_err(|e| e.to_string())?;
    if let Some(store) = args.store {
        settings.store.url = store;
    }
    let telemetry = init_telemetry(&settings)?;
    let node = match &telemetry {
        Some((guard, _)) => {
            trellis_admin::GatewayNode::start_with_tracer(settings, guard.tracer().clone()).await
        }
        None => trellis_admin::GatewayNode::start(settings).await,
    }
    .map_err(|e| e.to_string())?;
    println!("trellis gateway: on http://{}", node.local_addr());
    shutdown_signal().await;
    node.shutdown().await.map_err(|e| e.to_string())
}

/// Logging plus tracing as `[tracing]` (and `OTEL_*`) say: when enabled, the global
/// subscriber also turns plain `tracing` spans into exported spans, and the returned guard
/// (which flushes on drop) holds the tracer the node uses; otherwise plain logging.
fn init_telemetry(
    settings: &Settings,
) -> Result<
    Option<(
        trellis_tracing::TracingGuard,
        Option<trellis_tracing::TraceBuffer>,
    )>,
    String,
> {
    let config = settings.tracing_config().map_err(|e| e.to_string())?;
    if !config.enabled {
        init_logging();
        return Ok(None);
    }
    let buffer = Some(trellis_tracing::TraceBuffer::new(config.buffer_spans));
    let guard = trellis_tracing::install(&config, buffer.clone()).map_err(|e| e.to_string())?;
    Ok(Some((guard, buffer)))
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn mesh_render(
    provider: &str,
    service: &str,
    policy: Option<&std::path::Path>,
) -> Result<(), String> {
    let provider: trellis_mesh::MeshProvider =
        provider.parse().map_err(|e| format!("--provider: {e}"))?;
    let policy = match policy {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            trellis_mesh::MeshPolicy::from_toml(&text)
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => trellis_mesh::MeshPolicy::default(),
    };
    let yaml = trellis_mesh::render(provider, service, &policy).map_err(|e| e.to_string())?;
    print!("{yaml}");
    Ok(())
}

async fn open_bus(args: &BusArgs) -> Result<trellis_events::EventBus, String> {
    let url = args
        .store
        .clone()
        .unwrap_or_else(|| trellis_admin::DEFAULT_STORE_URL.to_owned());
    let store = trellis_store::Store::open(&url)
        .await
        .map_err(|e| e.to_string())?;
    trellis_events::EventBus::from_url(&args.bus, &store)
        .await
        .map_err(|e| e.to_string())
}

async fn events(command: EventsCommand) -> Result<(), String> {
    match command {
        EventsCommand::Publish {
            topic,
            json,
            key,
            bus,
        } => {
            let bus = open_bus(&bus).await?;
            let published = trellis_events::cli::publish_json(&bus, &topic, &json, key.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::json!({
                    "id": published.id.to_string(),
                    "topic": published.topic,
                    "partition": published.partition,
                    "offset": published.offset,
                })
            );
            Ok(())
        }
        EventsCommand::Consume {
            topic,
            group,
            from_beginning,
            max,
            bus,
        } => {
            let bus = open_bus(&bus).await?;
            let stop = trellis_events::StopSignal::new();
            let on_signal = stop.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                on_signal.stop();
            });
            let options = trellis_events::cli::ConsumeOptions::new(group)
                .from_beginning(from_beginning)
                .max(max)
                .stop(stop);
            trellis_events::cli::consume_json(&bus, &topic, options, std::io::stdout())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

async fn config(command: ConfigCommand) -> Result<(), String> {
    match command {
        ConfigCommand::Get {
            service,
            env,
            remote,
        } => {
            client::Client::new(&remote.admin, remote.admin_token)?
                .config_get(&service, env.as_deref())
                .await
        }
        ConfigCommand::Set {
            service,
            json,
            file,
            env,
            expected_version,
            remote,
        } => {
            let text = match (json, file) {
                (Some(json), None) => json,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?,
                _ => return Err("give the JSON document as an argument or with --file".into()),
            };
            let document: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("the configuration is not valid JSON: {e}"))?;
            client::Client::new(&remote.admin, remote.admin_token)?
                .config_set(&service, env.as_deref(), expected_version, &document)
                .await
        }
        ConfigCommand::History {
            service,
            env,
            remote,
        } => {
            client::Client::new(&remote.admin, remote.admin_token)?
                .config_history(&service, env.as_deref())
                .await
        }
        ConfigCommand::Rollback {
            service,
            target,
            env,
            remote,
        } => {
            client::Client::new(&remote.admin, remote.admin_token)?
                .config_rollback(&service, env.as_deref(), target)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
