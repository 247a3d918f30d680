//! The ops console at `/ui/`: server-rendered pages (minijinja templates and one stylesheet,
//! embedded in the binary) over the same store queries and API functions as `http/`.
//! Sign-in takes an API token and gives a signed session cookie; scopes and app allow-lists
//! are the API's own ([`crate::http::auth::Caller`]).

use std::path::PathBuf;
use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::config::ConfigError;
use crate::gateway::Gateway;
use crate::secret::Secret;

mod chart;
mod i18n;
mod pages;
mod session;
mod view;

pub use i18n::Lang;

/// `[console]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// Serve the console at `/ui/`.
    pub enabled: bool,
    /// Key that signs session cookies (inline, development only). Give at most one of
    /// `session_key`, `session_key_env`, `session_key_file`; with none, each process makes
    /// its own key (sessions then end at restart and do not carry across replicas).
    pub session_key: Option<Secret>,
    /// Environment variable holding the key.
    pub session_key_env: Option<String>,
    /// File holding the key (e.g. a mounted Kubernetes Secret).
    pub session_key_file: Option<PathBuf>,
    /// How long a sign-in lasts.
    pub session_ttl_secs: u64,
    /// Mark cookies `Secure` (set true behind a TLS-terminating proxy).
    pub secure_cookies: bool,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            session_key: None,
            session_key_env: None,
            session_key_file: None,
            session_ttl_secs: 8 * 3600,
            secure_cookies: false,
        }
    }
}

/// The shortest session key accepted (characters).
pub const MIN_KEY_LEN: usize = 32;
/// The largest console form body accepted.
pub const MAX_FORM_BYTES: usize = 16 * 1024;
/// The longest sign-in allowed.
pub const MAX_SESSION_TTL_SECS: u64 = 7 * 24 * 3600;

/// Check `[console]` and load its session key, if one is configured.
pub fn load_session_key(s: &ConsoleSettings) -> Result<Option<Secret>, ConfigError> {
    if !(60..=MAX_SESSION_TTL_SECS).contains(&s.session_ttl_secs) {
        return Err(ConfigError(format!(
            "console.session_ttl_secs must be between 60 and {MAX_SESSION_TTL_SECS}"
        )));
    }
    let given = [
        s.session_key.is_some(),
        s.session_key_env.is_some(),
        s.session_key_file.is_some(),
    ]
    .into_iter()
    .filter(|b| *b)
    .count();
    if given > 1 {
        return Err(ConfigError(
            "console: give at most one of session_key, session_key_env or session_key_file".into(),
        ));
    }
    let key = if let Some(k) = &s.session_key {
        k.expose().to_owned()
    } else if let Some(var) = &s.session_key_env {
        std::env::var(var).map_err(|_| {
            ConfigError(format!(
                "console.session_key_env: variable {var} is not set"
            ))
        })?
    } else if let Some(path) = &s.session_key_file {
        std::fs::read_to_string(path)
            .map_err(|e| {
                ConfigError(format!(
                    "console.session_key_file: cannot read {}: {e}",
                    path.display()
                ))
            })?
            .trim_end()
            .to_owned()
    } else {
        return Ok(None);
    };
    if key.chars().count() < MIN_KEY_LEN {
        return Err(ConfigError(format!(
            "console.session_key must be at least {MIN_KEY_LEN} characters (e.g. `openssl rand -hex 32`)"
        )));
    }
    Ok(Some(Secret::new(key)))
}

/// What every console handler shares.
pub struct ConsoleState {
    pub gateway: Arc<Gateway>,
    templates: minijinja::Environment<'static>,
    keys: session::Keys,
    secure: bool,
    ttl_secs: u64,
}

/// The console's routes, with their own state, ready to merge into the gateway's router.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let settings = &gateway.config.settings.console;
    let keys = match &gateway.config.console_key {
        Some(key) => session::Keys::from_secret(key),
        None => {
            if gateway.config.demo {
                tracing::warn!("console: no session key configured; using a key made for this process (demo mode)");
            } else {
                tracing::warn!(
                    "CONSOLE SESSION KEY NOT CONFIGURED: console sign-ins are signed with a key \
                     made for this process only; they end when it restarts and are not accepted \
                     by other replicas. Set console.session_key_file or console.session_key_env."
                );
            }
            session::Keys::random()
        }
    };
    let state = Arc::new(ConsoleState {
        templates: templates(),
        keys,
        secure: settings.secure_cookies,
        ttl_secs: settings.session_ttl_secs,
        gateway,
    });
    Router::new()
        .route("/ui", get(pages::overview))
        .route("/ui/", get(pages::overview))
        .route("/ui/pushes", get(pages::list_pushes))
        .route("/ui/pushes/{id}", get(pages::show_push))
        .route("/ui/pushes/{id}/refresh", post(pages::refresh_push))
        .route(
            "/ui/pushes/{id}/cancel",
            get(pages::confirm_cancel).post(pages::cancel_push),
        )
        .route("/ui/queue", get(pages::show_queue))
        .route("/ui/quotas", get(pages::list_quotas))
        .route("/ui/login", get(pages::show_login).post(pages::login))
        .route("/ui/logout", post(pages::logout))
        .route("/ui/lang/{code}", get(pages::switch_lang))
        .route("/ui/assets/style.css", get(stylesheet))
        .route("/ui/{*rest}", get(pages::not_found))
        .with_state(state)
        // Console forms are a token and a CSRF field: far below the API's body limit.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(axum::middleware::map_response(security_headers))
}

/// Templates, compiled once. `.html` names are HTML-escaped automatically.
fn templates() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    for (name, source) in [
        ("base.html", include_str!("templates/base.html")),
        ("login.html", include_str!("templates/login.html")),
        ("overview.html", include_str!("templates/overview.html")),
        ("pushes.html", include_str!("templates/pushes.html")),
        ("push.html", include_str!("templates/push.html")),
        ("cancel.html", include_str!("templates/cancel.html")),
        ("queue.html", include_str!("templates/queue.html")),
        ("quotas.html", include_str!("templates/quotas.html")),
        ("error.html", include_str!("templates/error.html")),
    ] {
        if let Err(e) = env.add_template(name, source) {
            // The templates are part of the binary: a broken one is a build defect that the
            // console tests catch; serve the other pages rather than abort.
            tracing::error!(template = name, error = %e, "console template does not compile");
        }
    }
    env
}

const STYLESHEET: &str = include_str!("style.css");

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

/// The content security policy: nothing inline, nothing from elsewhere, never framed.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
    form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

impl ConsoleState {
    /// Render `template` with `ctx` as an HTML answer.
    fn render(&self, status: StatusCode, template: &str, ctx: serde_json::Value) -> Response {
        let html = self
            .templates
            .get_template(template)
            .and_then(|t| t.render(minijinja::Value::from(minijinja::value::Serde(ctx))));
        match html {
            Ok(html) => (
                status,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                html,
            )
                .into_response(),
            Err(e) => {
                tracing::error!(template, error = %e, "console template failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    "the page could not be rendered; the error has been logged",
                )
                    .into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_key_sources_are_checked() {
        let none = ConsoleSettings::default();
        assert!(load_session_key(&none).unwrap().is_none());

        let inline = ConsoleSettings {
            session_key: Some(Secret::new("k".repeat(40))),
            ..ConsoleSettings::default()
        };
        assert_eq!(
            load_session_key(&inline).unwrap().unwrap().expose(),
            "k".repeat(40)
        );

        let short = ConsoleSettings {
            session_key: Some(Secret::new("short")),
            ..ConsoleSettings::default()
        };
        let err = load_session_key(&short).unwrap_err().to_string();
        assert!(err.contains("at least 32 characters"), "{err}");
        assert!(
            !err.contains("short"),
            "the key leaks into the error: {err}"
        );

        let two = ConsoleSettings {
            session_key_env: Some("UMGW_TEST_CONSOLE_KEY_UNSET".into()),
            ..inline.clone()
        };
        let err = load_session_key(&two).unwrap_err().to_string();
        assert!(err.contains("at most one"), "{err}");

        let unset = ConsoleSettings {
            session_key_env: Some("UMGW_TEST_CONSOLE_KEY_UNSET".into()),
            ..ConsoleSettings::default()
        };
        let err = load_session_key(&unset).unwrap_err().to_string();
        assert!(
            err.contains("UMGW_TEST_CONSOLE_KEY_UNSET is not set"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, format!("{}\n", "f".repeat(64))).unwrap();
        let file = ConsoleSettings {
            session_key_file: Some(path),
            ..ConsoleSettings::default()
        };
        assert_eq!(
            load_session_key(&file).unwrap().unwrap().expose(),
            "f".repeat(64)
        );

        let ttl = ConsoleSettings {
            session_ttl_secs: 0,
            ..ConsoleSettings::default()
        };
        let err = load_session_key(&ttl).unwrap_err().to_string();
        assert!(err.contains("console.session_ttl_secs"), "{err}");
    }

    #[test]
    fn debug_never_shows_the_session_key() {
        let s = ConsoleSettings {
            session_key: Some(Secret::new("x".repeat(40))),
            ..ConsoleSettings::default()
        };
        assert!(!format!("{s:?}").contains("xxxx"));
    }
}
