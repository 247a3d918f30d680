//! Signed callbacks: when a push with a `callback_url` reaches a final state, the store
//! writes an event in the same statement (a trigger, `migrations/*/0006_callbacks.sql`); the
//! callback worker on every replica claims due events with a lease and POSTs them, signed
//! per the Standard Webhooks specification:
//!
//! - `webhook-id`: the event id (the same on every attempt, so receivers can dedupe);
//! - `webhook-timestamp`: unix seconds of the attempt;
//! - `webhook-signature`: `v1,` + base64 of HMAC-SHA256 over `{id}.{timestamp}.{body}`,
//!   keyed with the base64-decoded part of the client's `whsec_` secret.
//!
//! Delivery is at least once: a 2xx ends it; anything else is retried with exponential
//! backoff and full jitter until `callbacks.max_attempts` or `callbacks.max_age_hours`.

pub mod worker;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::Sha256;
use time::OffsetDateTime;

use crate::config::Client;
use crate::secret::Secret;
use crate::umeng::FieldError;

pub use worker::spawn;

/// Longest accepted `callback_url`, in characters.
pub const MAX_CALLBACK_URL_CHARS: usize = 2048;
/// Prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Bounds of the decoded secret, in bytes.
pub const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// The HMAC key of a `whsec_` secret, or why it is not one.
pub fn signing_key(secret: &Secret) -> Result<Vec<u8>, &'static str> {
    let Some(encoded) = secret.expose().strip_prefix(SECRET_PREFIX) else {
        return Err("must start with whsec_");
    };
    let key = BASE64
        .decode(encoded)
        .map_err(|_| "must be whsec_ followed by standard base64")?;
    if !SECRET_BYTES.contains(&key.len()) {
        return Err("must decode to 24 to 64 bytes");
    }
    Ok(key)
}

/// The `webhook-signature` header value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// A new random secret (32 bytes), for `umeng-push-gateway` operators and tests.
pub fn generate_secret() -> String {
    use rand::RngCore;
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", BASE64.encode(key))
}

/// Check a request's `callback_url` against the calling client's prefixes.
pub fn check_url(client: Option<&Client>, url: &str) -> Result<(), FieldError> {
    let err = |message: String| FieldError {
        field: "callback_url".into(),
        message,
    };
    if url.chars().count() > MAX_CALLBACK_URL_CHARS {
        return Err(err(format!(
            "must be at most {MAX_CALLBACK_URL_CHARS} characters"
        )));
    }
    let Some(callbacks) = client.and_then(|c| c.callbacks.as_ref()) else {
        return Err(err(
            "this client has no callback_url_prefixes configured, so it cannot ask for callbacks"
                .into(),
        ));
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err("must not contain spaces or control characters".into()));
    }
    if !callbacks.allows(url) {
        return Err(err(format!(
            "must start with one of this client's callback_url_prefixes: {}",
            callbacks.url_prefixes.join(", ")
        )));
    }
    if url::Url::parse(url).is_err() {
        return Err(err("is not a valid URL".into()));
    }
    Ok(())
}

/// The push as an event shows it (`data`): the fields of the push view, in a fixed order,
/// absent ones left out. Anything else a stored row may hold is dropped.
pub fn event_data(stored: &Value) -> Value {
    const FIELDS: [&str; 9] = [
        "id",
        "app",
        "type",
        "status",
        "production_mode",
        "out_biz_no",
        "msg_id",
        "task_id",
        "file_id",
    ];
    let mut m = Map::new();
    for field in FIELDS {
        if let Some(v) = stored.get(field).filter(|v| !v.is_null()) {
            m.insert(field.to_owned(), v.clone());
        }
    }
    Value::Object(m)
}

/// The body of an event as POSTed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CallbackEventBody {
    /// `push.<state>`: push.accepted, push.failed, push.unknown, push.done,
    /// push.send_failed, push.cancelled, push.expired, push.no_match, push.task_lost,
    /// push.withdrawn.
    #[serde(rename = "type")]
    #[schema(example = "push.accepted")]
    pub event_type: String,
    /// When the push reached the state (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// The push as it was at that moment.
    #[schema(value_type = crate::gateway::PushView)]
    pub data: Value,
}

impl CallbackEventBody {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector of the Standard Webhooks specification (and svix's libraries).
    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        let key = signing_key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"))
            .expect("a valid secret");
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_are_checked() {
        assert!(signing_key(&Secret::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).is_err());
        assert!(signing_key(&Secret::new("whsec_not base64!")).is_err());
        assert!(
            signing_key(&Secret::new("whsec_c2hvcnQ=")).is_err(),
            "5 bytes"
        );
        let fresh = generate_secret();
        assert_eq!(signing_key(&Secret::new(fresh)).expect("valid").len(), 32);
    }

    #[test]
    fn event_data_keeps_the_view_fields_only() {
        let stored = serde_json::json!({"task_id": null, "status": "accepted", "id": "p1",
            "request": {"big": true}, "app": "a", "type": "unicast", "msg_id": "m",
            "production_mode": false});
        assert_eq!(
            serde_json::to_string(&event_data(&stored)).expect("json"),
            r#"{"id":"p1","app":"a","type":"unicast","status":"accepted","production_mode":false,"msg_id":"m"}"#
        );
    }
}
