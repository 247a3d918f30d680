//! Operational endpoints, open to all like a Kubernetes probe or a Prometheus scrape expects:
//! `/healthz` (the process answers), `/readyz` (the database is reachable and migrated) and
//! `/metrics` (Prometheus text format; off with `server.metrics_enabled = false`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::gateway::Gateway;
use crate::store::StoreError;

/// `/readyz` answers 503 when the database has not answered within this long, so a probe
/// never waits for the pool's whole acquire timeout.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router(metrics_enabled: bool) -> OpenApiRouter<Arc<Gateway>> {
    let router = OpenApiRouter::new()
        .routes(routes!(get_healthz))
        .routes(routes!(get_readyz));
    if metrics_enabled {
        router.routes(routes!(get_metrics))
    } else {
        router
    }
}

/// The body of `/healthz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// The body of `/readyz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// `postgres` or `sqlite`.
    #[schema(example = "postgres")]
    pub database: &'static str,
    /// Why the gateway is not ready, in general terms (the database's own error text is
    /// only logged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
}

/// The process is alive. No I/O.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process answers", body = Health)),
)]
pub async fn get_healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The database is reachable, writable, and every migration of this build is applied.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = Readiness),
        (status = 503, description = "The database is unreachable, read-only or not migrated", body = Readiness),
    ),
)]
pub async fn get_readyz(State(gateway): State<Arc<Gateway>>) -> (StatusCode, Json<Readiness>) {
    let database = gateway.store.backend();
    // The cause (which may name the database, its host or its user) goes to the log; the
    // open endpoint answers only a generic reason.
    let result = match tokio::time::timeout(READY_TIMEOUT, gateway.store.ready()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "not ready");
            Err(match e {
                StoreError::Migration(_) => "the database is not migrated",
                StoreError::Unavailable(_) => "the database is unreachable or read-only",
                StoreError::Database(_) | StoreError::BadUrl(_) => {
                    "the database answered with an error"
                }
            })
        }
        Err(_) => {
            tracing::warn!(
                timeout_secs = READY_TIMEOUT.as_secs(),
                "not ready: the database did not answer in time"
            );
            Err("the database did not answer in time")
        }
    };
    match result {
        Ok(()) => (
            StatusCode::OK,
            Json(Readiness {
                status: "ready",
                database,
                error: None,
            }),
        ),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Readiness {
                status: "unavailable",
                database,
                error: Some(error),
            }),
        ),
    }
}

/// Prometheus metrics of this process (text exposition format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((
        status = 200,
        description = "Prometheus text format; absent (404) when `server.metrics_enabled` is false",
        content_type = "text/plain",
        body = String,
    )),
)]
pub async fn get_metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    let pool = gateway.store.pool_status();
    crate::metrics::db_pool(pool.idle, pool.in_use);
    let body = crate::metrics::handle().render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROMETHEUS_TEXT),
        )],
        body,
    )
        .into_response()
}
