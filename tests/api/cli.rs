//! The built binary, run as a user would: `simulator` answers umeng-api.md's worked example,
//! and `serve` with no configuration starts in demo mode, takes the push its banner shows
//! and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_umeng-push-gateway");
const APPKEY: &str = "5f0000000000000000000001";
const SECRET: &str = "testsecret0123456789abcdefghijkl";

/// A child process that is killed when the test ends, even on panic.
struct ChildGuard(Child);

impl ChildGuard {
    fn id(&self) -> u32 {
        self.0.id()
    }

    /// Waits up to `limit` for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => panic!("process {} did not exit within {limit:?}", self.id()),
                Err(e) => panic!("cannot wait for process {}: {e}", self.id()),
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A local port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// `cmd` with every `UMENG_GATEWAY_*` variable removed, so only built-in defaults apply.
fn without_gateway_env(mut cmd: Command) -> Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("UMENG_GATEWAY_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

async fn wait_until_ok(http: &reqwest::Client, url: &str, child: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the process exited early: {status}");
        }
        assert!(Instant::now() < deadline, "{url} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn md5_hex(parts: &[&str]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The worked example body of umeng-api.md §2.3 with a fresh 13-digit timestamp.
fn worked_example_body() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis();
    format!(
        r#"{{"appkey":"{APPKEY}","timestamp":"{ms}","type":"unicast","device_tokens":"AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv","payload":{{"display_type":"notification","body":{{"ticker":"hi","title":"hi","text":"hello","after_open":"go_app"}}}},"production_mode":"false"}}"#
    )
}

#[tokio::test]
async fn simulator_subcommand_answers_the_worked_example_and_refuses_a_wrong_sign() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = Command::new(BIN);
    cmd.args([
        "simulator",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--app",
        &format!("{APPKEY}:{SECRET}:android"),
        "--app",
        "5f0000000000000000000002:testsecretios0123456789abcdefghi:ios",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = ChildGuard(cmd.spawn().expect("simulator starts"));
    let http = reqwest::Client::new();
    wait_until_ok(&http, &format!("{base}/_sim/health"), &mut child).await;
    let url = format!("{base}/api/send");
    let body = worked_example_body();
    assert_eq!(
        body.len(),
        283 + 3,
        "the §2.3 body with 13 instead of 10 digits"
    );

    let good = http
        .post(format!(
            "{url}?sign={}",
            md5_hex(&["POST", &url, &body, SECRET])
        ))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("simulator answers");
    // Signed as in the document, against Umeng's URL instead of the simulator's.
    let wrong_sign = md5_hex(&["POST", "https://msgapi.umeng.com/api/send", &body, SECRET]);
    let bad = http
        .post(format!("{url}?sign={wrong_sign}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("simulator answers");

    assert_eq!(good.status(), 200);
    let good: Value = good.json().await.expect("JSON answer");
    assert_eq!(good["ret"], "SUCCESS", "{good}");
    let msg_id = good["data"]["msg_id"].as_str().unwrap_or_default();
    assert!(msg_id.starts_with("uu") && msg_id.len() > 2, "{good}");
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.expect("JSON answer");
    assert_eq!(bad["ret"], "FAIL", "{bad}");
    assert_eq!(bad["data"]["error_code"], "2027", "{bad}");
}

/// The JSON after `-d '` in the banner's curl line.
fn curl_body(line: &str) -> Option<String> {
    let start = line.find("-d '")? + 4;
    let end = line.rfind('\'')?;
    (end > start).then(|| line[start..end].to_owned())
}

#[tokio::test]
async fn serve_without_config_runs_in_demo_mode_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = without_gateway_env(Command::new(BIN));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = ChildGuard(cmd.spawn().expect("gateway starts"));
    // Keep draining stderr so the gateway never blocks on a full pipe.
    let stderr = child.0.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = Vec::new();
    let body = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no curl in the banner; stderr so far:\n{banner:#?}"));
        if let Some(b) = curl_body(&line) {
            break b;
        }
        banner.push(line);
    };
    assert!(
        banner.iter().any(|l| l.contains("DEMO MODE")),
        "{banner:#?}"
    );
    let push: Value = serde_json::from_str(&body).expect("the banner's curl sends JSON");
    let http = reqwest::Client::new();
    wait_until_ok(&http, &format!("{base}/readyz"), &mut child).await;

    let created = http
        .post(format!("{base}/v1/pushes"))
        .bearer_auth("demo")
        .json(&push)
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.expect("JSON");
    assert_eq!(created["status"], "accepted", "{created}");
    let id = created["id"].as_str().expect("push id").to_owned();
    let history: Value = http
        .get(format!("{base}/v1/pushes"))
        .bearer_auth("demo")
        .send()
        .await
        .expect("gateway answers")
        .json()
        .await
        .expect("JSON");
    let items = history["items"].as_array().expect("items");
    assert!(
        items
            .iter()
            .any(|p| p["id"] == id.as_str() && p["app"] == "demo-android"),
        "{history}"
    );
    assert!(
        dir.path().join("data").is_dir(),
        "./data/ is created in the working directory"
    );

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let status = child.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status}");
}

/// `check-config` on a written config file: its exit status and stderr.
fn check_config(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml).expect("write config");
    let mut cmd = without_gateway_env(Command::new(BIN));
    let out = cmd
        .args(["--config", path.to_str().expect("utf-8"), "check-config"])
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const TWO_APPS: &str = r#"
[database]
url = "sqlite://data/check.db"

[[apps]]
name = "shop-android"
platform = "android"
appkey = "5f0000000000000000000001"
master_secret = "android-master-secret"

[[apps]]
name = "shop-ios"
platform = "ios"
appkey = "5f0000000000000000000002"
master_secret = "ios-master-secret"

[[clients]]
name = "order-service"
token_sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
scopes = ["send"]
"#;

#[test]
fn check_config_refuses_settings_that_break_a_promise() {
    let (ok, err) = check_config(TWO_APPS);
    assert!(ok, "the base config is valid: {err}");
    let cases = [
        // A 503 must mean nothing was sent: the request outlasts upload + send.
        (
            format!("[server]\nrequest_timeout_secs = 10\n{TWO_APPS}"),
            "server.request_timeout_secs (10 s) must exceed the worst-case Umeng path, \
             2 x (umeng.connect_timeout_ms 3000 + umeng.timeout_ms 30000) = 66000 ms",
        ),
        (
            format!("[history]\npending_timeout_secs = 60\n{TWO_APPS}"),
            "history.pending_timeout_secs (60 s) must exceed the worst-case Umeng path",
        ),
        (
            format!("[history]\nretention_days = 7\n{TWO_APPS}"),
            "history.retention_days (7) must be longer than a task can be polled",
        ),
        (
            format!("[history]\nupload_reuse_days = 60\n{TWO_APPS}"),
            "history.upload_reuse_days (60) must be at most 30",
        ),
        (
            format!("[umeng]\nbase_url = \"https://msgapi.umeng.com/?x=1\"\n{TWO_APPS}"),
            "must not have a query",
        ),
        (
            TWO_APPS.replace("5f0000000000000000000002", "5f0000000000000000000001"),
            "apps[1] (shop-ios).appkey is also the appkey of app \"shop-android\"",
        ),
        (
            format!(
                "{TWO_APPS}\n[[clients]]\nname = \"order-service\"\n\
                 token_sha256 = \"{}\"\nscopes = [\"read\"]\n",
                "b".repeat(64)
            ),
            "clients[1] (order-service): client name is used twice",
        ),
        // Callback prefixes: absolute http(s) URLs ending in "/", with a secret.
        (
            format!(
                "{TWO_APPS}callback_url_prefixes = [\"https://hooks.example.com\"]\n\
                 callback_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"
            ),
            "clients[0] (order-service).callback_url_prefixes[0] \"https://hooks.example.com\" \
             must end in /",
        ),
        (
            format!("{TWO_APPS}callback_url_prefixes = [\"https://hooks.example.com/\"]\n"),
            "callback_url_prefixes needs a secret",
        ),
    ];
    for (toml, expected) in cases {
        let (ok, err) = check_config(&toml);
        assert!(!ok, "accepted; expected {expected:?}");
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
        assert!(!err.contains("master-secret"), "a secret leaked: {err}");
    }
    // An upper-case scheme and a default port are normalised, not refused.
    let (ok, err) = check_config(&format!(
        "[umeng]\nbase_url = \"HTTPS://MsgApi.Umeng.com:443/\"\n{TWO_APPS}"
    ));
    assert!(ok, "{err}");
    let (ok, err) = check_config(&format!(
        "{TWO_APPS}callback_url_prefixes = [\"https://hooks.example.com/umeng/\"]\n\
         callback_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"
    ));
    assert!(ok, "{err}");
}
