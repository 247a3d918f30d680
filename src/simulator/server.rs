//! The simulator's HTTP side: an accept loop serving each connection with hyper (so that a
//! fault can drop a connection without answering), request dispatch, the Umeng envelope and
//! the `/_sim/*` control endpoints.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use super::faults::describe;
use super::state::State;
use super::validate::{check_timestamp, ApiError};
use super::{Fault, FaultKind, RecordedRequest};

/// The Umeng endpoints (§1.2). `/upload` has no `/api` prefix.
const API_PATHS: [&str; 4] = ["/api/send", "/api/status", "/api/cancel", "/upload"];

type Resp = Response<Full<Bytes>>;

/// Accepts connections until shutdown, then closes every connection still open.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    // Dropping every handle without calling shutdown leaves the simulator serving.
    let mut handles_gone = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    conns.spawn(serve_connection(stream, Arc::clone(&state)));
                }
                Err(error) => {
                    // Usually a transient lack of file descriptors; do not spin.
                    tracing::warn!(%error, "simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            changed = shutdown.changed(), if !handles_gone => match changed {
                Ok(()) if *shutdown.borrow() => break,
                Ok(()) => {}
                Err(_) => handles_gone = true,
            },
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// Serves one TCP connection; a Drop fault ends it (and closes the socket) without a response.
async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<State>) {
    let drop_now = Arc::new(Notify::new());
    let signal = Arc::clone(&drop_now);
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        let signal = Arc::clone(&signal);
        async move { Ok::<_, Infallible>(handle(req, state, signal).await) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = drop_now.notified() => {}
    }
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Resp {
    respond(status, "application/json", value.to_string())
}

fn sign_param(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "sign")
        .map(|(_, v)| v.into_owned())
}

async fn handle(req: Request<Incoming>, state: Arc<State>, drop_now: Arc<Notify>) -> Resp {
    let path = req.uri().path().to_owned();
    if path == "/_sim" || path.starts_with("/_sim/") {
        return control(req, &state).await;
    }
    let method = req.method().clone();
    let sign = sign_param(req.uri().query());
    // A JSON upload of `upload_limit_bytes` of content may grow when escaped; leave room.
    let limit = state
        .upload_limit_bytes
        .saturating_mul(2)
        .saturating_add(1 << 20);
    let raw = match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            let too_large = error.is::<http_body_util::LengthLimitError>();
            let seq = state.record_arrival(&path, sign, b"");
            let status = if too_large {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            state.record_outcome(seq, |r| r.http_status = status.as_u16());
            return respond(status, "text/plain", status.to_string());
        }
    };
    let seq = state.record_arrival(&path, sign.clone(), &raw);

    if !API_PATHS.contains(&path.as_str()) {
        state.record_outcome(seq, |r| r.http_status = 404);
        return respond(StatusCode::NOT_FOUND, "text/plain", "404 Not Found");
    }
    if method != Method::POST {
        state.record_outcome(seq, |r| r.http_status = 405);
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "405 Method Not Allowed",
        );
    }

    let appkey: Option<String> = serde_json::from_slice::<Map<String, Value>>(&raw)
        .ok()
        .and_then(|o| o.get("appkey").and_then(Value::as_str).map(str::to_owned));
    let fault = state.take_fault(appkey.as_deref(), &path);
    if let Some(kind) = &fault {
        let name = describe(kind);
        tracing::debug!(simulator.path = %path, simulator.fault = %name, "injecting fault");
        state.record_outcome(seq, |r| r.fault = Some(name));
    }
    match fault {
        Some(FaultKind::Latency { ms }) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Some(FaultKind::Hang) => std::future::pending::<()>().await,
        Some(FaultKind::Drop) => {
            drop_now.notify_one();
            std::future::pending::<()>().await;
        }
        Some(FaultKind::HttpStatus { status }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            state.record_outcome(seq, |r| r.http_status = status.as_u16());
            let reason = status.canonical_reason().unwrap_or("Error");
            let html = format!(
                "<html><head><title>{code} {reason}</title></head><body><center><h1>{code} {reason}</h1></center><hr><center>nginx</center></body></html>",
                code = status.as_u16()
            );
            return respond(status, "text/html", html);
        }
        Some(FaultKind::Answer { status, body }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            state.record_outcome(seq, |r| r.http_status = status.as_u16());
            return respond(status, "application/json", body);
        }
        Some(FaultKind::ErrorCode { code, message }) => {
            let msg = message.unwrap_or_else(|| "injected error".to_owned());
            return fail_response(&state, seq, ApiError { code, msg });
        }
        None => {}
    }

    match process(&state, &path, sign.as_deref(), &raw) {
        Ok((data, id)) => {
            tracing::debug!(simulator.seq = seq, simulator.path = %path, simulator.result_id = %id, "umeng SUCCESS");
            state.record_outcome(seq, |r| {
                r.http_status = 200;
                r.ret = Some("SUCCESS".to_owned());
                r.result_id = Some(id);
            });
            json_response(StatusCode::OK, &json!({ "ret": "SUCCESS", "data": data }))
        }
        Err(error) => fail_response(&state, seq, error),
    }
}

fn fail_response(state: &State, seq: u64, error: ApiError) -> Resp {
    tracing::debug!(simulator.seq = seq, simulator.error_code = %error.code, "umeng FAIL");
    let body = json!({
        "ret": "FAIL",
        "data": { "error_code": error.code, "error_msg": error.msg },
    });
    state.record_outcome(seq, |r: &mut RecordedRequest| {
        r.http_status = 400;
        r.ret = Some("FAIL".to_owned());
        r.error_code = Some(error.code);
    });
    json_response(StatusCode::BAD_REQUEST, &body)
}

/// The common checks in the order of §2 / §3.1, then the endpoint.
fn process(
    state: &State,
    path: &str,
    sign: Option<&str>,
    raw: &[u8],
) -> Result<(Value, String), ApiError> {
    let sign = match sign {
        Some(s) if !s.is_empty() => s,
        _ => {
            return Err(ApiError::new(
                "2007",
                "request is not signed: sign is missing",
            ))
        }
    };
    let body: Map<String, Value> = serde_json::from_slice(raw)
        .map_err(|_| ApiError::new("2008", "body is not a valid JSON object"))?;
    let appkey = match body.get("appkey") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        _ => return Err(ApiError::new("1000", "appkey is missing")),
    };
    let app = state
        .apps
        .get(appkey)
        .ok_or_else(|| ApiError::new("2021", "appkey does not exist"))?;
    // §2.1: md5("POST" + url without query + raw body bytes + secret), lowercase hex.
    let mut md5 = Md5::new();
    md5.update(b"POST");
    md5.update(state.base_url.as_bytes());
    md5.update(path.as_bytes());
    md5.update(raw);
    md5.update(app.secret.as_bytes());
    if hex::encode(md5.finalize()) != sign {
        return Err(ApiError::new("2027", "signature is incorrect"));
    }
    let now = OffsetDateTime::now_utc();
    let now_ms = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    let window_ms = i64::try_from(state.timestamp_window.as_millis()).unwrap_or(i64::MAX);
    check_timestamp(&body, now_ms, window_ms)?;
    match path {
        "/api/send" => state.send(appkey, app.platform, &body, now),
        "/api/status" => state.status(appkey, &body, now),
        "/api/cancel" => state.cancel(appkey, &body, now),
        _ => state.upload(appkey, &body, now),
    }
}

/// `/_sim/*`: requests, faults and health.
async fn control(req: Request<Incoming>, state: &State) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (method, path.as_str()) {
        (Method::GET, "/_sim/health") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (Method::GET, "/_sim/requests") => {
            let appkey = url::form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "appkey")
                .map(|(_, v)| v.into_owned());
            let records = state.requests(appkey.as_deref());
            json_response(StatusCode::OK, &json!(records))
        }
        (Method::DELETE, "/_sim/requests") => {
            state.clear_requests();
            respond(StatusCode::NO_CONTENT, "text/plain", "")
        }
        (Method::GET, "/_sim/faults") => json_response(StatusCode::OK, &json!(state.faults())),
        (Method::POST, "/_sim/faults") => {
            let raw = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                Ok(c) => c.to_bytes(),
                Err(_) => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": "fault body unreadable or over 64 KiB"}),
                    )
                }
            };
            match serde_json::from_slice::<Fault>(&raw) {
                Ok(fault) => {
                    if let FaultKind::HttpStatus { status } = fault.kind {
                        if StatusCode::from_u16(status).is_err() {
                            return json_response(
                                StatusCode::BAD_REQUEST,
                                &json!({"error": "http_status needs a status between 100 and 999"}),
                            );
                        }
                    }
                    state.add_fault(fault.clone());
                    json_response(StatusCode::CREATED, &json!(fault))
                }
                Err(error) => json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": format!("invalid fault: {error}")}),
                ),
            }
        }
        (Method::DELETE, "/_sim/faults") => {
            state.clear_faults();
            respond(StatusCode::NO_CONTENT, "text/plain", "")
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "404 Not Found"),
    }
}
