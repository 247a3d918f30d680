//! The OpenAPI 3.1 document, generated from the handlers' and types' annotations and served
//! at `GET /openapi.json`. A copy is committed as `openapi.json`; a test keeps the two equal.

use std::sync::{Arc, OnceLock};

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::gateway::Gateway;

/// The parts of the document no handler carries: title, description, tags, the bearer
/// security scheme and the shared error schema.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "umeng-push-gateway",
        description = "An HTTP gateway in front of Umeng U-Push: validation, shared quotas, \
            idempotency by out_biz_no, history, task refresh and cancel. Every error is an \
            RFC 9457 problem document (application/problem+json). Every answer carries \
            X-Request-Id (the caller's, or a new one).",
        license(name = "MIT OR Apache-2.0"),
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "pushes", description = "Send pushes, read history, refresh and cancel tasks"),
        (name = "quotas", description = "Umeng's per-type quotas, shared by every replica"),
        (name = "operations", description = "Probes, metrics and this document; no token needed"),
    ),
    components(schemas(crate::error::Problem, crate::callbacks::CallbackEventBody)),
)]
pub struct ApiDoc;

/// Adds the `bearer` security scheme: `Authorization: Bearer <client token>`.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A client token; its SHA-256 is configured under [[clients]]. The \
                         scopes named on each operation are the client scopes it needs \
                         (admin holds all).",
                    ))
                    .build(),
            ),
        );
    }
}

pub fn router() -> OpenApiRouter<Arc<Gateway>> {
    OpenApiRouter::new().routes(routes!(get_openapi))
}

/// The whole document, every route included (`/metrics` too, whatever the configuration).
pub fn document() -> utoipa::openapi::OpenApi {
    super::documented_routes(true).1
}

/// The document as pretty JSON with a final newline: what `openapi.json` holds. utoipa has
/// no 3.1 `webhooks`, so the callback event is added here ([`callback_webhooks`]).
pub fn document_json() -> String {
    let mut doc = match serde_json::to_value(document()) {
        Ok(doc) => doc,
        Err(e) => return format!("{{\"error\": \"cannot serialise the document: {e}\"}}\n"),
    };
    if let Some(root) = doc.as_object_mut() {
        root.insert("webhooks".into(), callback_webhooks());
    }
    let mut text = serde_json::to_string_pretty(&doc)
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialise the document: {e}\"}}"));
    text.push('\n');
    text
}

/// The OpenAPI 3.1 `webhooks` entry of the signed callback (README, "Callbacks").
fn callback_webhooks() -> serde_json::Value {
    let header = |name: &str, description: &str, example: &str| {
        serde_json::json!({
            "name": name,
            "in": "header",
            "required": true,
            "description": description,
            "schema": {"type": "string"},
            "example": example,
        })
    };
    serde_json::json!({
        "push-event": {
            "post": {
                "summary": "A push reached a final state",
                "description": "Sent to the push's `callback_url` when it reaches a final \
                    state: `accepted`, `failed` or `unknown` at the end of its Umeng call, and \
                    for task-class pushes later `done`, `send_failed`, `cancelled`, `expired`, \
                    `no_match` or `task_lost`; `withdrawn` for an asynchronous push cancelled \
                    before it was sent. One event per push and state, delivered at least \
                    once: a 2xx answer ends it, anything else (or no answer within \
                    `callbacks.timeout_ms`) is retried with exponential backoff and full \
                    jitter for up to a day. Redirects are not followed. Signed per the \
                    Standard Webhooks specification with the client's `callback_secret`: \
                    verify `webhook-signature` before trusting the body, and dedupe by \
                    `webhook-id`.",
                "parameters": [
                    header("webhook-id", "The event id, the same on every attempt: dedupe by it", "evt_01936f4e-2f0a-7c3e-9d4b-5a6b7c8d9e0f_accepted"),
                    header("webhook-timestamp", "Unix seconds of this attempt; refuse ones far from now", "1764489600"),
                    header("webhook-signature", "`v1,` + base64 of HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the base64-decoded part of the client's `whsec_` secret", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
                ],
                "requestBody": {
                    "required": true,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/CallbackEventBody"}
                        }
                    }
                },
                "responses": {
                    "2XX": {"description": "Received: the event is delivered"},
                    "default": {"description": "Not received: the event is tried again later"}
                }
            }
        }
    })
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)),
)]
pub async fn get_openapi() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let body = DOCUMENT.get_or_init(document_json).clone();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}
