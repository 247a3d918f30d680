//! The HTTP API: one router per resource, merged here, plus the shared middleware.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::{HeaderName, Method, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;

use crate::gateway::Gateway;

pub mod auth;
pub mod health;
pub mod limits;
pub mod openapi;
pub mod pushes;
pub mod quotas;
pub mod serve;

/// The request id header, taken from the caller or made, and returned.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Build the whole API router around a running gateway.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let settings = &gateway.config.settings.server;
    let body_limit = settings.body_limit_bytes;
    let timeout = Duration::from_secs(settings.request_timeout_secs);
    if settings.metrics_enabled {
        // The process-wide recorder; a gateway with metrics off never installs one.
        crate::metrics::handle();
        crate::metrics::preregister(gateway.apps.values().map(|a| {
            let kinds = a.app.quotas.keys().map(|k| k.to_string()).collect();
            (a.app.name.as_str(), kinds)
        }));
    }
    let (routes, _) = documented_routes(settings.metrics_enabled);
    let mut routes = routes.with_state(Arc::clone(&gateway));
    if gateway.config.settings.console.enabled {
        routes = routes.merge(crate::console::router(Arc::clone(&gateway)));
    }
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(middleware::from_fn_with_state(
            limits::BodyBudget::new(settings.inflight_body_bytes, body_limit),
            limits::limit_bodies,
        ))
        .layer(middleware::from_fn(count_request))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(middleware::from_fn(drop_unfit_request_id))
        .layer(SetSensitiveRequestHeadersLayer::new([
            axum::http::header::AUTHORIZATION,
            axum::http::header::COOKIE,
        ]))
}

/// Every route with its OpenAPI description (`/metrics` only when enabled). Routes are
/// registered only through here, so none can be left out of the document.
pub fn documented_routes(
    metrics_enabled: bool,
) -> (Router<Arc<Gateway>>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi as _;
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(pushes::router())
        .merge(quotas::router())
        .merge(health::router(metrics_enabled))
        .merge(openapi::router())
        .split_for_parts()
}

/// The longest `X-Request-Id` taken from a caller.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A caller's `X-Request-Id` is kept only when it is 1 to [`MAX_REQUEST_ID_LEN`] visible
/// ASCII characters; otherwise it is removed here and a fresh one is made, so a caller
/// cannot put arbitrary text into every log line of its request.
pub fn acceptable_request_id(v: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&v.len()) && v.iter().all(|b| b.is_ascii_graphic())
}

async fn drop_unfit_request_id(mut req: Request<Body>, next: Next) -> Response {
    let headers = req.headers_mut();
    let unfit = headers.get_all(REQUEST_ID).iter().count() > 1
        || headers
            .get(REQUEST_ID)
            .is_some_and(|v| !acceptable_request_id(v.as_bytes()));
    if unfit {
        headers.remove(REQUEST_ID);
    }
    next.run(req).await
}

/// The span every log line of a request is written in: the request id (from the caller's
/// `X-Request-Id` or made), the method and the route template. `client` is filled in once
/// the bearer token is matched. No query string, no headers, no body.
fn request_span<B>(req: &Request<B>) -> tracing::Span {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        request.id = %id,
        http.method = %req.method(),
        http.route = %route_of(req),
        client = tracing::field::Empty,
    )
}

/// The matched path template (`/v1/pushes/{id}`), never the concrete path, so ids do not
/// reach metric labels; `unmatched` for a 404.
fn route_of<B>(req: &Request<B>) -> String {
    req.extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned())
}

/// Count every answered request in `http_requests_total` and time it.
async fn count_request(req: Request<Body>, next: Next) -> Response {
    let started = Instant::now();
    let route = route_of(&req);
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        // Anything else a client makes up stays out of the label set.
        _ => "other",
    };
    let response = next.run(req).await;
    crate::metrics::http_request(
        &route,
        method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
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
