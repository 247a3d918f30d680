//! Spawning whole gateways for tests: a simulator, a fresh database (SQLite file or a new
//! PostgreSQL database), and one or more gateway instances on port 0 sharing both.

use std::sync::Arc;

use reqwest::Response;
use serde_json::{json, Value};
use umeng_push_gateway::config::{
    AppGroupSettings, AppSettings, ClientSettings, Config, QuotaSettings, Scope, Settings,
};
use umeng_push_gateway::secret::Secret;
use umeng_push_gateway::simulator::{
    self, Fault, FaultKind, SimApp, SimPlatform, SimulatorConfig, SimulatorHandle,
};
use umeng_push_gateway::startup::Application;
use umeng_push_gateway::umeng::Platform;

use crate::helpers::{postgres_store, sqlite_store, TestDb};
use crate::proxy::Proxy;

pub const ANDROID_APP: &str = "test-android";
pub const IOS_APP: &str = "test-ios";
/// An app group of both apps.
pub const GROUP: &str = "test-both";
pub const ANDROID_KEY: &str = "5f00000000000000000a0001";
pub const IOS_KEY: &str = "5f00000000000000000a0002";
pub const ANDROID_SECRET: &str = "androidsecret0123456789abcdefghi";
pub const IOS_SECRET: &str = "iossecret0123456789abcdefghijklm";

/// Bearer tokens of the configured test clients.
pub const TOKEN_SENDER: &str = "token-sender"; // send, read, cancel on every app
pub const TOKEN_READER: &str = "token-reader"; // read only
pub const TOKEN_ANDROID_ONLY: &str = "token-android-only"; // send, read on test-android

pub const ANDROID_TOKEN: &str = "AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv"; // 44 chars
pub const IOS_TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"; // 64

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How fast simulated tasks move from one status to the next, unless a test says otherwise.
const DEFAULT_TASK_STEP: std::time::Duration = std::time::Duration::from_millis(200);

/// A simulator and a database that gateway instances share.
pub struct TestEnv {
    pub sim: Arc<SimulatorHandle>,
    pub db: TestDb,
}

impl TestEnv {
    pub async fn new(backend: Backend) -> TestEnv {
        Self::with_task_step(backend, DEFAULT_TASK_STEP).await
    }

    /// A simulator whose tasks move one status every `task_step`.
    pub async fn with_task_step(backend: Backend, task_step: std::time::Duration) -> TestEnv {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::with_simulator(backend, listener, None, true, task_step).await
    }

    /// An env whose simulator is reached through a fault-injecting [`Proxy`]: the
    /// gateway's `umeng.base_url` (from [`TestEnv::settings`]) is the proxy's. The
    /// simulator does not enforce Umeng's quotas here: the gateway's own count is tested.
    pub async fn with_proxy(backend: Backend) -> (TestEnv, Proxy) {
        let (proxy_listener, proxy_addr) = Proxy::bind().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim_addr = listener.local_addr().unwrap();
        let env = Self::with_simulator(
            backend,
            listener,
            Some(format!("http://{proxy_addr}")),
            false,
            DEFAULT_TASK_STEP,
        )
        .await;
        (env, Proxy::start(proxy_listener, sim_addr))
    }

    /// An env whose simulator does not enforce Umeng's quotas (only the gateway's count).
    pub async fn without_sim_quotas(backend: Backend) -> TestEnv {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::with_simulator(backend, listener, None, false, DEFAULT_TASK_STEP).await
    }

    async fn with_simulator(
        backend: Backend,
        listener: tokio::net::TcpListener,
        public_url: Option<String>,
        quotas: bool,
        task_step: std::time::Duration,
    ) -> TestEnv {
        init_test_log();
        let sim = simulator::start(
            listener,
            SimulatorConfig {
                public_url,
                quotas,
                apps: vec![
                    SimApp {
                        appkey: ANDROID_KEY.into(),
                        secret: ANDROID_SECRET.into(),
                        platform: SimPlatform::Android,
                    },
                    SimApp {
                        appkey: IOS_KEY.into(),
                        secret: IOS_SECRET.into(),
                        platform: SimPlatform::Ios,
                    },
                ],
                task_step,
                ..SimulatorConfig::default()
            },
        )
        .await
        .expect("simulator starts");
        let db = match backend {
            Backend::Sqlite => TestDb::Sqlite(sqlite_store().await.1),
            Backend::Postgres => TestDb::Postgres(postgres_store().await.1),
        };
        TestEnv {
            sim: Arc::new(sim),
            db,
        }
    }

    /// Default test settings: both apps, three clients, this env's simulator and database.
    pub fn settings(&self) -> Settings {
        let hash = umeng_push_gateway::config::token_sha256_hex;
        let mut s = Settings::default();
        s.database.url = Secret::new(self.db.url().to_string());
        s.database.max_connections = 8;
        s.umeng.base_url = self.sim.base_url();
        s.umeng.timeout_ms = 1500;
        s.umeng.connect_timeout_ms = 500;
        // check-config: above 2 x (500 + 1500) ms of Umeng path plus 30 s to record it.
        s.history.pending_timeout_secs = 35;
        s.apps = vec![
            app_settings(ANDROID_APP, Platform::Android, ANDROID_KEY, ANDROID_SECRET),
            app_settings(IOS_APP, Platform::Ios, IOS_KEY, IOS_SECRET),
        ];
        s.clients = vec![
            ClientSettings {
                name: "sender".into(),
                token_sha256: Some(hash(TOKEN_SENDER)),
                token_sha256_env: None,
                scopes: vec![Scope::Send, Scope::Read, Scope::Cancel],
                apps: None,
                ..ClientSettings::default()
            },
            ClientSettings {
                name: "reader".into(),
                token_sha256: Some(hash(TOKEN_READER)),
                token_sha256_env: None,
                scopes: vec![Scope::Read],
                apps: None,
                ..ClientSettings::default()
            },
            ClientSettings {
                name: "android-only".into(),
                token_sha256: Some(hash(TOKEN_ANDROID_ONLY)),
                token_sha256_env: None,
                scopes: vec![Scope::Send, Scope::Read],
                apps: Some(vec![ANDROID_APP.into()]),
                ..ClientSettings::default()
            },
        ];
        s
    }

    /// [`TestEnv::settings`] with the app group [`GROUP`] of both apps.
    pub fn settings_with_group(&self) -> Settings {
        let mut s = self.settings();
        s.app_groups = vec![AppGroupSettings {
            name: GROUP.into(),
            apps: vec![ANDROID_APP.into(), IOS_APP.into()],
        }];
        s
    }

    /// [`TestEnv::settings`] with a fast delivery worker (looks every 50 ms, retries after
    /// 50 to 400 ms).
    pub fn fast_delivery(&self, mut s: Settings) -> Settings {
        s.delivery.interval_ms = 50;
        s.delivery.backoff_base_ms = 50;
        s.delivery.backoff_cap_ms = 400;
        s
    }

    pub async fn spawn_app(&self) -> TestApp {
        self.spawn_app_with(self.settings()).await
    }

    pub async fn spawn_app_with(&self, settings: Settings) -> TestApp {
        let config = Config::resolve(settings).expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = Application::build(config, Some(listener))
            .await
            .expect("gateway builds");
        let addr = app.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
        });
        TestApp {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Send-path requests the simulator received (`/api/send`).
    pub fn sends(&self) -> Vec<simulator::RecordedRequest> {
        self.sim
            .requests()
            .into_iter()
            .filter(|r| r.path == "/api/send")
            .collect()
    }
}

/// With `TEST_LOG=1`, the gateways and simulators of this test binary log to stderr
/// (`RUST_LOG` filter, default `debug`): `reliability/check-secrets.sh` greps that output.
pub fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        umeng_push_gateway::telemetry::init_sync(&umeng_push_gateway::config::LogSettings {
            level: "debug".into(),
            ..Default::default()
        });
    }
}

/// A fault for the simulator: the Android app's next send is answered FAIL `code`.
pub fn android_send_fails_once(code: &str, message: Option<&str>) -> Fault {
    Fault {
        appkey: Some(ANDROID_KEY.into()),
        path: Some("/api/send".into()),
        kind: FaultKind::ErrorCode {
            code: code.into(),
            message: message.map(Into::into),
        },
        times: Some(1),
    }
}

pub fn app_settings(name: &str, platform: Platform, appkey: &str, secret: &str) -> AppSettings {
    AppSettings {
        name: name.into(),
        platform,
        appkey: appkey.into(),
        master_secret: Some(Secret::new(secret)),
        master_secret_env: None,
        master_secret_file: None,
        payload_limit_bytes: None,
        quotas: QuotaSettings::default(),
    }
}

/// One running gateway instance.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn post_push(&self, body: &Value) -> Response {
        self.post_push_as(TOKEN_SENDER, body).await
    }

    pub async fn post_push_as(&self, token: &str, body: &Value) -> Response {
        self.http
            .post(format!("{}/v1/pushes", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("gateway answers")
    }

    pub async fn post_raw(&self, body: impl Into<reqwest::Body>) -> Response {
        self.http
            .post(format!("{}/v1/pushes", self.base))
            .bearer_auth(TOKEN_SENDER)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("gateway answers")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.get_as(TOKEN_SENDER, path).await
    }

    pub async fn get_as(&self, token: &str, path: &str) -> Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("gateway answers")
    }

    pub async fn post_as(&self, token: &str, path: &str) -> Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("gateway answers")
    }

    /// `GET path` as the sender, asserting 200, as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    /// Used slots of one app's quota bucket, from `GET /v1/quotas`.
    pub async fn quota_used(&self, app: &str, kind: &str) -> u64 {
        let q = self.get_json(&format!("/v1/quotas?app={app}")).await;
        q["quotas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} bucket in {q}"))["used"]
            .as_u64()
            .unwrap()
    }

    /// POST a push with `Prefer: respond-async` as the sender.
    pub async fn post_push_async(&self, body: &Value) -> Response {
        self.http
            .post(format!("{}/v1/pushes", self.base))
            .bearer_auth(TOKEN_SENDER)
            .header("prefer", "respond-async")
            .json(body)
            .send()
            .await
            .expect("gateway answers")
    }

    /// Waits (up to `secs`) until the push's status is one of `states`; returns the record.
    pub async fn wait_for_status(&self, id: &str, states: &[&str], secs: u64) -> Value {
        let mut last = Value::Null;
        for _ in 0..secs * 20 {
            last = self.get_json(&format!("/v1/pushes/{id}")).await;
            if states.iter().any(|s| last["status"] == *s) {
                return last;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("push {id} did not reach {states:?} within {secs} s: {last}");
    }

    /// Stop serving and wait for the instance to exit.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await
                .expect("gateway task")
                .expect("gateway exits cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A minimal valid notification push of `cast` for `app`, in test mode unless changed.
pub fn push_body(app: &str, cast: &str) -> Value {
    let android = app == ANDROID_APP;
    let mut body = json!({
        "app": app,
        "type": cast,
        "notification": {"title": "Hello", "text": "World"},
        "production_mode": false,
    });
    let token = if android { ANDROID_TOKEN } else { IOS_TOKEN };
    match cast {
        "unicast" => body["device_tokens"] = json!([token]),
        "listcast" => body["device_tokens"] = json!([token, token]),
        "groupcast" => body["filter"] = json!({"where": {"and": [{"tag": "vip"}]}}),
        "filecast" => body["file_lines"] = json!([token, token]),
        "customizedcast" => {
            body["alias_type"] = json!("user_id");
            body["aliases"] = json!(["u1", "u2"]);
        }
        _ => {}
    }
    body
}

/// Write a gateway case once (`async fn name(backend: Backend)` in the calling module) and
/// get `sqlite::name` and `postgres::name` tests. PostgreSQL tests fail when the server is
/// unreachable unless `UMGW_SKIP_POSTGRES=1`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::app::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if crate::helpers::skip_postgres() {
                        eprintln!("UMGW_SKIP_POSTGRES=1: skipped");
                        return;
                    }
                    super::$name(crate::app::Backend::Postgres).await
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;
