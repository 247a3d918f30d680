//! The `umeng-push-gateway` command: serve, simulator, migrate, check-config, healthcheck,
//! token. Thin: everything lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use umeng_push_gateway::config::{Config, Settings};
use umeng_push_gateway::startup::{self, Application};
use umeng_push_gateway::telemetry;

/// jemalloc: about a fifth less CPU per push than glibc's malloc, whose free lists the
/// gateway's mix of small and large buffers kept consolidating (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "umeng-push-gateway",
    version,
    about = "HTTP gateway in front of Umeng U-Push"
)]
struct Cli {
    /// Config file (TOML). Also `UMENG_GATEWAY_CONFIG`. Without one, built-in defaults
    /// apply: SQLite under ./data and demo mode.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve {
        /// Listen address, overriding `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run the Umeng simulator on its own.
    Simulator {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// Base URL clients use (and sign against); default http://<listen>.
        #[arg(long)]
        public_url: Option<String>,
        /// An app as APPKEY:SECRET:android|ios (repeatable).
        #[arg(long = "app", value_name = "APPKEY:SECRET:PLATFORM", required = true)]
        apps: Vec<umeng_push_gateway::simulator::SimApp>,
        /// Milliseconds between task status transitions.
        #[arg(long, default_value_t = 2000)]
        task_step_ms: u64,
    },
    /// Apply database migrations and exit (for a one-off Kubernetes Job).
    Migrate,
    /// Validate the configuration (file and environment) and exit non-zero on a problem.
    CheckConfig,
    /// Probe a running gateway's /readyz; exit 0 when ready (for container health checks).
    Healthcheck {
        /// Base URL of the gateway; default http://<server.listen> (0.0.0.0 becomes 127.0.0.1).
        #[arg(long)]
        url: Option<String>,
    },
    /// Make a new random client token and print it with its SHA-256 for `[[clients]]`.
    Token,
}

fn load(config: Option<PathBuf>) -> Result<Config, String> {
    let path = Settings::config_path(config);
    let settings = Settings::load(path.as_deref()).map_err(|e| e.to_string())?;
    Config::resolve(settings).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve { listen: None }) {
        Command::Serve { listen } => {
            let mut config = load(cli.config).map_err(anyhow::Error::msg)?;
            if let Some(addr) = listen {
                config.settings.server.listen = addr;
            }
            // Held until `serve` returns: dropping it writes out the queued log lines.
            let _log = telemetry::init(&config.settings.log);
            let demo = config.demo;
            let app = Application::build(config, None).await?;
            let addr = app.local_addr();
            if demo {
                let sim = app.simulator().map(|s| s.base_url()).unwrap_or_default();
                tracing::warn!(simulator = %sim, "DEMO MODE: no app configured; pushes go to the built-in simulator, token \"demo\" has every scope");
                eprintln!("{}", startup::demo_banner(addr, &sim));
            }
            tracing::info!(listen = %addr, "umeng-push-gateway listening");
            app.run_until(shutdown_signal()).await
        }
        Command::Simulator {
            listen,
            public_url,
            apps,
            task_step_ms,
        } => {
            let _log = telemetry::init(&Default::default());
            umeng_push_gateway::simulator::run_cli(
                listen,
                public_url,
                apps,
                Duration::from_millis(task_step_ms),
                shutdown_signal(),
            )
            .await
        }
        Command::Migrate => {
            let config = load(cli.config).map_err(anyhow::Error::msg)?;
            let _log = telemetry::init(&config.settings.log);
            let store = startup::open_store(&config).await?;
            store.migrate().await?;
            println!("migrations applied ({})", store.backend());
            Ok(())
        }
        Command::CheckConfig => {
            let config = load(cli.config).map_err(anyhow::Error::msg)?;
            umeng_push_gateway::store::check_url(config.settings.database.url.expose())
                .map_err(|e| anyhow::anyhow!("database.url: {e}"))?;
            if config.demo {
                println!(
                    "configuration OK: no apps configured, the gateway would run in demo mode"
                );
            } else {
                println!(
                    "configuration OK: {} app(s), {} client(s), database {}",
                    config.apps.len(),
                    config.clients.len(),
                    if config.settings.database.url.expose().starts_with("sqlite:") {
                        "sqlite"
                    } else {
                        "postgres"
                    }
                );
            }
            Ok(())
        }
        Command::Healthcheck { url } => {
            let base = match url {
                Some(u) => u,
                None => {
                    let config = load(cli.config).map_err(anyhow::Error::msg)?;
                    let mut addr = config.settings.server.listen;
                    if addr.ip().is_unspecified() {
                        addr.set_ip([127, 0, 0, 1].into());
                    }
                    format!("http://{addr}")
                }
            };
            let url = format!("{}/readyz", base.trim_end_matches('/'));
            let resp = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?
                .get(&url)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{url} unreachable: {}", e.without_url()))?;
            if resp.status().is_success() {
                println!("ready");
                Ok(())
            } else {
                anyhow::bail!("{url} answered {}", resp.status())
            }
        }
        Command::Token => {
            let token = format!("pgw_{}", startup::random_hex(32));
            println!("token:        {token}");
            println!(
                "token_sha256: {}",
                umeng_push_gateway::config::token_sha256_hex(&token)
            );
            println!("Give the token to the client; put only token_sha256 in [[clients]].");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}
