//! What an operator relies on: Prometheus metrics that move with pushes, logs that carry the
//! request id and never a secret, sign or device token, a clean exit on SIGTERM with
//! in-flight requests finished, `/readyz` following a database outage, and a 413 for
//! oversized bodies. Every case runs on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Connection;
use umeng_push_gateway::config::Settings;
use umeng_push_gateway::quota::{QuotaLimit, WindowUnit};
use umeng_push_gateway::simulator::{Fault, FaultKind};

use crate::app::*;
use crate::helpers::TestDb;
use crate::process::{config_toml, GatewayProcess};

on_both_backends!(
    metrics_count_pushes_by_outcome,
    logs_carry_the_request_id_and_no_secret_sign_or_token,
    sigterm_finishes_in_flight_requests_and_exits_0,
    readyz_follows_a_database_outage_without_restart,
    oversized_body_is_413_problem_json,
);

/// One sample line of the Prometheus text format.
#[derive(Debug)]
pub(crate) struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

pub(crate) fn parse_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.trim_end_matches('}');
                let mut labels = BTreeMap::new();
                // Label values in these tests hold no commas or quotes.
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    if let Some((k, v)) = pair.split_once('=') {
                        labels.insert(k.to_string(), v.trim_matches('"').to_string());
                    }
                }
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The value of the series `name` whose labels include all of `labels` (0 when absent).
pub(crate) fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

pub(crate) async fn scrape(app: &TestApp) -> (String, Vec<Sample>) {
    let r = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(r.status(), 200, "GET /metrics needs no token");
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = r.text().await.unwrap();
    let samples = parse_samples(&text);
    (text, samples)
}

/// Test settings whose two apps carry names no other test uses: the recorder is shared by
/// every gateway in this process, and the `app` label keeps this test's series apart.
pub(crate) fn settings_with_own_apps(env: &TestEnv, android: &str, ios: &str) -> Settings {
    let mut s = env.settings();
    s.apps[0].name = android.into();
    s.apps[1].name = ios.into();
    for c in &mut s.clients {
        if c.apps.is_some() {
            c.apps = Some(vec![android.into()]);
        }
    }
    s
}

/// True when the series `name` with exactly these labels is in the scrape, at 0.
fn present_at_zero(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> bool {
    samples.iter().any(|s| {
        s.name == name
            && s.value == 0.0
            && s.labels.len() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_umeng_series_exist_before_the_first_push() {
    // Apps of their own: no other test in this process pushes to them.
    let env = TestEnv::new(Backend::Sqlite).await;
    let suffix = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let (android, ios) = (format!("z-android-{suffix}"), format!("z-ios-{suffix}"));
    let app = env
        .spawn_app_with(settings_with_own_apps(&env, &android, &ios))
        .await;

    let (text, samples) = scrape(&app).await;

    for (name, labels) in [
        (
            "pushes_total",
            vec![
                ("app", android.as_str()),
                ("type", "unicast"),
                ("outcome", "accepted"),
            ],
        ),
        (
            "pushes_total",
            vec![
                ("app", ios.as_str()),
                ("type", "filecast"),
                ("outcome", "rate_limited"),
            ],
        ),
        ("idempotent_replays_total", vec![("app", ios.as_str())]),
        (
            "quota_rejections_total",
            vec![
                ("app", android.as_str()),
                ("kind", "broadcast"),
                ("source", "umeng"),
            ],
        ),
    ] {
        assert!(
            present_at_zero(&samples, name, &labels),
            "{name} {labels:?} missing before the first push:\n{text}"
        );
    }
    // Series other tests in this process may have moved: present is what matters.
    for endpoint in ["send", "status", "cancel", "upload"] {
        assert!(
            samples
                .iter()
                .any(|s| s.name == "umeng_request_duration_seconds_count"
                    && s.labels.get("endpoint").map(String::as_str) == Some(endpoint)),
            "no umeng_request_duration_seconds for {endpoint}:\n{text}"
        );
    }
    for code in ["not_sent", "unknown"] {
        assert!(
            samples.iter().any(|s| s.name == "umeng_errors_total"
                && s.labels.get("code").map(String::as_str) == Some(code)),
            "no umeng_errors_total for {code}"
        );
    }
    app.stop().await;
}

async fn metrics_count_pushes_by_outcome(backend: Backend) {
    // Arrange: a groupcast quota of one per day for the Android app.
    let env = TestEnv::new(backend).await;
    let suffix = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let (android, ios) = (format!("m-android-{suffix}"), format!("m-ios-{suffix}"));
    let mut settings = settings_with_own_apps(&env, &android, &ios);
    settings.apps[0].quotas.groupcast = Some(QuotaLimit {
        limit: 1,
        window: WindowUnit::Day,
    });
    let app = env.spawn_app_with(settings).await;
    let (_, before) = scrape(&app).await;
    let errors_2022_before = value(&before, "umeng_errors_total", &[("code", "2022")]);
    let groupcast = |key: &str| {
        let mut b = push_body(ANDROID_APP, "groupcast");
        b["app"] = json!(android);
        b["production_mode"] = json!(true);
        b["out_biz_no"] = json!(key);
        b
    };

    // Act: accepted, replayed, rate limited locally, Umeng FAIL, Umeng 2050, invalid.
    let r = app.post_push(&groupcast("m-1")).await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app.post_push(&groupcast("m-1")).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(app.post_push(&groupcast("m-2")).await.status(), 429);
    env.sim.add_fault(android_send_fails_once("2022", None));
    let mut unicast = push_body(ANDROID_APP, "unicast");
    unicast["app"] = json!(android);
    assert_eq!(app.post_push(&unicast).await.status(), 502);
    env.sim.add_fault(Fault {
        appkey: Some(IOS_KEY.into()),
        path: Some("/api/send".into()),
        kind: FaultKind::ErrorCode {
            code: "2050".into(),
            message: None,
        },
        times: Some(1),
    });
    let mut broadcast = push_body(IOS_APP, "broadcast");
    broadcast["app"] = json!(ios);
    broadcast["production_mode"] = json!(true);
    assert_eq!(app.post_push(&broadcast).await.status(), 429);
    let mut invalid = unicast.clone();
    invalid["notification"] = json!({"text": "no title"});
    assert_eq!(app.post_push(&invalid).await.status(), 422);
    assert_eq!(app.get(&format!("/v1/pushes/{id}")).await.status(), 200);
    assert_eq!(
        app.get(&format!("/v1/quotas?app={ios}")).await.status(),
        200
    );

    // Assert
    let (text, after) = scrape(&app).await;
    let pushes = |app: &str, cast: &str, outcome: &str| {
        value(
            &after,
            "pushes_total",
            &[("app", app), ("type", cast), ("outcome", outcome)],
        )
    };
    assert_eq!(pushes(&android, "groupcast", "accepted"), 1.0, "{text}");
    assert_eq!(pushes(&android, "groupcast", "replayed"), 1.0, "{text}");
    assert_eq!(pushes(&android, "groupcast", "rate_limited"), 1.0, "{text}");
    assert_eq!(pushes(&android, "unicast", "failed"), 1.0, "{text}");
    assert_eq!(pushes(&android, "unicast", "invalid"), 1.0, "{text}");
    assert_eq!(pushes(&ios, "broadcast", "rate_limited"), 1.0, "{text}");
    assert_eq!(
        value(&after, "idempotent_replays_total", &[("app", &android)]),
        1.0
    );
    let rejections = |app: &str, kind: &str, source: &str| {
        value(
            &after,
            "quota_rejections_total",
            &[("app", app), ("kind", kind), ("source", source)],
        )
    };
    assert_eq!(rejections(&android, "groupcast", "local"), 1.0, "{text}");
    assert_eq!(rejections(&ios, "broadcast", "umeng"), 1.0, "{text}");
    assert!(
        value(&after, "umeng_errors_total", &[("code", "2022")]) >= errors_2022_before + 1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &after,
            "quota_remaining",
            &[("app", &android), ("kind", "groupcast")]
        ),
        0.0
    );
    // /v1/quotas sets every bucket of the app it shows; Umeng's 2050 filled broadcast.
    assert!(after
        .iter()
        .any(|s| s.name == "quota_remaining" && s.labels.get("app") == Some(&ios)));
    assert_eq!(
        value(
            &after,
            "quota_remaining",
            &[("app", &ios), ("kind", "broadcast")]
        ),
        0.0,
        "{text}"
    );
    assert!(
        value(
            &after,
            "umeng_request_duration_seconds_count",
            &[("endpoint", "send")]
        ) >= 3.0,
        "{text}"
    );
    assert!(text.contains("umeng_request_duration_seconds_bucket{endpoint=\"send\""));
    let http = |route: &str, method: &str, status: &str| {
        value(
            &after,
            "http_requests_total",
            &[("route", route), ("method", method), ("status", status)],
        )
    };
    assert!(http("/v1/pushes", "POST", "201") >= 1.0, "{text}");
    assert!(http("/v1/pushes", "POST", "429") >= 2.0, "{text}");
    assert!(http("/v1/pushes/{id}", "GET", "200") >= 1.0, "{text}");
    assert!(!text.contains(&id), "route templates, never concrete paths");
    assert!(after.iter().any(|s| s.name == "db_pool_connections"
        && s.labels.get("state").map(String::as_str) == Some("idle")));
    assert!(after.iter().any(|s| s.name == "db_pool_connections"
        && s.labels.get("state").map(String::as_str) == Some("in_use")));

    // With metrics off there is no /metrics route.
    let mut off = settings_with_own_apps(&env, &android, &ios);
    off.server.metrics_enabled = false;
    let quiet = env.spawn_app_with(off).await;
    let r = quiet
        .http
        .get(format!("{}/metrics", quiet.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    quiet.stop().await;
    app.stop().await;
}

async fn post_with_id(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    request_id: &str,
    body: &Value,
) -> (u16, Value) {
    let r = http
        .post(format!("{base}/v1/pushes"))
        .bearer_auth(token)
        .header("x-request-id", request_id)
        .json(body)
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some(request_id),
        "the request id is returned"
    );
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn logs_carry_the_request_id_and_no_secret_sign_or_token(backend: Backend) {
    // Arrange: the real binary, JSON logs at debug, one Umeng FAIL queued.
    let env = TestEnv::new(backend).await;
    let gw = GatewayProcess::start(&config_toml(&env)).await;
    env.sim
        .add_fault(android_send_fails_once("2022", Some("payload too long")));
    let http = reqwest::Client::new();
    let aliases = ["alias-user-0123456789abcdef", "alias-user-fedcba9876543210"];

    // Act: a failing Umeng call, a validation error, successes of every audience kind,
    // a wrong token.
    let fail = push_body(ANDROID_APP, "unicast");
    let (status, _) = post_with_id(&http, &gw.base, TOKEN_SENDER, "req-umeng-fail", &fail).await;
    assert_eq!(status, 502);
    let mut invalid = push_body(ANDROID_APP, "unicast");
    invalid["notification"] = json!({"text": "no title"});
    let (status, _) = post_with_id(&http, &gw.base, TOKEN_SENDER, "req-invalid", &invalid).await;
    assert_eq!(status, 422);
    for (i, (app, cast)) in [
        (ANDROID_APP, "unicast"),
        (IOS_APP, "listcast"),
        (ANDROID_APP, "filecast"),
        (IOS_APP, "broadcast"),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, v) = post_with_id(
            &http,
            &gw.base,
            TOKEN_SENDER,
            &format!("req-ok-{i}"),
            &push_body(app, cast),
        )
        .await;
        assert_eq!(status, 201, "{cast}: {v}");
    }
    let mut by_alias = push_body(ANDROID_APP, "customizedcast");
    by_alias["aliases"] = json!(aliases);
    let (status, v) = post_with_id(&http, &gw.base, TOKEN_SENDER, "req-alias", &by_alias).await;
    assert_eq!(status, 201, "{v}");
    let (status, _) = post_with_id(&http, &gw.base, "not-a-token", "req-401", &fail).await;
    assert_eq!(status, 401);
    gw.terminate();
    let (code, logs) = gw.wait(Duration::from_secs(20)).await;

    // Assert: it exited cleanly and wrote JSON lines.
    assert_eq!(code, Some(0), "{logs}");
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON log line: {l}")))
        .collect();
    assert!(lines.len() > 10, "{logs}");
    // Every line of a request carries its id, including those of the send task and the
    // Umeng call: the failing call's warning and the success log of each push.
    let with_message = |m: &str| {
        lines
            .iter()
            .filter(|l| l["message"].as_str().is_some_and(|s| s.contains(m)))
            .map(Value::to_string)
            .collect::<Vec<_>>()
    };
    let failed = with_message("umeng call failed");
    assert!(!failed.is_empty(), "{logs}");
    assert!(
        failed.iter().all(|l| l.contains("req-umeng-fail")),
        "{failed:?}"
    );
    let accepted = with_message("umeng accepted the push");
    assert_eq!(accepted.len(), 5, "{logs}");
    for line in &accepted {
        assert!(line.contains("\"request.id\":\"req-"), "{line}");
    }
    for line in lines.iter().map(Value::to_string) {
        if line.contains("\"request.id\"") {
            continue;
        }
        // Outside a request: startup, shutdown, background work.
        assert!(!line.contains("req-"), "{line}");
    }
    assert!(
        logs.contains("req-invalid"),
        "the 422 request is logged: {logs}"
    );

    // No master secret, no client token, no full device token or alias.
    let mut forbidden: Vec<String> = vec![
        ANDROID_SECRET.into(),
        IOS_SECRET.into(),
        TOKEN_SENDER.into(),
        "not-a-token".into(),
        ANDROID_TOKEN.into(),
        IOS_TOKEN.into(),
    ];
    forbidden.extend(aliases.iter().map(|a| a.to_string()));
    // No sign: each request Umeng received, its sign recomputed from the secret.
    let recorded = env.sim.requests();
    assert!(recorded.len() >= 6, "{recorded:?}");
    for r in &recorded {
        let sign = expected_sign(&env.sim.base_url(), r);
        assert_eq!(r.sign.as_deref(), Some(sign.as_str()), "{}", r.body);
        forbidden.push(sign);
    }
    for needle in &forbidden {
        assert!(
            !logs.contains(needle.as_str()),
            "the logs contain {needle:?}:\n{logs}"
        );
    }
}

fn expected_sign(sim_base: &str, r: &umeng_push_gateway::simulator::RecordedRequest) -> String {
    use md5::Digest;
    let secret = if r.appkey.as_deref() == Some(ANDROID_KEY) {
        ANDROID_SECRET
    } else {
        IOS_SECRET
    };
    hex::encode(md5::Md5::digest(
        format!(
            "POST{}{}{}{}",
            sim_base.trim_end_matches('/'),
            r.path,
            r.body,
            secret
        )
        .as_bytes(),
    ))
}

async fn sigterm_finishes_in_flight_requests_and_exits_0(backend: Backend) {
    // Arrange: Umeng takes a second to answer each send.
    let env = TestEnv::new(backend).await;
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind: FaultKind::Latency { ms: 1000 },
        times: None,
    });
    let gw = GatewayProcess::start(&config_toml(&env)).await;
    let http = reqwest::Client::new();
    let mut in_flight = tokio::task::JoinSet::new();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..5 {
        let (http, base) = (http.clone(), gw.base.clone());
        let mut body = push_body(if i % 2 == 0 { ANDROID_APP } else { IOS_APP }, "unicast");
        body["out_biz_no"] = json!(format!("term-{i}"));
        let answered = std::sync::Arc::clone(&answered);
        in_flight.spawn(async move {
            let r = http
                .post(format!("{base}/v1/pushes"))
                .bearer_auth(TOKEN_SENDER)
                .json(&body)
                .send()
                .await
                .expect("an in-flight request is answered");
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            r.status().as_u16()
        });
    }
    // Wait until all five are inside the gateway (their rows are pending).
    let deadline = Instant::now() + Duration::from_secs(10);
    while env
        .db
        .query_i64("select count(*) from pushes where status = 'pending'")
        .await
        < 5
    {
        assert!(Instant::now() < deadline, "the requests never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Act
    let signalled = Instant::now();
    gw.terminate();
    // While the five are still waiting on Umeng, new connections are refused.
    let refused_new_connection = loop {
        let fresh = reqwest::Client::new()
            .get(format!("{}/healthz", gw.base))
            .timeout(Duration::from_millis(500))
            .send()
            .await;
        if fresh.is_err() {
            break true;
        }
        if answered.load(std::sync::atomic::Ordering::SeqCst) == 5 {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let statuses = in_flight.join_all().await;
    let (code, logs) = gw.wait(Duration::from_secs(20)).await;

    // Assert
    assert!(
        refused_new_connection,
        "no new connection is accepted after SIGTERM"
    );
    assert_eq!(statuses, vec![201; 5], "{logs}");
    assert_eq!(code, Some(0), "{logs}");
    assert!(signalled.elapsed() < Duration::from_secs(10));
    assert_eq!(env.sends().len(), 5);
    assert_eq!(
        env.db
            .query_i64("select count(*) from pushes where status = 'accepted'")
            .await,
        5
    );
    assert!(logs.contains("shutting down"), "{logs}");
}

/// A connection to the PostgreSQL server's maintenance database.
async fn pg_admin() -> sqlx::PgConnection {
    let url = std::env::var("UMGW_TEST_PG_URL")
        .unwrap_or_else(|_| crate::helpers::DEFAULT_PG_URL.to_owned());
    sqlx::PgConnection::connect(&url)
        .await
        .expect("PostgreSQL admin connection")
}

/// Makes the test database unreachable for the gateway, and reachable again.
enum Outage {
    /// PostgreSQL: the database refuses new connections and its sessions are ended.
    Postgres { name: String },
    /// SQLite, which has no server to lose: another connection holds the write lock, so
    /// the gateway can admit nothing.
    Sqlite {
        url: String,
        lock: Option<sqlx::SqliteConnection>,
    },
}

impl Outage {
    fn for_db(db: &TestDb) -> Outage {
        match db {
            TestDb::Postgres(pg) => Outage::Postgres {
                name: pg.name().to_owned(),
            },
            TestDb::Sqlite(lite) => Outage::Sqlite {
                url: lite.url().to_owned(),
                lock: None,
            },
        }
    }

    async fn begin(&mut self) {
        match self {
            Outage::Postgres { name } => {
                let mut admin = pg_admin().await;
                // The name is generated by the helpers ([a-z0-9_]), safe as an identifier.
                sqlx::query(&format!("alter database {name} allow_connections false"))
                    .execute(&mut admin)
                    .await
                    .expect("alter database");
                sqlx::query(
                    "select pg_terminate_backend(pid) from pg_stat_activity
                      where datname = $1 and pid <> pg_backend_pid()",
                )
                .bind(name.as_str())
                .execute(&mut admin)
                .await
                .expect("terminate sessions");
            }
            Outage::Sqlite { url, lock } => {
                let mut conn = sqlx::SqliteConnection::connect(url)
                    .await
                    .expect("sqlite connection");
                // Held until the outage ends: no admission (and no readiness) meanwhile.
                sqlx::query("begin immediate")
                    .execute(&mut conn)
                    .await
                    .expect("begin immediate");
                *lock = Some(conn);
            }
        }
    }

    async fn end(&mut self) {
        match self {
            Outage::Postgres { name } => {
                let mut admin = pg_admin().await;
                sqlx::query(&format!("alter database {name} allow_connections true"))
                    .execute(&mut admin)
                    .await
                    .expect("alter database");
            }
            Outage::Sqlite { lock, .. } => {
                if let Some(mut conn) = lock.take() {
                    sqlx::query("rollback")
                        .execute(&mut conn)
                        .await
                        .expect("rollback");
                    conn.close().await.expect("close the locking connection");
                }
            }
        }
    }
}

async fn readyz_status(app: &TestApp) -> u16 {
    app.http
        .get(format!("{}/readyz", app.base))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("gateway answers")
        .status()
        .as_u16()
}

/// Poll `/readyz` until it answers `want` (at most 30 s).
async fn wait_for_readyz(app: &TestApp, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = readyz_status(app).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {got}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn readyz_follows_a_database_outage_without_restart(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.database.acquire_timeout_ms = 1000;
    let app = env.spawn_app_with(settings).await;
    assert_eq!(readyz_status(&app).await, 200);
    assert_eq!(
        app.post_push(&push_body(ANDROID_APP, "unicast"))
            .await
            .status(),
        201
    );

    // The database goes away: not ready, and a push is refused before Umeng is called.
    let mut outage = Outage::for_db(&env.db);
    outage.begin().await;
    wait_for_readyz(&app, 503).await;
    let r = app.post_push(&push_body(ANDROID_APP, "unicast")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(env.sends().len(), 1, "nothing was sent during the outage");

    // It comes back: ready again, same process.
    outage.end().await;
    wait_for_readyz(&app, 200).await;
    assert_eq!(
        app.post_push(&push_body(ANDROID_APP, "unicast"))
            .await
            .status(),
        201
    );
    app.stop().await;
}

async fn oversized_body_is_413_problem_json(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.server.body_limit_bytes = 4096;
    let app = env.spawn_app_with(settings).await;
    let mut body = push_body(ANDROID_APP, "unicast");
    body["description"] = json!("x".repeat(8192));

    let r = app.post_push(&body).await;

    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], 413);
    assert_eq!(
        v["type"],
        "urn:umeng-push-gateway:problem:payload-too-large"
    );
    assert_eq!(v["limit_bytes"], 4096);
    assert!(env.sim.requests().is_empty());
    // A body under the limit still goes through.
    assert_eq!(
        app.post_push(&push_body(ANDROID_APP, "unicast"))
            .await
            .status(),
        201
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_metrics_show_depth_oldest_due_and_attempts() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let suffix = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let (android, ios) = (format!("q-android-{suffix}"), format!("q-ios-{suffix}"));
    let mut settings = settings_with_own_apps(&env, &android, &ios);
    settings.delivery.interval_ms = 50;
    let app = env.spawn_app_with(settings).await;
    let (text, samples) = scrape(&app).await;
    for outcome in [
        "accepted",
        "failed",
        "rate_limited",
        "not_sent",
        "timeout",
        "unknown",
    ] {
        assert!(
            present_at_zero(
                &samples,
                "delivery_attempts_total",
                &[("app", android.as_str()), ("outcome", outcome)]
            ),
            "delivery_attempts_total {outcome} missing before the first push:\n{text}"
        );
    }
    // Not labelled by app: other tests' workers in this process may have claimed already.
    for result in ["took", "empty", "failed"] {
        assert!(
            samples.iter().any(|s| s.name == "delivery_claims_total"
                && s.labels.get("result").map(String::as_str) == Some(result)),
            "delivery_claims_total {result} missing before the first push:\n{text}"
        );
    }

    let later = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    for _ in 0..2 {
        let mut body = push_body(ANDROID_APP, "unicast");
        body["app"] = json!(android);
        body["send_at"] = json!(later);
        assert_eq!(app.post_push(&body).await.status(), 202);
    }
    let mut now = push_body(ANDROID_APP, "unicast");
    now["app"] = json!(android);
    let r = app
        .http
        .post(format!("{}/v1/pushes", app.base))
        .bearer_auth(TOKEN_SENDER)
        .header("prefer", "respond-async")
        .json(&now)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // The gauges are refreshed every 5 s (a refresh may fall between the admission and the
    // delivery, showing the sent push still waiting until the next one); the attempts
    // counter is live.
    let mut last = String::new();
    for _ in 0..160 {
        let (text, samples) = scrape(&app).await;
        let held = value(
            &samples,
            "push_queue_depth",
            &[("app", android.as_str()), ("state", "awaiting_send_at")],
        );
        let attempts = value(
            &samples,
            "delivery_attempts_total",
            &[("app", android.as_str()), ("outcome", "accepted")],
        );
        let waiting = value(
            &samples,
            "push_queue_depth",
            &[("app", android.as_str()), ("state", "awaiting_send")],
        );
        if held == 2.0 && attempts == 1.0 && waiting == 0.0 {
            assert!(
                value(&samples, "delivery_claims_total", &[("result", "took")]) >= 1.0,
                "the claim that took the push is counted:\n{text}"
            );
            assert!(samples
                .iter()
                .any(|s| s.name == "push_queue_oldest_due_seconds"
                    && s.labels.get("app") == Some(&android)));
            app.stop().await;
            return;
        }
        last = text;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "queue metrics never showed 2 held pushes, none waiting and 1 delivered attempt:\n{last}"
    );
}
