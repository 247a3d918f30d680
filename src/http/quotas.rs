//! `GET /v1/quotas`: limit, used, remaining and reset time per app and quota bucket.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Scope;
use crate::error::{ApiError, Problem};
use crate::gateway::Gateway;
use crate::http::auth::Caller;
use crate::quota::{QuotaKind, WindowUnit};

pub fn router() -> OpenApiRouter<Arc<Gateway>> {
    OpenApiRouter::new().routes(routes!(list_quotas))
}

/// Query string of `GET /v1/quotas`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct QuotaQuery {
    /// Only this app (default: every app the client may use).
    pub app: Option<String>,
}

/// One quota bucket of one app, in its current window.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QuotaEntry {
    pub app: String,
    pub kind: QuotaKind,
    pub limit: u32,
    pub window: WindowUnit,
    pub used: u32,
    pub remaining: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub window_start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub reset_at: OffsetDateTime,
    pub reset_after_secs: i64,
}

/// Every bucket of every app the client may see.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QuotaList {
    pub quotas: Vec<QuotaEntry>,
}

/// Limit, used, remaining and reset time per app and quota bucket.
#[utoipa::path(
    get,
    path = "/v1/quotas",
    tag = "quotas",
    security(("bearer" = ["read"])),
    params(QuotaQuery),
    responses(
        (status = 200, description = "Quota state per app and bucket", body = QuotaList),
        (status = 400, description = "Unknown query parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The client lacks the `read` scope or may not use the app", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such app (for a client allowed every app; a client limited to some apps gets 403 for any other name)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is unreachable", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn list_quotas(
    State(gateway): State<Arc<Gateway>>,
    caller: Caller,
    query: Result<Query<QuotaQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<QuotaList>, ApiError> {
    caller.require(Scope::Read)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest {
        detail: e.body_text(),
        field: None,
    })?;
    let quotas = quota_entries(&gateway, &caller, q.app.as_deref()).await?;
    Ok(Json(QuotaList { quotas }))
}

/// Every bucket of `app` (or of every app `caller` may use), in its current window (the API
/// and the console).
pub async fn quota_entries(
    gateway: &Gateway,
    caller: &Caller,
    app: Option<&str>,
) -> Result<Vec<QuotaEntry>, ApiError> {
    caller.require(Scope::Read)?;
    let mut names: Vec<&String> = match app {
        Some(name) => {
            // The allow-list first: a client limited to some apps gets the same 403 for an
            // app that does not exist as for one it may not use.
            caller.require_app(name)?;
            let app = gateway
                .app(name)
                .ok_or_else(|| ApiError::NotFound(format!("no app named {name:?}")))?;
            vec![&app.app.name]
        }
        None => gateway
            .apps
            .keys()
            .filter(|n| caller.0.may_use_app(n))
            .collect(),
    };
    names.sort();
    let mut quotas = Vec::new();
    for name in names {
        let app = &gateway.apps[name];
        for (kind, limit) in &app.app.quotas {
            let s = gateway
                .store
                .quota_state(&app.app.appkey, *kind, *limit)
                .await?;
            crate::metrics::quota_remaining(name, &s);
            let start = OffsetDateTime::from_unix_timestamp(s.window_start)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            let end = OffsetDateTime::from_unix_timestamp(s.window_end())
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            quotas.push(QuotaEntry {
                app: name.clone(),
                kind: *kind,
                limit: s.limit,
                window: s.window,
                used: s.used,
                remaining: s.remaining(),
                window_start: start,
                reset_at: end,
                reset_after_secs: s.reset_after_secs,
            });
        }
    }
    Ok(quotas)
}
