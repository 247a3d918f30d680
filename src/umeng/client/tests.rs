//! Client tests against a tiny in-process axum stub (not the simulator).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

use super::*;
use crate::umeng::error::{ErrorClass, Outcome};
use crate::umeng::model::{AndroidBody, AndroidPayload, DisplayType, Payload};
use crate::umeng::CastType;

const SECRET: &str = "testsecret0123456789abcdefghijkl";

#[derive(Clone, Debug)]
struct Received {
    path: String,
    query: Option<String>,
    content_type: Option<String>,
    body: Bytes,
}

#[derive(Clone)]
struct Stub {
    received: Arc<Mutex<Vec<Received>>>,
    status: StatusCode,
    answer: String,
    delay: Duration,
}

async fn handle(
    State(stub): State<Stub>,
    uri: axum::http::Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    stub.received.lock().expect("lock").push(Received {
        path: uri.path().to_owned(),
        query,
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
    });
    tokio::time::sleep(stub.delay).await;
    (stub.status, stub.answer.clone())
}

/// Starts a stub answering every path with `status` and `answer`; returns its base URL
/// and the requests it received.
async fn stub(status: u16, answer: &str, delay: Duration) -> (String, Arc<Mutex<Vec<Received>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let state = Stub {
        received: received.clone(),
        status: StatusCode::from_u16(status).expect("status"),
        answer: answer.to_owned(),
        delay,
    };
    let router = Router::new()
        .route("/api/send", post(handle))
        .route("/api/status", post(handle))
        .route("/api/cancel", post(handle))
        .route("/upload", post(handle))
        .with_state(state);
    (serve(router).await, received)
}

/// Serves `router` on a free local port; returns its base URL.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}/")
}

fn client(base_url: &str, timeout: Duration) -> UmengClient {
    UmengClient::new(ClientConfig {
        base_url: base_url.to_owned(),
        connect_timeout: Duration::from_secs(2),
        timeout,
    })
    .expect("client")
}

fn app() -> AppCredentials {
    AppCredentials {
        appkey: "5f0000000000000000000001".into(),
        master_secret: Secret::new(SECRET),
    }
}

fn body() -> SendBody {
    let mut b = SendBody::new(
        CastType::Unicast,
        Payload::Android(AndroidPayload {
            display_type: DisplayType::Notification,
            body: AndroidBody {
                title: Some("你好".into()),
                text: Some("hello".into()),
                ..Default::default()
            },
            extra: None,
        }),
    );
    b.device_tokens = Some("A".repeat(44));
    b.production_mode = Some(false);
    b
}

fn sign_of(url: &str, sent: &serde_json::value::RawValue) -> String {
    sign(url, sent.get().as_bytes(), SECRET)
}

#[tokio::test]
async fn success_is_parsed_and_the_request_is_signed_over_the_exact_bytes() {
    let (base, received) = stub(
        200,
        r#"{"ret":"SUCCESS","data":{"msg_id":"uu07343141897754408310"}}"#,
        Duration::ZERO,
    )
    .await;
    let c = client(&base, Duration::from_secs(5));

    let attempt = c.send(&app(), &body()).await;

    let ok = attempt.result.expect("success");
    assert_eq!(ok.msg_id.as_deref(), Some("uu07343141897754408310"));
    assert_eq!(ok.task_id, None);
    let got = received.lock().expect("lock")[0].clone();
    assert_eq!(got.path, "/api/send");
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    let url = format!("{}/api/send", base.trim_end_matches('/'));
    let expected_sign = sign(&url, &got.body, SECRET);
    assert_eq!(got.query, Some(format!("sign={expected_sign}")));
    // What is recorded is exactly what was sent, appkey and timestamp first.
    let sent = attempt.sent_body.expect("sent body");
    assert_eq!(sent.get().as_bytes(), &got.body[..]);
    let sent: Value = serde_json::from_str(sent.get()).expect("json");
    let keys: Vec<&String> = sent.as_object().expect("object").keys().collect();
    assert_eq!(keys[..3], ["appkey", "timestamp", "type"]);
    let ts = sent["timestamp"].as_str().expect("string timestamp");
    assert_eq!(ts.len(), 13);
    assert!(ts.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(sent["production_mode"], json!("false"));
    // Non-ASCII is sent as raw UTF-8.
    assert!(String::from_utf8_lossy(&got.body).contains("你好"));
}

#[tokio::test]
async fn fail_envelopes_are_classified_with_string_or_number_codes() {
    for (code, class) in [
        (json!("2050"), ErrorClass::Quota),
        (json!(2027), ErrorClass::Auth),
        (json!("1001"), ErrorClass::Client),
        (json!(6003), ErrorClass::Retryable),
        (json!("2034"), ErrorClass::Certificate),
    ] {
        let answer =
            json!({"ret":"FAIL","data":{"error_code": code, "error_msg":"nope"}}).to_string();
        let (base, _) = stub(400, &answer, Duration::ZERO).await;

        let attempt = client(&base, Duration::from_secs(5))
            .send(&app(), &body())
            .await;

        match attempt.result {
            Err(UmengError::Fail {
                code: got,
                class: got_class,
                http_status,
                message,
                ..
            }) => {
                assert_eq!(
                    got,
                    code.as_str()
                        .map_or_else(|| code.to_string(), str::to_owned)
                );
                assert_eq!(got_class, class, "code {code}");
                assert_eq!(http_status, 400);
                assert_eq!(message, "nope");
            }
            other => panic!("expected Fail for {code}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_hang_longer_than_the_timeout_is_unknown_and_leaks_nothing() {
    let (base, _) = stub(200, "{}", Duration::from_secs(30)).await;

    let attempt = client(&base, Duration::from_millis(300))
        .send(&app(), &body())
        .await;

    let err = attempt.result.expect_err("timeout");
    assert_eq!(err.outcome(), Outcome::Unknown, "{err:?}");
    let sent = attempt.sent_body.expect("sent");
    let s = sign_of(&format!("{}/api/send", base.trim_end_matches('/')), &sent);
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains(&s), "{text}");
        assert!(!text.contains("sign="), "{text}");
    }
}

#[tokio::test]
async fn a_closed_port_is_not_sent() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);

    let attempt = client(&format!("http://{addr}"), Duration::from_secs(2))
        .send(&app(), &body())
        .await;

    let err = attempt.result.expect_err("refused");
    assert!(matches!(err, UmengError::NotSent { .. }), "{err:?}");
    assert!(err.is_definite_failure());
    assert!(!err.to_string().contains("sign="), "{err}");
    assert!(!err.to_string().contains(SECRET));
}

#[tokio::test]
async fn an_http_502_with_html_is_unknown() {
    let (base, _) = stub(502, "<html><body>Bad Gateway</body></html>", Duration::ZERO).await;

    let attempt = client(&base, Duration::from_secs(5))
        .send(&app(), &body())
        .await;

    let err = attempt.result.expect_err("502");
    assert!(matches!(err, UmengError::Unknown { .. }), "{err:?}");
    assert!(err.to_string().contains("502"));
    assert!(!err.to_string().contains(SECRET));
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_is_unknown() {
    // Following it would take the signed URL and the body to the address it names.
    let followed = Arc::new(Mutex::new(0u32));
    let hits = followed.clone();
    let router = Router::new()
        .route(
            "/api/send",
            post(|| async {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [("location", "/elsewhere")],
                    "",
                )
            }),
        )
        .route(
            "/elsewhere",
            post(move || async move {
                *hits.lock().expect("lock") += 1;
                r#"{"ret":"SUCCESS","data":{"msg_id":"m1"}}"#
            }),
        );
    let base = serve(router).await;

    let attempt = client(&base, Duration::from_secs(5))
        .send(&app(), &body())
        .await;

    let err = attempt.result.expect_err("307");
    assert!(matches!(err, UmengError::Unknown { .. }), "{err:?}");
    assert!(err.to_string().contains("307"), "{err}");
    assert_eq!(
        *followed.lock().expect("lock"),
        0,
        "the redirect was followed"
    );
}

#[tokio::test]
async fn status_cancel_and_upload_use_their_paths() {
    let (base, received) = stub(
        200,
        r#"{"ret":"SUCCESS","data":{"task_id":"us1","status":2,"sent_count":10,"file_id":"PF8961384936199949"}}"#,
        Duration::ZERO,
    )
    .await;
    let c = client(&base, Duration::from_secs(5));

    let status = c.status(&app(), "us1").await.expect("status");
    c.cancel(&app(), "us1").await.expect("cancel");
    let file_id = c.upload(&app(), "a\nb\n").await.expect("upload");

    assert_eq!(status.status, 2);
    assert_eq!(status.raw["data"]["sent_count"], json!(10));
    assert_eq!(file_id, "PF8961384936199949");
    let got = received.lock().expect("lock").clone();
    let paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/api/status", "/api/cancel", "/upload"]);
    let upload: Value = serde_json::from_slice(&got[2].body).expect("json");
    assert_eq!(upload["content"], json!("a\nb\n"));
    let status_body: Value = serde_json::from_slice(&got[0].body).expect("json");
    assert_eq!(status_body["task_id"], json!("us1"));
    let url = format!("{}/upload", base.trim_end_matches('/'));
    assert_eq!(
        got[2].query,
        Some(format!("sign={}", sign(&url, &got[2].body, SECRET)))
    );
}

#[test]
fn interpret_rejects_envelopes_it_cannot_trust() {
    assert!(matches!(
        interpret(200, b"not json"),
        Err(UmengError::Unknown { .. })
    ));
    assert!(matches!(
        interpret(200, br#"{"ret":"FAIL","data":{}}"#),
        Err(UmengError::Unknown { .. })
    ));
    assert!(matches!(
        interpret(500, br#"{"ret":"SUCCESS","data":{}}"#),
        Err(UmengError::Unknown { .. })
    ));
    assert!(interpret(200, br#"{"ret":"SUCCESS","data":{"task_id":"us1"}}"#).is_ok());
}

#[test]
fn a_body_is_sent_with_the_clients_appkey_and_timestamp_first_and_its_own_left_out() {
    let fields =
        json!({"appkey": "other", "type": "unicast", "timestamp": "1", "payload": {"a": 1}});
    let signed = Signed {
        appkey: "k-1",
        timestamp: "1700000000000",
        fields: fields.as_object().expect("object"),
    };
    assert_eq!(
        serde_json::value::to_raw_value(&signed)
            .expect("json")
            .get(),
        r#"{"appkey":"k-1","timestamp":"1700000000000","type":"unicast","payload":{"a":1}}"#
    );
}
