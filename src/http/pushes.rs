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
use crate::gateway::{Audience, Gateway, PushAnswer, PushView};
use crate::http::auth::Caller;
use crate::push::PushRequest;
use crate::store::{
    HistoryCursor, PushQuery, PushRecord, PushStatus, PushSummary, TaskUpdate, MAX_PAGE,
};
use crate::task_status::{refresh_task, RefreshError, TaskRef};
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

/// Validate a push, take its quota slot, send it to Umeng and record it; or, with
/// `Prefer: respond-async` or `send_at`, store it for a delivery worker and answer 202.
///
/// A repeat of an earlier request with the same `out_biz_no` is answered from history with
/// the stored status and `Idempotent-Replayed: true`, without calling Umeng.
///
/// `app` may name an app group (one part per member app), and a `listcast` or alias
/// `customizedcast` may list more than 500 recipients (one part per 500): the push is a
/// parent with `parts` (see README "One request, the whole audience").
#[utoipa::path(
    post,
    path = "/v1/pushes",
    tag = "pushes",
    security(("bearer" = ["send"])),
    request_body(content = PushRequest, description = "The push; see docs/push-request.md"),
    params(
        ("Prefer" = Option<String>, Header, description = "`respond-async` (RFC 7240): store the push and answer 202 at once; a delivery worker sends it, retrying transient failures (see README \"Synchronous and asynchronous pushes\")"),
    ),
    responses(
        (status = 202, description = "Stored for asynchronous delivery (`Prefer: respond-async`, or `send_at`): status `awaiting_send` or `awaiting_send_at`. A repeat of such a push while it is not final answers 202 with its current state and `Idempotent-Replayed: true`", body = PushView, headers(
            ("Location" = String, description = "`/v1/pushes/{id}`"),
            ("Preference-Applied" = String, description = "`respond-async`, when the request asked for it"),
        )),
        (status = 207, description = "A push to an app group, or with a list longer than 500, of which some parts went out and some did not (status `partial`): `parts` says which. A repeat with the same `out_biz_no` re-sends exactly the parts that failed (`resent_parts`)", body = PushView, headers(
            ("Location" = String, description = "`/v1/pushes/{id}`"),
        )),
        (status = 201, description = "Umeng accepted the push (for a push with parts: every part)", body = PushView, headers(
            ("Location" = String, description = "`/v1/pushes/{id}`"),
            ("RateLimit-Limit" = u32, description = "Limit of the quota bucket this push counted against"),
            ("RateLimit-Remaining" = u32, description = "Slots left in the window"),
            ("RateLimit-Reset" = i64, description = "Seconds until the window resets"),
            ("RateLimit-Policy" = String, description = "`\"<bucket>\";q=<limit>;w=<window seconds>`"),
        )),
        (status = 200, description = "A repeat of an earlier request that Umeng accepted: its stored answer (the status it was answered with, e.g. 201)", body = PushView, headers(
            ("Location" = String, description = "`/v1/pushes/{id}`"),
            ("Idempotent-Replayed" = String, description = "`true`"),
        )),
        (status = 400, description = "The body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The client lacks the `send` scope or may not use the app", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A push with this `out_biz_no` is in flight (`in-flight`, with `Retry-After`), or a repeat of a unicast-class push whose outcome is unknown (`outcome-unknown`, with `Idempotent-Replayed: true`): it is not sent again", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = u32, description = "Seconds to wait: 1"),
        )),
        (status = 413, description = "The body is larger than `server.body_limit_bytes`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A rule is broken (every field listed), or the `out_biz_no` was used for a different request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The quota window is full: counted locally (`from_umeng: false`; Umeng was not called, nothing stored), or Umeng answered 2050 (`from_umeng: true`; `push_id` names the `failed` row)", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = i64, description = "Seconds until the window resets"),
            ("RateLimit-Limit" = u32, description = "Limit of the bucket"),
            ("RateLimit-Remaining" = u32, description = "0"),
            ("RateLimit-Reset" = i64, description = "Seconds until the window resets"),
            ("RateLimit-Policy" = String, description = "`\"<bucket>\";q=<limit>;w=<window seconds>`"),
        )),
        (status = 502, description = "Umeng answered FAIL, or could not be reached (`not_sent`); or (`umeng-unclear-answer`) its answer could not be used and the push is recorded as `unknown`. `umeng.retryable` says whether the same request may be sent again", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is unreachable (nothing was sent), the Umeng circuit breaker is open (`umeng-unavailable`: nothing was sent or stored), or the request timed out", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = u32, description = "Seconds to wait"),
        )),
        (status = 504, description = "Umeng did not answer in time: the push is recorded as `unknown`", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn create_push(
    State(gateway): State<Arc<Gateway>>,
    caller: Caller,
    headers: HeaderMap,
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
    let req = parse_push(&gateway, &body)?;
    drop(body);
    // The allow-list first: a client limited to some apps gets the same 403 for an app that
    // does not exist as for one it may not use, so it cannot probe for app names.
    caller.require_app(&req.app)?;
    let stored = req.stored_form();
    let respond_async = prefers_async(&headers);
    // An app group, or a list longer than one Umeng call takes: a parent with parts.
    if let Some(group) = gateway.config.group(&req.app) {
        let audience = Audience {
            name: &group.name,
            group: true,
            members: group.apps.iter().filter_map(|a| gateway.app(a)).collect(),
        };
        let answer = Box::pin(gateway.create_parent_push(
            caller.name(),
            audience,
            req,
            stored,
            respond_async,
        ))
        .await?;
        return Ok(push_answer(answer));
    }
    let app = gateway.app(&req.app).ok_or_else(|| {
        ApiError::Validation(vec![crate::umeng::FieldError {
            field: "app".into(),
            message: format!("no app or app group named {:?} is configured", req.app),
        }])
    })?;
    let answer = if crate::push::fanout::needs_split(&req) {
        let audience = Audience {
            name: &app.app.name,
            group: false,
            members: vec![app],
        };
        Box::pin(gateway.create_parent_push(caller.name(), audience, req, stored, respond_async))
            .await?
    } else {
        // Boxed (as the parent push above), so that the handler's future, which axum
        // builds and moves before its first poll, holds a pointer instead of every state
        // of these calls.
        Box::pin(gateway.create_push(caller.name(), app, req, stored, respond_async)).await?
    };
    Ok(push_answer(answer))
}

/// Whether the request carries `Prefer: respond-async` (RFC 7240: preferences are
/// comma-separated, names case-insensitive, parameters after `;`, and the header may
/// repeat).
pub fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|pref| {
            let name = pref.split([';', '=']).next().unwrap_or("").trim();
            name.eq_ignore_ascii_case("respond-async")
        })
}

/// Parse the body straight into the typed request (no generic JSON value of the whole body
/// is built first, so a huge array of the wrong type is refused at its first element). The
/// first broken rule is named by its path: 400 for a body that is not a JSON object, 422
/// for a field of the wrong shape.
fn parse_push(gateway: &Gateway, body: &[u8]) -> Result<PushRequest, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(match first {
            None => ApiError::BadRequest {
                detail: "the body is empty: expected a JSON object".into(),
                field: None,
            },
            Some(b'[' | b'"' | b't' | b'f' | b'n' | b'-' | b'0'..=b'9') => ApiError::BadRequest {
                detail: "the body must be a JSON object".into(),
                field: None,
            },
            Some(_) => ApiError::BadRequest {
                detail: "the body is not valid JSON: expected a JSON object".into(),
                field: None,
            },
        });
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize::<_, PushRequest>(&mut de)
        .map_err(|e| (e.path().to_string(), e.into_inner()))
        .and_then(|req| de.end().map(|()| req).map_err(|e| (String::new(), e)));
    let (path, error) = match parsed {
        Ok(req) => {
            // Numbers that parsing rounded cannot be sent as written: refuse them by name.
            let inexact = crate::push::inexact_numbers(body);
            if !inexact.is_empty() {
                count_invalid(gateway, body);
                return Err(ApiError::Validation(inexact));
            }
            return Ok(req);
        }
        Err(failure) => failure,
    };
    // Not JSON at all (wherever the typed parse stopped): 400, as for any syntax error.
    // Skipping values builds nothing, whatever the size.
    if let Err(syntax) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(ApiError::BadRequest {
            detail: format!("the body is not valid JSON: {syntax}"),
            field: None,
        });
    }
    count_invalid(gateway, body);
    let (path, message) = if error.is_data() {
        (path, without_position(&error.to_string()).to_owned())
    } else {
        // Valid JSON of the wrong shape where the streaming parser reports only what it
        // expected next (e.g. an array where a cast type belongs): a small body is parsed
        // again through a JSON value for serde's usual message.
        shape_error(body).unwrap_or((path, "has the wrong type".to_owned()))
    };
    Err(ApiError::Validation(vec![crate::umeng::FieldError {
        // "." is the body itself; "" an unknown field whose name is empty.
        field: if path == "." || path.is_empty() {
            "(body)".into()
        } else {
            path
        },
        message,
    }]))
}

/// Bodies up to this size may be parsed a second time, through a generic JSON value, to
/// word an error (only after the typed parse failed on valid JSON).
const SHAPE_ERROR_REPARSE_BYTES: usize = 256 * 1024;

/// The path and message of the typed error, read through a JSON value (small bodies only).
fn shape_error(body: &[u8]) -> Option<(String, String)> {
    if body.len() > SHAPE_ERROR_REPARSE_BYTES {
        return None;
    }
    let value: Value = serde_json::from_slice(body).ok()?;
    let e = serde_path_to_error::deserialize::<_, PushRequest>(&value).err()?;
    Some((e.path().to_string(), e.into_inner().to_string()))
}

/// A serde_json message without its " at line L column C" suffix: the field path says
/// where, and positions in a machine-made body help nobody.
fn without_position(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(i)
            if message[i + 9..]
                .split(" column ")
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            &message[..i]
        }
        _ => message,
    }
}

/// The two fields a refused body is counted by, read loosely: anything but a string
/// (however large) is skipped without being built.
#[derive(Deserialize)]
struct CountedFields {
    #[serde(default)]
    app: LooseStr,
    #[serde(default, rename = "type")]
    cast_type: LooseStr,
}

/// A string, or nothing for a value of any other type.
#[derive(Default)]
struct LooseStr(Option<String>);

impl<'de> Deserialize<'de> for LooseStr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = LooseStr;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<LooseStr, E> {
                Ok(LooseStr(Some(v.to_owned())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<LooseStr, E> {
                Ok(LooseStr(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<LooseStr, E> {
                Ok(LooseStr(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<LooseStr, E> {
                Ok(LooseStr(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<LooseStr, E> {
                Ok(LooseStr(None))
            }
            fn visit_unit<E>(self) -> Result<LooseStr, E> {
                Ok(LooseStr(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<LooseStr, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(LooseStr(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<LooseStr, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(LooseStr(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Count a request refused before its app was resolved, when it names a configured app
/// (anything else would put caller text into metric labels).
fn count_invalid(gateway: &Gateway, body: &[u8]) {
    let Ok(fields) = serde_json::from_slice::<CountedFields>(body) else {
        return;
    };
    let Some(app) = fields.app.0 else { return };
    if gateway.app(&app).is_none() {
        return;
    }
    let cast_type = fields
        .cast_type
        .0
        .as_deref()
        .and_then(crate::umeng::CastType::parse)
        .map_or("invalid", |c| c.as_str());
    crate::metrics::push(&app, cast_type, crate::metrics::PushOutcome::Invalid);
}

fn push_answer(answer: PushAnswer) -> Response {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/pushes/{}", answer.push.id)) {
        headers.insert(header::LOCATION, v);
    }
    if answer.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if answer.async_applied {
        headers.insert(
            "preference-applied",
            HeaderValue::from_static("respond-async"),
        );
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
    /// A push status (pending, accepted, failed, unknown, a task state, a delivery state:
    /// awaiting_send, awaiting_send_at, awaiting_quota, withdrawn; or partial, a push with
    /// parts of which some failed).
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

/// One page of history, newest first: a summary per push (the stored request and Umeng
/// bodies are on `GET /v1/pushes/{id}`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PushPage {
    pub items: Vec<PushSummary>,
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
    let before = p
        .cursor
        .as_deref()
        .map(|c| {
            HistoryCursor::decode(c)
                .ok_or_else(|| field_error("cursor", "not a next_cursor from an earlier page"))
        })
        .transpose()?;
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
        before,
        // One more than the page: if it comes back, another page follows.
        limit: limit + 1,
    };
    let mut items = gateway.store.list_pushes(&query).await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|r| HistoryCursor::after(r).encode())
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
    if caller.0.may_use_app(&push.app) {
        return Ok(push);
    }
    // A part of a push to an app group is visible to whoever may use the group.
    if let Some(parent) = &push.parent_id {
        let parent = gateway.store.get_push(parent).await?;
        if parent.is_some_and(|p| caller.0.may_use_app(&p.app)) {
            return Ok(push);
        }
    }
    Err(not_found())
}

/// The whole record of one push; a large field (over 64 KiB) is cut and named in
/// `truncated`.
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
    Ok(Json(visible_push(&gateway, &caller, &id).await?.bounded()))
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
        UmengError::Unknown {
            ref reason,
            timed_out,
            ..
        } => {
            let umeng = UmengDetail {
                error_code: e.record_code().to_owned(),
                error_msg: reason.clone(),
                retryable: true,
            };
            let push_id = Some(push_id.to_string());
            if timed_out {
                ApiError::UpstreamTimeout {
                    detail: format!("Umeng did not answer: {reason}"),
                    umeng,
                    push_id,
                }
            } else {
                ApiError::UpstreamUnclear {
                    detail: format!("Umeng's answer could not be used: {reason}"),
                    umeng,
                    push_id,
                }
            }
        }
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
    Ok(Json(refresh(&gateway, &caller, &id).await?.bounded()))
}

/// Refresh a task-class push's status from Umeng and return it (the API and the console).
pub async fn refresh(gateway: &Gateway, caller: &Caller, id: &str) -> Result<PushRecord, ApiError> {
    caller.require(Scope::Read)?;
    let push = visible_push(gateway, caller, id).await?;
    if push.part_count.is_some() {
        return for_each_task_part(gateway, caller, push, PartAction::Refresh).await;
    }
    refresh_one(gateway, caller, push).await
}

/// Refresh one push (not a parent).
async fn refresh_one(
    gateway: &Gateway,
    caller: &Caller,
    push: PushRecord,
) -> Result<PushRecord, ApiError> {
    let id = push.id.as_str();
    let task_id = task_of(&push, "refresh")?;
    let task = TaskRef {
        push_id: &push.id,
        app: &push.app,
        appkey: &push.appkey,
        task_id: &task_id,
        seen_checked_at: push.task_checked_at,
        claim: None,
    };
    refresh_task(gateway, task).await.map_err(|e| match e {
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
    Ok(Json(cancel(&gateway, &caller, &id).await?.bounded()))
}

/// Cancel a task-class push at Umeng and record it (the API and the console).
pub async fn cancel(gateway: &Gateway, caller: &Caller, id: &str) -> Result<PushRecord, ApiError> {
    caller.require(Scope::Cancel)?;
    let push = visible_push(gateway, caller, id).await?;
    let push = withdraw_if_waiting(gateway, caller, push).await?;
    if push.part_count.is_none() {
        return cancel_sent(gateway, caller, push).await;
    }
    // A parent waiting as a whole has no parts yet: withdrawn above (or still waiting).
    if push.status == PushStatus::Withdrawn || push.status.is_waiting() {
        return Ok(push);
    }
    for_each_task_part(gateway, caller, push, PartAction::Cancel).await
}

/// Cancel one push (not a parent).
async fn cancel_one(
    gateway: &Gateway,
    caller: &Caller,
    push: PushRecord,
) -> Result<PushRecord, ApiError> {
    let push = withdraw_if_waiting(gateway, caller, push).await?;
    cancel_sent(gateway, caller, push).await
}

/// A push the gateway has not sent yet is withdrawn here (Umeng never hears of it);
/// returns the push as it is now (withdrawn, or claimed by a delivery worker meanwhile).
async fn withdraw_if_waiting(
    gateway: &Gateway,
    caller: &Caller,
    push: PushRecord,
) -> Result<PushRecord, ApiError> {
    if !push.status.is_waiting() {
        return Ok(push);
    }
    if gateway.store.withdraw(&push.id).await? {
        tracing::info!(push.id = %push.id, client = %caller.name(), "push withdrawn before it was sent");
        // A slot it held (if any) went back with it.
        gateway.slot_returned(&push.appkey, push.quota_kind);
    }
    visible_push(gateway, caller, &push.id).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartAction {
    Refresh,
    Cancel,
}

/// Refresh or cancel every part of a parent that it applies to: task parts (refresh,
/// cancel) and parts not sent yet (cancel: withdrawn). A part that cannot be acted on
/// keeps its state; the answer is the parent with every part's state, or, when no part
/// could be acted on, the first part's error.
async fn for_each_task_part(
    gateway: &Gateway,
    caller: &Caller,
    parent: PushRecord,
    action: PartAction,
) -> Result<PushRecord, ApiError> {
    let mut done = 0;
    let mut first_error = None;
    for part in &parent.parts {
        let applies = match action {
            PartAction::Refresh => part.task_id.is_some(),
            PartAction::Cancel => {
                part.task_id.is_some() && !part.status.is_final_task_state()
                    || part.status.is_waiting()
            }
        };
        if !applies {
            continue;
        }
        let result = match visible_push(gateway, caller, &part.id).await {
            Ok(record) => match action {
                PartAction::Refresh => refresh_one(gateway, caller, record).await,
                PartAction::Cancel => cancel_one(gateway, caller, record).await,
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => done += 1,
            Err(e) => {
                tracing::warn!(push.id = %parent.id, part = part.part, error = %e, "a part could not be acted on");
                first_error.get_or_insert(e);
            }
        }
    }
    gateway.settle_parent_now(&parent.id).await;
    match first_error {
        Some(e) if done == 0 => Err(e),
        None if done == 0 => Err(ApiError::Conflict {
            detail: match action {
                PartAction::Refresh => "no part of this push is a task (refresh works on task-class parts: broadcast, groupcast, customizedcast by file)".into(),
                PartAction::Cancel => "no part of this push can be cancelled: every part is final, or being sent, or not a task".into(),
            },
            umeng: None,
        }),
        _ => visible_push(gateway, caller, &parent.id).await,
    }
}

/// Cancel a push the gateway has sent (or is sending).
async fn cancel_sent(
    gateway: &Gateway,
    caller: &Caller,
    push: PushRecord,
) -> Result<PushRecord, ApiError> {
    if push.status == PushStatus::Withdrawn {
        return Ok(push);
    }
    if push.status == PushStatus::Pending {
        return Err(ApiError::Conflict {
            detail: "the push is being sent to Umeng right now; a task-class push can be cancelled once Umeng has accepted it".into(),
            umeng: None,
        });
    }
    let id = push.id.clone();
    let task_id = task_of(&push, "cancel")?;
    if push.status == PushStatus::Cancelled {
        return Ok(push);
    }
    let app = gateway
        .app(&push.app)
        .filter(|a| a.credentials.appkey == push.appkey)
        .ok_or_else(|| ApiError::Conflict {
            detail: RefreshError::AppGone(push.app.clone()).to_string(),
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
                seen_checked_at: push.task_checked_at,
                claim: None,
            },
        )
        .await?;
    visible_push(gateway, caller, &id).await
}
