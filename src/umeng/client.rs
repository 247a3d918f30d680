//! HTTP client for Umeng's `/api/send`, `/api/status`, `/api/cancel` and `/upload`.
//!
//! Every call serialises the body once, signs exactly those bytes and sends them. Errors
//! are split into not sent / rejected / unknown (see [`UmengError`]); none of them carries
//! the secret, the sign or the signed URL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tracing::Instrument;

use super::error::UmengError;
use super::model::SendBody;
use super::sign::sign;
use crate::secret::Secret;

/// Largest answer body read from Umeng; anything longer is treated as not an envelope.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Connection settings for [`UmengClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Scheme + host (+ port), e.g. `https://msgapi.umeng.com`. A trailing `/` is ignored.
    pub base_url: String,
    /// Limit for DNS + TCP + TLS.
    pub connect_timeout: Duration,
    /// Limit for the whole call, answer included.
    pub timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            base_url: "https://msgapi.umeng.com".into(),
            connect_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(10),
        }
    }
}

/// One Umeng app's credentials.
#[derive(Debug, Clone)]
pub struct AppCredentials {
    pub appkey: String,
    pub master_secret: Secret,
}

/// A successful send.
#[derive(Debug, Clone, PartialEq)]
pub struct SendSuccess {
    /// For unicast-class sends.
    pub msg_id: Option<String>,
    /// For task-class sends.
    pub task_id: Option<String>,
    /// The whole answer.
    pub raw: Value,
}

/// The record of one send attempt.
#[derive(Debug, Clone)]
pub struct SendAttempt {
    /// The JSON that was sent (or, for [`UmengError::NotSent`], would have been sent): the
    /// exact bytes, which hold `appkey` and `timestamp` but no sign.
    pub sent_body: Option<Box<RawValue>>,
    /// Time from just before sending to the end of the answer (or the failure).
    pub latency: Duration,
    /// Umeng's answer.
    pub result: Result<SendSuccess, UmengError>,
}

/// The answer of `/api/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStatus {
    /// 0 queued, 1 sending, 2 done, 3 failed, 4 cancelled, 5 expired, 6 empty filter,
    /// 7 scheduled.
    pub status: i64,
    /// The answer's `data` object: task_id, status and the counters.
    pub data: Value,
    /// The whole answer.
    pub raw: Value,
}

/// A client for Umeng's server API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct UmengClient {
    http: reqwest::Client,
    base_url: String,
    /// The URL of each path in [`PATHS`], parsed once (a request then only sets its
    /// query); a base URL that does not parse leaves this empty.
    endpoints: Arc<[(&'static str, reqwest::Url)]>,
}

/// Umeng's paths that the client calls.
const PATHS: [&str; 4] = ["/api/send", "/api/status", "/api/cancel", "/upload"];

struct Call {
    sent: Option<Box<RawValue>>,
    latency: Duration,
    /// `(data, whole answer)` for a SUCCESS envelope.
    result: Result<(Value, Value), UmengError>,
}

impl UmengClient {
    /// Builds a client.
    pub fn new(config: ClientConfig) -> Result<Self, UmengError> {
        // A redirect is not followed: it would take the signed URL (and the body) to
        // another address. A 3xx is an answer that is not Umeng's (`unknown`).
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .user_agent(concat!("umeng-push-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UmengError::NotSent {
                reason: format!("cannot build the HTTP client: {}", describe(e)),
            })?;
        let base_url = config.base_url.trim_end_matches('/').to_owned();
        let endpoints = PATHS
            .iter()
            .filter_map(|path| {
                let url = reqwest::Url::parse(&format!("{base_url}{path}")).ok()?;
                Some((*path, url))
            })
            .collect();
        Ok(Self {
            http,
            base_url,
            endpoints,
        })
    }

    /// The base URL requests go to (and that is signed), without a trailing `/`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Sends a message via `/api/send`. The body should have passed
    /// [`super::validate`]; `appkey` and a fresh 13-digit `timestamp` are added first.
    pub async fn send(&self, app: &AppCredentials, body: &SendBody) -> SendAttempt {
        self.send_fields(app, &body.to_value()).await
    }

    /// [`UmengClient::send`] of a body already in its JSON form (a [`SendBody::to_value`],
    /// e.g. as stored for a delivery worker).
    pub async fn send_fields(
        &self,
        app: &AppCredentials,
        fields: &Map<String, Value>,
    ) -> SendAttempt {
        let span = tracing::info_span!(
            "umeng.send",
            umeng.appkey = %app.appkey,
            umeng.cast_type = fields.get("type").and_then(serde_json::Value::as_str).unwrap_or(""),
            umeng.tokens = fields
                .get("device_tokens")
                .and_then(serde_json::Value::as_str)
                .map_or(0, |t| t.split(',').count()),
        );
        let call = self.call(app, "/api/send", fields).instrument(span).await;
        let result = call.result.map(|(data, raw)| SendSuccess {
            msg_id: string_field(&data, "msg_id"),
            task_id: string_field(&data, "task_id"),
            raw,
        });
        SendAttempt {
            sent_body: call.sent,
            latency: call.latency,
            result,
        }
    }

    /// Queries a task via `/api/status`.
    pub async fn status(
        &self,
        app: &AppCredentials,
        task_id: &str,
    ) -> Result<TaskStatus, UmengError> {
        let span = tracing::info_span!("umeng.status", umeng.appkey = %app.appkey, umeng.task_id = %task_id);
        let (data, raw) = self
            .call(app, "/api/status", &task_body(task_id))
            .instrument(span)
            .await
            .result?;
        let status = match data.get("status") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        match status {
            Some(status) => Ok(TaskStatus { status, data, raw }),
            None => Err(UmengError::unclear(
                "SUCCESS answer without a numeric data.status",
            )),
        }
    }

    /// Cancels a task via `/api/cancel`.
    pub async fn cancel(&self, app: &AppCredentials, task_id: &str) -> Result<(), UmengError> {
        let span = tracing::info_span!("umeng.cancel", umeng.appkey = %app.appkey, umeng.task_id = %task_id);
        self.call(app, "/api/cancel", &task_body(task_id))
            .instrument(span)
            .await
            .result
            .map(|_| ())
    }

    /// Uploads a token or alias file via `/upload` (no `/api` prefix) and returns its
    /// `file_id`. `content` holds one entry per line, each followed by `\n`.
    pub async fn upload(&self, app: &AppCredentials, content: &str) -> Result<String, UmengError> {
        let span = tracing::info_span!("umeng.upload", umeng.appkey = %app.appkey, umeng.bytes = content.len());
        let mut body = Map::new();
        body.insert("content".into(), Value::String(content.to_owned()));
        let (data, _) = self
            .call(app, "/upload", &body)
            .instrument(span)
            .await
            .result?;
        string_field(&data, "file_id")
            .ok_or_else(|| UmengError::unclear("SUCCESS answer without data.file_id"))
    }

    async fn call(&self, app: &AppCredentials, path: &str, fields: &Map<String, Value>) -> Call {
        let started = Instant::now();
        let signed = Signed {
            appkey: &app.appkey,
            timestamp: &timestamp_ms(),
            fields,
        };
        // The record is the bytes that go over the wire, as they are.
        let sent = match serde_json::value::to_raw_value(&signed) {
            Ok(sent) => sent,
            Err(e) => {
                return Call {
                    sent: None,
                    latency: started.elapsed(),
                    result: Err(UmengError::NotSent {
                        reason: format!("cannot serialise the body: {e}"),
                    }),
                }
            }
        };
        let bytes = sent.get().as_bytes().to_vec();
        let sent = Some(sent);
        let url = format!("{}{}", self.base_url, path);
        let signature = sign(&url, &bytes, app.master_secret.expose());
        let result = self.exchange(path, &url, &signature, bytes).await;
        let latency = started.elapsed();
        crate::metrics::umeng_call(
            endpoint_label(path),
            latency,
            result
                .as_ref()
                .err()
                .map(|e| e.code().unwrap_or(e.metric_label())),
        );
        match &result {
            // The caller logs the outcome at info (with the push id); this is the detail.
            Ok(_) => tracing::debug!(
                umeng.latency_ms = latency.as_millis() as u64,
                "umeng answered SUCCESS"
            ),
            Err(e) => tracing::warn!(
                umeng.latency_ms = latency.as_millis() as u64,
                umeng.outcome = e.metric_label(),
                umeng.error_code = e.code().unwrap_or(""),
                error = %e,
                "umeng call failed"
            ),
        }
        Call {
            sent,
            latency,
            result,
        }
    }

    async fn exchange(
        &self,
        path: &str,
        url: &str,
        signature: &str,
        bytes: Vec<u8>,
    ) -> Result<(Value, Value), UmengError> {
        let query = format!("sign={signature}");
        let request = match self.endpoints.iter().find(|(p, _)| *p == path) {
            Some((_, parsed)) => {
                let mut target = parsed.clone();
                target.set_query(Some(&query));
                self.http.post(target)
            }
            None => self.http.post(format!("{url}?{query}")),
        };
        let response = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(bytes)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        let answer = read_limited(response).await?;
        interpret(status.as_u16(), &answer)
    }
}

/// The `endpoint` label of an Umeng path.
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/api/send" => "send",
        "/api/status" => "status",
        "/api/cancel" => "cancel",
        "/upload" => "upload",
        _ => "other",
    }
}

/// A request body as sent: `appkey` and `timestamp` first, then the caller's fields in
/// their order (any `appkey` or `timestamp` among them left out). Serialised from borrowed
/// parts, so the caller's body is neither copied nor rebuilt for each call.
struct Signed<'a> {
    appkey: &'a str,
    timestamp: &'a str,
    fields: &'a Map<String, Value>,
}

impl Serialize for Signed<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let rest = self
            .fields
            .iter()
            .filter(|(k, _)| *k != "appkey" && *k != "timestamp");
        let mut map = serializer.serialize_map(Some(2 + rest.clone().count()))?;
        map.serialize_entry("appkey", self.appkey)?;
        map.serialize_entry("timestamp", self.timestamp)?;
        for (k, v) in rest {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

fn task_body(task_id: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("task_id".into(), Value::String(task_id.to_owned()));
    m
}

fn timestamp_ms() -> String {
    let ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    ms.to_string()
}

/// A string field of `data`, accepting numbers too.
fn string_field(data: &Value, key: &str) -> Option<String> {
    match data.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A reqwest error's text without its URL (which carries the sign), with its causes.
fn describe(e: reqwest::Error) -> String {
    describe_ref(&e.without_url())
}

/// The error and its sources, one line (URLs stripped by the caller where needed).
fn describe_ref(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        // Never print the URL: Umeng's carries the sign.
        text = text.replace(url.as_str(), "<url>");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn transport_error(e: reqwest::Error) -> UmengError {
    if e.is_connect() {
        UmengError::NotSent {
            reason: describe(e),
        }
    } else if e.is_timeout() {
        UmengError::timeout(format!("timed out waiting for Umeng: {}", describe(e)))
    } else {
        UmengError::unclear(describe(e))
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, UmengError> {
    let mut buf = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(UmengError::unclear(format!(
                        "HTTP {}: answer longer than {MAX_ANSWER_BYTES} bytes",
                        response.status().as_u16()
                    )));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf),
            Err(e) => {
                let reason = format!("reading the answer failed: {}", describe_ref(&e));
                return Err(if e.is_timeout() {
                    UmengError::timeout(reason)
                } else {
                    UmengError::unclear(reason)
                });
            }
        }
    }
}

/// Reads an answer: a SUCCESS envelope gives `(data, whole answer)`; a FAIL envelope gives
/// [`UmengError::Fail`]; anything else is [`UmengError::Unknown`].
fn interpret(status: u16, answer: &[u8]) -> Result<(Value, Value), UmengError> {
    let not_envelope = || {
        let text = String::from_utf8_lossy(answer);
        let snippet: String = text.chars().take(160).collect();
        UmengError::unclear(format!("HTTP {status}: not an Umeng answer: {snippet:?}"))
    };
    let Ok(raw) = serde_json::from_slice::<Value>(answer) else {
        return Err(not_envelope());
    };
    match raw.get("ret").and_then(Value::as_str) {
        Some("SUCCESS") if (200..300).contains(&status) => {
            let data = raw.get("data").cloned().unwrap_or(Value::Null);
            Ok((data, raw))
        }
        Some("FAIL") => {
            let data = raw.get("data");
            let code = data.and_then(|d| string_field(d, "error_code"));
            let Some(code) = code else {
                return Err(not_envelope());
            };
            let message = data
                .and_then(|d| d.get("error_msg"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            Err(UmengError::fail(code, message, status, raw))
        }
        _ => Err(not_envelope()),
    }
}

#[cfg(test)]
mod tests;
