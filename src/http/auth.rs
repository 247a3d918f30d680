//! Bearer-token authentication: the token's SHA-256 is compared in constant time with each
//! configured client's hash. The matched client is what handlers see.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::Digest;
use subtle::ConstantTimeEq;

use crate::config::{Client, Scope};
use crate::error::ApiError;
use crate::gateway::Gateway;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller(pub Client);

impl Caller {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// 403 unless the client holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.0.has_scope(scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "client {:?} lacks the {:?} scope",
                self.0.name,
                format!("{scope:?}").to_lowercase()
            )))
        }
    }

    /// The apps this client is limited to (`None`: every app), for store queries.
    pub fn apps_allowed(&self) -> Option<Vec<String>> {
        self.0
            .apps
            .clone()
            .filter(|_| !self.0.has_scope(Scope::Admin))
    }

    /// 403 unless the client may use `app`.
    pub fn require_app(&self, app: &str) -> Result<(), ApiError> {
        if self.0.may_use_app(app) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "client {:?} may not use app {app:?}",
                self.0.name
            )))
        }
    }
}

impl FromRequestParts<Arc<Gateway>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let caller = Caller::from_token(gateway, token).ok_or(ApiError::Unauthorized)?;
        tracing::Span::current().record("client", caller.name());
        Ok(caller)
    }
}

impl Caller {
    /// The configured client whose token this is (the API's bearer token and the console's
    /// sign-in form both authenticate through here).
    pub fn from_token(gateway: &Gateway, token: &str) -> Option<Caller> {
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        // Look at every client so the time taken does not depend on which one matched.
        let mut found = None;
        for c in &gateway.config.clients {
            if bool::from(c.token_sha256.ct_eq(&digest)) {
                found = Some(c);
            }
        }
        found.map(|c| Caller(c.clone()))
    }
}
