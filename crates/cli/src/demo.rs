//! `trellis demo`: the seed's whole story on one machine, narrated step by step.
//!
//! It starts a node in this process (admin API, dashboard, gateway with JWT, an
//! authorization rule and a rate limit, tracing at sampling 1.0) on a fresh SQLite file,
//! deploys the four example services (`examples/*-service`) on the local platform — each
//! replica is this binary again, `trellis demo serve SERVICE` — and then calls them the way
//! a client would, saying for each step what was called, what came back and where to look
//! on the dashboard, with the time elapsed since start:
//!
//! 1. node up; 2. the four services registered and healthy; 3. the gateway's 401, 403,
//!    200 and 429; 4. `createUserAndWelcomeOrder` and `getUserWithOrders`; 5. `user.created`
//!    and `user.updated` reaching order-service's `UserProfile`; 6. the OrderCreationSaga,
//!    completed and compensated; 7. one trace across gateway, user-service and
//!    order-service; 8. a configuration change flipping a feature flag live; 9. a
//!    blue-green of order-service 1.1.0 → 1.2.0; 10. the Istio resources for order-service.
//!
//! Then it keeps running until Ctrl-C (undeploying everything and stopping the node on the
//! way out). `--check` runs the same steps headless and exits 0 only if every step's
//! expectation held; otherwise 1, naming the steps that failed. Bad flags exit 2.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use trellis::admin::{Node, Settings};
use trellis::auth::{AuthzRule, JwtConfig};
use trellis::config::{ConfigOptions, ConfigurationManager};
use trellis::core::HumanDuration;
use trellis::deploy::{
    AnalysisOptions, BlueGreenOptions, DeploySpec, HealthCheck, LocalOptions, Outcome, Platform,
    PrometheusScrape, ServiceDeployer,
};
use trellis::gateway::{GatewayConfig, LoadBalancer, RateLimitConfig, RouteConfig};
use trellis::mesh::{MeshPolicy, MeshProvider};
use trellis::tracing::TracingConfig;

/// Where the demo keeps its SQLite file by default.
pub(crate) const DEFAULT_DATA_DIR: &str = "./trellis-data/demo";
/// The admin server's default address.
pub(crate) const DEFAULT_ADMIN: &str = "127.0.0.1:7070";
/// A file marking a data directory as the demo's own, so that it may be wiped.
const MARKER: &str = ".trellis-demo";
/// The demo's JWT secret (HS256). A demo secret: never use it for anything else.
const SECRET: &str = "trellis-demo-secret-not-for-production-use";
/// The tokens' issuer.
const ISSUER: &str = "trellis-demo";
/// The role the orders route requires.
const ROLE: &str = "shopper";
/// Requests per minute and JWT subject on the users route.
const USERS_RATE: u32 = 5;
/// The node's service name in traces (the gateway's spans).
const NODE_SERVICE: &str = "trellis-gateway";
/// An amount the payment service declines (above its limit of 100,000 cents).
const DECLINED_TOTAL: u64 = 250_000;

/// `trellis demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    #[command(subcommand)]
    command: Option<DemoCommand>,
    /// Run headless: no waiting at the end; exit 0 only if every step's expectation held.
    #[arg(long)]
    check: bool,
    /// Directory of the demo's SQLite file; wiped and made again on every run (only if it
    /// is empty or was made by `trellis demo`).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Admin server (and dashboard) address, on loopback; another free port is used when
    /// this one is taken.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN)]
    admin_listen: SocketAddr,
}

#[derive(Debug, Subcommand)]
enum DemoCommand {
    /// Run one of the demo's services (what the demo's replicas run; reads PORT,
    /// TRELLIS_* and OTEL_* from the environment).
    #[command(hide = true)]
    Serve {
        /// Which service.
        #[arg(value_enum)]
        service: DemoService,
    },
}

/// The demo's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DemoService {
    #[value(name = "user-service")]
    User,
    #[value(name = "order-service")]
    Order,
    #[value(name = "inventory-service")]
    Inventory,
    #[value(name = "payment-service")]
    Payment,
}

impl DemoService {
    const ALL: [DemoService; 4] = [
        DemoService::Inventory,
        DemoService::Payment,
        DemoService::Order,
        DemoService::User,
    ];

    fn name(self) -> &'static str {
        match self {
            DemoService::User => user_service::SERVICE,
            DemoService::Order => order_service::SERVICE,
            DemoService::Inventory => inventory_service::SERVICE,
            DemoService::Payment => payment_service::SERVICE,
        }
    }

    fn version(self) -> &'static str {
        match self {
            DemoService::Order => "1.1.0",
            _ => "1.0.0",
        }
    }
}

/// Runs `trellis demo` and returns its exit code: 0 when it held, 1 when a step failed, 2
/// for bad input.
pub(crate) async fn run(args: DemoArgs) -> ExitCode {
    if let Some(DemoCommand::Serve { service }) = args.command {
        return serve(service).await;
    }
    if !args.admin_listen.ip().is_loopback() {
        eprintln!(
            "error: --admin-listen {}: the demo's admin server has no token, so it listens on loopback only (127.0.0.1 or ::1)",
            args.admin_listen
        );
        return ExitCode::from(2);
    }
    let data_dir = match prepare_data_dir(&args.data_dir) {
        Ok(dir) => dir,
        Err(message) => {
            eprintln!("error: --data-dir {}: {message}", args.data_dir.display());
            return ExitCode::from(2);
        }
    };
    let mut demo = Demo::new(args.check);
    let held = demo.run(&data_dir, args.admin_listen).await;
    if held {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `trellis demo serve SERVICE`: one replica.
async fn serve(service: DemoService) -> ExitCode {
    let name = service.name();
    let result = match service {
        DemoService::User => match user_service::ServiceEnv::from_env(name) {
            Ok(env) => user_service::run(env, crate::shutdown_signal()).await,
            Err(e) => Err(e.into()),
        },
        DemoService::Order => match order_service::ServiceEnv::from_env(name) {
            Ok(env) => order_service::run(env, crate::shutdown_signal()).await,
            Err(e) => Err(e.into()),
        },
        DemoService::Inventory => match inventory_service::ServiceEnv::from_env(name) {
            Ok(env) => inventory_service::run(env, crate::shutdown_signal()).await,
            Err(e) => Err(e.into()),
        },
        DemoService::Payment => match payment_service::ServiceEnv::from_env(name) {
            Ok(env) => payment_service::run(env, crate::shutdown_signal()).await,
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Makes `dir` empty and marked as the demo's, and returns its absolute path. Refuses a
/// directory with content that the demo did not make.
fn prepare_data_dir(dir: &Path) -> Result<PathBuf, String> {
    let dir = std::path::absolute(dir).map_err(|e| e.to_string())?;
    match std::fs::read_dir(&dir) {
        Ok(mut entries) => {
            let empty = entries.next().is_none();
            if !empty && !dir.join(MARKER).exists() {
                return Err(format!(
                    "{} has files that `trellis demo` did not make; refusing to wipe it (choose an empty or new directory)",
                    dir.display()
                ));
            }
            std::fs::remove_dir_all(&dir).map_err(|e| format!("cannot wipe it: {e}"))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err("is a file, not a directory".into());
        }
        Err(e) => return Err(format!("cannot read it: {e}")),
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create it: {e}"))?;
    std::fs::write(
        dir.join(MARKER),
        "made by `trellis demo`; wiped on its next run\n",
    )
    .map_err(|e| format!("cannot write in it: {e}"))?;
    Ok(dir)
}

/// What a step found wrong.
type StepResult = Result<(), String>;

/// The running scenario: the narration and the outcome of each step.
struct Demo {
    started: Instant,
    check: bool,
    step: usize,
    step_started: Instant,
    first_step_ms: Option<u128>,
    failed: Vec<String>,
    admin: String,
}

/// Everything the steps use.
struct World {
    node: Node,
    deployer: ServiceDeployer,
    http: reqwest::Client,
    gateway: String,
    admin: String,
    specs: BTreeMap<&'static str, DeploySpec>,
}

const STEPS: usize = 10;

impl Demo {
    fn new(check: bool) -> Demo {
        let now = Instant::now();
        Demo {
            started: now,
            check,
            step: 0,
            step_started: now,
            first_step_ms: None,
            failed: Vec::new(),
            admin: String::new(),
        }
    }

    fn line(&self, label: &str, text: impl Display) {
        let ms = self.started.elapsed().as_millis();
        let text = text.to_string();
        let mut lines = text.lines();
        println!(
            "[{ms:>6} ms]   {label:<7}{}",
            lines.next().unwrap_or_default()
        );
        for more in lines {
            println!("{:>13}{:<7}{more}", "", "");
        }
    }

    fn begin(&mut self, title: &str) {
        self.step += 1;
        self.step_started = Instant::now();
        let ms = self.started.elapsed().as_millis();
        println!();
        println!("[{ms:>6} ms] step {}/{STEPS}: {title}", self.step);
    }

    fn called(&self, text: impl Display) {
        self.line("called", text);
    }

    fn got(&self, text: impl Display) {
        self.line("got", text);
    }

    fn look(&self, page: &str) {
        self.line("look", format!("{}/dashboard/#/{page}", self.admin));
    }

    fn end(&mut self, name: &str, result: StepResult) -> bool {
        let took = self.step_started.elapsed().as_millis();
        if self.first_step_ms.is_none() {
            let ms = self.started.elapsed().as_millis();
            self.first_step_ms = Some(ms);
        }
        match result {
            Ok(()) => {
                self.line("ok", format!("step {} {name} held ({took} ms)", self.step));
                true
            }
            Err(reason) => {
                self.line(
                    "FAILED",
                    format!("step {} {name}: {reason} ({took} ms)", self.step),
                );
                self.failed.push(name.to_owned());
                false
            }
        }
    }

    /// The whole scenario; true when every step held.
    async fn run(&mut self, data_dir: &Path, admin_listen: SocketAddr) -> bool {
        println!(
            "trellis demo: the seed's story on this machine; data in {}",
            data_dir.display()
        );
        self.begin("node: admin API, dashboard, gateway and tracing on a fresh SQLite file");
        let world = match self.start_node(data_dir, admin_listen).await {
            Ok(world) => world,
            Err(e) => {
                self.end("node", Err(e));
                return self.summary();
            }
        };
        self.end("node", Ok(()));
        if let Some(ms) = self.first_step_ms {
            self.line("timing", format!("first step after {ms} ms"));
        }
        let interrupted = tokio::select! {
            () = self.scenario(&world) => false,
            () = crate::shutdown_signal() => true,
        };
        if interrupted {
            self.failed.push("interrupted".into());
            println!("\ninterrupted: stopping the services and the node");
        } else if !self.check {
            println!();
            println!(
                "trellis demo: running. Dashboard: {}/  (Ctrl-C to stop)",
                world.admin
            );
            println!(
                "  gateway {}  — try: curl -H \"Authorization: Bearer {}\" {}/api/orders",
                world.gateway,
                token("you", &[ROLE]).unwrap_or_default(),
                world.gateway
            );
            crate::shutdown_signal().await;
            println!("\nstopping: undeploying the services, then the node");
        }
        self.stop(world).await;
        self.summary()
    }

    fn summary(&self) -> bool {
        let total = self.started.elapsed();
        println!();
        if self.failed.is_empty() {
            println!(
                "demo check: all {} steps held in {:.1} s (first step after {} ms)",
                self.step,
                total.as_secs_f64(),
                self.first_step_ms.unwrap_or_default()
            );
            true
        } else {
            println!(
                "demo check: FAILED steps: {} ({} steps run in {:.1} s)",
                self.failed.join(", "),
                self.step,
                total.as_secs_f64()
            );
            false
        }
    }

    async fn stop(&self, world: World) {
        for service in DemoService::ALL {
            if let Err(e) = world.deployer.undeploy(service.name()).await {
                eprintln!("undeploying {}: {e}", service.name());
            }
        }
        world.deployer.shutdown().await;
        if let Err(e) = world.node.shutdown().await {
            eprintln!("stopping the node: {e}");
        }
    }

    async fn start_node(
        &mut self,
        data_dir: &Path,
        admin_listen: SocketAddr,
    ) -> Result<World, String> {
        let store_url = format!("sqlite://{}/trellis.db", data_dir.display());
        let mut admin = admin_listen;
        if admin.port() != 0 && std::net::TcpListener::bind(admin).is_err() {
            self.line(
                "note",
                format!("{admin} is taken; the admin server takes a free port instead"),
            );
            admin.set_port(0);
        }
        let settings = settings(&store_url, admin)?;
        self.called(format!(
            "Node::start — store {store_url}, admin {admin}, gateway routes /api/users/* and /api/orders/* (JWT HS256, role {ROLE:?} on orders, {USERS_RATE}/min per user on users), tracing sampling 1.0"
        ));
        let node = Node::start(settings).await.map_err(|e| e.to_string())?;
        let admin = format!("http://{}", node.admin_addr());
        self.admin = admin.clone();
        let gateway = node
            .gateway_addr()
            .map(|a| format!("http://{a}"))
            .ok_or("the node started without its gateway")?;
        self.got(format!(
            "admin API and dashboard {admin}/, gateway {gateway}"
        ));
        self.look("routes");
        let deployer = ServiceDeployer::builder(Platform::Local, node.registry().clone())
            .namespace("demo")
            .local_options(LocalOptions {
                health_check_interval: Duration::from_millis(500),
                startup_timeout: Duration::from_secs(30),
                stop_grace: Duration::from_secs(3),
                drain: Duration::from_millis(500),
                ..LocalOptions::default()
            })
            .metrics(PrometheusScrape::new(format!("{admin}/metrics")).map_err(|e| e.to_string())?)
            .store(node.store().clone())
            .build()
            .map_err(|e| e.to_string())?;
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this program to run the services: {e}"))?
            .display()
            .to_string();
        let mut specs = BTreeMap::new();
        for service in DemoService::ALL {
            specs.insert(
                service.name(),
                service_spec(&exe, service.name(), &store_url, &admin)?,
            );
        }
        Ok(World {
            node,
            deployer,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .map_err(|e| e.to_string())?,
            gateway,
            admin,
            specs,
        })
    }

    async fn scenario(&mut self, w: &World) {
        self.begin("registry and health: deploy the four services on the local platform");
        let deployed = self.deploy(w).await;
        if !self.end("registry+health", deployed) {
            return;
        }
        self.begin("gateway: authentication, authorization and rate limiting");
        let r = self.gateway(w).await;
        self.end("gateway", r);
        self.begin("service to service: createUserAndWelcomeOrder and getUserWithOrders");
        let r = self.service_calls(w).await;
        self.end("service-calls", r);
        self.begin("events: user.created and user.updated through the outbox");
        let r = self.events(w).await;
        self.end("events", r);
        self.begin("saga: OrderCreationSaga, completed and compensated");
        let r = self.saga(w).await;
        self.end("saga", r);
        self.begin("tracing: one trace across gateway, user-service and order-service");
        let r = self.trace(w).await;
        self.end("trace", r);
        self.begin("configuration: a watched feature flag flips live");
        let r = self.config(w).await;
        self.end("config", r);
        self.begin("blue-green: order-service 1.1.0 → 1.2.0 with metrics analysis");
        let r = self.blue_green(w).await;
        self.end("blue-green", r);
        self.begin("mesh: the same policy as Istio resources");
        let r = self.mesh();
        self.end("mesh", r);
    }

    async fn deploy(&mut self, w: &World) -> StepResult {
        self.called(format!(
            "ServiceDeployer(local).deploy_version × 4: each replica is `{} demo serve SERVICE` with PORT, TRELLIS_SERVICE/VERSION/INSTANCE_ID, TRELLIS_STORE, OTEL_EXPORTER_OTLP_ENDPOINT={}",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            w.admin
        ));
        let deploys = DemoService::ALL.map(|service| {
            let spec = w.specs.get(service.name()).cloned();
            async move {
                let spec = spec.ok_or_else(|| format!("no spec for {}", service.name()))?;
                w.deployer
                    .deploy_version(service.name(), service.version(), &spec)
                    .await
                    .map_err(|e| format!("{}: {e}", service.name()))
            }
        });
        let [a, b, c, d] = deploys;
        let (a, b, c, d) = tokio::join!(a, b, c, d);
        for deployment in [a?, b?, c?, d?] {
            let replica = deployment.replicas.first();
            self.got(format!(
                "{} {} ready in {} ms on port {}, pid {}",
                deployment.service,
                deployment.version,
                deployment.took.as_millis(),
                replica.map(|r| r.port).unwrap_or_default(),
                replica
                    .and_then(|r| r.pid)
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            ));
        }
        let registry = w.node.registry().clone();
        let healthy = eventually(Duration::from_secs(20), || {
            let registry = registry.clone();
            async move {
                let counts: Vec<(&str, usize)> = DemoService::ALL
                    .iter()
                    .map(|s| (s.name(), registry.discover(s.name()).healthy().count()))
                    .collect();
                counts
                    .iter()
                    .all(|(_, n)| *n >= 1)
                    .then(|| counts.clone())
                    .ok_or_else(|| format!("healthy instances: {counts:?}"))
            }
        })
        .await?;
        self.got(format!(
            "registry: {} — all healthy (the node's registry checks /health every 500 ms)",
            healthy
                .iter()
                .map(|(s, n)| format!("{s} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        // Each service finds the others in its own registry snapshot of the shared store.
        for (service, needs) in [
            (user_service::SERVICE, &[order_service::SERVICE][..]),
            (
                order_service::SERVICE,
                &[inventory_service::SERVICE, payment_service::SERVICE][..],
            ),
        ] {
            let url = format!("{}/discovery", instance_url(w, service)?);
            let http = w.http.clone();
            let seen = eventually(Duration::from_secs(10), || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let (status, body) =
                        send(&http, reqwest::Method::GET, &url, None, None).await?;
                    (status == 200 && needs.iter().all(|n| body[*n].as_u64().unwrap_or(0) >= 1))
                        .then_some(body.clone())
                        .ok_or_else(|| format!("{service} sees {status} {body}"))
                }
            })
            .await?;
            self.called(format!("GET {url}"));
            self.got(format!("{service} sees {seen}"));
        }
        self.look("services");
        Ok(())
    }

    async fn gateway(&mut self, w: &World) -> StepResult {
        let users = format!("{}/api/users/nobody", w.gateway);
        let orders = format!("{}/api/orders", w.gateway);
        let status = send(&w.http, reqwest::Method::GET, &users, None, None)
            .await?
            .0;
        self.called("GET /api/users/nobody without a token");
        self.got(format!("{status}"));
        expect_status("without a token", status, 401)?;
        let no_role = token("no-role", &[])?;
        let status = send(&w.http, reqwest::Method::GET, &orders, Some(&no_role), None)
            .await?
            .0;
        self.called(format!(
            "GET /api/orders with a valid token lacking role {ROLE:?}"
        ));
        self.got(format!("{status}"));
        expect_status("without the role", status, 403)?;
        let shopper = token("shopper", &[ROLE])?;
        let (status, body) =
            send(&w.http, reqwest::Method::GET, &orders, Some(&shopper), None).await?;
        self.called(format!("GET /api/orders with role {ROLE:?}"));
        self.got(format!("{status} {body}"));
        expect_status("with the role", status, 200)?;
        let burst = token("burst-client", &[ROLE])?;
        let mut statuses = Vec::new();
        for _ in 0..USERS_RATE + 3 {
            statuses.push(
                send(&w.http, reqwest::Method::GET, &users, Some(&burst), None)
                    .await?
                    .0,
            );
        }
        self.called(format!(
            "GET /api/users/nobody × {} as one user (limit {USERS_RATE}/min)",
            USERS_RATE + 3
        ));
        self.got(format!("{statuses:?}"));
        self.look("routes");
        if !statuses.contains(&429) {
            return Err(format!("no 429 in {statuses:?}"));
        }
        if statuses.first() == Some(&429) {
            return Err(format!(
                "the first request was already refused: {statuses:?}"
            ));
        }
        Ok(())
    }

    async fn service_calls(&mut self, w: &World) -> StepResult {
        let tok = token("service-calls", &[ROLE])?;
        let url = format!("{}/api/users/with-welcome-order", w.gateway);
        let body = json!({"id": "ada", "name": "Ada Lovelace", "email": "ada@example.com"});
        let (status, reply) = send(
            &w.http,
            reqwest::Method::POST,
            &url,
            Some(&tok),
            Some(&body),
        )
        .await?;
        self.called(format!("POST /api/users/with-welcome-order {body}"));
        self.got(format!("{status} {reply}"));
        expect_status("createUserAndWelcomeOrder", status, 201)?;
        if reply["welcome_order"]["state"] != "completed" {
            return Err(format!("the welcome order did not complete: {reply}"));
        }
        let url = format!("{}/api/users/ada/with-orders", w.gateway);
        let (status, reply) = send(&w.http, reqwest::Method::GET, &url, Some(&tok), None).await?;
        self.called(
            "GET /api/users/ada/with-orders (user-service → order-service via ServiceClient)",
        );
        self.got(format!("{status} {reply}"));
        expect_status("getUserWithOrders", status, 200)?;
        let orders = reply["orders"].as_array().cloned().unwrap_or_default();
        if orders.len() != 1 || orders[0]["kind"] != "welcome" {
            return Err(format!("expected the one welcome order, got {reply}"));
        }
        self.look("sagas");
        Ok(())
    }

    async fn events(&mut self, w: &World) -> StepResult {
        let tok = token("events", &[ROLE])?;
        let created = json!({"id": "grace", "name": "Grace Hopper", "email": "grace@example.com"});
        let (status, reply) = send(
            &w.http,
            reqwest::Method::POST,
            &format!("{}/api/users", w.gateway),
            Some(&tok),
            Some(&created),
        )
        .await?;
        self.called(format!(
            "POST /api/users {created}  (row + user.created in one batch)"
        ));
        self.got(format!("{status} {reply}"));
        expect_status("create", status, 201)?;
        let change = json!({"email": "grace@navy.example"});
        let (status, reply) = send(
            &w.http,
            reqwest::Method::PUT,
            &format!("{}/api/users/grace", w.gateway),
            Some(&tok),
            Some(&change),
        )
        .await?;
        self.called(format!(
            "PUT /api/users/grace {change}  (row + user.updated in one batch)"
        ));
        self.got(format!("{status} {reply}"));
        expect_status("update", status, 200)?;
        let order_service = instance_url(w, order_service::SERVICE)?;
        let url = format!("{order_service}/profiles/grace");
        let http = w.http.clone();
        let profile = eventually(Duration::from_secs(15), || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let (status, body) = send(&http, reqwest::Method::GET, &url, None, None).await?;
                (status == 200
                    && body["email"] == "grace@navy.example"
                    && body["last_event"] == "user.updated")
                    .then_some(body.clone())
                    .ok_or_else(|| format!("profile: {status} {body}"))
            }
        })
        .await?;
        self.called(format!(
            "GET {url} (order-service's UserProfile, fed by its consumer group {:?})",
            order_service::GROUP
        ));
        self.got(format!("{profile}"));
        self.look("events");
        Ok(())
    }

    async fn saga(&mut self, w: &World) -> StepResult {
        let tok = token("saga", &[ROLE])?;
        let url = format!("{}/api/orders", w.gateway);
        let order = json!({"user_id": "ada", "items": [{"sku": "book-1", "quantity": 2}, {"sku": "pen-7", "quantity": 1}], "total": 4250});
        let (status, reply) = send(
            &w.http,
            reqwest::Method::POST,
            &url,
            Some(&tok),
            Some(&order),
        )
        .await?;
        self.called(format!(
            "POST /api/orders {order}  (reserve inventory → charge payment → create order)"
        ));
        self.got(format!("{status} {reply}"));
        expect_status("order", status, 201)?;
        if reply["state"] != "completed" {
            return Err(format!("expected completed, got {reply}"));
        }
        let declined = json!({"user_id": "ada", "items": [{"sku": "piano-1", "quantity": 1}], "total": DECLINED_TOTAL});
        let (status, reply) = send(
            &w.http,
            reqwest::Method::POST,
            &url,
            Some(&tok),
            Some(&declined),
        )
        .await?;
        self.called(format!(
            "POST /api/orders {declined}  (payment-service declines above 100000 cents)"
        ));
        self.got(format!("{status} {reply}"));
        expect_status("declined order", status, 409)?;
        if reply["state"] != "compensated" {
            return Err(format!("expected compensated, got {reply}"));
        }
        let saga_id = reply["saga_id"].as_str().unwrap_or_default().to_owned();
        let inventory = instance_url(w, inventory_service::SERVICE)?;
        let (_, stats) = send(
            &w.http,
            reqwest::Method::GET,
            &format!("{inventory}/stats"),
            None,
            None,
        )
        .await?;
        self.called("GET inventory-service /stats");
        self.got(format!("{stats}"));
        let held = stats["reserved"]
            .as_array()
            .is_some_and(|r| r.iter().any(|s| s == saga_id.as_str()));
        if held || stats["unreserve"]["effects"].as_u64().unwrap_or(0) < 1 {
            return Err(format!(
                "saga {saga_id}'s reservation was not released: {stats}"
            ));
        }
        let (status, record) = send(
            &w.http,
            reqwest::Method::GET,
            &format!("{}/v1/sagas/{saga_id}", w.admin),
            None,
            None,
        )
        .await?;
        self.called(format!("GET /v1/sagas/{saga_id} on the node"));
        self.got(format!("{status} state {}", record["state"]));
        if record["state"] != "compensated" {
            return Err(format!("the saga log says {record}"));
        }
        self.look(&format!("sagas/{saga_id}"));
        Ok(())
    }

    async fn trace(&mut self, w: &World) -> StepResult {
        let tok = token("tracing", &[ROLE])?;
        let trace_id = random_hex(16);
        let traceparent = format!("00-{trace_id}-{}-01", random_hex(8));
        let url = format!("{}/api/users/ada/with-orders", w.gateway);
        let response = w
            .http
            .get(&url)
            .bearer_auth(&tok)
            .header("traceparent", &traceparent)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status().as_u16();
        self.called(format!(
            "GET /api/users/ada/with-orders with traceparent {traceparent}"
        ));
        self.got(format!("{status}"));
        expect_status("traced request", status, 200)?;
        let wanted = [NODE_SERVICE, user_service::SERVICE, order_service::SERVICE];
        let trace_url = format!("{}/v1/traces/{trace_id}", w.admin);
        let http = w.http.clone();
        let found = eventually(Duration::from_secs(10), || {
            let (http, trace_url, trace_id) = (http.clone(), trace_url.clone(), trace_id.clone());
            async move {
                let (status, body) =
                    send(&http, reqwest::Method::GET, &trace_url, None, None).await?;
                let services: Vec<String> = body["services"]
                    .as_array()
                    .map(|s| {
                        s.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let missing: Vec<&str> = wanted
                    .iter()
                    .copied()
                    .filter(|s| !services.iter().any(|have| have == s))
                    .collect();
                if status == 200 && missing.is_empty() {
                    Ok(body)
                } else {
                    Err(format!(
                        "trace {trace_id} on the node ({status}) has services {services:?}; missing {missing:?} (the services export OTLP/HTTP to the node's POST /v1/traces)"
                    ))
                }
            }
        })
        .await?;
        self.called(format!("GET /v1/traces/{trace_id} on the node"));
        let spans = found["spans"].as_array().cloned().unwrap_or_default();
        let mut lines = Vec::new();
        for span in spans.iter().take(12) {
            lines.push(format!(
                "{}{} {} ({} µs)",
                "  ".repeat(span["depth"].as_u64().unwrap_or(0) as usize),
                span["service"].as_str().unwrap_or("?"),
                span["name"].as_str().unwrap_or("?"),
                span["duration_us"]
            ));
        }
        self.got(format!(
            "{} spans from {}:\n{}",
            spans.len(),
            found["services"],
            lines.join("\n")
        ));
        self.look(&format!("traces/{trace_id}"));
        Ok(())
    }

    async fn config(&mut self, w: &World) -> StepResult {
        let tok = token("config", &[ROLE])?;
        let url = format!("{}/api/orders", w.gateway);
        let (_, before) = send(&w.http, reqwest::Method::GET, &url, Some(&tok), None).await?;
        self.called("GET /api/orders");
        self.got(format!("{before}"));
        if before[order_service::FLAG] != false {
            return Err(format!("the flag should start off: {before}"));
        }
        let config = ConfigurationManager::new(w.node.store(), ConfigOptions::default())
            .map_err(|e| e.to_string())?;
        let version = config
            .set_config(
                order_service::SERVICE,
                config.environment(),
                json!({order_service::FLAG: true}),
            )
            .await
            .map_err(|e| e.to_string())?;
        self.called(format!(
            "ConfigurationManager::set_config(order-service, {}, {{\"express_shipping\": true}})",
            config.environment()
        ));
        self.got(format!("version {}", version.version));
        let changed_at = Instant::now();
        let http = w.http.clone();
        let after = eventually(Duration::from_secs(10), || {
            let (http, url, tok) = (http.clone(), url.clone(), tok.clone());
            async move {
                let (status, body) =
                    send(&http, reqwest::Method::GET, &url, Some(&tok), None).await?;
                (status == 200 && body[order_service::FLAG] == true)
                    .then_some(body.clone())
                    .ok_or_else(|| format!("{status} {body}"))
            }
        })
        .await?;
        self.called("GET /api/orders");
        self.got(format!(
            "{after}  — flipped {} ms after the write, no restart (order-service watches its config)",
            changed_at.elapsed().as_millis()
        ));
        self.look("config/order-service");
        Ok(())
    }

    async fn blue_green(&mut self, w: &World) -> StepResult {
        let tok = token("blue-green", &[ROLE])?;
        let url = format!("{}/api/orders", w.gateway);
        let spec = w
            .specs
            .get(order_service::SERVICE)
            .cloned()
            .ok_or("no order-service spec")?;
        let stop = Arc::new(AtomicBool::new(false));
        let versions = Arc::new(VersionCounts::default());
        let load = tokio::spawn(load(
            w.http.clone(),
            url.clone(),
            tok.clone(),
            stop.clone(),
            versions.clone(),
        ));
        let analysis = AnalysisOptions {
            window: Duration::from_secs(3),
            interval: Duration::from_millis(250),
            max_error_rate: 0.01,
            max_p99_latency: Duration::from_millis(500),
            min_requests: 20,
        };
        self.called("ServiceDeployer::blue_green_deploy(order-service, 1.1.0 → 1.2.0, split 50/50, analysis 3 s on the gateway's /metrics: error rate ≤ 1 %, p99 ≤ 500 ms, ≥ 20 requests) while GET /api/orders runs through the gateway");
        let report = w
            .deployer
            .blue_green_deploy(
                order_service::SERVICE,
                BlueGreenOptions::new("1.1.0", "1.2.0")
                    .spec(spec)
                    .traffic_split(50, 50)
                    .analysis(analysis),
            )
            .await;
        let http = w.http.clone();
        let after = match &report {
            Ok(r) if r.outcome == Outcome::Promoted => eventually(Duration::from_secs(10), || {
                let (http, url, tok) = (http.clone(), url.clone(), tok.clone());
                async move {
                    let (status, body) =
                        send(&http, reqwest::Method::GET, &url, Some(&tok), None).await?;
                    (status == 200 && body["version"] == "1.2.0")
                        .then_some(body.clone())
                        .ok_or_else(|| format!("{status} {body}"))
                }
            })
            .await
            .map(Some),
            _ => Ok(None),
        };
        stop.store(true, Ordering::Relaxed);
        let sent = load.await.unwrap_or_default();
        let report = report.map_err(|e| e.to_string())?;
        let mut lines = Vec::new();
        for d in &report.decisions {
            lines.push(format!(
                "{} {}: requests {} errors {} p99 {} — {}",
                d.action.as_str(),
                d.version,
                d.requests,
                d.errors,
                // Sub-millisecond p99s are the rule here: `{:?}` keeps them (`700µs`).
                d.p99.map(|p| format!("{p:?}")).unwrap_or("-".into()),
                d.reason
            ));
        }
        self.got(format!(
            "{:?}: green ready after {} ms, analysis {} ms; decisions:\n{}",
            report.outcome,
            report
                .green_ready_after
                .map(|d| d.as_millis())
                .unwrap_or_default(),
            report.analysis_took.as_millis(),
            lines.join("\n")
        ));
        self.got(format!(
            "load through the gateway: {} requests, {} failed; by version {:?}",
            sent,
            versions.failed.load(Ordering::Relaxed),
            versions.snapshot()
        ));
        self.look("deployments");
        if report.outcome != Outcome::Promoted {
            return Err(format!("green was not promoted: {:?}", report.outcome));
        }
        let after = after?.ok_or("no answer after the switch")?;
        self.called("GET /api/orders");
        self.got(format!("{after}"));
        if after[order_service::FLAG] != true {
            return Err(format!("1.2.0 should read the flag as on: {after}"));
        }
        Ok(())
    }

    fn mesh(&mut self) -> StepResult {
        let yaml = trellis::mesh::render(
            MeshProvider::Istio,
            order_service::SERVICE,
            &MeshPolicy::default(),
        )
        .map_err(|e| e.to_string())?;
        self.called("trellis_mesh::render(istio, order-service, the seed's policy)");
        let kinds: Vec<&str> = yaml
            .lines()
            .filter_map(|l| l.strip_prefix("kind: "))
            .collect();
        let excerpt: Vec<&str> = yaml.lines().take(14).collect();
        self.got(format!(
            "{} lines, kinds {kinds:?}; first lines:\n{}\n…  (all of it: trellis mesh render --provider istio --service order-service)",
            yaml.lines().count(),
            excerpt.join("\n")
        ));
        if !kinds.contains(&"VirtualService") || !kinds.contains(&"DestinationRule") {
            return Err(format!(
                "expected a VirtualService and a DestinationRule: {kinds:?}"
            ));
        }
        Ok(())
    }
}

/// The node's settings: the registry checks often, the gateway as described in the crate
/// docs, tracing on.
fn settings(store_url: &str, admin: SocketAddr) -> Result<Settings, String> {
    let mut settings = Settings::default();
    settings.store.url = store_url.to_owned();
    settings.admin.listen = admin.to_string();
    settings.registry.health_check_interval = HumanDuration(Duration::from_millis(500));
    settings.registry.refresh_interval = HumanDuration(Duration::from_millis(100));
    settings.registry.healthy_threshold = 1;
    settings.config.refresh_interval = HumanDuration(Duration::from_millis(200));
    let authentication = JwtConfig::from_toml(&format!(
        "enabled = true\nprovider = \"jwt\"\nsecret = \"{SECRET}\"\nissuer = \"{ISSUER}\"\nforward_claims = {{ sub = \"x-user-id\" }}\n"
    ))
    .map_err(|e| e.to_string())?;
    let mut users = RouteConfig::new("/api/users/*", user_service::SERVICE).strip_prefix("/api");
    users.rate_limiting = Some(RateLimitConfig {
        enabled: true,
        requests: USERS_RATE,
        window: HumanDuration(Duration::from_secs(60)),
    });
    let mut orders = RouteConfig::new("/api/orders/*", order_service::SERVICE).strip_prefix("/api");
    orders.authorization = Some(AuthzRule::any().roles([ROLE]));
    orders.load_balancer = Some(LoadBalancer::Weighted);
    settings.gateway = Some(GatewayConfig {
        listen: "127.0.0.1:0".into(),
        authentication: Some(authentication),
        routes: vec![users, orders],
        ..GatewayConfig::default()
    });
    settings.tracing = TracingConfig {
        service_name: NODE_SERVICE.into(),
        sampling_rate: 1.0,
        ..TracingConfig::default()
    };
    Ok(settings)
}

/// One service's spec: this binary as `demo serve SERVICE` on a free port.
fn service_spec(
    exe: &str,
    service: &str,
    store_url: &str,
    admin: &str,
) -> Result<DeploySpec, String> {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port for {service}: {e}"))?
        .port();
    let mut environment = BTreeMap::new();
    environment.insert("TRELLIS_STORE".to_owned(), store_url.to_owned());
    environment.insert("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), admin.to_owned());
    environment.insert(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".to_owned(),
        format!("{admin}/v1/traces"),
    );
    environment.insert("OTEL_SERVICE_NAME".to_owned(), service.to_owned());
    Ok(DeploySpec {
        command: Some(vec![
            exe.to_owned(),
            "demo".into(),
            "serve".into(),
            service.to_owned(),
        ]),
        replicas: 1,
        environment,
        health_check: Some(HealthCheck {
            path: "/health".into(),
            port: i32::from(port),
            liveness_path: None,
            readiness_path: None,
        }),
        ..DeploySpec::default()
    })
}

/// A token for `subject` with `roles`, valid for an hour, signed with the demo secret.
fn token(subject: &str, roles: &[&str]) -> Result<String, String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let claims =
        json!({"sub": subject, "iss": ISSUER, "iat": now, "exp": now + 3600, "roles": roles});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .map_err(|e| format!("signing the demo token: {e}"))
}

/// One request: (status, JSON body or the text as a JSON string).
async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let mut request = http.request(method.clone(), url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .map_err(|e| format!("{method} {url}: reading the body: {e}"))?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, body))
}

fn expect_status(what: &str, got: u16, want: u16) -> StepResult {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: expected {want}, got {got}"))
    }
}

/// `http://host:port` of a healthy instance of `service` in the node's registry.
fn instance_url(w: &World, service: &str) -> Result<String, String> {
    let found = w.node.registry().discover(service);
    let record = found
        .healthy()
        .next()
        .ok_or_else(|| format!("no healthy {service} in the registry"))?;
    Ok(format!(
        "http://{}:{}",
        record.instance.host, record.instance.port
    ))
}

/// Polls `check` every 50 ms until it returns `Ok`, or fails with its last error after
/// `limit`.
async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(last) if Instant::now() >= deadline => {
                return Err(format!("not within {} s: {last}", limit.as_secs()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Answers by version during the blue-green load.
#[derive(Default)]
struct VersionCounts {
    by_version: std::sync::Mutex<BTreeMap<String, u64>>,
    failed: AtomicU64,
}

impl VersionCounts {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.by_version
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }
}

/// GETs `url` every 10 ms until `stop` (at most 6,000 requests or 60 s); returns how many
/// were sent.
async fn load(
    http: reqwest::Client,
    url: String,
    token: String,
    stop: Arc<AtomicBool>,
    counts: Arc<VersionCounts>,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::Relaxed) && sent < 6_000 && Instant::now() < deadline {
        tick.tick().await;
        sent += 1;
        match send(&http, reqwest::Method::GET, &url, Some(&token), None).await {
            Ok((200, body)) => {
                let version = body["version"].as_str().unwrap_or("?").to_owned();
                if let Ok(mut m) = counts.by_version.lock() {
                    *m.entry(version).or_default() += 1;
                }
            }
            _ => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    sent
}

/// `bytes` random bytes as lowercase hex (never all zero: a valid trace or span id).
fn random_hex(bytes: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::with_capacity(bytes * 2);
    while out.len() < bytes * 2 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(1),
        );
        out.push_str(&format!("{:016x}", hasher.finish() | 1));
    }
    out.truncate(bytes * 2);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_with_foreign_files_is_not_wiped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious.txt"), "keep me").unwrap();
        let err = prepare_data_dir(dir.path()).unwrap_err();
        assert!(err.contains("refusing to wipe"), "{err}");
        assert!(dir.path().join("precious.txt").exists());
    }

    #[test]
    fn the_demo_directory_is_wiped_and_marked() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("demo");
        let made = prepare_data_dir(&data).unwrap();
        std::fs::write(made.join("trellis.db"), "old").unwrap();
        let again = prepare_data_dir(&data).unwrap();
        assert!(!again.join("trellis.db").exists());
        assert!(again.join(MARKER).exists());
    }

    #[test]
    fn tokens_pass_the_gateway_verifier() {
        let settings = settings("sqlite:///tmp/x.db", "127.0.0.1:0".parse().unwrap()).unwrap();
        let config = settings.gateway.unwrap().authentication.unwrap();
        let verifier = trellis::auth::JwtVerifier::from_config(&config).unwrap();
        let claims = verifier
            .verify_cached(&token("someone", &[ROLE]).unwrap())
            .unwrap();
        assert_eq!(claims.subject(), Some("someone"));
        assert!(claims.has_role(ROLE));
    }

    #[test]
    fn random_ids_are_hex_of_the_asked_length() {
        let id = random_hex(16);
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(random_hex(16), id);
    }
}
