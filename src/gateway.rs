//! The send pipeline: validate, admit (quota + idempotency claim + pending row, atomically),
//! upload `file_lines`, sign and send to Umeng, record the outcome, answer.
//!
//! Everything after admission runs in a spawned task, so a caller that disconnects (or a
//! request timeout) cannot cut a push in half: the Umeng call and its record always finish.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use sha2::Digest;
use time::OffsetDateTime;
use tracing::Instrument;

use crate::config::{App, Config};
use crate::error::{ApiError, UmengDetail};
use crate::metrics::{self, PushOutcome};
use crate::push::{AppProfile, PreparedPush, PushRequest};
use crate::quota::QuotaState;
use crate::store::{
    Admission, Finish, NewPush, PushRecord, PushStatus, QuotaAction, QuotaClaim, Store,
};
use crate::umeng::{AppCredentials, ErrorClass, Outcome, UmengClient, UmengError};

/// An app as the pipeline uses it.
#[derive(Debug, Clone)]
pub struct AppRuntime {
    pub app: App,
    pub credentials: AppCredentials,
    pub profile: AppProfile,
}

/// Shared state of a running gateway.
pub struct Gateway {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub umeng: UmengClient,
    pub apps: HashMap<String, AppRuntime>,
}

/// What the caller gets after a push was admitted (or replayed).
#[derive(Debug)]
pub struct PushAnswer {
    pub status: StatusCode,
    pub push: PushView,
    pub replayed: bool,
    pub quota: Option<QuotaState>,
}

/// The answer body for a created or replayed push.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PushView {
    pub id: String,
    pub app: String,
    #[serde(rename = "type")]
    pub cast_type: String,
    pub status: PushStatus,
    pub production_mode: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_biz_no: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_id: Option<String>,
}

impl PushView {
    pub fn from_record(r: &PushRecord) -> Self {
        PushView {
            id: r.id.clone(),
            app: r.app.clone(),
            cast_type: r.cast_type.clone(),
            status: r.status,
            production_mode: r.production_mode,
            out_biz_no: r.out_biz_no.clone(),
            msg_id: r.msg_id.clone(),
            task_id: r.task_id.clone(),
            file_id: r.file_id.clone(),
        }
    }
}

impl Gateway {
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>, umeng: UmengClient) -> Self {
        let apps = config
            .apps
            .iter()
            .map(|a| {
                let rt = AppRuntime {
                    app: a.clone(),
                    credentials: AppCredentials {
                        appkey: a.appkey.clone(),
                        master_secret: a.master_secret.clone(),
                    },
                    profile: AppProfile {
                        name: a.name.clone(),
                        platform: a.platform,
                        payload_limit: a.payload_limit,
                    },
                };
                (a.name.clone(), rt)
            })
            .collect();
        Gateway {
            config,
            store,
            umeng,
            apps,
        }
    }

    pub fn app(&self, name: &str) -> Option<&AppRuntime> {
        self.apps.get(name)
    }

    /// Validate and send one push. `raw` is the caller's JSON as received.
    pub async fn create_push(
        self: &Arc<Self>,
        client: &str,
        app: &AppRuntime,
        req: PushRequest,
        raw: Value,
    ) -> Result<PushAnswer, ApiError> {
        let prepared = crate::push::prepare(&req, &app.profile, OffsetDateTime::now_utc())
            .map_err(|errors| {
                metrics::push(&app.app.name, req.cast_type.as_str(), PushOutcome::Invalid);
                ApiError::Validation(errors)
            })?;
        let quota = match (prepared.production_mode, prepared.quota_kind) {
            (true, Some(kind)) => Some(QuotaClaim {
                kind,
                limit: app.app.quotas[&kind],
            }),
            _ => None,
        };
        let new = NewPush {
            id: uuid::Uuid::now_v7().to_string(),
            app: app.app.name.clone(),
            appkey: app.app.appkey.clone(),
            platform: app.app.platform.as_str().to_string(),
            cast_type: prepared.cast_type.as_str().to_string(),
            task_class: prepared.task_class,
            production_mode: prepared.production_mode,
            client: client.to_string(),
            out_biz_no: prepared.out_biz_no.clone(),
            fingerprint: prepared.fingerprint.clone(),
            request: raw,
            description: prepared.description.clone(),
        };

        // Admission and everything after it run to completion even if the caller goes away.
        let this = Arc::clone(self);
        let app = app.clone();
        // The spawned task keeps the request's span, so its log lines carry the request id.
        let work = async move { this.admit_and_send(app, new, quota, prepared).await };
        tokio::spawn(work.in_current_span())
            .await
            .map_err(|e| ApiError::Internal(format!("send task failed: {e}")))?
    }

    async fn admit_and_send(
        &self,
        app: AppRuntime,
        new: NewPush,
        quota: Option<QuotaClaim>,
        mut prepared: PreparedPush,
    ) -> Result<PushAnswer, ApiError> {
        let out_biz_no = new.out_biz_no.clone();
        let app_name = app.app.name.as_str();
        let cast_type = prepared.cast_type.as_str();
        let count = |outcome| metrics::push(app_name, cast_type, outcome);
        let admission = self.store.admit(new, quota).await.map_err(|e| match e {
            crate::store::StoreError::Unavailable(m) => {
                ApiError::Unavailable(format!("cannot record the push, nothing was sent: {m}"))
            }
            other => ApiError::Internal(other.to_string()),
        })?;
        let (push_id, quota_state) = match admission {
            Admission::Admitted {
                push_id,
                quota,
                reclaimed_from,
            } => {
                if let Some(old) = reclaimed_from {
                    tracing::info!(push.id = %push_id, push.previous = %old, "retrying a key whose previous push did not go through");
                }
                if let Some(q) = &quota {
                    metrics::quota_remaining(app_name, q);
                }
                (push_id, quota)
            }
            Admission::RateLimited { quota } => {
                count(PushOutcome::RateLimited);
                metrics::quota_rejection(app_name, &quota.kind.to_string(), false);
                metrics::quota_remaining(app_name, &quota);
                return Err(ApiError::RateLimited {
                    retry_after: quota.reset_after_secs.max(1),
                    quota: Some(quota),
                    app: app.app.name.clone(),
                    from_umeng: false,
                });
            }
            Admission::Replay { push } => {
                count(PushOutcome::Replayed);
                return Ok(replay(&push));
            }
            Admission::InFlight { push_id } => {
                count(PushOutcome::InFlight);
                return Err(ApiError::InFlight {
                    out_biz_no: out_biz_no.unwrap_or_default(),
                    push_id,
                });
            }
            Admission::Mismatch { push_id } => {
                count(PushOutcome::Mismatch);
                return Err(ApiError::IdempotencyMismatch {
                    out_biz_no: out_biz_no.unwrap_or_default(),
                    push_id,
                });
            }
        };

        // A token file given inline is uploaded first (or an identical earlier upload reused).
        let mut file_id = None;
        if let Some(content) = prepared.upload_content.take() {
            match self.upload(&app, &content).await {
                Ok(id) => {
                    prepared.set_file_id(&id);
                    file_id = Some(id);
                }
                Err(e) => {
                    let (code, msg) = umeng_code(&e);
                    let err = ApiError::Upstream {
                        detail: format!("uploading file_lines to Umeng failed: {msg}"),
                        umeng: UmengDetail {
                            error_code: code.clone(),
                            error_msg: msg.clone(),
                            retryable: e.is_retryable(),
                        },
                        push_id: Some(push_id.clone()),
                    };
                    // The send never happened: the push failed and its slot goes back.
                    count(PushOutcome::Failed);
                    self.finish(
                        &push_id,
                        Finish {
                            status: PushStatus::Failed,
                            umeng_request: None,
                            umeng_response: fail_raw(&e),
                            msg_id: None,
                            task_id: None,
                            file_id: None,
                            error_code: Some(code),
                            error_msg: Some(msg),
                            http_status: err.status().as_u16(),
                            latency_ms: None,
                            sent_at: None,
                            quota: QuotaAction::Refund,
                        },
                    )
                    .await;
                    return Err(err);
                }
            }
        }

        let sent_at = OffsetDateTime::now_utc();
        let attempt = self.umeng.send(&app.credentials, &prepared.body).await;
        let latency_ms = Some(attempt.latency.as_millis() as i64);
        let base = Finish {
            status: PushStatus::Failed,
            umeng_request: attempt.sent_body.clone(),
            umeng_response: None,
            msg_id: None,
            task_id: None,
            file_id: file_id.clone(),
            error_code: None,
            error_msg: None,
            http_status: 0,
            latency_ms,
            sent_at: Some(sent_at),
            quota: QuotaAction::Keep,
        };
        let view = |status: PushStatus, msg_id: Option<String>, task_id: Option<String>| PushView {
            id: push_id.clone(),
            app: app.app.name.clone(),
            cast_type: prepared.cast_type.as_str().to_string(),
            status,
            production_mode: prepared.production_mode,
            out_biz_no: prepared.out_biz_no.clone(),
            msg_id,
            task_id,
            file_id: file_id.clone(),
        };
        match attempt.result {
            Ok(ok) => {
                tracing::info!(push.id = %push_id, umeng.msg_id = ?ok.msg_id, umeng.task_id = ?ok.task_id, umeng.latency_ms = attempt.latency.as_millis() as u64, "umeng accepted the push");
                count(PushOutcome::Accepted);
                self.finish(
                    &push_id,
                    Finish {
                        status: PushStatus::Accepted,
                        umeng_response: Some(ok.raw.clone()),
                        msg_id: ok.msg_id.clone(),
                        task_id: ok.task_id.clone(),
                        http_status: StatusCode::CREATED.as_u16(),
                        ..base
                    },
                )
                .await;
                Ok(PushAnswer {
                    status: StatusCode::CREATED,
                    push: view(PushStatus::Accepted, ok.msg_id, ok.task_id),
                    replayed: false,
                    quota: quota_state,
                })
            }
            Err(e) => {
                let (code, msg) = umeng_code(&e);
                let (status, quota_action, err) = match &e {
                    // Umeng's own internal errors (600x and the like): it may still have
                    // queued the push, so the slot is kept and the outcome is unknown.
                    UmengError::Fail { .. } if e.outcome() == Outcome::Unknown => (
                        PushStatus::Unknown,
                        QuotaAction::Keep,
                        ApiError::Upstream {
                            detail: format!("Umeng answered FAIL {code} (an internal error): {msg}; the push may or may not have been queued and is recorded as unknown"),
                            umeng: UmengDetail { error_code: code.clone(), error_msg: msg.clone(), retryable: true },
                            push_id: Some(push_id.clone()),
                        },
                    ),
                    UmengError::Unknown { .. } => (
                        PushStatus::Unknown,
                        QuotaAction::Keep,
                        ApiError::UpstreamTimeout {
                            detail: format!("Umeng did not answer ({msg}); the push may or may not have been delivered and is recorded as unknown"),
                            push_id: Some(push_id.clone()),
                        },
                    ),
                    UmengError::Fail { class: ErrorClass::Quota, .. } => {
                        let (action, retry_after) = match quota_state {
                            Some(q) => (QuotaAction::Saturate, q.reset_after_secs.max(1)),
                            None => (QuotaAction::Keep, 60),
                        };
                        (
                            PushStatus::Failed,
                            action,
                            ApiError::RateLimited {
                                quota: quota_state,
                                app: app.app.name.clone(),
                                from_umeng: true,
                                retry_after,
                            },
                        )
                    }
                    _ => (
                        PushStatus::Failed,
                        QuotaAction::Refund,
                        ApiError::Upstream {
                            detail: match &e {
                                UmengError::NotSent { .. } => format!("Umeng could not be reached, nothing was sent: {msg}"),
                                _ => format!("Umeng answered FAIL {code}: {msg}"),
                            },
                            umeng: UmengDetail { error_code: code.clone(), error_msg: msg.clone(), retryable: e.is_retryable() },
                            push_id: Some(push_id.clone()),
                        },
                    ),
                };
                tracing::warn!(push.id = %push_id, umeng.error_code = %code, push.status = %status, "umeng call did not succeed");
                match &err {
                    ApiError::RateLimited { quota, .. } => {
                        count(PushOutcome::RateLimited);
                        let kind = prepared
                            .quota_kind
                            .map_or_else(|| "none".to_owned(), |k| k.to_string());
                        metrics::quota_rejection(app_name, &kind, true);
                        if let Some(q) = quota {
                            let mut full = *q;
                            full.used = full.used.max(full.limit);
                            metrics::quota_remaining(app_name, &full);
                        }
                    }
                    _ if status == PushStatus::Unknown => count(PushOutcome::Unknown),
                    _ => count(PushOutcome::Failed),
                }
                self.finish(
                    &push_id,
                    Finish {
                        status,
                        umeng_response: fail_raw(&e),
                        error_code: Some(code),
                        error_msg: Some(msg),
                        http_status: err.status().as_u16(),
                        quota: quota_action,
                        ..base
                    },
                )
                .await;
                Err(err)
            }
        }
    }

    /// Upload a token/alias file, reusing an earlier upload of identical content.
    async fn upload(&self, app: &AppRuntime, content: &str) -> Result<String, UmengError> {
        let sha = hex::encode(sha2::Sha256::digest(content.as_bytes()));
        let max_age = self.config.settings.history.upload_reuse_days as i64 * 86_400;
        match self.store.find_upload(&app.app.appkey, &sha, max_age).await {
            Ok(Some(id)) => return Ok(id),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "upload lookup failed; uploading again"),
        }
        let id = self.umeng.upload(&app.credentials, content).await?;
        if let Err(e) = self.store.save_upload(&app.app.appkey, &sha, &id).await {
            tracing::warn!(error = %e, "could not remember the uploaded file");
        }
        Ok(id)
    }

    /// Record the outcome (the Umeng call already happened, so it must not be lost). If
    /// the database is unreachable the caller gets the real outcome anyway and the
    /// record keeps being retried in the background (backing off to 5 s) for three
    /// quarters of `history.pending_timeout_secs`, before the sweeper would mark the row
    /// `unknown`; only an outage longer than that leaves the row to the sweeper.
    async fn finish(&self, push_id: &str, finish: Finish) {
        let Err(e) = self.store.finish(push_id, finish.clone()).await else {
            return;
        };
        tracing::error!(push.id = %push_id, error = %e, "recording the push outcome failed; retrying in the background");
        // The caller gets the real outcome now; the record follows as soon as the database
        // is back, within 3/4 of the pending timeout so the sweeper does not overtake it.
        let store = Arc::clone(&self.store);
        let push_id = push_id.to_string();
        let budget = Duration::from_secs(self.config.settings.history.pending_timeout_secs * 3 / 4);
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + budget;
            let mut delay = Duration::from_millis(100);
            while tokio::time::Instant::now() + delay < deadline {
                tokio::time::sleep(delay).await;
                match store.finish(&push_id, finish.clone()).await {
                    Ok(_) => {
                        tracing::info!(push.id = %push_id, "push outcome recorded after a retry");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(push.id = %push_id, error = %e, "recording the push outcome failed again")
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            tracing::error!(push.id = %push_id, "gave up recording the push outcome; the sweeper will mark it unknown");
        });
    }
}

/// The stored answer for a repeat of a known request.
pub fn replay(push: &PushRecord) -> PushAnswer {
    let status = push
        .http_status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(match push.status {
            // Marked unknown by the sweeper (its process died mid-call): the answer that
            // an unknown outcome gets.
            PushStatus::Unknown => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::OK,
        });
    PushAnswer {
        status,
        push: PushView::from_record(push),
        replayed: true,
        quota: None,
    }
}

fn umeng_code(e: &UmengError) -> (String, String) {
    match e {
        UmengError::Fail { code, message, .. } => (code.clone(), message.clone()),
        UmengError::NotSent { reason } => ("not_sent".into(), reason.clone()),
        UmengError::Unknown { reason } => ("unknown".into(), reason.clone()),
    }
}

fn fail_raw(e: &UmengError) -> Option<Value> {
    match e {
        UmengError::Fail { raw, .. } => Some(raw.clone()),
        _ => None,
    }
}
