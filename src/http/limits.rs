//! Memory on input: a request's body is admitted only when it fits under the body limit
//! (413 at once by `Content-Length`, before a byte of it is read) and under the global
//! budget of body bytes in flight (`server.inflight_body_bytes`; a request that does not
//! fit waits briefly, then gets 503 with `Retry-After`). The budget is held until the
//! answer is ready, so the work a large body causes is bounded too.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// How long a request waits for room in the budget before it is answered 503.
pub const BUDGET_WAIT: Duration = Duration::from_secs(2);

/// The budget is counted in units of this many bytes (a semaphore counts in `u32`).
const UNIT: usize = 1024;

/// The in-flight body budget and the per-request limit.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total_units: u32,
    body_limit: usize,
}

impl BodyBudget {
    pub fn new(inflight_body_bytes: usize, body_limit: usize) -> Self {
        let total_units = u32::try_from(inflight_body_bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX >> 3)
            .clamp(1, u32::MAX >> 3);
        BodyBudget {
            permits: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
            body_limit,
        }
    }

    /// Units a body of `bytes` reserves: never more than the whole budget, so one request
    /// of the largest allowed size still goes through when nothing else is in flight.
    fn units(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.total_units)
    }
}

/// How large a request says its body is.
enum Declared {
    /// No body (no `Content-Length`, no `Transfer-Encoding`) or an empty one.
    None,
    Length(usize),
    /// Chunked (or an unreadable length): counted as the body limit.
    Unknown,
}

fn declared(req: &Request<Body>) -> Declared {
    let headers = req.headers();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return Declared::Unknown;
    }
    match headers.get(header::CONTENT_LENGTH) {
        None => Declared::None,
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(0) => Declared::None,
            Some(n) => Declared::Length(usize::try_from(n).unwrap_or(usize::MAX)),
            None => Declared::Unknown,
        },
    }
}

/// The middleware: 413 for a declared body over the limit, then a place in the budget
/// (or 503), held until the answer is made.
pub async fn limit_bodies(
    State(budget): State<BodyBudget>,
    req: Request<Body>,
    next: Next,
) -> Response {
    let bytes = match declared(&req) {
        Declared::None => return next.run(req).await,
        Declared::Length(n) if n > budget.body_limit => {
            return too_large(budget.body_limit);
        }
        Declared::Length(n) => n,
        Declared::Unknown => budget.body_limit,
    };
    let units = budget.units(bytes);
    let permit = tokio::time::timeout(
        BUDGET_WAIT,
        Arc::clone(&budget.permits).acquire_many_owned(units),
    )
    .await;
    match permit {
        Ok(Ok(permit)) => {
            let response = next.run(req).await;
            drop(permit);
            response
        }
        _ => {
            tracing::warn!(
                body.bytes = bytes,
                "request bodies in flight are at server.inflight_body_bytes: answered 503"
            );
            ApiError::Unavailable(
                "the gateway is holding as many request bytes as it may (server.inflight_body_bytes); retry shortly"
                    .into(),
            )
            .into_response()
        }
    }
}

/// 413, and the connection closes: the body is never read.
fn too_large(limit: usize) -> Response {
    let mut response = ApiError::PayloadTooLarge { limit }.into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_never_reserves_more_than_the_whole_budget() {
        let b = BodyBudget::new(10 * 1024, 100 * 1024);
        assert_eq!(b.units(1), 1);
        assert_eq!(b.units(2048), 2);
        assert_eq!(b.units(50 * 1024), 10);
    }
}
