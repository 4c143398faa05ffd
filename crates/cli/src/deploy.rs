//! `trellis deploy`: one service on one platform, and `trellis deploy blue-green` on the
//! local platform.
//!
//! Everything the user gave is checked before anything starts: flags, the spec file, the
//! spec for the platform, the version. Deployments through the deployer (local, and
//! blue-green) keep their record in the store given, where the admin node's
//! `GET /v1/deployments` reads it. Bad input prints `error: …` naming what was wrong
//! and exits with code 2 (as clap does for bad flags); failures while deploying exit 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use trellis_core::HumanDuration;
use trellis_deploy::{
    AnalysisOptions, BlueGreenOptions, Decision, DeployError, DeploySpec, DockerDeployer,
    DockerOptions, EcsOptions, ImageReference, KubernetesApplier, KubernetesOptions, Platform,
    PrometheusScrape, ReplicaStatus, ServiceDeployer,
};
use trellis_registry::{RegistryOptions, ServiceRegistry};

/// `trellis deploy`.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    disable_version_flag = true
)]
pub(crate) struct DeployArgs {
    #[command(subcommand)]
    command: Option<DeployCommand>,
    #[command(flatten)]
    one: DeployOne,
}

#[derive(Debug, Subcommand)]
enum DeployCommand {
    /// Run the current version on the local platform, start the new one beside it, split
    /// traffic, judge the new one from the gateway's metrics, then promote or roll back;
    /// every decision is printed with its figures. Stays in the foreground supervising
    /// what runs until Ctrl-C or SIGTERM.
    #[command(disable_version_flag = true)]
    BlueGreen(BlueGreenArgs),
}

/// Where the local platform registers instances.
#[derive(Debug, Args, Clone)]
struct StoreArgs {
    /// Store URL holding the registry [default: sqlite://./trellis-data/trellis.db, the
    /// node's].
    #[arg(long, env = "TRELLIS_STORE", value_name = "URL")]
    store: Option<String>,
    /// Data directory of a node: its store is sqlite://DIR/trellis.db.
    #[arg(long, value_name = "DIR", conflicts_with = "store")]
    data_dir: Option<PathBuf>,
}

impl StoreArgs {
    fn url(&self) -> String {
        match (&self.store, &self.data_dir) {
            (Some(url), _) => url.clone(),
            (None, Some(dir)) => format!("sqlite://{}/trellis.db", dir.display()),
            (None, None) => trellis_admin::DEFAULT_STORE_URL.to_owned(),
        }
    }
}

#[derive(Debug, Args)]
struct DeployOne {
    /// Service name.
    #[arg(required = true)]
    name: Option<String>,
    /// local, kubernetes, docker or ecs.
    #[arg(long, required = true, value_parser = parse_platform)]
    platform: Option<Platform>,
    /// Deploy spec (TOML mirroring the seed's deploy options).
    #[arg(long, required = true, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// Print what would be started or applied instead of doing it: the processes (local),
    /// the manifests as YAML (kubernetes), the Engine API calls as JSON (docker), the task
    /// and service definitions as JSON (ecs).
    #[arg(long)]
    dry_run: bool,
    /// Version deployed [default: the image's tag, else `unversioned`].
    #[arg(long, value_name = "V")]
    version: Option<String>,
    /// Image registry prefix (the seed's `registry`).
    #[arg(long)]
    registry: Option<String>,
    /// Namespace when the spec names none [default: default].
    #[arg(long)]
    namespace: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
    /// Kubernetes: the kubeconfig [default: $KUBECONFIG, else ~/.kube/config].
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes: how long to wait for the rollout; docker: for healthy containers.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    /// Docker: the Engine API's unix socket (Docker or podman).
    #[arg(
        long,
        env = "TRELLIS_DOCKER_SOCKET",
        default_value = "/var/run/docker.sock",
        value_name = "PATH"
    )]
    docker_socket: PathBuf,
    /// ECS: the cluster [default: the account's default cluster].
    #[arg(long)]
    cluster: Option<String>,
    /// ECS: a subnet for awsvpc networking (repeat for several).
    #[arg(long = "subnet", value_name = "ID")]
    subnets: Vec<String>,
    /// ECS: a security group for awsvpc networking (repeat for several).
    #[arg(long = "security-group", value_name = "ID")]
    security_groups: Vec<String>,
    /// ECS: the task execution role.
    #[arg(long, value_name = "ARN")]
    execution_role_arn: Option<String>,
}

#[derive(Debug, Args)]
struct BlueGreenArgs {
    /// Service name.
    name: String,
    /// The version running now (blue); started first from the spec.
    #[arg(long, value_name = "V")]
    current_version: String,
    /// The version to roll out (green).
    #[arg(long, value_name = "V")]
    new_version: String,
    /// Traffic shares BLUE:GREEN during the analysis, adding up to 100.
    #[arg(long, default_value = "90:10", value_parser = parse_split)]
    split: (u32, u32),
    /// Deploy spec (TOML), for both versions.
    #[arg(long, value_name = "FILE")]
    spec: PathBuf,
    /// The gateway's Prometheus `/metrics` URL.
    #[arg(long, value_name = "URL")]
    metrics_url: String,
    /// How long green is watched before it is promoted.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    window: Duration,
    /// Time between checks [default: a sixth of the window, at least 1s].
    #[arg(long, value_parser = parse_duration)]
    interval: Option<Duration>,
    /// Highest acceptable share of 5xx answers, 0 to 1.
    #[arg(long, default_value = "0.05")]
    max_error_rate: f64,
    /// Highest acceptable 99th percentile latency.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    max_p99: Duration,
    /// Requests green must serve before it is judged.
    #[arg(long, default_value = "20")]
    min_requests: u64,
    /// Keep both versions when the analysis fails instead of rolling back.
    #[arg(long)]
    no_rollback: bool,
    /// Namespace when the spec names none [default: default].
    #[arg(long)]
    namespace: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

fn parse_platform(text: &str) -> Result<Platform, String> {
    text.parse().map_err(|e: DeployError| e.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    text.parse::<HumanDuration>()
        .map(HumanDuration::get)
        .map_err(|e| e.to_string())
}

fn parse_split(text: &str) -> Result<(u32, u32), String> {
    let (blue, green) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not BLUE:GREEN, such as 90:10"))?;
    let number = |side: &str, v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{side} share {v:?} in {text:?} is not a whole number"))
    };
    Ok((number("blue", blue)?, number("green", green)?))
}

/// Runs `trellis deploy …`: exit code 0, 1 when deploying failed, 2 for bad input.
pub(crate) async fn run(args: DeployArgs) -> ExitCode {
    match execute(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::BadInput(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// [`run`] with every failure as its message.
pub(crate) async fn run_result(args: DeployArgs) -> Result<(), String> {
    execute(args).await.map_err(|f| match f {
        Failure::BadInput(message) | Failure::Failed(message) => message,
    })
}

async fn execute(args: DeployArgs) -> Result<(), Failure> {
    match args.command {
        Some(DeployCommand::BlueGreen(args)) => blue_green(args).await,
        None => deploy_one(args.one).await,
    }
}

enum Failure {
    /// The user's input is wrong; nothing was started.
    BadInput(String),
    /// Deploying failed.
    Failed(String),
}

fn bad(message: impl Into<String>) -> Failure {
    Failure::BadInput(message.into())
}

fn failed(error: impl std::fmt::Display) -> Failure {
    Failure::Failed(error.to_string())
}

/// Reads and validates the spec file for `platform`.
fn read_spec(path: &Path, name: &str, platform: Platform) -> Result<DeploySpec, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(format!("--spec: cannot read {}: {e}", path.display())))?;
    let spec = DeploySpec::from_toml(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    spec.validate(name, platform)
        .map_err(|e| bad(format!("{}: {e}", path.display())))?;
    Ok(spec)
}

/// The version: the flag, else the image's tag (or digest), else `unversioned`.
fn version_of(flag: Option<&str>, spec: &DeploySpec) -> String {
    flag.map(str::to_owned)
        .or_else(|| {
            let image = ImageReference::parse(spec.image.as_deref()?).ok()?;
            image
                .tag
                .or_else(|| image.digest.map(|d| d.replace(':', "-")))
        })
        .unwrap_or_else(|| "unversioned".to_owned())
}

fn json(value: &impl serde::Serialize) -> Result<String, Failure> {
    serde_json::to_string_pretty(value).map_err(failed)
}

async fn deploy_one(args: DeployOne) -> Result<(), Failure> {
    // clap enforces these; kept panic-free.
    let (Some(name), Some(platform), Some(spec_path)) =
        (args.name.clone(), args.platform, args.spec.clone())
    else {
        return Err(bad("NAME, --platform and --spec are required"));
    };
    let spec = read_spec(&spec_path, &name, platform)?;
    let version = version_of(args.version.as_deref(), &spec);
    let namespace = spec
        .namespace
        .clone()
        .or_else(|| args.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    match platform {
        Platform::Local => local(&args, &name, &version, &namespace, spec).await,
        Platform::Kubernetes => kubernetes(&args, &name, &version, &namespace, &spec).await,
        Platform::Docker => docker(&args, &name, &version, &spec).await,
        Platform::Ecs => ecs(&args, &name, &version, &spec).await,
    }
}

/// The store (where deployment records go too) and the registry on it.
async fn open_registry(
    store: &StoreArgs,
) -> Result<(trellis_store::Store, ServiceRegistry), Failure> {
    let url = store.url();
    let opened = trellis_store::Store::open(&url)
        .await
        .map_err(|e| bad(format!("--store {url}: {e}")))?;
    let registry = ServiceRegistry::start(&opened, RegistryOptions::default())
        .await
        .map_err(|e| failed(format!("registry on {url}: {e}")))?;
    Ok((opened, registry))
}

fn print_replicas(replicas: &[ReplicaStatus]) {
    for r in replicas {
        println!(
            "  {} pid {} port {} {:?}{}",
            r.instance_id,
            r.pid.map_or("-".to_owned(), |p| p.to_string()),
            r.port,
            r.phase,
            if r.registered { " registered" } else { "" }
        );
    }
}

async fn local(
    args: &DeployOne,
    name: &str,
    version: &str,
    namespace: &str,
    spec: DeploySpec,
) -> Result<(), Failure> {
    if args.dry_run {
        let processes = trellis_deploy::render_local(name, version, namespace, &spec)
            .map_err(|e| bad(e.to_string()))?;
        println!("{}", json(&processes)?);
        return Ok(());
    }
    // Checked before the store is opened or anything started.
    trellis_deploy::render_local(name, version, namespace, &spec)
        .map_err(|e| bad(e.to_string()))?;
    crate::init_logging();
    let (store, registry) = open_registry(&args.store).await?;
    let deployer = ServiceDeployer::builder(Platform::Local, registry.clone())
        .namespace(namespace)
        .store(store)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let deployment = match deployer.deploy_version(name, version, &spec).await {
        Ok(deployment) => deployment,
        Err(e) => {
            let _ = registry.shutdown().await;
            return Err(failed(e));
        }
    };
    println!(
        "trellis deploy: {name} {version} on local, {} replicas ready and registered in {} ms",
        deployment.replicas.len(),
        deployment.took.as_millis()
    );
    print_replicas(&deployment.replicas);
    supervise_until_signal(&deployer, &registry, name).await
}

/// Keeps the supervisor running until Ctrl-C or SIGTERM, then deregisters and stops
/// everything.
async fn supervise_until_signal(
    deployer: &ServiceDeployer,
    registry: &ServiceRegistry,
    name: &str,
) -> Result<(), Failure> {
    crate::shutdown_signal().await;
    println!("trellis deploy: stopping {name}");
    let stopped = deployer.undeploy(name).await;
    deployer.shutdown().await;
    let closed = registry.shutdown().await;
    let stopped = stopped.map_err(failed)?;
    closed.map_err(failed)?;
    println!(
        "trellis deploy: {name} stopped ({} replicas)",
        stopped.len()
    );
    Ok(())
}

fn kubeconfig_path(flag: Option<&Path>) -> Result<PathBuf, Failure> {
    if let Some(path) = flag {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty()) {
        // The first file of a list, as kubectl reads the current context from it.
        let path = PathBuf::from(path);
        return Ok(std::env::split_paths(&path).next().unwrap_or(path));
    }
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".kube/config"))
        .ok_or_else(|| bad("--kubeconfig: not given, KUBECONFIG is not set and there is no HOME"))
}

async fn kubernetes(
    args: &DeployOne,
    name: &str,
    version: &str,
    namespace: &str,
    spec: &DeploySpec,
) -> Result<(), Failure> {
    let mut options = KubernetesOptions::new().namespace(namespace);
    if let Some(registry) = &args.registry {
        options = options.registry(registry.clone());
    }
    if let Some(version) = &args.version {
        options = options.version(version.clone());
    }
    let manifests = trellis_deploy::kubernetes_manifests(name, spec, &options)
        .map_err(|e| bad(e.to_string()))?;
    if args.dry_run {
        let yaml = trellis_deploy::render_kubernetes(name, spec, &options)
            .map_err(|e| bad(e.to_string()))?;
        print!("{yaml}");
        return Ok(());
    }
    let path = kubeconfig_path(args.kubeconfig.as_deref())?;
    if !path.exists() {
        return Err(bad(format!(
            "--kubeconfig: {} does not exist",
            path.display()
        )));
    }
    let applier = KubernetesApplier::from_kubeconfig(&path)
        .await
        .map_err(|e| bad(format!("--kubeconfig: {e}")))?;
    let applied = applier.apply_manifests(&manifests).await.map_err(failed)?;
    let deployment = applied.deployment.metadata.name.clone().unwrap_or_default();
    println!(
        "trellis deploy: applied Deployment {namespace}/{deployment}{} ({name} {version}); waiting up to {} for the rollout",
        applied
            .service
            .as_ref()
            .and_then(|s| s.metadata.name.as_deref())
            .map(|s| format!(" and Service {namespace}/{s}"))
            .unwrap_or_default(),
        trellis_core::format_duration(args.timeout)
    );
    let status = applier
        .wait_for_rollout(namespace, &deployment, args.timeout)
        .await
        .map_err(failed)?;
    println!(
        "trellis deploy: rolled out, {} of {} replicas available",
        status.available, status.desired
    );
    Ok(())
}

async fn docker(
    args: &DeployOne,
    name: &str,
    version: &str,
    spec: &DeploySpec,
) -> Result<(), Failure> {
    let mut options = DockerOptions::new()
        .version(version)
        .ready_timeout(args.timeout);
    if let Some(registry) = &args.registry {
        options = options.registry(registry.clone());
    }
    let calls =
        trellis_deploy::render_docker_json(name, spec, &options).map_err(|e| bad(e.to_string()))?;
    if args.dry_run {
        println!("{calls}");
        return Ok(());
    }
    let socket = args.docker_socket.to_string_lossy();
    // A socket that is not there is an engine that is not running, not a bad flag: exit 1.
    let deployer = DockerDeployer::connect_unix(&socket)
        .map_err(|e| failed(format!("--docker-socket {socket}: {e}")))?;
    deployer
        .ping()
        .await
        .map_err(|e| failed(format!("--docker-socket {socket}: {e}")))?;
    let deployment = deployer
        .deploy(name, spec, &options)
        .await
        .map_err(failed)?;
    println!(
        "trellis deploy: {name} {} on docker, {} containers healthy",
        deployment.version,
        deployment.containers.len()
    );
    for container in &deployment.containers {
        println!(
            "  {} {} {}",
            container.name,
            &container.id[..container.id.len().min(12)],
            container
                .host_port
                .map_or("no port".to_owned(), |p| format!("127.0.0.1:{p}"))
        );
    }
    Ok(())
}

async fn ecs(
    args: &DeployOne,
    name: &str,
    version: &str,
    spec: &DeploySpec,
) -> Result<(), Failure> {
    let mut options = EcsOptions::new()
        .version(version)
        .subnets(args.subnets.clone())
        .security_groups(args.security_groups.clone());
    if let Some(registry) = &args.registry {
        options = options.registry(registry.clone());
    }
    if let Some(cluster) = &args.cluster {
        options = options.cluster(cluster.clone());
    }
    if let Some(arn) = &args.execution_role_arn {
        options = options.execution_role_arn(arn.clone());
    }
    let definitions =
        trellis_deploy::render_ecs(name, spec, &options).map_err(|e| bad(e.to_string()))?;
    if args.dry_run {
        println!("{}", definitions.to_json().map_err(failed)?);
        return Ok(());
    }
    let deployer = trellis_deploy_ecs::EcsDeployer::from_environment()
        .await
        .map_err(failed)?;
    let deployed = deployer
        .deploy(name, spec, &options)
        .await
        .map_err(failed)?;
    println!(
        "trellis deploy: {name} {version} on ecs: task definition {}, service {} {} with {} tasks",
        deployed.task_definition_arn,
        deployed.service_arn,
        if deployed.created {
            "created"
        } else {
            "updated"
        },
        deployed.desired_count
    );
    Ok(())
}

fn print_decision(decision: &Decision) {
    println!(
        "  {:<8} {:<12} requests {:>6} errors {:>5} error_rate {} p99 {}  {}",
        decision.action.as_str(),
        decision.version,
        decision.requests,
        decision.errors,
        decision
            .error_rate
            .map_or("-".to_owned(), |r| format!("{r:.4}")),
        decision
            .p99
            .map_or("-".to_owned(), |p| format!("{}ms", p.as_millis())),
        decision.reason
    );
}

async fn blue_green(args: BlueGreenArgs) -> Result<(), Failure> {
    let spec = read_spec(&args.spec, &args.name, Platform::Local)?;
    let namespace = spec
        .namespace
        .clone()
        .or_else(|| args.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let interval = args.interval.unwrap_or_else(|| {
        (args.window / 6)
            .max(Duration::from_secs(1))
            .min(args.window)
    });
    let options = BlueGreenOptions::new(&args.current_version, &args.new_version)
        .traffic_split(args.split.0, args.split.1)
        .rollback_on_failure(!args.no_rollback)
        .analysis(AnalysisOptions {
            window: args.window,
            interval,
            max_error_rate: args.max_error_rate,
            max_p99_latency: args.max_p99,
            min_requests: args.min_requests,
        });
    options
        .validate(&args.name)
        .map_err(|e| bad(e.to_string()))?;
    trellis_deploy::render_local(&args.name, &args.current_version, &namespace, &spec)
        .map_err(|e| bad(e.to_string()))?;
    let metrics = PrometheusScrape::new(args.metrics_url.clone())
        .map_err(|e| bad(format!("--metrics-url: {e}")))?;

    crate::init_logging();
    let (store, registry) = open_registry(&args.store).await?;
    let deployer = ServiceDeployer::builder(Platform::Local, registry.clone())
        .namespace(&namespace)
        .metrics(metrics)
        .store(store)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let name = args.name.as_str();
    let blue = match deployer
        .deploy_version(name, &args.current_version, &spec)
        .await
    {
        Ok(blue) => blue,
        Err(e) => {
            let _ = registry.shutdown().await;
            return Err(failed(e));
        }
    };
    println!(
        "trellis deploy: {name} {} (blue) on local, {} replicas ready",
        args.current_version,
        blue.replicas.len()
    );
    print_replicas(&blue.replicas);
    println!(
        "trellis deploy: blue-green {name} {} -> {}, split {}:{}, window {}",
        args.current_version,
        args.new_version,
        args.split.0,
        args.split.1,
        trellis_core::format_duration(args.window)
    );

    // Decisions are printed as they are taken.
    let run = deployer.blue_green_deploy(name, options);
    tokio::pin!(run);
    let mut printed = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let report = loop {
        tokio::select! {
            report = &mut run => break report,
            _ = tick.tick() => {
                let decisions = deployer.decisions(name);
                for decision in decisions.iter().skip(printed) {
                    print_decision(decision);
                }
                printed = decisions.len();
            }
        }
    };
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            deployer.shutdown().await;
            let _ = registry.shutdown().await;
            return Err(failed(e));
        }
    };
    for decision in report.decisions.iter().skip(printed) {
        print_decision(decision);
    }
    println!(
        "trellis deploy: outcome {:?}: green ready after {}, analysis {}, switch {}",
        report.outcome,
        report
            .green_ready_after
            .map_or("-".to_owned(), trellis_core::format_duration),
        trellis_core::format_duration(report.analysis_took),
        report
            .switch_took
            .map_or("-".to_owned(), trellis_core::format_duration)
    );
    print_replicas(&report.replicas);
    supervise_until_signal(&deployer, &registry, name).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits() {
        assert_eq!(parse_split("90:10"), Ok((90, 10)));
        assert!(parse_split("90").unwrap_err().contains("BLUE:GREEN"));
        assert!(parse_split("90:x").unwrap_err().contains("green share"));
    }
}
