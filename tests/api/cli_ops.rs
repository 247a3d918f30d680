//! The operator commands, run through the built binary: `check-config`, `token`, `migrate`,
//! `healthcheck`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use umeng_push_gateway::store::{self, PoolOptions};

use crate::app::{Backend, TestEnv};

const BIN: &str = env!("CARGO_BIN_EXE_umeng-push-gateway");

/// The example config shipped in the repository.
fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml")
}

/// The binary with a clean environment (no stray `UMENG_GATEWAY_*` from the caller).
fn gateway(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run {BIN}: {e}"),
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const EXAMPLE_ENV: [(&str, &str); 4] = [
    ("SHOP_ANDROID_SECRET", "android-master-secret"),
    ("SHOP_IOS_SECRET", "ios-master-secret"),
    (
        "ORDER_SERVICE_TOKEN_SHA256",
        "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
    ),
    (
        "OPS_TOKEN_SHA256",
        "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9",
    ),
];

#[test]
fn check_config_accepts_the_example_with_its_environment() {
    let config = example_config();
    let config = config.to_str().expect("utf-8 path");
    let out = gateway(&["--config", config, "check-config"], &EXAMPLE_ENV);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "configuration OK: 2 app(s), 2 client(s), database postgres"
    );
    // The variable naming the file works as well as the flag.
    let mut env = EXAMPLE_ENV.to_vec();
    env.push(("UMENG_GATEWAY_CONFIG", config));
    let out = gateway(&["check-config"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn check_config_names_the_problem_and_exits_non_zero() {
    let config = example_config();
    let config = config.to_str().expect("utf-8 path");
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        // A secret variable is missing.
        (
            EXAMPLE_ENV[1..].to_vec(),
            "apps[0] (shop-android).master_secret_env: variable SHOP_ANDROID_SECRET is not set",
        ),
        // A token hash is not a SHA-256.
        (
            {
                let mut env = EXAMPLE_ENV.to_vec();
                env[2] = ("ORDER_SERVICE_TOKEN_SHA256", "not-a-hash");
                env
            },
            "clients[0] (order-service).token_sha256 must be 64 hex characters",
        ),
        // An environment override with a bad value.
        (
            {
                let mut env = EXAMPLE_ENV.to_vec();
                env.push(("UMENG_GATEWAY_DATABASE__URL", "mysql://db/gateway"));
                env
            },
            "database.url must start with postgres://, postgresql:// or sqlite:",
        ),
        // A background setting that would let two replicas poll one task.
        (
            {
                let mut env = EXAMPLE_ENV.to_vec();
                env.push(("UMENG_GATEWAY_POLLER__LEASE_SECS", "5"));
                env
            },
            "poller.lease_secs (5) must exceed umeng.timeout_ms (30000 ms)",
        ),
    ];
    for (env, expected) in cases {
        let out = gateway(&["--config", config, "check-config"], &env);
        assert!(!out.status.success(), "accepted; expected {expected:?}");
        assert!(
            stderr(&out).contains(expected),
            "expected {expected:?} in: {}",
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains("android-master-secret"),
            "a secret leaked: {}",
            stderr(&out)
        );
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten_addr = \"0.0.0.0:8080\"\n").expect("write");
    let out = gateway(
        &["--config", bad.to_str().expect("utf-8"), "check-config"],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("listen_addr"), "{}", stderr(&out));

    let missing = dir.path().join("missing.toml");
    let out = gateway(
        &["--config", missing.to_str().expect("utf-8"), "check-config"],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("missing.toml does not exist"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn token_prints_a_fresh_token_and_its_sha256() {
    let parse = |out: &Output| {
        assert!(out.status.success(), "{}", stderr(out));
        let text = stdout(out);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        (field("token:"), field("token_sha256:"))
    };
    let (token, sha) = parse(&gateway(&["token"], &[]));
    assert!(token.len() >= 32, "{token}");
    assert_eq!(sha, umeng_push_gateway::config::token_sha256_hex(&token));
    assert_eq!(sha.len(), 64);
    let (other, _) = parse(&gateway(&["token"], &[]));
    assert_ne!(token, other, "every run makes a new token");
}

#[tokio::test]
async fn migrate_prepares_a_fresh_sqlite_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/fresh/gateway.db", dir.path().display());
    for _ in 0..2 {
        let out = gateway(&["migrate"], &[("UMENG_GATEWAY_DATABASE__URL", &url)]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out).trim(), "migrations applied (sqlite)");
    }
    let store = match store::connect(&url, &PoolOptions::default()).await {
        Ok(s) => s,
        Err(e) => panic!("cannot open the migrated file: {e}"),
    };
    assert!(store.ready().await.is_ok(), "every migration applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_probes_readyz() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let app = env.spawn_app().await;
    let base = app.base.clone();
    let out = tokio::task::spawn_blocking(move || gateway(&["healthcheck", "--url", &base], &[]))
        .await
        .expect("healthcheck runs");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "ready");
    app.stop().await;

    // Nothing listens there any more.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let out = tokio::task::spawn_blocking(move || gateway(&["healthcheck", "--url", &closed], &[]))
        .await
        .expect("healthcheck runs");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unreachable"), "{}", stderr(&out));
}
