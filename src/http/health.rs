//! Health endpoints, open to all: `/healthz` (the process answers) and `/readyz` (the
//! database is reachable and migrated).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::gateway::Gateway;

pub fn router() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/healthz", get(get_healthz))
        .route("/readyz", get(get_readyz))
}

async fn get_healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn get_readyz(State(gateway): State<Arc<Gateway>>) -> (StatusCode, Json<Value>) {
    match gateway.store.ready().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({"status": "ready", "database": gateway.store.backend()})),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(
                    json!({"status": "unavailable", "database": gateway.store.backend(), "error": e.to_string()}),
                ),
            )
        }
    }
}
