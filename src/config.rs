//! Settings: a documented TOML file plus `UMENG_GATEWAY_*` environment overrides,
//! loaded and validated once. Secrets are read from the environment or files and are
//! wrapped in [`Secret`] so that `Debug` never shows them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::quota::{QuotaKind, QuotaLimit};
use crate::secret::Secret;
use crate::umeng::Platform;

/// Prefix of environment overrides; nested keys are separated by `__`,
/// e.g. `UMENG_GATEWAY_DATABASE__URL`.
pub const ENV_PREFIX: &str = "UMENG_GATEWAY_";
/// Environment variable naming the config file (same as `--config`).
pub const ENV_CONFIG_FILE: &str = "UMENG_GATEWAY_CONFIG";
/// How long a push's outcome write is retried after the Umeng call before the pending
/// sweeper may take over: `history.pending_timeout_secs` must leave this much after the
/// worst-case Umeng path.
pub const FINISH_RETRY_BUDGET_MS: u128 = 30_000;
/// Clock difference allowed between the gateway and Umeng when a `policy.start_time` is
/// checked: the worst-case Umeng path plus this must fit in
/// [`crate::umeng::validate::MIN_START_AHEAD`].
pub const CLOCK_SKEW_ALLOWANCE_MS: u128 = 60_000;
/// Longest a task can live at Umeng: a `start_time` up to 7 days ahead and an
/// `expire_time` up to 7 days after it, plus the hour the poller waits after expiry.
pub const TASK_HORIZON_HOURS: u64 = 14 * 24 + 1;
/// Upper bound of `history.retention_days` (100 years; the purge computes dates from it).
const MAX_RETENTION_DAYS: u64 = 36_500;

/// Upper bound of `history.upload_reuse_days`: well inside Umeng's two-month file retention.
pub const MAX_UPLOAD_REUSE_DAYS: u64 = 30;
/// Upper bound of `history.pending_timeout_secs` (one day).
pub const MAX_PENDING_TIMEOUT_SECS: u64 = 86_400;
/// Upper bound of an app's `payload_limit_bytes` (Umeng's limits are 2048 and 2012).
pub const MAX_PAYLOAD_LIMIT_BYTES: usize = 4096;

/// Everything the gateway can be told, as read from the file and environment.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub umeng: UmengSettings,
    /// Default quota limits for every app (Umeng's documented defaults).
    pub quotas: QuotaSettings,
    pub history: HistorySettings,
    pub poller: PollerSettings,
    pub callbacks: CallbackSettings,
    pub delivery: DeliverySettings,
    pub log: LogSettings,
    /// The ops console at `/ui/`.
    pub console: crate::console::ConsoleSettings,
    pub apps: Vec<AppSettings>,
    /// Apps sent to together: a push naming a group goes to every member (one part per
    /// member, each rendered for its platform).
    pub app_groups: Vec<AppGroupSettings>,
    pub clients: Vec<ClientSettings>,
}

/// One app group as configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppGroupSettings {
    /// The name pushes give in `app` (distinct from every app name).
    pub name: String,
    /// Member app names, at most one per platform.
    pub apps: Vec<String>,
}

/// An app group as the gateway uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppGroup {
    pub name: String,
    /// Member app names, in the configured order (parts are numbered in this order).
    pub apps: Vec<String>,
}

/// Most tokens or aliases one request may address (`delivery.max_audience` is at most
/// this); more goes through `file_lines`.
pub const MAX_AUDIENCE_CEILING: u32 = 100_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Largest accepted request body (bytes). `file_lines` pushes carry whole token
    /// files, so this is above Umeng's 10 MiB upload limit.
    pub body_limit_bytes: usize,
    /// A request taking longer than this is answered 503; a push already admitted still
    /// completes and is recorded.
    pub request_timeout_secs: u64,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Serve Prometheus metrics at `GET /metrics` on the API port (open, like the probes).
    pub metrics_enabled: bool,
    /// Request-body bytes all requests together may hold at once (by `Content-Length`; a
    /// body without one counts as `body_limit_bytes`). A request that would go over waits
    /// up to 2 s for room, then gets 503 with `Retry-After`.
    pub inflight_body_bytes: usize,
    /// A connection whose request head has not fully arrived within this long is closed: a
    /// new connection that sends nothing, a client trickling its headers, and an idle
    /// keep-alive connection between requests (so this is also the keep-alive timeout).
    pub header_read_timeout_secs: u64,
    /// Open API connections at most; lowered at start so that descriptors stay free for the
    /// database pool and Umeng under the process's open-file limit. At the cap the
    /// connection idle for the longest is closed to make room.
    pub max_connections: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 12 * 1024 * 1024,
            request_timeout_secs: 90,
            shutdown_grace_secs: 30,
            metrics_enabled: true,
            inflight_body_bytes: 16 * 1024 * 1024,
            header_read_timeout_secs: 20,
            max_connections: 4096,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `postgres://user@host/db` or `sqlite://path/to/file.db`.
    pub url: Secret,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    /// Run migrations at start (otherwise use the `migrate` subcommand).
    pub migrate_on_start: bool,
    /// Whether a commit of outcome records alone waits for PostgreSQL's WAL flush.
    pub outcome_commit: OutcomeCommit,
    /// How long a replica answers 429 for a quota window the database called full before
    /// it asks the database again (0: ask every time). See [`crate::quota::FullWindows`].
    pub quota_full_recheck_ms: u64,
}

/// The longest `database.quota_full_recheck_ms`: a slot given back on another replica
/// is seen at most this late.
pub const MAX_QUOTA_FULL_RECHECK_MS: u64 = 60_000;

/// How PostgreSQL commits a statement that records outcomes and nothing else
/// (`database.outcome_commit`). Admissions, claims and every other write always wait for
/// the WAL flush. SQLite ignores it: its commits are durable against the gateway's crash,
/// not the machine's (`synchronous = NORMAL`), whatever they write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeCommit {
    /// Every commit waits for its WAL flush.
    #[default]
    Durable,
    /// Outcome-only commits do not wait (`synchronous_commit = off` for those transactions
    /// only): a crash of PostgreSQL itself may lose the outcomes of its last moments, whose
    /// pushes are then treated as if their replica had died mid-send.
    Relaxed,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("sqlite://data/umeng-push-gateway.db"),
            max_connections: 16,
            acquire_timeout_ms: 3000,
            migrate_on_start: true,
            outcome_commit: OutcomeCommit::Durable,
            quota_full_recheck_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UmengSettings {
    /// Umeng's API base URL, signed as part of every request.
    pub base_url: String,
    pub connect_timeout_ms: u64,
    /// Whole-request timeout for Umeng calls. Umeng answers in under 2 s normally and
    /// advises clients to wait up to a minute.
    pub timeout_ms: u64,
    /// Transport failures in a row (nothing sent, timeouts, answers that were not Umeng's)
    /// that open the circuit breaker; 0 turns it off.
    pub breaker_failures: u32,
    /// How long an open breaker answers 503 before it lets a probe through.
    pub breaker_cooldown_secs: u64,
}

impl Default for UmengSettings {
    fn default() -> Self {
        Self {
            base_url: "https://msgapi.umeng.com".into(),
            connect_timeout_ms: 3000,
            timeout_ms: 30_000,
            breaker_failures: 5,
            breaker_cooldown_secs: 30,
        }
    }
}

/// Limits per quota bucket. Any bucket left out keeps Umeng's default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaSettings {
    pub broadcast: Option<QuotaLimit>,
    pub groupcast: Option<QuotaLimit>,
    pub filecast: Option<QuotaLimit>,
    pub customizedcast_file: Option<QuotaLimit>,
}

impl QuotaSettings {
    fn get(&self, kind: QuotaKind) -> Option<QuotaLimit> {
        match kind {
            QuotaKind::Broadcast => self.broadcast,
            QuotaKind::Groupcast => self.groupcast,
            QuotaKind::Filecast => self.filecast,
            QuotaKind::CustomizedcastFile => self.customizedcast_file,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    /// A push still `pending` this long after it was created is marked `unknown`
    /// (its process died during the Umeng call). Must exceed the Umeng timeout.
    pub pending_timeout_secs: u64,
    /// How often the pending sweeper runs.
    pub sweep_interval_secs: u64,
    /// An uploaded token file is reused for identical content for this long
    /// (Umeng keeps files for two months).
    pub upload_reuse_days: u64,
    /// Pushes (and their idempotency keys) older than this many days are deleted;
    /// 0 keeps them forever.
    pub retention_days: u64,
    /// How often the retention purge runs (pushes, old quota counters, old uploads).
    pub purge_interval_secs: u64,
    /// Rows deleted per statement, so the purge never holds many locks for long.
    pub purge_batch_size: u32,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self {
            pending_timeout_secs: 120,
            sweep_interval_secs: 30,
            upload_reuse_days: 30,
            retention_days: 90,
            purge_interval_secs: 3600,
            purge_batch_size: 1000,
        }
    }
}

/// The task-status poller: refreshes unfinished task-class pushes from `/api/status`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollerSettings {
    pub enabled: bool,
    /// How often the poller looks for tasks that are due.
    pub interval_secs: u64,
    /// Most tasks claimed (and asked about concurrently) per round.
    pub batch_size: u32,
    /// How long a claimed task belongs to one replica. Must exceed `umeng.timeout_ms`;
    /// a replica that dies mid-round leaves its tasks to others after this long.
    pub lease_secs: u64,
    /// Seconds before the 1st, 2nd, 3rd ... check of a task (the first counted from
    /// acceptance); the last value repeats.
    pub backoff_secs: Vec<u64>,
    /// Stop polling a task that has not reached a final state this many hours after its
    /// start (`policy.start_time`, or creation), or one hour after it ends
    /// (`policy.expire_time`, or three days after its start) when that is earlier.
    pub max_age_hours: u64,
}

impl Default for PollerSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: 5,
            batch_size: 20,
            lease_secs: 120,
            backoff_secs: vec![5, 10, 30, 60, 120, 300, 600],
            max_age_hours: 192,
        }
    }
}

impl PollerSettings {
    /// The wait before check number `n` (1-based) of a task.
    pub fn backoff(&self, n: u32) -> Duration {
        let i = usize::try_from(n.saturating_sub(1)).unwrap_or(usize::MAX);
        let secs = self
            .backoff_secs
            .get(i)
            .or(self.backoff_secs.last())
            .copied()
            .unwrap_or(60);
        Duration::from_secs(secs)
    }
}

/// The callback worker (every replica runs one): delivery of signed callback events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackSettings {
    pub enabled: bool,
    /// How often the worker looks for due events when it found none last time.
    pub interval_ms: u64,
    /// Most deliveries in flight at once on one replica.
    pub concurrency: u32,
    /// Whole-request timeout of one delivery (connect included).
    pub timeout_ms: u64,
    /// How long a claimed event belongs to one replica; must exceed `timeout_ms` by 5 s.
    /// A replica that dies mid-delivery leaves the event to others after this long.
    pub lease_secs: u64,
    /// Retry waits: a random time between 0 and min(cap, base * 2^(n-1)) after attempt n
    /// (exponential backoff with full jitter).
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// Give up after this many attempts ...
    pub max_attempts: u32,
    /// ... or when the next attempt would come more than this long after the event.
    pub max_age_hours: u64,
}

impl Default for CallbackSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 1000,
            concurrency: 16,
            timeout_ms: 10_000,
            lease_secs: 60,
            backoff_base_ms: 5_000,
            backoff_cap_ms: 3_600_000,
            max_attempts: 60,
            max_age_hours: 24,
        }
    }
}

/// Asynchronous delivery (every replica runs a worker): pushes admitted with
/// `Prefer: respond-async`, `send_at` or `on_quota_exhausted: "wait"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// Run the delivery worker on this replica. Pushes are still accepted when it is off
    /// (another replica sends them).
    pub enabled: bool,
    /// How often the worker looks for due pushes when it found none (a push admitted on
    /// this replica wakes it at once).
    pub interval_ms: u64,
    /// Most pushes being sent at once by one replica ...
    pub concurrency: u32,
    /// ... and per app.
    pub per_app_concurrency: u32,
    /// How long a claimed push belongs to one replica. If the replica dies mid-send, the
    /// push is re-sent (task-class) or marked `unknown` (unicast-class) after this long.
    /// Must exceed twice the worst-case Umeng path plus 10 s.
    pub lease_secs: u64,
    /// Retry waits: a random time between 0 and min(cap, base * 2^(n-1)) after attempt n
    /// (exponential backoff with full jitter).
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// A push fails after this many attempts (claims) ...
    pub max_attempts: u32,
    /// ... or once this long has passed since it was due (its `send_at`, else admission)
    /// with no attempt succeeding; `policy.expire_time` ends it earlier. Waiting for quota
    /// ends at the same deadline.
    pub max_age_hours: u64,
    /// `send_at` at most this far ahead.
    pub max_send_at_days: u64,
    /// Most tokens (listcast) or aliases (customizedcast) one request may give, across
    /// its parts: a longer list is split into Umeng calls of at most 500 each. At most
    /// 100000; beyond it, use `file_lines`.
    pub max_audience: u32,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 500,
            concurrency: 32,
            per_app_concurrency: 16,
            lease_secs: 180,
            backoff_base_ms: 1000,
            backoff_cap_ms: 300_000,
            max_attempts: 12,
            max_age_hours: 24,
            max_send_at_days: 30,
            max_audience: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `info,umeng_push_gateway=debug`.
    /// `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// One Umeng app as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSettings {
    /// The name callers put in `app`.
    pub name: String,
    pub platform: Platform,
    pub appkey: String,
    /// The master secret inline (discouraged outside development).
    #[serde(default)]
    pub master_secret: Option<Secret>,
    /// Environment variable holding the master secret.
    #[serde(default)]
    pub master_secret_env: Option<String>,
    /// File holding the master secret (e.g. a mounted Kubernetes Secret); trailing
    /// whitespace is trimmed.
    #[serde(default)]
    pub master_secret_file: Option<PathBuf>,
    /// Payload size limit in bytes (default: Android 2048, iOS 2012).
    #[serde(default)]
    pub payload_limit_bytes: Option<usize>,
    /// Raised or lowered limits for this app's account.
    #[serde(default)]
    pub quotas: QuotaSettings,
}

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// POST /v1/pushes
    Send,
    /// history, task status refresh, quotas
    Read,
    /// cancel tasks
    Cancel,
    /// everything, on every app
    Admin,
}

/// One calling client as configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    pub name: String,
    /// Hex SHA-256 of the bearer token (`umeng-push-gateway token` makes one).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Environment variable holding the hex SHA-256 instead.
    #[serde(default)]
    pub token_sha256_env: Option<String>,
    pub scopes: Vec<Scope>,
    /// Apps this client may use; absent means all.
    #[serde(default)]
    pub apps: Option<Vec<String>>,
    /// A push's `callback_url` must start with one of these (absolute http(s) URLs, each
    /// ending in `/`). Needs a callback secret.
    #[serde(default)]
    pub callback_url_prefixes: Vec<String>,
    /// The signing secret of this client's callbacks, `whsec_` + base64 of 24 to 64 bytes:
    /// exactly one of inline (development only), an environment variable or a file.
    #[serde(default)]
    pub callback_secret: Option<Secret>,
    #[serde(default)]
    pub callback_secret_env: Option<String>,
    #[serde(default)]
    pub callback_secret_file: Option<PathBuf>,
}

/// A configuration problem, naming the setting at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// An app ready to use: secret loaded, limits resolved.
#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    pub platform: Platform,
    pub appkey: String,
    pub master_secret: Secret,
    pub payload_limit: usize,
    pub quotas: BTreeMap<QuotaKind, QuotaLimit>,
}

/// A client ready to authenticate.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    pub token_sha256: [u8; 32],
    pub scopes: Vec<Scope>,
    pub apps: Option<Vec<String>>,
    /// Callback settings, when the client may ask for callbacks.
    pub callbacks: Option<ClientCallbacks>,
}

/// Where a client's callbacks may go and the secret that signs them.
#[derive(Debug, Clone)]
pub struct ClientCallbacks {
    /// Each an absolute http(s) URL ending in `/`.
    pub url_prefixes: Vec<String>,
    /// `whsec_...`, checked at load.
    pub secret: Secret,
}

impl ClientCallbacks {
    pub fn allows(&self, url: &str) -> bool {
        self.url_prefixes
            .iter()
            .any(|p| url.starts_with(p.as_str()))
    }
}

impl Client {
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }

    pub fn may_use_app(&self, app: &str) -> bool {
        self.scopes.contains(&Scope::Admin)
            || self
                .apps
                .as_ref()
                .is_none_or(|apps| apps.iter().any(|a| a == app))
    }
}

/// Settings resolved into what the running gateway uses.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    pub apps: Vec<App>,
    pub groups: Vec<AppGroup>,
    pub clients: Vec<Client>,
    /// No app configured: run the built-in simulator with demo apps and the `demo` token.
    pub demo: bool,
    /// The key console session cookies are signed with, when configured.
    pub console_key: Option<Secret>,
}

impl Settings {
    /// Load defaults, then the file (if any), then `UMENG_GATEWAY_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only `SECTION__KEY` variables are settings. Others that happen to share the prefix
        // (Kubernetes service links such as UMENG_GATEWAY_PORT=tcp://..., or
        // UMENG_GATEWAY_CONFIG itself) are not ours to reject.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        figment
            .extract()
            .map_err(|e| ConfigError(format!("invalid configuration: {e}")))
    }

    /// The config file named by `--config` or `UMENG_GATEWAY_CONFIG`.
    pub fn config_path(flag: Option<PathBuf>) -> Option<PathBuf> {
        flag.or_else(|| std::env::var_os(ENV_CONFIG_FILE).map(PathBuf::from))
    }
}

impl Config {
    /// Validate settings and load secrets. Every problem names its setting.
    pub fn resolve(settings: Settings) -> Result<Config, ConfigError> {
        let mut apps = Vec::with_capacity(settings.apps.len());
        for (i, a) in settings.apps.iter().enumerate() {
            let at = format!("apps[{i}] ({})", a.name);
            if a.name.trim().is_empty() {
                return Err(ConfigError(format!("apps[{i}].name must not be empty")));
            }
            if apps.iter().any(|x: &App| x.name == a.name) {
                return Err(ConfigError(format!("{at}: app name is used twice")));
            }
            if a.appkey.trim().is_empty() {
                return Err(ConfigError(format!("{at}.appkey must not be empty")));
            }
            if let Some(other) = apps
                .iter()
                .find(|x: &&App| x.appkey.trim() == a.appkey.trim())
            {
                return Err(ConfigError(format!(
                    "{at}.appkey is also the appkey of app {:?}: one Umeng app is one [[apps]] \
                     block (they would share quota counters and idempotency keys)",
                    other.name
                )));
            }
            let master_secret = load_secret(
                &at,
                "master_secret",
                a.master_secret.as_ref(),
                a.master_secret_env.as_deref(),
                a.master_secret_file.as_deref(),
            )?;
            let payload_limit = a.payload_limit_bytes.unwrap_or(match a.platform {
                Platform::Android => 2048,
                Platform::Ios => 2012,
            });
            if !(1..=MAX_PAYLOAD_LIMIT_BYTES).contains(&payload_limit) {
                return Err(ConfigError(format!(
                    "{at}.payload_limit_bytes ({payload_limit}) must be 1 to \
                     {MAX_PAYLOAD_LIMIT_BYTES} (Umeng's limits are 2048 Android, 2012 iOS)"
                )));
            }
            let mut quotas = BTreeMap::new();
            for kind in QuotaKind::ALL {
                let limit = a
                    .quotas
                    .get(kind)
                    .or(settings.quotas.get(kind))
                    .unwrap_or(kind.default_limit());
                if limit.limit == 0 {
                    return Err(ConfigError(format!(
                        "{at}.quotas.{kind}.limit must be at least 1"
                    )));
                }
                quotas.insert(kind, limit);
            }
            apps.push(App {
                name: a.name.clone(),
                platform: a.platform,
                appkey: a.appkey.clone(),
                master_secret,
                payload_limit,
                quotas,
            });
        }
        for kind in QuotaKind::ALL {
            if settings.quotas.get(kind).is_some_and(|l| l.limit == 0) {
                return Err(ConfigError(format!(
                    "quotas.{kind}.limit must be at least 1"
                )));
            }
        }

        let groups = app_groups(&settings.app_groups, &apps)?;

        let mut clients = Vec::with_capacity(settings.clients.len());
        for (i, c) in settings.clients.iter().enumerate() {
            let at = format!("clients[{i}] ({})", c.name);
            if c.name.trim().is_empty() {
                return Err(ConfigError(format!("clients[{i}].name must not be empty")));
            }
            if clients.iter().any(|x: &Client| x.name == c.name) {
                return Err(ConfigError(format!(
                    "{at}: client name is used twice (history and logs name clients)"
                )));
            }
            let hex_hash = match (&c.token_sha256, &c.token_sha256_env) {
                (Some(h), None) => h.clone(),
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    ConfigError(format!("{at}.token_sha256_env: variable {var} is not set"))
                })?,
                (Some(_), Some(_)) => {
                    return Err(ConfigError(format!(
                        "{at}: give token_sha256 or token_sha256_env, not both"
                    )))
                }
                (None, None) => {
                    return Err(ConfigError(format!("{at}: token_sha256 is required")));
                }
            };
            let token_sha256 = parse_sha256(hex_hash.trim()).ok_or_else(|| {
                ConfigError(format!(
                    "{at}.token_sha256 must be 64 hex characters (a SHA-256)"
                ))
            })?;
            if clients
                .iter()
                .any(|x: &Client| x.token_sha256 == token_sha256)
            {
                return Err(ConfigError(format!(
                    "{at}: the same token is configured twice"
                )));
            }
            if c.scopes.is_empty() {
                return Err(ConfigError(format!("{at}.scopes must not be empty")));
            }
            if let Some(list) = &c.apps {
                for name in list {
                    if !apps.iter().any(|a| &a.name == name)
                        && !groups.iter().any(|g| &g.name == name)
                    {
                        return Err(ConfigError(format!(
                            "{at}.apps names unknown app or app group {name:?}"
                        )));
                    }
                }
            }
            let callbacks = client_callbacks(&at, c)?;
            clients.push(Client {
                name: c.name.clone(),
                token_sha256,
                scopes: c.scopes.clone(),
                apps: c.apps.clone(),
                callbacks,
            });
        }

        let url = settings.database.url.expose();
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            return Err(ConfigError(
                "database.url must start with postgres://, postgresql:// or sqlite:".into(),
            ));
        }
        let mut settings = settings;
        settings.umeng.base_url = normalize_base_url(&settings.umeng.base_url)?;
        check_timeouts(&settings)?;
        check_horizons(&settings.history, &settings.poller)?;

        let h = &settings.history;
        for (name, value) in [
            ("history.sweep_interval_secs", h.sweep_interval_secs),
            ("history.purge_interval_secs", h.purge_interval_secs),
            ("history.purge_batch_size", u64::from(h.purge_batch_size)),
            ("poller.interval_secs", settings.poller.interval_secs),
            ("poller.batch_size", u64::from(settings.poller.batch_size)),
            ("poller.max_age_hours", settings.poller.max_age_hours),
            (
                "server.header_read_timeout_secs",
                settings.server.header_read_timeout_secs,
            ),
            (
                "server.max_connections",
                settings.server.max_connections as u64,
            ),
            (
                "server.inflight_body_bytes",
                settings.server.inflight_body_bytes as u64,
            ),
            ("callbacks.interval_ms", settings.callbacks.interval_ms),
            (
                "callbacks.concurrency",
                u64::from(settings.callbacks.concurrency),
            ),
            ("callbacks.timeout_ms", settings.callbacks.timeout_ms),
            (
                "callbacks.backoff_base_ms",
                settings.callbacks.backoff_base_ms,
            ),
            (
                "callbacks.backoff_cap_ms",
                settings.callbacks.backoff_cap_ms,
            ),
            (
                "callbacks.max_attempts",
                u64::from(settings.callbacks.max_attempts),
            ),
            ("callbacks.max_age_hours", settings.callbacks.max_age_hours),
            ("delivery.interval_ms", settings.delivery.interval_ms),
            (
                "delivery.concurrency",
                u64::from(settings.delivery.concurrency),
            ),
            (
                "delivery.per_app_concurrency",
                u64::from(settings.delivery.per_app_concurrency),
            ),
            (
                "delivery.backoff_base_ms",
                settings.delivery.backoff_base_ms,
            ),
            ("delivery.backoff_cap_ms", settings.delivery.backoff_cap_ms),
            (
                "delivery.max_attempts",
                u64::from(settings.delivery.max_attempts),
            ),
            ("delivery.max_age_hours", settings.delivery.max_age_hours),
            (
                "delivery.max_send_at_days",
                settings.delivery.max_send_at_days,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{name} must be at least 1")));
            }
        }
        if settings.database.quota_full_recheck_ms > MAX_QUOTA_FULL_RECHECK_MS {
            return Err(ConfigError(format!(
                "database.quota_full_recheck_ms must be at most {MAX_QUOTA_FULL_RECHECK_MS} \
                 (a slot given back on another replica is seen that late); 0 turns it off"
            )));
        }
        let p = &settings.poller;
        if p.backoff_secs.is_empty() || p.backoff_secs.contains(&0) {
            return Err(ConfigError(
                "poller.backoff_secs must list at least one wait, each at least 1 second".into(),
            ));
        }

        let cb = &settings.callbacks;
        if u128::from(cb.lease_secs) * 1000 < u128::from(cb.timeout_ms) + 5000 {
            return Err(ConfigError(format!(
                "callbacks.lease_secs ({}) must exceed callbacks.timeout_ms ({} ms) by at \
                 least 5 seconds, or a slow delivery could be sent twice",
                cb.lease_secs, cb.timeout_ms
            )));
        }
        if cb.max_attempts > 100 {
            return Err(ConfigError(
                "callbacks.max_attempts must be at most 100 (every attempt is kept)".into(),
            ));
        }
        let d = &settings.delivery;
        if d.backoff_cap_ms < d.backoff_base_ms {
            return Err(ConfigError(
                "delivery.backoff_cap_ms must be at least delivery.backoff_base_ms".into(),
            ));
        }
        if d.max_attempts > 100 {
            return Err(ConfigError(
                "delivery.max_attempts must be at most 100 (every attempt is kept)".into(),
            ));
        }
        if d.max_audience < 500 || d.max_audience > MAX_AUDIENCE_CEILING {
            return Err(ConfigError(format!(
                "delivery.max_audience must be 500 to {MAX_AUDIENCE_CEILING} (beyond it, use file_lines)"
            )));
        }
        if d.max_send_at_days > 365 || d.max_age_hours > 24 * 30 {
            return Err(ConfigError(
                "delivery.max_send_at_days must be at most 365 and delivery.max_age_hours at most 720".into(),
            ));
        }
        if cb.backoff_cap_ms < cb.backoff_base_ms {
            return Err(ConfigError(
                "callbacks.backoff_cap_ms must be at least callbacks.backoff_base_ms".into(),
            ));
        }

        let console_key = crate::console::load_session_key(&settings.console)?;
        let demo = apps.is_empty();
        if !demo && clients.is_empty() {
            return Err(ConfigError(
                "apps are configured but no [[clients]]: nobody could call the gateway".into(),
            ));
        }
        Ok(Config {
            settings,
            apps,
            groups,
            clients,
            demo,
            console_key,
        })
    }

    pub fn group(&self, name: &str) -> Option<&AppGroup> {
        self.groups.iter().find(|g| g.name == name)
    }

    pub fn app(&self, name: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.name == name)
    }

    pub fn umeng_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.umeng.timeout_ms)
    }
}

/// Checks `umeng.base_url` and returns it as it is signed: `scheme://host[:port]`, scheme
/// and host lower-case, a default port dropped. Every request is signed over this string
/// plus the path, while the HTTP client sends the normalised URL; forms that differ
/// (`HTTP://`, `:443`, a query, userinfo) could never sign correctly, so they are refused
/// or normalised here.
pub fn normalize_base_url(raw: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| {
        Err(ConfigError(format!(
            "umeng.base_url {raw:?} {why}; give scheme://host[:port], e.g. https://msgapi.umeng.com"
        )))
    };
    let Ok(url) = url::Url::parse(raw.trim()) else {
        return bad("is not a valid URL");
    };
    if !matches!(url.scheme(), "http" | "https") {
        return bad("must use http or https");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return bad("has no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return bad("must not contain a user name or password");
    }
    if url.query().is_some() {
        return bad("must not have a query (the sign goes in the query)");
    }
    if url.fragment().is_some() {
        return bad("must not have a fragment");
    }
    if url.path() != "/" {
        return bad("must not have a path (Umeng's paths start at the host)");
    }
    Ok(url.origin().ascii_serialization())
}

/// The Umeng timeouts against the settings that must outlast them. W, the worst case of
/// one push's Umeng path, is an upload then a send: 2 x (connect + call timeout).
fn check_timeouts(settings: &Settings) -> Result<(), ConfigError> {
    let u = &settings.umeng;
    for (name, value) in [
        ("umeng.connect_timeout_ms", u.connect_timeout_ms),
        ("umeng.timeout_ms", u.timeout_ms),
        (
            "server.request_timeout_secs",
            settings.server.request_timeout_secs,
        ),
    ] {
        if value == 0 {
            return Err(ConfigError(format!("{name} must be at least 1")));
        }
    }
    let pending = settings.history.pending_timeout_secs;
    if pending > MAX_PENDING_TIMEOUT_SECS {
        return Err(ConfigError(format!(
            "history.pending_timeout_secs ({pending}) must be at most {MAX_PENDING_TIMEOUT_SECS}"
        )));
    }
    let worst = 2 * (u128::from(u.connect_timeout_ms) + u128::from(u.timeout_ms));
    let path = format!(
        "2 x (umeng.connect_timeout_ms {} + umeng.timeout_ms {}) = {worst} ms, an upload then a send",
        u.connect_timeout_ms, u.timeout_ms
    );
    let request_ms = u128::from(settings.server.request_timeout_secs) * 1000;
    if request_ms <= worst {
        return Err(ConfigError(format!(
            "server.request_timeout_secs ({} s) must exceed the worst-case Umeng path, {path}: \
             a request timed out during the Umeng call would answer 503 for a push that was sent",
            settings.server.request_timeout_secs
        )));
    }
    if u128::from(pending) * 1000 <= worst + FINISH_RETRY_BUDGET_MS {
        return Err(ConfigError(format!(
            "history.pending_timeout_secs ({pending} s) must exceed the worst-case Umeng path, \
             {path}, plus {} s to record its outcome: otherwise the sweeper marks a push \
             `unknown` while its real outcome is on the way",
            FINISH_RETRY_BUDGET_MS / 1000
        )));
    }
    let lease = settings.poller.lease_secs;
    if u128::from(lease) * 1000 <= u128::from(u.timeout_ms) {
        return Err(ConfigError(format!(
            "poller.lease_secs ({lease}) must exceed umeng.timeout_ms ({} ms): a lease that runs \
             out during the status call lets another replica poll the same task",
            u.timeout_ms
        )));
    }
    let lease = settings.delivery.lease_secs;
    if u128::from(lease) * 1000 <= 2 * worst + 10_000 {
        return Err(ConfigError(format!(
            "delivery.lease_secs ({lease}) must exceed twice the worst-case Umeng path, {path}, \
             plus 10 s: a lease that runs out while a push is being sent lets another replica \
             send it again"
        )));
    }
    let margin = crate::umeng::validate::MIN_START_AHEAD.whole_milliseconds();
    let margin = u128::try_from(margin).unwrap_or(0);
    if worst + CLOCK_SKEW_ALLOWANCE_MS > margin {
        return Err(ConfigError(format!(
            "the worst-case Umeng path, {path}, must be at most {} ms: a policy.start_time is \
             accepted {} minutes ahead, and the push must reach Umeng before it (with {} s for \
             clock differences)",
            margin - CLOCK_SKEW_ALLOWANCE_MS,
            margin / 60_000,
            CLOCK_SKEW_ALLOWANCE_MS / 1000
        )));
    }
    Ok(())
}

/// Retention against the horizons of live tasks, and the upload reuse cap.
fn check_horizons(h: &HistorySettings, p: &PollerSettings) -> Result<(), ConfigError> {
    if h.retention_days > MAX_RETENTION_DAYS {
        return Err(ConfigError(format!(
            "history.retention_days ({}) must be at most {MAX_RETENTION_DAYS} (0 keeps everything)",
            h.retention_days
        )));
    }
    if h.retention_days > 0 {
        let needed_hours = p.max_age_hours.max(TASK_HORIZON_HOURS);
        if u128::from(h.retention_days) * 24 <= u128::from(needed_hours) {
            return Err(ConfigError(format!(
                "history.retention_days ({}) must be longer than a task can be polled: \
                 poller.max_age_hours ({} h) and a policy.start_time 7 days ahead with an \
                 expire_time 7 days after it ({TASK_HORIZON_HOURS} h); otherwise a live task's \
                 row and its out_biz_no are purged (0 keeps everything)",
                h.retention_days, p.max_age_hours
            )));
        }
    }
    if h.upload_reuse_days > MAX_UPLOAD_REUSE_DAYS {
        return Err(ConfigError(format!(
            "history.upload_reuse_days ({}) must be at most {MAX_UPLOAD_REUSE_DAYS}: Umeng keeps \
             uploaded files for about two months, and a file_id it has forgotten fails every push",
            h.upload_reuse_days
        )));
    }
    if h.retention_days > 0 && h.upload_reuse_days >= h.retention_days {
        return Err(ConfigError(format!(
            "history.upload_reuse_days ({}) must be shorter than history.retention_days ({})",
            h.upload_reuse_days, h.retention_days
        )));
    }
    Ok(())
}

/// Validates `[[app_groups]]`: a name distinct from every app and group, and one to
/// (number of platforms) configured member apps, at most one per platform.
fn app_groups(groups: &[AppGroupSettings], apps: &[App]) -> Result<Vec<AppGroup>, ConfigError> {
    let mut out: Vec<AppGroup> = Vec::with_capacity(groups.len());
    for (i, g) in groups.iter().enumerate() {
        let at = format!("app_groups[{i}] ({})", g.name);
        if g.name.trim().is_empty() || g.name.len() > 64 {
            return Err(ConfigError(format!(
                "app_groups[{i}].name must be 1 to 64 characters"
            )));
        }
        if apps.iter().any(|a| a.name == g.name) || out.iter().any(|o| o.name == g.name) {
            return Err(ConfigError(format!(
                "{at}: the name is already used by an app or another group"
            )));
        }
        if g.apps.is_empty() {
            return Err(ConfigError(format!("{at}.apps must name at least one app")));
        }
        let mut platforms = Vec::new();
        for name in &g.apps {
            let Some(app) = apps.iter().find(|a| &a.name == name) else {
                return Err(ConfigError(format!("{at}.apps names unknown app {name:?}")));
            };
            if platforms.contains(&app.platform) {
                return Err(ConfigError(format!(
                    "{at}.apps has two {} apps; a group has at most one app per platform",
                    app.platform.as_str()
                )));
            }
            platforms.push(app.platform);
        }
        out.push(AppGroup {
            name: g.name.clone(),
            apps: g.apps.clone(),
        });
    }
    Ok(out)
}

fn load_secret(
    at: &str,
    what: &str,
    inline: Option<&Secret>,
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<Secret, ConfigError> {
    let given = [inline.is_some(), env.is_some(), file.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if given != 1 {
        return Err(ConfigError(format!(
            "{at}: give exactly one of {what}, {what}_env or {what}_file"
        )));
    }
    let value = if let Some(s) = inline {
        s.expose().to_string()
    } else if let Some(var) = env {
        std::env::var(var)
            .map_err(|_| ConfigError(format!("{at}.{what}_env: variable {var} is not set")))?
    } else if let Some(path) = file {
        std::fs::read_to_string(path)
            .map_err(|e| {
                ConfigError(format!(
                    "{at}.{what}_file: cannot read {}: {e}",
                    path.display()
                ))
            })?
            .trim_end()
            .to_string()
    } else {
        unreachable!("exactly one source was checked above")
    };
    if value.is_empty() {
        return Err(ConfigError(format!("{at}: {what} is empty")));
    }
    Ok(Secret::new(value))
}

/// A client's callback prefixes and secret: prefixes need a secret (and the other way
/// round), each prefix is an absolute http(s) URL ending in `/`.
fn client_callbacks(at: &str, c: &ClientSettings) -> Result<Option<ClientCallbacks>, ConfigError> {
    let any_secret = c.callback_secret.is_some()
        || c.callback_secret_env.is_some()
        || c.callback_secret_file.is_some();
    if c.callback_url_prefixes.is_empty() {
        if any_secret {
            return Err(ConfigError(format!(
                "{at}: a callback secret without callback_url_prefixes has no use"
            )));
        }
        return Ok(None);
    }
    if !any_secret {
        return Err(ConfigError(format!(
            "{at}.callback_url_prefixes needs a secret: give exactly one of callback_secret, \
             callback_secret_env or callback_secret_file"
        )));
    }
    for (i, prefix) in c.callback_url_prefixes.iter().enumerate() {
        check_callback_prefix(prefix).map_err(|why| {
            ConfigError(format!(
                "{at}.callback_url_prefixes[{i}] {prefix:?} {why}; give an absolute http(s) \
                 URL ending in /, e.g. https://hooks.example.com/umeng/"
            ))
        })?;
    }
    let secret = load_secret(
        at,
        "callback_secret",
        c.callback_secret.as_ref(),
        c.callback_secret_env.as_deref(),
        c.callback_secret_file.as_deref(),
    )?;
    crate::callbacks::signing_key(&secret)
        .map_err(|why| ConfigError(format!("{at}: the callback secret {why}")))?;
    Ok(Some(ClientCallbacks {
        url_prefixes: c.callback_url_prefixes.clone(),
        secret,
    }))
}

/// Why `prefix` is not a usable callback URL prefix.
fn check_callback_prefix(prefix: &str) -> Result<(), &'static str> {
    if !prefix.ends_with('/') {
        return Err("must end in /");
    }
    let Ok(url) = url::Url::parse(prefix) else {
        return Err("is not a valid URL");
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must use http or https");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain a user name or password");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment");
    }
    // The written form must be the parsed form, so a prefix match on the caller's text
    // means what it says (no `HTTPS://`, default ports, `..` or percent tricks).
    if url.as_str() != prefix {
        return Err("is not in normal form (lower-case scheme and host, no default port)");
    }
    Ok(())
}

/// Parse 64 hex characters into a SHA-256 digest.
pub fn parse_sha256(hex_str: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_str).ok()?;
    bytes.try_into().ok()
}

/// Hex SHA-256 of a token, as configured in `token_sha256`.
pub fn token_sha256_hex(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Settings {
        Figment::new()
            .merge(Toml::string(toml))
            .extract()
            .expect("valid toml")
    }

    const ONE_APP: &str = r#"
        [[apps]]
        name = "shop-android"
        platform = "android"
        appkey = "5f0000000000000000000001"
        master_secret = "s3cret-value"
        [apps.quotas]
        broadcast = { limit = 20, window = "day" }
        [[clients]]
        name = "order-service"
        token_sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        scopes = ["send", "read"]
        apps = ["shop-android"]
    "#;

    #[test]
    fn outcome_commit_is_durable_unless_asked_and_rejects_other_words() {
        assert_eq!(
            Settings::default().database.outcome_commit,
            OutcomeCommit::Durable
        );
        let relaxed = settings("[database]\noutcome_commit = \"relaxed\"\n");
        assert_eq!(relaxed.database.outcome_commit, OutcomeCommit::Relaxed);
        let err = Figment::new()
            .merge(Toml::string("[database]\noutcome_commit = \"sometimes\"\n"))
            .extract::<Settings>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes"), "{err}");
        assert!(
            err.contains("durable") && err.contains("relaxed"),
            "names the choices: {err}"
        );
    }

    #[test]
    fn quota_full_recheck_defaults_to_a_second_may_be_off_and_is_bounded() {
        assert_eq!(Settings::default().database.quota_full_recheck_ms, 1000);
        let off = Config::resolve(settings("[database]\nquota_full_recheck_ms = 0\n")).unwrap();
        assert_eq!(off.settings.database.quota_full_recheck_ms, 0);
        let err = resolve_err("[database]\nquota_full_recheck_ms = 60001\n");
        assert!(
            err.contains("database.quota_full_recheck_ms must be at most 60000"),
            "{err}"
        );
    }

    #[test]
    fn no_apps_means_demo_mode() {
        let c = Config::resolve(Settings::default()).unwrap();
        assert!(c.demo);
    }

    #[test]
    fn resolves_apps_clients_and_quota_overrides() {
        let c = Config::resolve(settings(ONE_APP)).unwrap();
        assert!(!c.demo);
        let app = c.app("shop-android").unwrap();
        assert_eq!(app.payload_limit, 2048);
        assert_eq!(app.quotas[&QuotaKind::Broadcast].limit, 20);
        assert_eq!(app.quotas[&QuotaKind::Groupcast].limit, 5);
        assert_eq!(
            c.clients[0].token_sha256,
            parse_sha256(&token_sha256_hex("foo")).unwrap()
        );
        assert!(c.clients[0].may_use_app("shop-android"));
        assert!(!c.clients[0].may_use_app("other"));
        assert!(!c.clients[0].has_scope(Scope::Cancel));
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let c = Config::resolve(settings(ONE_APP)).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("s3cret-value"), "{dump}");
    }

    #[test]
    fn errors_name_the_setting() {
        let bad = ONE_APP.replace("master_secret = \"s3cret-value\"", "");
        let err = Config::resolve(settings(&bad)).unwrap_err().to_string();
        assert!(err.contains("apps[0] (shop-android)"), "{err}");
        assert!(err.contains("master_secret"), "{err}");

        let bad = ONE_APP.replace("2c26b46b", "zz");
        let err = Config::resolve(settings(&bad)).unwrap_err().to_string();
        assert!(err.contains("token_sha256"), "{err}");

        let bad = ONE_APP.replace("apps = [\"shop-android\"]", "apps = [\"nope\"]");
        let err = Config::resolve(settings(&bad)).unwrap_err().to_string();
        assert!(err.contains("unknown app or app group \"nope\""), "{err}");
    }

    #[test]
    fn app_groups_are_checked() {
        let two = format!(
            "{ONE_APP}\n[[apps]]\nname = \"shop-ios\"\nplatform = \"ios\"\nappkey = \"5f0000000000000000000009\"\nmaster_secret = \"s\"\n"
        );
        let group = |apps: &str, name: &str| {
            format!("{two}\n[[app_groups]]\nname = \"{name}\"\napps = {apps}\n")
        };
        let ok = Config::resolve(settings(&group("[\"shop-android\", \"shop-ios\"]", "shop")))
            .expect("a group of one Android and one iOS app");
        assert_eq!(ok.group("shop").unwrap().apps, ["shop-android", "shop-ios"]);
        for (apps, name, needle) in [
            (
                "[\"shop-android\", \"nope\"]",
                "shop",
                "unknown app \"nope\"",
            ),
            (
                "[\"shop-android\", \"shop-android\"]",
                "shop",
                "at most one app per platform",
            ),
            ("[]", "shop", "at least one app"),
            ("[\"shop-ios\"]", "shop-android", "already used"),
        ] {
            let err = Config::resolve(settings(&group(apps, name)))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{apps}: {err}");
        }
        // A client's allow-list may name the group.
        let allowed = group("[\"shop-android\", \"shop-ios\"]", "shop")
            .replace("apps = [\"shop-android\"]\n", "apps = [\"shop\"]\n");
        Config::resolve(settings(&allowed)).expect("a client may be allowed a group");
    }

    #[test]
    fn secret_from_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "from-file\n").unwrap();
        let toml = ONE_APP.replace(
            "master_secret = \"s3cret-value\"",
            &format!("master_secret_file = {:?}", path.display().to_string()),
        );
        let c = Config::resolve(settings(&toml)).unwrap();
        assert_eq!(c.apps[0].master_secret.expose(), "from-file");

        let toml = ONE_APP.replace(
            "master_secret = \"s3cret-value\"",
            "master_secret_env = \"UMGW_TEST_UNSET_VARIABLE_42\"",
        );
        let err = Config::resolve(settings(&toml)).unwrap_err().to_string();
        assert!(
            err.contains("UMGW_TEST_UNSET_VARIABLE_42 is not set"),
            "{err}"
        );
    }

    #[test]
    fn default_toml_documents_the_built_in_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let file: Settings = Figment::new()
            .merge(Toml::file(&path))
            .extract()
            .expect("config/default.toml parses");
        let built_in = Settings::default();
        let dump = |s: &Settings| {
            format!(
                "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
                s.server, s.database, s.umeng, s.history, s.poller, s.callbacks, s.log, s.console
            )
        };
        assert_eq!(dump(&file), dump(&built_in));
    }

    #[test]
    fn poller_backoff_grows_then_repeats_its_last_value() {
        let p = PollerSettings::default();
        let waits: Vec<u64> = (1..=9).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 30, 60, 120, 300, 600, 600, 600]);
    }

    #[test]
    fn background_settings_are_checked() {
        let err = Config::resolve(settings("[poller]\nlease_secs = 10"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("poller.lease_secs (10) must exceed umeng.timeout_ms"),
            "{err}"
        );
        let err = Config::resolve(settings("[poller]\nbackoff_secs = []"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("poller.backoff_secs"), "{err}");
        let err = Config::resolve(settings("[history]\npurge_batch_size = 0"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("history.purge_batch_size must be at least 1"),
            "{err}"
        );
        for zero in [
            "header_read_timeout_secs",
            "max_connections",
            "inflight_body_bytes",
        ] {
            let err = Config::resolve(settings(&format!("[server]\n{zero} = 0")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("server.{zero} must be at least 1")),
                "{err}"
            );
        }
    }

    fn resolve_err(toml: &str) -> String {
        Config::resolve(settings(toml)).unwrap_err().to_string()
    }

    const CALLBACK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn with_callbacks(lines: &str) -> String {
        ONE_APP.replace(
            "apps = [\"shop-android\"]",
            &format!("apps = [\"shop-android\"]\n{lines}"),
        )
    }

    #[test]
    fn callback_prefixes_and_secret_resolve() {
        let toml = with_callbacks(&format!(
            "callback_url_prefixes = [\"https://hooks.example.com/umeng/\", \
             \"http://127.0.0.1:9000/\"]\ncallback_secret = \"{CALLBACK_SECRET}\""
        ));
        let c = Config::resolve(settings(&toml)).expect("valid");
        let cb = c.clients[0].callbacks.as_ref().expect("callbacks");
        assert!(cb.allows("https://hooks.example.com/umeng/orders?x=1"));
        assert!(!cb.allows("https://hooks.example.com.evil/umeng/"));
        assert!(!cb.allows("https://hooks.example.com/other/"));
        assert!(!format!("{c:?}").contains("MfKQ9r8G"), "secret in Debug");
        // Without callbacks a client has none.
        let plain = Config::resolve(settings(ONE_APP)).expect("valid");
        assert!(plain.clients[0].callbacks.is_none());
    }

    #[test]
    fn bad_callback_settings_are_refused_by_name() {
        let secret = format!("callback_secret = \"{CALLBACK_SECRET}\"");
        for (lines, needle) in [
            (
                "callback_url_prefixes = [\"https://a.example/\"]".to_owned(),
                "needs a secret",
            ),
            (secret.clone(), "without callback_url_prefixes"),
            (
                format!("callback_url_prefixes = [\"https://a.example\"]\n{secret}"),
                "must end in /",
            ),
            (
                format!("callback_url_prefixes = [\"http://127.0.0.1:\"]\n{secret}"),
                "callback_url_prefixes[0]",
            ),
            (
                format!("callback_url_prefixes = [\"ftp://a.example/\"]\n{secret}"),
                "http or https",
            ),
            (
                format!("callback_url_prefixes = [\"HTTPS://A.example/\"]\n{secret}"),
                "normal form",
            ),
            (
                format!("callback_url_prefixes = [\"https://a.example:443/\"]\n{secret}"),
                "normal form",
            ),
            (
                "callback_url_prefixes = [\"https://a.example/\"]\n\
                 callback_secret = \"not-a-whsec\""
                    .to_owned(),
                "whsec_",
            ),
            (
                "callback_url_prefixes = [\"https://a.example/\"]\n\
                 callback_secret = \"whsec_c2hvcnQ=\""
                    .to_owned(),
                "24 to 64 bytes",
            ),
            (
                format!(
                    "callback_url_prefixes = [\"https://a.example/\"]\n{secret}\n\
                     callback_secret_env = \"X\""
                ),
                "exactly one of callback_secret",
            ),
        ] {
            let err = resolve_err(&with_callbacks(&lines));
            assert!(err.contains(needle), "{lines}: {err}");
            assert!(!err.contains("MfKQ9r8G"), "secret in the error: {err}");
        }
        let err = resolve_err(&format!(
            "{ONE_APP}\n[callbacks]\nlease_secs = 10\ntimeout_ms = 10000"
        ));
        assert!(err.contains("callbacks.lease_secs"), "{err}");
    }

    const SECOND_APP: &str = r#"
        [[apps]]
        name = "shop-ios"
        platform = "ios"
        appkey = "5f0000000000000000000002"
        master_secret = "other-secret"
    "#;

    #[test]
    fn an_appkey_belongs_to_one_app() {
        Config::resolve(settings(&format!("{ONE_APP}{SECOND_APP}"))).expect("two apps");
        let shared = SECOND_APP.replace("5f0000000000000000000002", "5f0000000000000000000001");
        let err = resolve_err(&format!("{ONE_APP}{shared}"));
        assert!(
            err.contains("apps[1] (shop-ios).appkey is also the appkey of app \"shop-android\""),
            "{err}"
        );
        let renamed = SECOND_APP.replace("shop-ios", "shop-android");
        let err = resolve_err(&format!("{ONE_APP}{renamed}"));
        assert!(err.contains("app name is used twice"), "{err}");
    }

    #[test]
    fn client_names_are_unique() {
        let twice = format!(
            "{ONE_APP}\n[[clients]]\nname = \"order-service\"\ntoken_sha256 = \"{}\"\nscopes = [\"read\"]\n",
            token_sha256_hex("other")
        );
        let err = resolve_err(&twice);
        assert!(
            err.contains("clients[1] (order-service): client name is used twice"),
            "{err}"
        );
    }

    #[test]
    fn payload_limit_is_bounded() {
        let at = |n: usize| {
            ONE_APP.replace(
                "master_secret = \"s3cret-value\"",
                &format!("master_secret = \"s3cret-value\"\npayload_limit_bytes = {n}"),
            )
        };
        Config::resolve(settings(&at(MAX_PAYLOAD_LIMIT_BYTES))).expect("at the bound");
        let err = resolve_err(&at(MAX_PAYLOAD_LIMIT_BYTES + 1));
        assert!(err.contains("payload_limit_bytes (4097)"), "{err}");
        assert!(resolve_err(&at(0)).contains("payload_limit_bytes (0)"));
    }

    #[test]
    fn base_url_is_normalised_or_refused() {
        let with = |url: &str| settings(&format!("[umeng]\nbase_url = {url:?}"));
        for (given, used) in [
            ("https://msgapi.umeng.com", "https://msgapi.umeng.com"),
            ("https://msgapi.umeng.com/", "https://msgapi.umeng.com"),
            ("HTTP://127.0.0.1:18090", "http://127.0.0.1:18090"),
            ("https://MsgApi.Umeng.com:443/", "https://msgapi.umeng.com"),
            ("http://[::1]:80", "http://[::1]"),
            ("http://sim:8090", "http://sim:8090"),
        ] {
            let c = Config::resolve(with(given)).expect(given);
            assert_eq!(c.settings.umeng.base_url, used, "{given}");
        }
        for (given, why) in [
            ("http://127.0.0.1:18090?x=1", "query"),
            ("http://127.0.0.1:18090/#frag", "fragment"),
            ("https://user:pw@msgapi.umeng.com", "user name or password"),
            ("https://msgapi.umeng.com/api", "path"),
            ("ftp://msgapi.umeng.com", "http or https"),
            ("msgapi.umeng.com", "not a valid URL"),
        ] {
            let err = Config::resolve(with(given)).unwrap_err().to_string();
            assert!(
                err.contains("umeng.base_url") && err.contains(why),
                "{given}: {err}"
            );
        }
    }

    #[test]
    fn timeouts_must_cover_the_worst_case_umeng_path() {
        // Defaults: W = 2 x (3000 + 30000) = 66000 ms.
        Config::resolve(Settings::default()).expect("defaults are consistent");
        let err = resolve_err("[server]\nrequest_timeout_secs = 66");
        assert!(
            err.contains("server.request_timeout_secs (66 s)")
                && err
                    .contains("umeng.connect_timeout_ms 3000 + umeng.timeout_ms 30000) = 66000 ms"),
            "{err}"
        );
        Config::resolve(settings("[server]\nrequest_timeout_secs = 67")).expect("67 s");
        let err = resolve_err("[history]\npending_timeout_secs = 96");
        assert!(
            err.contains("history.pending_timeout_secs (96 s)") && err.contains("66000 ms"),
            "{err}"
        );
        Config::resolve(settings("[history]\npending_timeout_secs = 97")).expect("97 s");
        // The old unchecked multiplication: no overflow, a clear error.
        let err = resolve_err("[history]\npending_timeout_secs = 9223372036854775807");
        assert!(err.contains("must be at most 86400"), "{err}");
        let err = resolve_err("[umeng]\ntimeout_ms = 9223372036854775807");
        assert!(err.contains("server.request_timeout_secs"), "{err}");
        // A start_time 5 minutes ahead must still be ahead when the push reaches Umeng.
        let err = resolve_err(
            "[umeng]\ntimeout_ms = 118000\n[server]\nrequest_timeout_secs = 600\n\
             [history]\npending_timeout_secs = 600\n[poller]\nlease_secs = 600\n\
             [delivery]\nlease_secs = 600",
        );
        assert!(err.contains("must be at most 240000 ms"), "{err}");
        Config::resolve(settings(
            "[umeng]\ntimeout_ms = 117000\n[server]\nrequest_timeout_secs = 600\n\
             [history]\npending_timeout_secs = 600\n[poller]\nlease_secs = 600\n\
             [delivery]\nlease_secs = 600",
        ))
        .expect("W = 240000 ms");
        // A delivery lease must outlast two Umeng paths (and 10 s).
        let err = resolve_err("[delivery]\nlease_secs = 142");
        assert!(err.contains("delivery.lease_secs (142)"), "{err}");
        Config::resolve(settings("[delivery]\nlease_secs = 143")).expect("143 s");
        assert!(resolve_err("[umeng]\nconnect_timeout_ms = 0").contains("at least 1"));
    }

    #[test]
    fn retention_covers_live_tasks_and_upload_reuse_is_capped() {
        let err = resolve_err("[history]\nretention_days = 36501");
        assert!(
            err.contains("retention_days (36501) must be at most 36500"),
            "{err}"
        );
        let err = resolve_err("[history]\nretention_days = 14");
        assert!(
            err.contains("history.retention_days (14)") && err.contains("337 h"),
            "{err}"
        );
        Config::resolve(settings(
            "[history]\nretention_days = 15\nupload_reuse_days = 14",
        ))
        .expect("15 days");
        Config::resolve(settings("[history]\nretention_days = 0")).expect("forever");
        let err = resolve_err("[history]\nretention_days = 20\n[poller]\nmax_age_hours = 480");
        assert!(err.contains("poller.max_age_hours (480 h)"), "{err}");
        let err = resolve_err("[history]\nupload_reuse_days = 31");
        assert!(
            err.contains("history.upload_reuse_days (31) must be at most 30"),
            "{err}"
        );
        let err = resolve_err("[history]\nupload_reuse_days = 20\nretention_days = 20");
        assert!(
            err.contains("must be shorter than history.retention_days (20)"),
            "{err}"
        );
        Config::resolve(settings(
            "[history]\nupload_reuse_days = 30\nretention_days = 0",
        ))
        .expect("reuse 30, keep forever");
    }

    #[test]
    fn only_section_variables_are_read_from_the_environment() {
        // Kubernetes adds <SERVICE>_PORT variables; they must not break loading.
        std::env::set_var("UMENG_GATEWAY_PORT", "tcp://10.0.0.1:8080");
        std::env::set_var("UMENG_GATEWAY_PORT_8080_TCP_ADDR", "10.0.0.1");
        std::env::set_var("UMENG_GATEWAY_LOG__LEVEL", "debug");
        let loaded = Settings::load(None);
        std::env::remove_var("UMENG_GATEWAY_PORT");
        std::env::remove_var("UMENG_GATEWAY_PORT_8080_TCP_ADDR");
        std::env::remove_var("UMENG_GATEWAY_LOG__LEVEL");
        assert_eq!(loaded.expect("loads").log.level, "debug");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let r = Figment::new()
            .merge(Toml::string("[server]\nlisten_addr = \"1.2.3.4:5\""))
            .extract::<Settings>();
        assert!(r.is_err());
    }
}
