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
    components(schemas(crate::error::Problem)),
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

/// The document as pretty JSON with a final newline: what `openapi.json` holds.
pub fn document_json() -> String {
    let mut text = document()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialise the document: {e}\"}}"));
    text.push('\n');
    text
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
