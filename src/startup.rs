//! Building and running the gateway: connect the store, migrate, start the built-in
//! simulator in demo mode, bind the listener, serve until shutdown, run the background work
//! (`background.rs`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{App, Client, Config, OutcomeCommit, Scope};
use crate::gateway::Gateway;
use crate::secret::Secret;
use crate::simulator::{SimApp, SimPlatform, SimulatorConfig, SimulatorHandle};
use crate::store::{PoolOptions, Store};
use crate::umeng::{ClientConfig, Platform, UmengClient};

/// The bearer token accepted in demo mode.
pub const DEMO_TOKEN: &str = "demo";

/// A gateway bound to its listener, ready to serve.
pub struct Application {
    listener: TcpListener,
    gateway: Arc<Gateway>,
    simulator: Option<SimulatorHandle>,
}

impl Application {
    /// Connect, migrate (unless disabled), and bind. `listener` overrides
    /// `server.listen` (tests pass a port-0 listener).
    pub async fn build(mut config: Config, listener: Option<TcpListener>) -> anyhow::Result<Self> {
        let simulator = if config.demo {
            Some(enter_demo_mode(&mut config).await?)
        } else {
            None
        };
        let store = open_store(&config).await?;
        if config.settings.database.migrate_on_start {
            store
                .migrate()
                .await
                .context("running database migrations")?;
        }
        let umeng = UmengClient::new(ClientConfig {
            base_url: config.settings.umeng.base_url.clone(),
            connect_timeout: Duration::from_millis(config.settings.umeng.connect_timeout_ms),
            timeout: Duration::from_millis(config.settings.umeng.timeout_ms),
        })
        .context("building the Umeng client")?;
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(config.settings.server.listen)
                .await
                .with_context(|| format!("binding {}", config.settings.server.listen))?,
        };
        let gateway = Arc::new(Gateway::new(Arc::new(config), store, umeng));
        Ok(Application {
            listener,
            gateway,
            simulator,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn gateway(&self) -> Arc<Gateway> {
        Arc::clone(&self.gateway)
    }

    /// The in-process simulator (demo mode only).
    pub fn simulator(&self) -> Option<&SimulatorHandle> {
        self.simulator.as_ref()
    }

    /// Serve until `shutdown` resolves, then stop accepting, let in-flight requests finish
    /// (bounded by `server.shutdown_grace_secs`) and stop background work.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            gateway,
            simulator,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let background = crate::background::spawn(Arc::clone(&gateway), stop_rx);
        let grace = shutdown_grace(&gateway.config);
        let app = crate::http::router(Arc::clone(&gateway));
        let server_settings = &gateway.config.settings.server;
        let nofile = crate::http::serve::raise_descriptor_limit();
        let reserved = crate::http::serve::RESERVED_DESCRIPTORS
            + u64::from(gateway.config.settings.database.max_connections);
        let options = crate::http::serve::ServeOptions {
            header_read_timeout: Duration::from_secs(server_settings.header_read_timeout_secs),
            max_connections: crate::http::serve::connection_cap(
                server_settings.max_connections,
                nofile,
                reserved,
            ),
        };
        if options.max_connections < server_settings.max_connections {
            tracing::info!(
                max_connections = options.max_connections,
                open_file_limit = nofile,
                "connection cap lowered to leave descriptors for the database and Umeng"
            );
        }
        let (signal_tx, signal_rx) = tokio::sync::oneshot::channel::<()>();
        let server = crate::http::serve::serve(listener, app, options, async move {
            shutdown.await;
            let _ = signal_tx.send(());
        });
        let server = tokio::spawn(server);
        let mut server = server;
        tokio::select! {
            res = &mut server => { res??; }
            _ = signal_rx => {
                let deadline = tokio::time::Instant::now() + grace;
                tracing::info!(grace_secs = grace.as_secs(), "shutting down: finishing in-flight requests");
                match tokio::time::timeout_at(deadline, &mut server).await {
                    Ok(res) => res??,
                    Err(_) => {
                        tracing::warn!("in-flight requests did not finish within the grace period");
                        server.abort();
                    }
                }
                // Admitted pushes whose caller went away, and outcome records being
                // retried, finish too (within the same deadline).
                gateway.drain(deadline).await;
            }
        }
        let _ = stop_tx.send(true);
        for task in background {
            let _ = task.await;
        }
        if let Some(sim) = simulator {
            sim.shutdown().await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// How long shutdown waits for in-flight work: `server.shutdown_grace_secs`, and never less
/// than the longest an admitted push can take (an upload and a send, each up to the connect
/// plus the whole-call timeout) plus 5 s to record it. A push that reached Umeng is thus
/// recorded before the process exits. The pod's `terminationGracePeriodSeconds` must exceed
/// this.
pub fn shutdown_grace(config: &Config) -> Duration {
    let umeng = &config.settings.umeng;
    let one_call = umeng.connect_timeout_ms.saturating_add(umeng.timeout_ms);
    let push = Duration::from_millis(one_call.saturating_mul(2)) + Duration::from_secs(5);
    Duration::from_secs(config.settings.server.shutdown_grace_secs).max(push)
}

/// Open the configured store.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let db = &config.settings.database;
    if db.outcome_commit == OutcomeCommit::Relaxed && db.url.expose().starts_with("sqlite:") {
        tracing::warn!("database.outcome_commit = \"relaxed\" applies to PostgreSQL only; SQLite commits every write alike (synchronous = NORMAL)");
    }
    crate::store::connect(
        db.url.expose(),
        &PoolOptions {
            max_connections: db.max_connections,
            acquire_timeout: Duration::from_millis(db.acquire_timeout_ms),
            outcome_commit: db.outcome_commit,
        },
    )
    .await
    .context("opening the database")
}

/// Demo mode: start the simulator in-process with two apps, point the Umeng client at it,
/// and accept the `demo` token for every scope.
async fn enter_demo_mode(config: &mut Config) -> anyhow::Result<SimulatorHandle> {
    let demo_apps = [
        (
            "demo-android",
            Platform::Android,
            SimPlatform::Android,
            "5f00000000000000000d0001",
        ),
        (
            "demo-ios",
            Platform::Ios,
            SimPlatform::Ios,
            "5f00000000000000000d0002",
        ),
    ];
    let mut sim_apps = Vec::new();
    for (name, platform, sim_platform, appkey) in demo_apps {
        let secret = random_hex(16);
        sim_apps.push(SimApp {
            appkey: appkey.into(),
            secret: secret.clone(),
            platform: sim_platform,
        });
        config.apps.push(App {
            name: name.into(),
            platform,
            appkey: appkey.into(),
            master_secret: Secret::new(secret),
            payload_limit: match platform {
                Platform::Android => 2048,
                Platform::Ios => 2012,
            },
            quotas: crate::quota::QuotaKind::ALL
                .into_iter()
                .map(|k| (k, k.default_limit()))
                .collect(),
        });
    }
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("binding the demo simulator")?;
    let sim = crate::simulator::start(
        listener,
        SimulatorConfig {
            apps: sim_apps,
            ..SimulatorConfig::default()
        },
    )
    .await?;
    config.settings.umeng.base_url = sim.base_url();
    config.clients.push(Client {
        name: "demo".into(),
        token_sha256: crate::config::parse_sha256(&crate::config::token_sha256_hex(DEMO_TOKEN))
            .expect("a sha256 hex string parses"),
        scopes: vec![Scope::Admin],
        apps: None,
        // Demo mode has no callbacks: the demo client has no prefixes and no secret.
        callbacks: None,
    });
    Ok(sim)
}

/// Random lowercase hex of `bytes` random bytes.
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// The banner printed in demo mode: what this is and a first push to try.
pub fn demo_banner(mut addr: SocketAddr, simulator_url: &str) -> String {
    // Listening on every interface (containers): the curl goes to loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!(
        r#"
  umeng-push-gateway is running in DEMO MODE: no app is configured.
  Pushes go to the built-in Umeng simulator at {simulator_url}, not to Umeng.
  Apps: demo-android, demo-ios. Bearer token: {DEMO_TOKEN}. Configure [[apps]] to leave demo mode.

  Send a first push:
    curl -sS -X POST http://{addr}/v1/pushes \
      -H 'Authorization: Bearer {DEMO_TOKEN}' -H 'Content-Type: application/json' \
      -d '{{"app":"demo-android","type":"unicast","device_tokens":["AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv"],"notification":{{"title":"Hello","text":"First push through the gateway"}},"production_mode":false}}'

  Then see it in history:
    curl -sS http://{addr}/v1/pushes -H 'Authorization: Bearer {DEMO_TOKEN}'
"#
    )
}
