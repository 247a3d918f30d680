//! Session cookies and CSRF tokens. A session is a cookie holding the client's name, a
//! fingerprint of its token hash (so a rotated token ends its sessions), an expiry and a
//! random id, signed with HMAC-SHA-256. The CSRF token of a session is derived from its id.
//! Before sign-in, a random nonce cookie stands in for the session id.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::i18n::Lang;
use super::ConsoleState;
use crate::http::auth::Caller;
use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

pub const SESSION_COOKIE: &str = "umgw_session";
pub const SIGNIN_COOKIE: &str = "umgw_signin";
pub const LANG_COOKIE: &str = "umgw_lang";
/// Longest cookie value looked at.
const MAX_COOKIE_LEN: usize = 2048;

/// The signing key.
pub struct Keys {
    key: [u8; 32],
}

impl Keys {
    pub fn from_secret(secret: &Secret) -> Self {
        Keys {
            key: Sha256::digest(secret.expose().as_bytes()).into(),
        }
    }

    pub fn random() -> Self {
        use rand::RngCore;
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        Keys { key }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length.
        HmacSha256::new_from_slice(&self.key).expect("HMAC accepts any key length")
    }

    fn sign(&self, data: &[u8]) -> Vec<u8> {
        let mut m = self.mac();
        m.update(data);
        m.finalize().into_bytes().to_vec()
    }

    fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut m = self.mac();
        m.update(data);
        m.verify_slice(tag).is_ok()
    }

    /// The CSRF token bound to a session id (or a sign-in nonce).
    pub fn csrf_for(&self, id: &str) -> String {
        hex::encode(&self.sign(format!("csrf|{id}").as_bytes())[..16])
    }

    /// Whether `given` is the CSRF token for `id` (constant time).
    pub fn csrf_ok(&self, id: &str, given: Option<&str>) -> bool {
        let Some(given) = given else { return false };
        let expected = self.csrf_for(id);
        given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
    }
}

/// A signed-in client.
pub struct Session {
    pub caller: Caller,
    pub csrf: String,
    pub lang: Lang,
    id: String,
}

impl Session {
    pub fn csrf_ok(&self, state: &ConsoleState, given: Option<&str>) -> bool {
        state.keys.csrf_ok(&self.id, given)
    }
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn token_fingerprint(caller: &Caller) -> String {
    hex::encode(&caller.0.token_sha256[..8])
}

/// A random hex id of 16 bytes.
pub fn random_id() -> String {
    crate::startup::random_hex(16)
}

/// The `Set-Cookie` value that signs `caller` in.
pub fn issue(state: &ConsoleState, caller: &Caller) -> String {
    let expires = now_secs() + i64::try_from(state.ttl_secs).unwrap_or(i64::MAX / 2);
    let payload = format!(
        "{expires}|{}|{}|{}",
        random_id(),
        token_fingerprint(caller),
        caller.name()
    );
    let value = format!(
        "{}.{}",
        hex::encode(payload.as_bytes()),
        hex::encode(state.keys.sign(payload.as_bytes()))
    );
    cookie(state, SESSION_COOKIE, &value, state.ttl_secs)
}

/// A `Set-Cookie` value (HttpOnly, SameSite=Strict, path /ui, Secure when configured).
pub fn cookie(state: &ConsoleState, name: &str, value: &str, max_age: u64) -> String {
    format!(
        "{name}={value}; Path=/ui; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        if state.secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes cookie `name`.
pub fn clear(state: &ConsoleState, name: &str) -> String {
    cookie(state, name, "", 0)
}

/// The value of cookie `name`, if present and not oversized.
pub fn read_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| v.len() <= MAX_COOKIE_LEN)
}

/// The session carried by `headers`, if its signature, expiry and client are all valid.
pub fn verify(state: &ConsoleState, headers: &HeaderMap) -> Option<(Caller, String)> {
    let value = read_cookie(headers, SESSION_COOKIE)?;
    let (payload_hex, tag_hex) = value.split_once('.')?;
    let payload = hex::decode(payload_hex).ok()?;
    let tag = hex::decode(tag_hex).ok()?;
    if !state.keys.verify(&payload, &tag) {
        return None;
    }
    let payload = String::from_utf8(payload).ok()?;
    let mut parts = payload.splitn(4, '|');
    let expires: i64 = parts.next()?.parse().ok()?;
    let id = parts.next()?.to_owned();
    let fingerprint = parts.next()?;
    let name = parts.next()?;
    if expires <= now_secs() {
        return None;
    }
    // The client as configured now: scopes and apps follow the configuration, and a client
    // that was removed or given a new token is signed out.
    let client = state
        .gateway
        .config
        .clients
        .iter()
        .find(|c| c.name == name)?;
    let caller = Caller(client.clone());
    if token_fingerprint(&caller) != fingerprint {
        return None;
    }
    Some((caller, id))
}

/// Where to go after signing in: a console path, never another site.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with("/ui")
                && !n.contains("//")
                && !n.contains('\\')
                && n.len() <= 1024
                && n.chars().all(|c| c.is_ascii_graphic()) =>
        {
            n.to_owned()
        }
        _ => "/ui/".to_owned(),
    }
}

impl FromRequestParts<Arc<ConsoleState>> for Session {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ConsoleState>,
    ) -> Result<Self, Self::Rejection> {
        let lang = Lang::of(&parts.headers);
        match verify(state, &parts.headers) {
            Some((caller, id)) => {
                tracing::Span::current().record("client", caller.name());
                Ok(Session {
                    csrf: state.keys.csrf_for(&id),
                    caller,
                    lang,
                    id,
                })
            }
            None => {
                // Reading pages send the visitor to sign in (and back); a form POST without a
                // session is refused outright.
                if parts.method == Method::GET || parts.method == Method::HEAD {
                    let here = parts
                        .uri
                        .path_and_query()
                        .map_or("/ui/", |p| p.as_str())
                        .to_owned();
                    let mut target = url::form_urlencoded::Serializer::new(String::new());
                    target.append_pair("next", &safe_next(Some(&here)));
                    let mut res =
                        Redirect::to(&format!("/ui/login?{}", target.finish())).into_response();
                    if read_cookie(&parts.headers, SESSION_COOKIE).is_some() {
                        if let Ok(v) = HeaderValue::from_str(&clear(state, SESSION_COOKIE)) {
                            res.headers_mut().append(header::SET_COOKIE, v);
                        }
                    }
                    Err(res)
                } else {
                    Err(super::pages::refused(state, lang, None))
                }
            }
        }
    }
}
