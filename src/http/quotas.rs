//! `GET /v1/quotas`: limit, used, remaining and reset time per app and quota bucket.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::Scope;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::http::auth::Caller;
use crate::quota::{QuotaKind, WindowUnit};

pub fn router() -> Router<Arc<Gateway>> {
    Router::new().route("/v1/quotas", get(list_quotas))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaQuery {
    pub app: Option<String>,
}

#[derive(Debug, Serialize)]
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

#[derive(Debug, Serialize)]
pub struct QuotaList {
    pub quotas: Vec<QuotaEntry>,
}

async fn list_quotas(
    State(gateway): State<Arc<Gateway>>,
    caller: Caller,
    Query(q): Query<QuotaQuery>,
) -> Result<Json<QuotaList>, ApiError> {
    caller.require(Scope::Read)?;
    let mut names: Vec<&String> = match &q.app {
        Some(name) => {
            let app = gateway
                .app(name)
                .ok_or_else(|| ApiError::NotFound(format!("no app named {name:?}")))?;
            caller.require_app(&app.app.name)?;
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
    Ok(Json(QuotaList { quotas }))
}
