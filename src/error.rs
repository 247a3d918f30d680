//! The HTTP error type: every failure becomes an RFC 9457 `application/problem+json` body
//! with a stable `type`, a `title`, the `status`, a `detail`, and extension members where
//! they help the caller (field errors, Umeng's code, the quota state). 5xx causes are
//! logged, never sent.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::quota::{QuotaKind, QuotaState, WindowUnit};
use crate::store::PushStatus;
use crate::umeng::FieldError;

/// Content type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or unknown bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// Authenticated, but not allowed (scope or app).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The body is not JSON, or not the right JSON shape.
    #[error("{detail}")]
    BadRequest {
        detail: String,
        field: Option<String>,
    },
    /// The body is larger than `server.body_limit_bytes`.
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The request is well-formed but breaks a rule; every field error at once.
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    /// The same out_biz_no was used before with a different request.
    #[error("out_biz_no {out_biz_no:?} was already used for a different request")]
    IdempotencyMismatch { out_biz_no: String, push_id: String },
    /// The same out_biz_no is being sent right now.
    #[error("a push with out_biz_no {out_biz_no:?} is still in flight")]
    InFlight { out_biz_no: String, push_id: String },
    /// The operation does not fit the resource's state (e.g. cancel a unicast).
    #[error("{detail}")]
    Conflict {
        detail: String,
        umeng: Option<UmengDetail>,
    },
    /// The quota window is full (locally, or Umeng said 2050).
    #[error("quota exceeded")]
    RateLimited {
        quota: Option<QuotaState>,
        app: String,
        from_umeng: bool,
        retry_after: i64,
        /// Umeng said 2050: the push was recorded (as failed) under this id.
        push_id: Option<String>,
    },
    /// Umeng answered FAIL, or could not be reached.
    #[error("{detail}")]
    Upstream {
        detail: String,
        umeng: UmengDetail,
        push_id: Option<String>,
    },
    /// Umeng did not answer in time: outcome unknown.
    #[error("{detail}")]
    UpstreamTimeout {
        detail: String,
        umeng: UmengDetail,
        push_id: Option<String>,
    },
    /// Umeng answered, but not usably (not an Umeng envelope, HTML from a proxy, a SUCCESS
    /// without the id it must carry): outcome unknown.
    #[error("{detail}")]
    UpstreamUnclear {
        detail: String,
        umeng: UmengDetail,
        push_id: Option<String>,
    },
    /// A repeat of a push whose outcome is unknown (a unicast-class push that may have
    /// reached Umeng): it is not sent again.
    #[error("the push with out_biz_no {out_biz_no:?} may or may not have reached Umeng; it is not sent again")]
    OutcomeUnknown { push_id: String, out_biz_no: String },
    /// The Umeng circuit breaker is open: nothing was written or sent.
    #[error("Umeng has been unreachable; no call is made for {retry_after} s (nothing was sent or stored)")]
    UmengUnavailable { retry_after: u64 },
    /// The database is unreachable: nothing was sent.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else: logged with its cause, answered without it.
    #[error("internal error")]
    Internal(String),
}

/// An RFC 9457 problem document, the body of every error answer
/// (`application/problem+json`). Extension members appear only where they apply.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A stable URN naming the kind of problem.
    #[serde(rename = "type")]
    #[schema(example = "urn:umeng-push-gateway:problem:validation")]
    pub problem_type: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// Every invalid field (400 with a field, 422).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
    /// Umeng's error (502, 504, and 409 when Umeng refused a cancel). `retryable` says
    /// whether the same request may be sent again: for an unknown outcome, only when it is a
    /// task-class push with an `out_biz_no` (Umeng dedupes it into the same task).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub umeng: Option<UmengDetail>,
    /// The push this answer is about (409, 422 mismatch, 429 after Umeng's 2050, 502, 504).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_id: Option<String>,
    /// The stored status of that push (`unknown` for 504, an unclear 502, and 409
    /// `outcome-unknown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_status: Option<PushStatus>,
    /// The idempotency key in question (409 in flight, 422 mismatch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_biz_no: Option<String>,
    /// 429: the app whose quota is used up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// 429: the quota bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<QuotaKind>,
    /// 429: the bucket's limit per window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// 429: the bucket's window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowUnit>,
    /// 429: seconds until a slot is free (also in `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<i64>,
    /// 429: whether Umeng itself answered 2050.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_umeng: Option<bool>,
    /// 413: the configured body limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<usize>,
}

/// Umeng's error as echoed to callers.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct UmengDetail {
    pub error_code: String,
    pub error_msg: String,
    /// Whether the same request may succeed later.
    pub retryable: bool,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Validation(_) | ApiError::IdempotencyMismatch { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::InFlight { .. }
            | ApiError::Conflict { .. }
            | ApiError::OutcomeUnknown { .. } => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Upstream { .. } | ApiError::UpstreamUnclear { .. } => StatusCode::BAD_GATEWAY,
            ApiError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) | ApiError::UmengUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug_and_title(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::Unauthorized => ("unauthorized", "Unauthorized"),
            ApiError::Forbidden(_) => ("forbidden", "Forbidden"),
            ApiError::NotFound(_) => ("not-found", "Not found"),
            ApiError::BadRequest { .. } => ("bad-request", "Malformed request"),
            ApiError::PayloadTooLarge { .. } => ("payload-too-large", "Request body too large"),
            ApiError::Validation(_) => ("validation", "Invalid push request"),
            ApiError::IdempotencyMismatch { .. } => (
                "idempotency-mismatch",
                "out_biz_no reused with a different request",
            ),
            ApiError::InFlight { .. } => ("in-flight", "Request with this out_biz_no in flight"),
            ApiError::Conflict { .. } => ("conflict", "Not possible in this state"),
            ApiError::RateLimited { .. } => ("quota-exceeded", "Quota exceeded"),
            ApiError::Upstream { .. } => ("umeng-error", "Umeng rejected the request"),
            ApiError::UpstreamTimeout { .. } => ("umeng-timeout", "Umeng did not answer in time"),
            ApiError::UpstreamUnclear { .. } => {
                ("umeng-unclear-answer", "Umeng's answer could not be used")
            }
            ApiError::OutcomeUnknown { .. } => (
                "outcome-unknown",
                "An earlier push with this out_biz_no has an unknown outcome",
            ),
            ApiError::Unavailable(_) => ("unavailable", "Service unavailable"),
            ApiError::UmengUnavailable { .. } => ("umeng-unavailable", "Umeng is unreachable"),
            ApiError::Internal(_) => ("internal", "Internal error"),
        }
    }

    /// The problem body (without headers).
    pub fn body(&self) -> Value {
        serde_json::to_value(self.problem()).unwrap_or(Value::Null)
    }

    /// The problem document of this error.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let (slug, title) = self.slug_and_title();
        let detail = match self {
            ApiError::Internal(_) => "an internal error occurred; it has been logged".to_string(),
            ApiError::Validation(errors) => match errors.as_slice() {
                [one] => format!("{}: {}", one.field, one.message),
                many => format!("{} fields are invalid", many.len()),
            },
            ApiError::RateLimited {
                quota: Some(q),
                from_umeng,
                ..
            } => format!(
                "{} quota ({} per {}) for this app is used up{}",
                q.kind,
                q.limit,
                q.window.as_str(),
                if *from_umeng {
                    " (Umeng answered 2050)"
                } else {
                    ""
                }
            ),
            ApiError::RateLimited { quota: None, .. } => {
                "Umeng answered 2050: send frequency limit exceeded".to_string()
            }
            other => other.to_string(),
        };
        let mut p = Problem {
            problem_type: format!("urn:umeng-push-gateway:problem:{slug}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail: detail.clone(),
            ..Problem::default()
        };
        match self {
            ApiError::BadRequest { field: Some(f), .. } => {
                p.errors = Some(vec![FieldError::new(f.clone(), detail)]);
            }
            ApiError::PayloadTooLarge { limit } => p.limit_bytes = Some(*limit),
            ApiError::Validation(errors) => p.errors = Some(errors.clone()),
            ApiError::IdempotencyMismatch {
                push_id,
                out_biz_no,
            }
            | ApiError::InFlight {
                push_id,
                out_biz_no,
            } => {
                p.push_id = Some(push_id.clone());
                p.out_biz_no = Some(out_biz_no.clone());
            }
            ApiError::OutcomeUnknown {
                push_id,
                out_biz_no,
            } => {
                p.push_id = Some(push_id.clone());
                p.out_biz_no = Some(out_biz_no.clone());
                p.push_status = Some(PushStatus::Unknown);
            }
            ApiError::Conflict { umeng: Some(u), .. } => p.umeng = Some(u.clone()),
            ApiError::RateLimited {
                quota,
                app,
                retry_after,
                from_umeng,
                push_id,
            } => {
                p.app = Some(app.clone());
                p.push_id = push_id.clone();
                if let Some(q) = quota {
                    p.policy = Some(q.kind);
                    p.limit = Some(q.limit);
                    p.window = Some(q.window);
                }
                p.retry_after = Some(*retry_after);
                p.from_umeng = Some(*from_umeng);
            }
            ApiError::Upstream { umeng, push_id, .. } => {
                p.umeng = Some(umeng.clone());
                p.push_id = push_id.clone();
            }
            ApiError::UpstreamTimeout { umeng, push_id, .. }
            | ApiError::UpstreamUnclear { umeng, push_id, .. } => {
                p.umeng = Some(umeng.clone());
                if let Some(id) = push_id {
                    p.push_id = Some(id.clone());
                    p.push_status = Some(PushStatus::Unknown);
                }
            }
            _ => {}
        }
        p
    }

    /// Headers that go with this error (Retry-After, rate limits, WWW-Authenticate).
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        match self {
            ApiError::Unauthorized => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Forbidden(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
                );
            }
            ApiError::InFlight { .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::OutcomeUnknown { .. } => {
                h.insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            ApiError::RateLimited {
                quota, retry_after, ..
            } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
                if let Some(q) = quota {
                    let mut q = *q;
                    q.used = q.used.max(q.limit);
                    q.reset_after_secs = *retry_after;
                    rate_limit_headers(&mut h, &q);
                }
            }
            ApiError::Unavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ApiError::UmengUnavailable { retry_after } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        h
    }
}

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds) and a
/// `RateLimit-Policy` naming the bucket and window.
pub fn rate_limit_headers(h: &mut HeaderMap, q: &QuotaState) {
    h.insert("ratelimit-limit", HeaderValue::from(q.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(q.remaining()));
    h.insert(
        "ratelimit-reset",
        HeaderValue::from(q.reset_after_secs.max(1)),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "\"{}\";q={};w={}",
        q.kind,
        q.limit,
        q.window.seconds()
    )) {
        h.insert("ratelimit-policy", v);
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(cause) = &self {
            tracing::error!(error.cause = %cause, "internal error");
        } else if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let mut headers = self.headers();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        (status, headers, self.body().to_string()).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(m) => {
                ApiError::Unavailable(format!("database unavailable: {m}"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}
