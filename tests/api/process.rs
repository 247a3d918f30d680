//! Running the real binary as a child process: a TOML config written to a temporary
//! directory, JSON logs on stderr captured whole, and SIGTERM to stop it.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::app::*;

/// A gateway process and everything it has written to stderr and stdout so far.
pub struct GatewayProcess {
    pub base: String,
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// A config for the test apps and the sender client against `env`'s simulator and
/// database, logging JSON at `debug`.
pub fn config_toml(env: &TestEnv) -> String {
    let sender_hash = umeng_push_gateway::config::token_sha256_hex(TOKEN_SENDER);
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 10

[database]
url = "{db}"
max_connections = 4

[umeng]
base_url = "{sim}"
connect_timeout_ms = 500
timeout_ms = 5000

[log]
format = "json"
level = "debug"

[[apps]]
name = "{ANDROID_APP}"
platform = "android"
appkey = "{ANDROID_KEY}"
master_secret = "{ANDROID_SECRET}"

[[apps]]
name = "{IOS_APP}"
platform = "ios"
appkey = "{IOS_KEY}"
master_secret = "{IOS_SECRET}"

[[clients]]
name = "sender"
token_sha256 = "{sender_hash}"
scopes = ["send", "read", "cancel"]
"#,
        db = env.db.url(),
        sim = env.sim.base_url(),
    )
}

impl GatewayProcess {
    /// Start `umeng-push-gateway --config <file> serve` and wait until it listens.
    pub async fn start(config: &str) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).expect("config written");
        let mut command = Command::new(env!("CARGO_BIN_EXE_umeng-push-gateway"));
        command
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .env_remove("RUST_LOG")
            .env_remove("UMENG_GATEWAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, _) in std::env::vars() {
            if key.starts_with("UMENG_GATEWAY_") {
                command.env_remove(key);
            }
        }
        let mut child = command.spawn().expect("the gateway binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = oneshot::channel::<String>();
        let mut addr_tx = Some(addr_tx);
        let stderr = child.stderr.take().expect("piped stderr");
        let captured = Arc::clone(&output);
        let stderr_reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = listen_address(&line) {
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                if std::env::var("TEST_LOG").is_ok() {
                    eprintln!("{line}");
                }
                let mut out = captured.lock().expect("log buffer");
                out.push_str(&line);
                out.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let captured = Arc::clone(&output);
        let stdout_reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut out = captured.lock().expect("log buffer");
                out.push_str(&line);
                out.push('\n');
            }
        });
        let addr = match tokio::time::timeout(Duration::from_secs(30), addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => {
                let _ = child.start_kill();
                panic!(
                    "the gateway did not report its address; output:\n{}",
                    output.lock().expect("log buffer")
                );
            }
        };
        GatewayProcess {
            base: format!("http://{addr}"),
            child,
            output,
            readers: vec![stderr_reader, stdout_reader],
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway is running")
    }

    /// Send SIGTERM.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Wait for the process to exit (at most `limit`), then return its exit code and
    /// everything it wrote.
    pub async fn wait(mut self, limit: Duration) -> (Option<i32>, String) {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for the gateway"),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!(
                    "the gateway did not exit within {limit:?}; output:\n{}",
                    self.output.lock().expect("log buffer")
                );
            }
        };
        for reader in self.readers.drain(..) {
            let _ = reader.await;
        }
        let output = self.output.lock().expect("log buffer").clone();
        (status.code(), output)
    }
}

/// The address in the "listening" line (`"listen":"127.0.0.1:PORT"` in JSON logs).
fn listen_address(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if !v["message"].as_str()?.contains("listening") {
        return None;
    }
    v["listen"].as_str().map(str::to_owned)
}
