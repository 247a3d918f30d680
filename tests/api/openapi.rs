//! The OpenAPI document: valid 3.1, identical to the committed `openapi.json`
//! (`UPDATE_OPENAPI=1 cargo test openapi` rewrites it), served at `/openapi.json`, and
//! every documented operation is routed.

use serde_json::Value;
use umeng_push_gateway::http::openapi;

use crate::app::*;

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

#[test]
fn committed_document_matches_the_code() {
    let generated = openapi::document_json();
    if std::env::var("UPDATE_OPENAPI").is_ok_and(|v| v == "1") {
        std::fs::write(COMMITTED, &generated).expect("openapi.json written");
        return;
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.json differs from the document the code generates; run \
         `UPDATE_OPENAPI=1 cargo test openapi` and commit the result"
    );
}

#[test]
fn document_is_openapi_3_1_with_every_route_and_schema() {
    let doc: Value = serde_json::from_str(&openapi::document_json()).expect("valid JSON");
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let paths = doc["paths"].as_object().expect("paths");
    let mut routes: Vec<(String, String)> = Vec::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            routes.push((method.clone(), path.clone()));
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
        }
    }
    routes.sort();
    let expected = [
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/readyz"),
        ("get", "/v1/pushes"),
        ("get", "/v1/pushes/{id}"),
        ("get", "/v1/quotas"),
        ("post", "/v1/pushes"),
        ("post", "/v1/pushes/{id}/cancel"),
        ("post", "/v1/pushes/{id}/refresh"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(routes, expected);

    // Request and answer schemas, the error body and the documented headers.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "PushRequest",
        "Notification",
        "Open",
        "Message",
        "PushPolicy",
        "AndroidOptions",
        "IosOptions",
        "Badge",
        "CastType",
        "PushView",
        "PushRecord",
        "PushStatus",
        "PushPage",
        "QuotaList",
        "QuotaEntry",
        "Problem",
        "FieldError",
        "UmengDetail",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let create = &doc["paths"]["/v1/pushes"]["post"];
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/PushRequest"
    );
    let responses = &create["responses"];
    for status in [
        "200", "201", "400", "401", "403", "409", "413", "422", "429", "502", "503", "504",
    ] {
        assert!(responses[status].is_object(), "POST /v1/pushes {status}");
    }
    assert!(responses["201"]["headers"]["Location"].is_object());
    assert!(responses["200"]["headers"]["Idempotent-Replayed"].is_object());
    assert!(responses["429"]["headers"]["Retry-After"].is_object());
    assert!(responses["429"]["headers"]["RateLimit-Remaining"].is_object());
    assert_eq!(
        responses["422"]["content"]["application/problem+json"]["schema"]["$ref"],
        "#/components/schemas/Problem"
    );
}

#[test]
fn the_callback_event_is_a_webhook_and_callbacks_are_in_the_schemas() {
    let doc: Value = serde_json::from_str(&openapi::document_json()).expect("valid JSON");
    let hook = &doc["webhooks"]["push-event"]["post"];
    assert_eq!(
        hook["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/CallbackEventBody"
    );
    let headers: Vec<&str> = hook["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        headers,
        ["webhook-id", "webhook-timestamp", "webhook-signature"]
    );
    let schemas = &doc["components"]["schemas"];
    let event = &schemas["CallbackEventBody"]["properties"];
    for field in ["type", "timestamp", "data"] {
        assert!(event[field].is_object(), "event.{field}: {event}");
    }
    assert!(schemas["PushRequest"]["properties"]["callback_url"].is_object());
    assert!(schemas["PushRecord"]["properties"]["callbacks"].is_object());
    assert!(schemas["CallbackEvent"]["properties"]["attempts"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_document_equals_generated_and_every_operation_is_routed() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let app = env.spawn_app().await;
    let r = app
        .http
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "open, like the probes");
    let served = r.text().await.unwrap();
    assert_eq!(served, openapi::document_json());

    let doc: Value = serde_json::from_str(&served).unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "no-such-push");
        for method in item.as_object().unwrap().keys() {
            let request = match method.as_str() {
                "get" => app.http.get(format!("{}{concrete}", app.base)),
                "post" => app.http.post(format!("{}{concrete}", app.base)),
                other => panic!("unexpected method {other}"),
            };
            let r = request.bearer_auth(TOKEN_SENDER).send().await.unwrap();
            let status = r.status().as_u16();
            let problem = r
                .headers()
                .get("content-type")
                .is_some_and(|v| v == "application/problem+json");
            // A route the router does not know answers a bare 404/405; ours answer
            // something else, or a problem document.
            assert!(
                !matches!(status, 404 | 405) || problem,
                "{method} {path} is not routed ({status})"
            );
        }
    }
    app.stop().await;
}
