//! A stand-alone fake of Umeng's U-Push HTTP API, written from `docs/umeng-api.md` only.
//!
//! The simulator is deliberately independent of the gateway's own Umeng types: it reads raw
//! request bytes and `serde_json::Value`, verifies the signature over the raw body and its own
//! public base URL (§2), applies the documented rules with the documented error codes (§3-§5),
//! enforces the production quotas (§7), issues ids with the documented prefixes (§1.3), moves
//! tasks through the statuses of §6 over time, records every request it receives and can
//! inject faults (latency, hang, HTTP errors, dropped connections, chosen error codes).
//!
//! Error codes chosen where `umeng-api.md` leaves a choice (all HTTP 400 + FAIL envelope):
//!
//! | situation | code |
//! |---|---|
//! | unicast `device_tokens` holds more than one token (a comma) | 2015 |
//! | listcast with more than 500 tokens (§10 q6; old 2015 had the limit at 50) | 2015 |
//! | customizedcast with more than 500 aliases (§10 q6; old 2011) | 2011 |
//! | Android device token not 44 characters (old 4020) | 4020 |
//! | iOS device token not 64 characters (old 5005 "device_token format") | 5005 |
//! | iOS `aps.alert` missing/empty/invalid without `content-available: 1` | 2025 |
//! | Android `after_open` not one of `go_app`/`go_url`/`go_activity`/`go_custom` | 1002 |
//! | `go_custom` without `body.custom` | 1003 |
//! | `mipush` not the string `"true"`/`"false"` | 1017 |
//! | filter larger than 3000 bytes (compact JSON) | 2031 |
//! | `policy.max_send_num` not an integer ≥ 1000 (old 2024) | 2024 |
//! | `policy.out_biz_no` not a string, `policy.apns_collapse_id` not a string or > 64 bytes | 1027 |
//! | upload `content` larger than `upload_limit_bytes` (old 2038 "upload failed") | 2038 |
//!
//! Task statuses (§6): 7 until `policy.start_time`, then 0 (queued) for one `task_step`,
//! 1 (sending, counters growing) for one more, then 2 (done); 4 once cancelled; 5 if
//! `policy.expire_time` passes before the task is done.
//!
//! Test hooks: a groupcast whose filter is exactly `{"where":{"and":[{"tag":"nobody"}]}}`
//! ends in status 6 ("filter matched nobody") instead of 2.

mod faults;
mod server;
mod state;
mod validate;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The platform of a simulated app: decides which payload rules (§3.2 / §3.3), token length
/// and status counters (§6) apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimPlatform {
    Android,
    Ios,
}

impl SimPlatform {
    /// `"android"` or `"ios"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SimPlatform::Android => "android",
            SimPlatform::Ios => "ios",
        }
    }
}

impl std::fmt::Display for SimPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One app known to the simulator: its appkey, app master secret and platform.
#[derive(Clone, PartialEq, Eq)]
pub struct SimApp {
    pub appkey: String,
    /// The app master secret used to verify `sign`. Never logged, never in `Debug`.
    pub secret: String,
    pub platform: SimPlatform,
}

impl std::fmt::Debug for SimApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimApp")
            .field("appkey", &self.appkey)
            .field("secret", &"<redacted>")
            .field("platform", &self.platform)
            .finish()
    }
}

/// Why an `APPKEY:SECRET:PLATFORM` string could not be read. The text never contains the
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimAppParseError {
    #[error("expected APPKEY:SECRET:android or APPKEY:SECRET:ios")]
    Shape,
    #[error("the appkey part of APPKEY:SECRET:PLATFORM is empty")]
    EmptyAppkey,
    #[error("the secret part of APPKEY:SECRET:PLATFORM is empty")]
    EmptySecret,
    #[error("unknown platform {0:?} in APPKEY:SECRET:PLATFORM (expected android or ios)")]
    Platform(String),
}

impl std::str::FromStr for SimApp {
    type Err = SimAppParseError;

    /// Reads `APPKEY:SECRET:android` or `APPKEY:SECRET:ios`. The secret may itself contain
    /// `:`, since the appkey is everything before the first `:` and the platform everything
    /// after the last one.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (appkey, rest) = s.split_once(':').ok_or(SimAppParseError::Shape)?;
        let (secret, platform) = rest.rsplit_once(':').ok_or(SimAppParseError::Shape)?;
        let appkey = appkey.trim();
        if appkey.is_empty() {
            return Err(SimAppParseError::EmptyAppkey);
        }
        if secret.is_empty() {
            return Err(SimAppParseError::EmptySecret);
        }
        let platform = match platform.trim().to_ascii_lowercase().as_str() {
            "android" => SimPlatform::Android,
            "ios" => SimPlatform::Ios,
            other => return Err(SimAppParseError::Platform(other.to_owned())),
        };
        Ok(SimApp {
            appkey: appkey.to_owned(),
            secret: secret.to_owned(),
            platform,
        })
    }
}

/// Two demo apps for a simulator started with no app configured: the Android app of the
/// worked example in umeng-api.md §2.3 and an iOS app with a made-up secret.
pub fn demo_apps() -> Vec<SimApp> {
    vec![
        SimApp {
            appkey: "5f0000000000000000000001".to_owned(),
            secret: "testsecret0123456789abcdefghijkl".to_owned(),
            platform: SimPlatform::Android,
        },
        SimApp {
            appkey: "5f0000000000000000000002".to_owned(),
            secret: "testsecretios0123456789abcdefghi".to_owned(),
            platform: SimPlatform::Ios,
        },
    ]
}

/// How a simulator behaves.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// Apps the simulator knows; any other appkey gets 2021.
    pub apps: Vec<SimApp>,
    /// Base URL (scheme + host + port, no trailing path) that clients sign against (§2.1).
    /// Default: `http://<local_addr>`.
    pub public_url: Option<String>,
    /// Time between task status transitions (queued → sending → done). Default 2 s.
    pub task_step: Duration,
    /// Accepted distance between `timestamp` and the simulator's clock (§3.1). Default 10 min.
    pub timestamp_window: Duration,
    /// Enforce Umeng's production quotas of §7 (2050). Default true.
    pub quotas: bool,
    /// Largest accepted upload `content`, in bytes (§1.4). Default 10 MiB.
    pub upload_limit_bytes: usize,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            apps: Vec::new(),
            public_url: None,
            task_step: Duration::from_secs(2),
            timestamp_window: Duration::from_secs(600),
            quotas: true,
            upload_limit_bytes: 10 * 1024 * 1024,
        }
    }
}

/// One request the simulator received, with what it answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// 1, 2, 3 ... in order of arrival.
    pub seq: u64,
    pub path: String,
    /// The `sign` query parameter as received.
    pub sign: Option<String>,
    /// The raw body, lossy UTF-8 (bodies over 1 MiB are cut, with a marker).
    pub body: String,
    pub appkey: Option<String>,
    /// `type` of a send.
    pub cast_type: Option<String>,
    /// `policy.out_biz_no`.
    pub out_biz_no: Option<String>,
    /// `production_mode` as sent: the string itself (`"true"`), or `json:` + the JSON text
    /// of a non-string value (`json:true` for a JSON boolean), so the two stay apart.
    pub production_mode: Option<String>,
    /// HTTP status answered; 0 if the connection was dropped or the request hangs.
    pub http_status: u16,
    /// `SUCCESS` or `FAIL` when an Umeng envelope was answered.
    pub ret: Option<String>,
    pub error_code: Option<String>,
    /// The msg_id, task_id or file_id issued or answered.
    pub result_id: Option<String>,
    /// The fault applied, e.g. `latency(200ms)`, `hang`, `http_status(502)`, `drop`,
    /// `error_code(2050)`.
    pub fault: Option<String>,
}

/// A fault to inject into matching requests to the Umeng endpoints (never `/_sim/*`).
///
/// As JSON (for `POST /_sim/faults`):
/// `{"appkey":"5f…","path":"/api/send","kind":{"kind":"http_status","status":502},"times":1}`;
/// `appkey`, `path` and `times` may be omitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Only requests whose body carries this appkey; `None` = any.
    pub appkey: Option<String>,
    /// Only requests to this exact path (e.g. `/api/send`); `None` = any.
    pub path: Option<String>,
    pub kind: FaultKind,
    /// How many matching requests get the fault; `None` = until cleared.
    pub times: Option<u32>,
}

/// What an injected fault does. The first matching fault (in the order added) applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Wait `ms` milliseconds, then answer normally.
    Latency { ms: u64 },
    /// Read the request and never answer (until the client gives up or shutdown).
    Hang,
    /// Answer with this HTTP status and a non-Umeng HTML body (like a proxy would).
    HttpStatus { status: u16 },
    /// Read the request, then close the connection without any response.
    Drop,
    /// Answer HTTP 400 with a FAIL envelope carrying this error code.
    ErrorCode {
        code: String,
        message: Option<String>,
    },
    /// Answer with this HTTP status and this body verbatim (`application/json`), e.g. a
    /// SUCCESS envelope that lacks the id it should carry. Nothing is processed.
    Answer { status: u16, body: String },
}

/// A running simulator. Clones share the same server; serving stops on [`shutdown`].
/// Dropping every handle without calling it leaves the server running until the Tokio
/// runtime ends.
///
/// [`shutdown`]: SimulatorHandle::shutdown
#[derive(Clone)]
pub struct SimulatorHandle {
    state: Arc<state::State>,
    local_addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for SimulatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatorHandle")
            .field("base_url", &self.state.base_url)
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// Starts serving the simulated Umeng API on `listener` in a background task.
pub async fn start(
    listener: tokio::net::TcpListener,
    config: SimulatorConfig,
) -> anyhow::Result<SimulatorHandle> {
    let local_addr = listener.local_addr()?;
    let base_url = match &config.public_url {
        Some(url) => {
            let trimmed = url.trim().trim_end_matches('/');
            anyhow::ensure!(
                trimmed.starts_with("http://") || trimmed.starts_with("https://"),
                "simulator public URL must start with http:// or https://"
            );
            trimmed.to_owned()
        }
        None => format!("http://{local_addr}"),
    };
    anyhow::ensure!(
        !config.task_step.is_zero(),
        "simulator task_step must be greater than zero"
    );
    let state = Arc::new(state::State::new(&config, base_url));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(server::serve(listener, Arc::clone(&state), shutdown_rx));
    Ok(SimulatorHandle {
        state,
        local_addr,
        shutdown_tx,
        task: Arc::new(Mutex::new(Some(task))),
    })
}

impl SimulatorHandle {
    /// The base URL clients must send to and sign against (`public_url` or `http://<addr>`).
    pub fn base_url(&self) -> String {
        self.state.base_url.clone()
    }

    /// The address the simulator listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }

    /// Every request received so far (rejected, faulted and dropped ones too), in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests(None)
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.state.clear_requests();
    }

    /// Adds a fault after those already present.
    pub fn add_fault(&self, fault: Fault) {
        self.state.add_fault(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.state.clear_faults();
    }

    /// Stops accepting, closes every open connection (hung requests included) and waits for
    /// the server task to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Runs the simulator as a program: binds `listen`, logs the base URL and the apps (never
/// their secrets) and serves until `shutdown` resolves (the binary passes Ctrl-C or
/// SIGTERM). With no app given it serves [`demo_apps`].
pub async fn run_cli(
    listen: SocketAddr,
    public_url: Option<String>,
    apps: Vec<SimApp>,
    task_step: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let apps = if apps.is_empty() {
        tracing::warn!("no simulator app configured; serving the demo apps of umeng-api.md");
        demo_apps()
    } else {
        apps
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let config = SimulatorConfig {
        apps,
        public_url,
        task_step,
        ..SimulatorConfig::default()
    };
    let app_list: Vec<String> = config
        .apps
        .iter()
        .map(|a| format!("{}({})", a.appkey, a.platform))
        .collect();
    let handle = start(listener, config).await?;
    if handle.local_addr().ip().is_unspecified() {
        tracing::warn!(
            "the simulator listens on an unspecified address; set a public URL so that clients sign against the URL they use"
        );
    }
    tracing::info!(
        simulator.base_url = %handle.base_url(),
        simulator.apps = %app_list.join(", "),
        "umeng simulator listening"
    );
    shutdown.await;
    tracing::info!("umeng simulator shutting down");
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_app_parses_and_hides_the_secret() {
        let app: SimApp = "key1:sec:ret:ios".parse().expect("valid");
        assert_eq!(app.appkey, "key1");
        assert_eq!(app.secret, "sec:ret");
        assert_eq!(app.platform, SimPlatform::Ios);
        assert!(!format!("{app:?}").contains("sec:ret"));
    }

    #[test]
    fn sim_app_errors_are_clear() {
        assert_eq!(
            "k:s".parse::<SimApp>().unwrap_err(),
            SimAppParseError::Shape
        );
        assert_eq!(
            ":s:android".parse::<SimApp>().unwrap_err(),
            SimAppParseError::EmptyAppkey
        );
        assert_eq!(
            "k::android".parse::<SimApp>().unwrap_err(),
            SimAppParseError::EmptySecret
        );
        let err = "k:topsecret:windows".parse::<SimApp>().unwrap_err();
        assert!(err.to_string().contains("windows"));
        assert!(!err.to_string().contains("topsecret"));
    }
}
