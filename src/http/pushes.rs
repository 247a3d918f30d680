//! `/v1/pushes`: send a push, read history, refresh a task's status, cancel a task.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::config::Scope;
use crate::error::{rate_limit_headers, ApiError, Problem, UmengDetail};
use crate::gateway::{Gateway, PushAnswer, PushView};
use crate::http::auth::Caller;
use crate::push::PushRequest;
use crate::store::{PushQuery, PushRecord, PushStatus, TaskUpdate};
use crate::task_status::{refresh_task, RefreshError};
use crate::umeng::UmengError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn router() -> OpenApiRouter<Arc<Gateway>> {
    OpenApiRouter::new()
        .routes(routes!(create_push, list_pushes))
        .routes(routes!(get_push))
        .routes(routes!(refresh_push))
        .routes(routes!(cancel_push))
}

/// The largest page of history.
pub const MAX_PAGE: u32 = 200;

/// Validate a push, take its quota slot, send it to Umeng and record it.
///
/// A repeat of an earlier request with the same `out_biz_no` is answered from history with
/// the stored status and `Idempotent-Replayed: true`, without calling Umeng.
#[utoipa::path(
    post,
    path = "/v1/pushes",
    tag = "pushes",
    security(("bearer" = ["send"])),
    request_body(content = PushRequest, description = "The push; see docs/push-request.md"),
    responses(
        (status = 201, description = "Umeng accepted the push", body = PushView, headers(
            ("Location" = String, description = "`/v1/pushes/{id}`"),
            ("RateLimit-Limit" = u32, description = "Limit of the quota bucket this push counted against"),
            ("RateLimit-Remaining" = u32, description = "Slots left in the window"),
            ("RateLimit-Reset" = i64, description = "Seconds until the window resets"),
            ("RateLimit-Policy" = String, description = "`\"<bucket>\";q=<limit>;w=<window seconds>`"),
        )),
        (status = 200, description = "A repeat of an earlier request: its stored answer (the status it was answered with, e.g. 201 or 504)", body = PushView, headers(
            ("Location" = String, description = "`/v1/pushes/{id}`"),
            ("Idempotent-Replayed" = String, description = "`true`"),
        )),
        (status = 400, description = "The body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The client lacks the `send` scope or may not use the app", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A push with this `out_biz_no` is in flight", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = u32, description = "Seconds to wait: 1"),
        )),
        (status = 413, description = "The body is larger than `server.body_limit_bytes`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A rule is broken (every field listed), or the `out_biz_no` was used for a different request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The quota window is full (locally, or Umeng answered 2050); Umeng was not called", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = i64, description = "Seconds until the window resets"),
            ("RateLimit-Limit" = u32, description = "Limit of the bucket"),
            ("RateLimit-Remaining" = u32, description = "0"),
            ("RateLimit-Reset" = i64, description = "Seconds until the window resets"),
            ("RateLimit-Policy" = String, description = "`\"<bucket>\";q=<limit>;w=<window seconds>`"),
        )),
        (status = 502, description = "Umeng answered FAIL, or could not be reached (`not_sent`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is unreachable (nothing was sent), or the request timed out", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = u32, description = "Seconds to wait"),
        )),
        (status = 504, description = "Umeng did not answer in time: the push is recorded as `unknown`", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn create_push(
    State(gateway): State<Arc<Gateway>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Send)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: gateway.config.settings.server.body_limit_bytes,
            }
        } else {
            ApiError::BadRequest {
                detail: e.body_text(),
                field: None,
            }
        }
    })?;
    let raw: Value = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
        detail: format!("the body is not valid JSON: {e}"),
        field: None,
    })?;
    if !raw.is_object() {
        return Err(ApiError::BadRequest {
            detail: "the body must be a JSON object".into(),
            field: None,
        });
    }
    let req: PushRequest = serde_path_to_error::deserialize(&raw).map_err(|e| {
        count_invalid(&gateway, &raw);
        let path = e.path().to_string();
        ApiError::Validation(vec![crate::umeng::FieldError {
            // "." is the body itself; "" an unknown field whose name is empty.
            field: if path == "." || path.is_empty() {
                "(body)".into()
            } else {
                path
            },
            message: e.into_inner().to_string(),
        }])
    })?;
    let app = gateway.app(&req.app).ok_or_else(|| {
        ApiError::Validation(vec![crate::umeng::FieldError {
            field: "app".into(),
            message: format!("no app named {:?} is configured", req.app),
        }])
    })?;
    caller.require_app(&app.app.name)?;
    let answer = gateway.create_push(caller.name(), app, req, raw).await?;
    Ok(push_answer(answer))
}

/// Count a request refused before its app was resolved, when it names a configured app
/// (anything else would put caller text into metric labels).
fn count_invalid(gateway: &Gateway, raw: &Value) {
    let Some(app) = raw.get("app").and_then(Value::as_str) else {
        return;
    };
    if gateway.app(app).is_none() {
        return;
    }
    let cast_type = raw
        .get("type")
        .and_then(Value::as_str)
        .and_then(crate::umeng::CastType::parse)
        .map_or("invalid", |c| c.as_str());
    crate::metrics::push(app, cast_type, crate::metrics::PushOutcome::Invalid);
}

fn push_answer(answer: PushAnswer) -> Response {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/pushes/{}", answer.push.id)) {
        headers.insert(header::LOCATION, v);
    }
    if answer.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if let Some(q) = &answer.quota {
        rate_limit_headers(&mut headers, q);
    }
    (answer.status, headers, Json(answer.push)).into_response()
}

/// Query string of `GET /v1/pushes`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// A configured app name.
    pub app: Option<String>,
    /// A cast type (unicast, listcast, broadcast, groupcast, filecast, customizedcast).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub cast_type: Option<String>,
    /// A push status (pending, accepted, failed, unknown, or a task state).
    #[param(value_type = Option<crate::store::PushStatus>)]
    pub status: Option<String>,
    /// The sending client's configured name.
    pub client: Option<String>,
    /// The caller's idempotency key.
    pub out_biz_no: Option<String>,
    /// Umeng's msg_id (unicast-class pushes).
    pub msg_id: Option<String>,
    /// Umeng's task_id (task-class pushes).
    pub task_id: Option<String>,
    /// RFC 3339; created at or after.
    #[param(format = DateTime)]
    pub from: Option<String>,
    /// RFC 3339; created before.
    #[param(format = DateTime)]
    pub to: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1..=200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// One page of history, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PushPage {
    pub items: Vec<PushRecord>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

fn field_error(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::Validation(vec![crate::umeng::FieldError {
        field: field.into(),
        message: message.into(),
    }])
}

fn parse_time(field: &str, v: &Option<String>) -> Result<Option<OffsetDateTime>, ApiError> {
    v.as_deref()
        .map(|s| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|_| {
                field_error(
                    field,
                    "must be an RFC 3339 time, e.g. 2026-12-01T09:00:00+08:00",
                )
            })
        })
        .transpose()
}

/// History of pushes the caller may see, newest first.
#[utoipa::path(
    get,
    path = "/v1/pushes",
    tag = "pushes",
    security(("bearer" = ["read"])),
    params(ListParams),
    responses(
        (status = 200, description = "A page of pushes", body = PushPage),
        (status = 400, description = "Unknown query parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The client lacks the `read` scope or may not use the app", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A bad filter value (limit, status, from, to)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is unreachable", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn list_pushes(
    State(gateway): State<Arc<Gateway>>,
    caller: Caller,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<PushPage>, ApiError> {
    caller.require(Scope::Read)?;
    let Query(p) = params.map_err(|e| ApiError::BadRequest {
        detail: e.body_text(),
        field: None,
    })?;
    Ok(Json(history(&gateway, &caller, p).await?))
}

/// One page of the history `caller` may see, filtered by `p` (the API and the console).
pub async fn history(
    gateway: &Gateway,
    caller: &Caller,
    p: ListParams,
) -> Result<PushPage, ApiError> {
    caller.require(Scope::Read)?;
    // U+0000 cannot match anything stored (and PostgreSQL rejects it in a parameter).
    for (field, v) in [
        ("app", &p.app),
        ("type", &p.cast_type),
        ("client", &p.client),
        ("out_biz_no", &p.out_biz_no),
        ("msg_id", &p.msg_id),
        ("task_id", &p.task_id),
        ("cursor", &p.cursor),
    ] {
        if v.as_deref().is_some_and(|s| s.contains('\0')) {
            return Err(field_error(field, "must not contain the NUL character"));
        }
    }
    let limit = p.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(field_error(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    let status = p
        .status
        .as_deref()
        .map(|s| {
            PushStatus::parse(s).ok_or_else(|| {
                field_error(
                    "status",
                    format!(
                        "unknown status {s:?}; one of {}",
                        PushStatus::ALL.map(|s| s.as_str()).join(", ")
                    ),
                )
            })
        })
        .transpose()?;
    if let Some(app) = &p.app {
        caller.require_app(app)?;
    }
    let apps_allowed = caller.apps_allowed();
    let query = PushQuery {
        app: p.app,
        apps_allowed,
        cast_type: p.cast_type,
        status,
        client: p.client,
        out_biz_no: p.out_biz_no,
        msg_id: p.msg_id,
        task_id: p.task_id,
        from: parse_time("from", &p.from)?,
        to: parse_time("to", &p.to)?,
        before_id: p.cursor,
        limit: limit + 1,
    };
    let mut items = gateway.store.list_pushes(&query).await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(PushPage { items, next_cursor })
}

/// Load a push the caller may see (404 otherwise, so ids of other apps are not confirmed).
pub async fn visible_push(
    gateway: &Gateway,
    caller: &Caller,
    id: &str,
) -> Result<PushRecord, ApiError> {
    let not_found = || ApiError::NotFound(format!("no push with id {id:?}"));
    if id.contains('\0') {
        return Err(not_found());
    }
    let push = gateway.store.get_push(id).await?.ok_or_else(not_found)?;
    if !caller.0.may_use_app(&push.app) {
        return Err(not_found());
    }
    Ok(push)
}

/// The whole record of one push.
#[utoipa::path(
    get,
    path = "/v1/pushes/{id}",
    tag = "pushes",
    security(("bearer" = ["read"])),
    params(("id" = String, Path, description = "The push id")),
    responses(
        (status = 200, description = "The push", body = PushRecord),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The client lacks the scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such push visible to this client", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is unreachable", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn get_push(
    State(gateway): State<Arc<Gateway>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PushRecord>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(visible_push(&gateway, &caller, &id).await?))
}

/// The task_id of a task-class push, or 409.
fn task_of(push: &PushRecord, action: &str) -> Result<String, ApiError> {
    if !push.task_class {
        return Err(ApiError::Conflict {
            detail: format!(
                "{action} works only for task-class pushes (broadcast, groupcast, filecast, customizedcast by file); this is a {}",
                push.cast_type
            ),
            umeng: None,
        });
    }
    push.task_id.clone().ok_or_else(|| ApiError::Conflict {
        detail: format!("push {} has no task_id (status {})", push.id, push.status),
        umeng: None,
    })
}

fn umeng_failure(e: UmengError, push_id: &str) -> ApiError {
    match e {
        UmengError::Unknown { reason } => ApiError::UpstreamTimeout {
            detail: format!("Umeng did not answer: {reason}"),
            push_id: Some(push_id.to_string()),
        },
        UmengError::NotSent { reason } => ApiError::Upstream {
            detail: format!("Umeng could not be reached: {reason}"),
            umeng: UmengDetail {
                error_code: "not_sent".into(),
                error_msg: reason,
                retryable: true,
            },
            push_id: Some(push_id.to_string()),
        },
        UmengError::Fail {
            code,
            message,
            class,
            ..
        } => {
            let retryable = matches!(class, crate::umeng::ErrorClass::Retryable);
            let umeng = UmengDetail {
                error_code: code.clone(),
                error_msg: message.clone(),
                retryable,
            };
            if code == "1028" {
                ApiError::Conflict {
                    detail: format!("Umeng cannot cancel this task: {message}"),
                    umeng: Some(umeng),
                }
            } else {
                ApiError::Upstream {
                    detail: format!("Umeng answered FAIL {code}: {message}"),
                    umeng,
                    push_id: Some(push_id.to_string()),
                }
            }
        }
    }
}

/// The error answers refresh and cancel share: both look a push up and call Umeng.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // documents answers; the values are built by `ApiError`
enum TaskCallProblems {
    /// No or unknown bearer token
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// The client lacks the scope
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// No such push visible to this client
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// The database is unreachable
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
    /// Not a task-class push, no task_id, or (cancel) Umeng can no longer cancel the task (1028)
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(Problem),
    /// Umeng answered FAIL or could not be reached
    #[response(status = 502, content_type = "application/problem+json")]
    Upstream(Problem),
    /// Umeng did not answer in time
    #[response(status = 504, content_type = "application/problem+json")]
    Timeout(Problem),
}

/// Ask Umeng's `/api/status` for a task's state and store it.
#[utoipa::path(
    post,
    path = "/v1/pushes/{id}/refresh",
    tag = "pushes",
    security(("bearer" = ["read"])),
    params(("id" = String, Path, description = "The push id")),
    responses(
        (status = 200, description = "The push with its refreshed task state", body = PushRecord),
        TaskCallProblems,
    ),
)]
async fn refresh_push(
    State(gateway): State<Arc<Gateway>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PushRecord>, ApiError> {
    Ok(Json(refresh(&gateway, &caller, &id).await?))
}

/// Refresh a task-class push's status from Umeng and return it (the API and the console).
pub async fn refresh(gateway: &Gateway, caller: &Caller, id: &str) -> Result<PushRecord, ApiError> {
    caller.require(Scope::Read)?;
    let push = visible_push(gateway, caller, id).await?;
    let task_id = task_of(&push, "refresh")?;
    refresh_task(gateway, &push.id, &push.app, &task_id)
        .await
        .map_err(|e| match e {
            RefreshError::AppGone(_) => ApiError::Conflict {
                detail: e.to_string(),
                umeng: None,
            },
            RefreshError::Umeng(e) => umeng_failure(e, &push.id),
            RefreshError::UnknownStatus(_) => ApiError::Internal(e.to_string()),
            RefreshError::Store(e) => e.into(),
        })?;
    visible_push(gateway, caller, id).await
}

/// Cancel a task via Umeng's `/api/cancel`.
#[utoipa::path(
    post,
    path = "/v1/pushes/{id}/cancel",
    tag = "pushes",
    security(("bearer" = ["cancel"])),
    params(("id" = String, Path, description = "The push id")),
    responses(
        (status = 200, description = "The push, now `cancelled`", body = PushRecord),
        TaskCallProblems,
    ),
)]
async fn cancel_push(
    State(gateway): State<Arc<Gateway>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PushRecord>, ApiError> {
    Ok(Json(cancel(&gateway, &caller, &id).await?))
}

/// Cancel a task-class push at Umeng and record it (the API and the console).
pub async fn cancel(gateway: &Gateway, caller: &Caller, id: &str) -> Result<PushRecord, ApiError> {
    caller.require(Scope::Cancel)?;
    let push = visible_push(gateway, caller, id).await?;
    let task_id = task_of(&push, "cancel")?;
    if push.status == PushStatus::Cancelled {
        return Ok(push);
    }
    let app = gateway.app(&push.app).ok_or_else(|| ApiError::Conflict {
        detail: format!("app {:?} is no longer configured", push.app),
        umeng: None,
    })?;
    gateway
        .umeng
        .cancel(&app.credentials, &task_id)
        .await
        .map_err(|e| umeng_failure(e, &push.id))?;
    tracing::info!(push.id = %push.id, client = %caller.name(), "task cancelled");
    let mut task_status = push
        .task_status
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(obj) = task_status.as_object_mut() {
        obj.insert("task_id".into(), Value::String(task_id));
        obj.insert("status".into(), Value::from(4));
        obj.insert(
            "cancelled_by".into(),
            Value::String(caller.name().to_string()),
        );
    }
    gateway
        .store
        .update_task(
            &push.id,
            TaskUpdate {
                status: PushStatus::Cancelled,
                task_status,
            },
        )
        .await?;
    visible_push(gateway, caller, id).await
}
