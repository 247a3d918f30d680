//! The HTTP API: one router per resource, merged here, plus the shared middleware.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::gateway::Gateway;

pub mod auth;
pub mod health;
pub mod pushes;
pub mod quotas;

/// The request id header, taken from the caller or made, and returned.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Build the whole API router around a running gateway.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let settings = &gateway.config.settings.server;
    let body_limit = settings.body_limit_bytes;
    let timeout = Duration::from_secs(settings.request_timeout_secs);
    Router::new()
        .merge(pushes::router())
        .merge(quotas::router())
        .merge(health::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(TimeoutLayer::with_status_code(axum::http::StatusCode::SERVICE_UNAVAILABLE, timeout))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let id = req
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", http.method = %req.method(), http.path = %req.uri().path(), request.id = %id)
            }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(SetSensitiveRequestHeadersLayer::new([axum::http::header::AUTHORIZATION]))
        .with_state(gateway)
}

/// Unknown paths: a problem+json 404 like every other error.
async fn not_found(uri: axum::http::Uri) -> crate::error::ApiError {
    crate::error::ApiError::NotFound(format!("no route for {}", uri.path()))
}

/// Known path, wrong method: a problem+json 405.
async fn method_not_allowed(method: axum::http::Method) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = serde_json::json!({
        "type": "urn:umeng-push-gateway:problem:method-not-allowed",
        "title": "Method not allowed",
        "status": 405,
        "detail": format!("{method} is not allowed on this path"),
    });
    (
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        [(axum::http::header::CONTENT_TYPE, crate::error::PROBLEM_JSON)],
        body.to_string(),
    )
        .into_response()
}
