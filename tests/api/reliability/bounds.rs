//! Bounded resources under heavy and hostile input, the fast half (issue 8): history lists
//! without stored bodies and `file_lines` never stored, paging at the largest page, the
//! in-flight body budget, 413 before the body, connection timeouts and the connection cap,
//! request ids, app names hidden from restricted clients, a generic `/readyz`, a read-only
//! database, and metrics present before the first push. The slow figures (release binary,
//! peak memory, 1,100 connections) are in `figures.rs`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::*;
use crate::helpers::TestDb;

on_both_backends!(
    history_lists_summaries_and_never_stores_file_lines,
    walking_history_at_the_largest_page_sees_every_row,
    history_pages_by_creation_time_with_from_and_to,
);

/// `n` pushes through the API, `workers` at a time; their ids.
async fn send_many(app: &TestApp, n: usize, workers: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut queue: Vec<usize> = (0..n).collect();
    while !queue.is_empty() {
        let batch: Vec<usize> = queue.drain(..workers.min(queue.len())).collect();
        let body = push_body(ANDROID_APP, "unicast");
        let sends = batch.iter().map(|_| app.post_push(&body));
        for r in futures::future::join_all(sends).await {
            assert_eq!(r.status(), 201);
            let v: Value = r.json().await.unwrap();
            ids.push(v["id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

/// Every id `GET /v1/pushes?<query>` shows, following `next_cursor`.
async fn walk(app: &TestApp, query: &str) -> (Vec<String>, usize) {
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/pushes?{query}&cursor={c}"),
            None => format!("/v1/pushes?{query}"),
        };
        let page = app.get_json(&path).await;
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (seen, pages),
        }
        assert!(pages < 100, "the walk does not end");
    }
}

async fn history_lists_summaries_and_never_stores_file_lines(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let lines: Vec<String> = (0..300)
        .map(|i| format!("{ANDROID_TOKEN}{i:04}")[4..].to_string())
        .collect();
    let mut body = push_body(ANDROID_APP, "filecast");
    body["file_lines"] = json!(lines);
    let r = app.post_push(&body).await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap();

    // The list: a summary, without the stored request and Umeng bodies.
    let page = app.get_json("/v1/pushes").await;
    let item = &page["items"][0];
    assert_eq!(item["id"], id);
    assert_eq!(item["type"], "filecast");
    assert_eq!(item["status"], "accepted");
    assert!(item["file_id"].is_string(), "{item}");
    for big in ["request", "umeng_request", "umeng_response", "task_status"] {
        assert!(item.get(big).is_none(), "{big} in a list item: {item}");
    }

    // The record: the request without the tokens, their digest instead.
    let record = app.get_json(&format!("/v1/pushes/{id}")).await;
    let content: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(content.as_bytes()))
    };
    assert_eq!(
        record["request"]["file_lines"],
        json!({"sha256": sha, "lines": 300, "bytes": content.len()})
    );
    assert_eq!(record["file_id"], created["file_id"]);
    assert!(record.get("truncated").is_none(), "nothing cut: {record}");
    let stored = record.to_string();
    assert!(
        !stored.contains(&lines[7]),
        "a token is in the stored record"
    );
    app.stop().await;
}

async fn walking_history_at_the_largest_page_sees_every_row(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let mut ids = send_many(&app, 254, 16).await;

    let (seen, pages) = walk(&app, "limit=200").await;

    assert_eq!(pages, 2, "200 + 54");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "no row twice");
    ids.sort();
    assert_eq!(sorted, ids, "every row");
    // The first page says there is more; the last one does not.
    let first = app.get_json("/v1/pushes?limit=200").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 200);
    assert!(first["next_cursor"].is_string());
    let exact = app.get_json("/v1/pushes?limit=200&status=failed").await;
    assert!(exact.get("next_cursor").is_none());
    // A cursor that was not made by the gateway is a 422 naming it.
    let r = app.get("/v1/pushes?cursor=not-a-cursor").await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["field"], "cursor", "{v}");
    app.stop().await;
}

async fn history_pages_by_creation_time_with_from_and_to(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let mut ids = send_many(&app, 7, 1).await;
    let from = "2000-01-01T00:00:00Z";
    let to = "2999-01-01T00:00:00Z";

    let (seen, pages) = walk(
        &app,
        &format!("limit=3&app={ANDROID_APP}&from={from}&to={to}"),
    )
    .await;

    assert_eq!(pages, 3);
    ids.reverse();
    assert_eq!(seen, ids, "every row once, newest first");
    app.stop().await;
}

/// PostgreSQL only: SQLite has no read-only mode a failover could put it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_read_only_is_503_and_not_ready() {
    if crate::helpers::skip_postgres() {
        eprintln!("UMGW_SKIP_POSTGRES=1: skipped");
        return;
    }
    let env = TestEnv::new(Backend::Postgres).await;
    let TestDb::Postgres(pg) = &env.db else {
        unreachable!("a PostgreSQL env")
    };
    let app = env.spawn_app().await;
    assert_eq!(
        app.post_push(&push_body(ANDROID_APP, "unicast"))
            .await
            .status(),
        201
    );
    app.stop().await;
    // The database turns read-only (as after a failover to a standby); a gateway started
    // now gets only read-only sessions.
    env.db
        .execute(&format!(
            "alter database {} set default_transaction_read_only = on",
            pg.name()
        ))
        .await;
    let mut settings = env.settings();
    settings.database.migrate_on_start = false;
    let app = env.spawn_app_with(settings).await;

    let r = app.post_push(&push_body(ANDROID_APP, "unicast")).await;
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    let ready = app
        .http
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let v: Value = ready.json().await.unwrap();
    assert_eq!(v["error"], "the database is unreachable or read-only");
    assert_eq!(env.sends().len(), 1, "nothing sent while read-only");
    // History still reads.
    assert_eq!(app.get("/v1/pushes").await.status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_a_generic_reason_without_the_database_error() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let app = env.spawn_app().await;
    let TestDb::Sqlite(lite) = &env.db else {
        unreachable!()
    };
    // A migration this build knows is gone from the database's record.
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(lite.url())
        .await
        .unwrap();
    sqlx::query("delete from _sqlx_migrations where version = 1")
        .execute(&mut conn)
        .await
        .unwrap();

    let r = app
        .http
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();

    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "the database is not migrated", "{v}");
    assert!(!v.to_string().contains("0001"), "{v}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_client_cannot_tell_unknown_apps_from_forbidden_ones() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let app = env.spawn_app().await;
    let mut answers = Vec::new();
    for name in [IOS_APP, "no-such-app"] {
        let mut body = push_body(ANDROID_APP, "unicast");
        body["app"] = json!(name);
        let r = app.post_push_as(TOKEN_ANDROID_ONLY, &body).await;
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        answers.push((status, v["type"].clone()));
        let r = app
            .get_as(TOKEN_ANDROID_ONLY, &format!("/v1/quotas?app={name}"))
            .await;
        answers.push((
            r.status().as_u16(),
            r.json::<Value>().await.unwrap()["type"].clone(),
        ));
        let r = app
            .get_as(TOKEN_ANDROID_ONLY, &format!("/v1/pushes?app={name}"))
            .await;
        answers.push((
            r.status().as_u16(),
            r.json::<Value>().await.unwrap()["type"].clone(),
        ));
    }

    assert!(answers.iter().all(|(s, _)| *s == 403), "{answers:?}");
    assert_eq!(answers[..3], answers[3..], "same answers for both names");
    // A client allowed every app is told the app does not exist.
    let mut body = push_body(ANDROID_APP, "unicast");
    body["app"] = json!("no-such-app");
    assert_eq!(app.post_push(&body).await.status(), 422);
    assert!(env.sends().is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfit_request_id_is_replaced() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let app = env.spawn_app().await;
    let get_with_id = |id: &'static [u8]| {
        let http = app.http.clone();
        let url = format!("{}/healthz", app.base);
        async move {
            let r = http
                .get(url)
                .header(
                    "x-request-id",
                    reqwest::header::HeaderValue::from_bytes(id).unwrap(),
                )
                .send()
                .await
                .unwrap();
            r.headers()["x-request-id"]
                .to_str()
                .unwrap_or("")
                .to_owned()
        }
    };
    let long: &'static [u8] = Box::leak("a".repeat(129).into_boxed_str()).as_bytes();
    let max: &'static [u8] = Box::leak("b".repeat(128).into_boxed_str()).as_bytes();

    assert_eq!(get_with_id(b"order-42:retry.1").await, "order-42:retry.1");
    assert_eq!(
        get_with_id(max).await.len(),
        128,
        "128 visible characters are kept"
    );
    for unfit in [long, b"with space", b"tab\there", b"caf\xc3\xa9"] {
        let got = get_with_id(unfit).await;
        assert_ne!(got.as_bytes(), unfit);
        assert_eq!(got.len(), 36, "a fresh UUID instead of {unfit:?}: {got}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_over_the_limit_is_413_before_the_body_arrives() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.server.body_limit_bytes = 4096;
    let app = env.spawn_app_with(settings).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/pushes HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN_SENDER}\r\n\
             content-type: application/json\r\ncontent-length: 20000000\r\n\r\n{{\"app\""
        )
        .as_bytes(),
    )
    .await
    .unwrap();

    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut head))
        .await
        .expect("answered without waiting for the body")
        .unwrap();

    let text = String::from_utf8_lossy(&head[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("application/problem+json"), "{text}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_in_flight_budget_wait_then_get_503() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.server.body_limit_bytes = 64 * 1024;
    settings.server.inflight_body_bytes = 64 * 1024;
    let app = env.spawn_app_with(settings).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    // One request holds 40 KiB of the budget: its body never finishes arriving.
    let mut holder = TcpStream::connect(&addr).await.unwrap();
    holder
        .write_all(
            format!(
                "POST /v1/pushes HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN_SENDER}\r\n\
                 content-type: application/json\r\ncontent-length: 40960\r\n\r\n{{\"app\""
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut body = push_body(ANDROID_APP, "unicast");
    body["description"] = json!("x".repeat(30 * 1024));

    let started = Instant::now();
    let r = app.post_push(&body).await;

    assert_eq!(r.status(), 503);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "it waited first"
    );
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    // Small requests still pass, and once the holder is gone the large one does too.
    assert_eq!(
        app.post_push(&push_body(ANDROID_APP, "unicast"))
            .await
            .status(),
        201
    );
    drop(holder);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = app.post_push(&body).await;
    assert_ne!(r.status(), 503, "{:?}", r.text().await);
    app.stop().await;
}

/// Read from `conn` until it is closed; how long that took (`None`: still open at `limit`).
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            conn.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_headers_and_idle_keep_alive_connections_are_closed() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.server.header_read_timeout_secs = 1;
    let app = env.spawn_app_with(settings).await;
    let addr = app.base.trim_start_matches("http://").to_owned();

    // A client that trickles its request head, one byte every 200 ms.
    let mut trickle = TcpStream::connect(&addr).await.unwrap();
    let trickler = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaa" {
            if trickle.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Still open after every byte: read to see whether the server closed it.
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), trickle.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    });
    // A keep-alive connection that asks once, then idles.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let idle_closed = closed_within(&mut idle, Duration::from_secs(5)).await;

    assert!(
        idle_closed.is_some_and(|d| d >= Duration::from_millis(500)),
        "idle keep-alive connection closed after the timeout: {idle_closed:?}"
    );
    assert!(trickler.await.unwrap(), "the trickling client was cut off");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_idle_connections_make_room() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.server.max_connections = 8;
    let app = env.spawn_app_with(settings).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let r = tokio::time::timeout(
        Duration::from_secs(5),
        app.post_push(&push_body(ANDROID_APP, "unicast")),
    )
    .await
    .expect("a push gets through while idle connections fill the cap");

    assert_eq!(r.status(), 201);
    let mut closed = 0;
    for conn in &mut idle {
        if closed_within(conn, Duration::from_millis(100))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    assert!(
        closed >= 4,
        "idle connections were closed to make room: {closed}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_array_of_the_wrong_type_is_refused_at_its_first_element() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let app = env.spawn_app().await;
    let mut body = String::from(r#"{"app":"test-android","type":"unicast","device_tokens":["#);
    body.push_str(&vec!["0"; 500_000].join(","));
    body.push_str("]}");

    let r = app.post_raw(body).await;

    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["field"], "device_tokens[0]", "{v}");
    assert_eq!(
        v["errors"][0]["message"],
        "invalid type: integer `0`, expected a string"
    );
    // Not JSON, and not an object: 400.
    assert_eq!(app.post_raw("[1, 2]").await.status(), 400);
    assert_eq!(app.post_raw("{\"app\": ").await.status(), 400);
    app.stop().await;
}

#[test]
fn check_config_refuses_a_malformed_database_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "[database]\nurl = \"postgres://gw:s3cret@db:notaport/gw\"\n",
    )
    .unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_umeng-push-gateway"))
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .env_remove("UMENG_GATEWAY_DATABASE__URL")
        .output()
        .unwrap();

    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("database.url"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}
