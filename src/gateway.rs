//! The send pipeline: validate, admit (quota + idempotency claim + pending row, atomically),
//! upload `file_lines`, sign and send to Umeng, record the outcome, answer.
//!
//! Everything after admission runs in a spawned task, so a caller that disconnects (or a
//! request timeout) cannot cut a push in half: the Umeng call and its record always finish.

mod parts;

pub use parts::{parent_answer, Audience};

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::Digest;
use time::OffsetDateTime;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{App, Config};
use crate::delivery::breaker::Permit;
use crate::delivery::outcome::QuotaEffect;
use crate::delivery::Verdict;
use crate::delivery::{self, Breaker, BreakerConfig};
use crate::error::{ApiError, UmengDetail};
use crate::metrics::{self, PushOutcome};
use crate::push::{AppProfile, PreparedPush, PushRequest};
use crate::quota::{FullWindows, QuotaKind, QuotaState};
use crate::store::{
    Admission, AsyncDelivery, Attempt, DeliveryClaim, DeliveryMode, DeliveryRetry, Finish, NewPush,
    PushRecord, PushStatus, QuotaAction, QuotaClaim, Store,
};
use crate::umeng::{AppCredentials, ErrorClass, FieldError, SendAttempt, UmengClient, UmengError};

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
    /// Admitted pushes and outcome records in progress: shutdown waits for them.
    tasks: TaskTracker,
    /// Stops calling Umeng while it is unreachable.
    pub breaker: Breaker,
    /// Outcome records being retried because the database was unreachable.
    unrecorded: Arc<AtomicUsize>,
    /// Wakes this replica's delivery worker when an asynchronous push was admitted here.
    pub delivery_wake: delivery::DeliveryWake,
    /// Wakes requests waiting for a parent push to be settled.
    parents_settled: tokio::sync::Notify,
    /// Quota windows the database called full, answered 429 without asking it again.
    pub full_windows: FullWindows,
}

/// What the caller gets after a push was admitted (or replayed).
#[derive(Debug)]
pub struct PushAnswer {
    pub status: StatusCode,
    pub push: PushView,
    pub replayed: bool,
    pub quota: Option<QuotaState>,
    /// The caller asked for `Prefer: respond-async` and the push is answered 202.
    pub async_applied: bool,
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
    /// When the push goes out, when that is not at once (`send_at` or `start_time`).
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub send_at: Option<OffsetDateTime>,
    /// A push to an app group or with a list split into calls of at most 500: what each
    /// part did.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<crate::store::PushPart>,
    /// A repeat of a push whose parts partly failed: the parts it sent again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resent_parts: Vec<u32>,
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
            send_at: r.send_at,
            parts: r.parts.clone(),
            resent_parts: Vec::new(),
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
        let breaker = Breaker::new(BreakerConfig {
            failures: config.settings.umeng.breaker_failures,
            cooldown: Duration::from_secs(config.settings.umeng.breaker_cooldown_secs),
        });
        let full_windows = FullWindows::new(Duration::from_millis(
            config.settings.database.quota_full_recheck_ms,
        ));
        Gateway {
            config,
            store,
            umeng,
            apps,
            tasks: TaskTracker::new(),
            breaker,
            unrecorded: Arc::new(AtomicUsize::new(0)),
            delivery_wake: delivery::DeliveryWake::default(),
            parents_settled: tokio::sync::Notify::new(),
            full_windows,
        }
    }

    pub fn app(&self, name: &str) -> Option<&AppRuntime> {
        self.apps.get(name)
    }

    /// Validate and send one push. `raw` is the caller's JSON as received. With
    /// `respond_async` (the caller's `Prefer: respond-async`), or a `send_at`, the push is
    /// stored for a delivery worker and answered 202 at once.
    pub async fn create_push(
        self: &Arc<Self>,
        client: &str,
        app: &AppRuntime,
        req: PushRequest,
        raw: Value,
        respond_async: bool,
    ) -> Result<PushAnswer, ApiError> {
        if let Some(url) = &req.callback_url {
            let caller = self.config.clients.iter().find(|c| c.name == client);
            crate::callbacks::check_url(caller, url).map_err(|e| {
                metrics::push(&app.app.name, req.cast_type.as_str(), PushOutcome::Invalid);
                ApiError::Validation(vec![e])
            })?;
        }
        let now = OffsetDateTime::now_utc();
        let invalid = |errors| {
            metrics::push(&app.app.name, req.cast_type.as_str(), PushOutcome::Invalid);
            ApiError::Validation(errors)
        };
        let prepared = crate::push::prepare(&req, &app.profile, now).map_err(invalid)?;
        let asynchronous = respond_async || prepared.send_at.is_some();
        self.check_async_fields(&prepared, asynchronous, now)
            .map_err(|e| invalid(vec![e]))?;
        let quota = match (prepared.production_mode, prepared.quota_kind) {
            (true, Some(kind)) => Some(QuotaClaim {
                kind,
                limit: app.app.quotas[&kind],
            }),
            _ => None,
        };
        let id = uuid::Uuid::now_v7().to_string();
        let delivery = asynchronous.then(|| self.async_delivery(&id, &prepared, quota, now));
        let new = NewPush {
            id,
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
            send_at: prepared.send_at.or(prepared.start_time),
            delivery,
        };

        // Admission and everything after it run to completion even if the caller goes away.
        let this = Arc::clone(self);
        let app = app.clone();
        // The spawned task keeps the request's span, so its log lines carry the request id.
        let work = async move {
            if new.delivery.is_some() {
                this.admit_async(app, new, quota, prepared, respond_async)
                    .await
            } else {
                this.admit_and_send(app, new, quota, prepared).await
            }
        };
        // Boxed: a task's future is moved into the task and its stage swapped for the
        // output, each a copy of the whole future, and this one holds every step of a push.
        self.tasks
            .spawn(Box::pin(work).in_current_span())
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
        let admitted_at = tokio::time::Instant::now();
        let app_name = app.app.name.as_str();
        let cast_type = prepared.cast_type;
        let count = |outcome| metrics::push(app_name, cast_type.as_str(), outcome);
        // While Umeng is unreachable the breaker answers at once: nothing is written, sent
        // or counted.
        let permit = match self.breaker.try_call() {
            Ok(permit) => permit,
            Err(wait) => {
                count(PushOutcome::Unavailable);
                return Err(ApiError::UmengUnavailable {
                    retry_after: wait.as_secs().max(1),
                });
            }
        };
        let (push_id, quota_state) = match self.admit(&app, new, quota).await {
            Ok(Admitted::Go { push_id, quota }) => (push_id, quota),
            Ok(Admitted::Answer(outcome, answer)) => {
                self.breaker.release(permit);
                count(outcome);
                return answer;
            }
            Err(e) => {
                self.breaker.release(permit);
                return Err(e);
            }
        };
        let recorder = Recorder {
            gateway: self,
            push_id: &push_id,
            admitted_at,
            slot: (&app.app.appkey, prepared.counted_quota()),
        };

        // Every Umeng call made for this push, recorded with its outcome.
        let mut calls = Vec::new();
        let mut body = std::mem::take(&mut prepared.json);
        let upload = prepared.upload_content.take();
        let sent_at = OffsetDateTime::now_utc();
        let called = self
            .call_umeng(&app, &push_id, &mut body, upload.as_deref(), &mut calls)
            .await;
        let (attempt, file_id) = match called {
            Ok(sent) => sent,
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
                let reached = matches!(e, UmengError::Fail { .. });
                self.breaker.record(permit, reached);
                count(PushOutcome::Failed);
                recorder
                    .finish(Finish {
                        status: PushStatus::Failed,
                        umeng_request: None,
                        umeng_response: umeng_raw(&e),
                        msg_id: None,
                        task_id: None,
                        file_id: None,
                        error_code: Some(code),
                        error_msg: Some(msg),
                        http_status: err.status().as_u16(),
                        latency_ms: None,
                        sent_at: None,
                        quota: QuotaAction::Refund,
                        attempts: calls,
                        claim: None,
                    })
                    .await;
                return Err(err);
            }
        };
        let latency_ms = Some(attempt.latency.as_millis() as i64);
        let base = Finish {
            status: PushStatus::Failed,
            umeng_request: attempt.sent_body,
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
            attempts: calls,
            claim: None,
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
            send_at: prepared.start_time,
            parts: Vec::new(),
            resent_parts: Vec::new(),
        };
        // A task-class retry carrying the same out_biz_no is deduped by Umeng; anything else
        // sent again may reach the devices twice.
        let dedupes = prepared.task_class && prepared.out_biz_no.is_some();
        let result = delivery::outcome::missing_task_id(attempt.result, prepared.task_class);
        let verdict = delivery::classify(&result, dedupes);
        self.breaker.record(permit, verdict.reached_umeng);
        count(verdict.metric);
        let e = match result {
            Ok(ok) => {
                tracing::info!(push.id = %push_id, umeng.msg_id = ok.msg_id.as_deref(), umeng.task_id = ok.task_id.as_deref(), umeng.latency_ms = attempt.latency.as_millis() as u64, "umeng accepted the push");
                recorder
                    .finish(Finish {
                        status: verdict.status,
                        umeng_response: Some(ok.raw),
                        msg_id: ok.msg_id.clone(),
                        task_id: ok.task_id.clone(),
                        http_status: StatusCode::CREATED.as_u16(),
                        ..base
                    })
                    .await;
                return Ok(PushAnswer {
                    status: StatusCode::CREATED,
                    push: view(verdict.status, ok.msg_id, ok.task_id),
                    replayed: false,
                    quota: quota_state,
                    async_applied: false,
                });
            }
            Err(e) => e,
        };
        let (code, msg) = umeng_code(&e);
        tracing::warn!(push.id = %push_id, umeng.error_code = %code, push.status = %verdict.status, "umeng call did not succeed");
        let umeng = UmengDetail {
            error_code: code.clone(),
            error_msg: msg.clone(),
            retryable: verdict.retryable,
        };
        let mut err = failure_error(&e, &verdict, umeng, &push_id, &app.app.name, quota_state);
        let quota_kind = prepared.counted_quota();
        let quota_action = quota_action(verdict.quota, quota_kind, &app);
        recorder
            .finish(Finish {
                status: verdict.status,
                umeng_response: umeng_raw(&e),
                error_code: Some(code),
                error_msg: Some(msg),
                http_status: err.status().as_u16(),
                quota: quota_action,
                ..base
            })
            .await;
        if let (
            ApiError::RateLimited {
                quota, retry_after, ..
            },
            Some(kind),
        ) = (&mut err, quota_kind)
        {
            // Umeng called the window of now full: answer with that window's state (read
            // after the finish saturated it), not the admission's.
            metrics::quota_rejection(app_name, kind.as_str(), true);
            let limit = app.app.quotas[&kind];
            match self.store.quota_state(&app.app.appkey, kind, limit).await {
                Ok(now) => {
                    let mut full = now;
                    full.used = full.used.max(full.limit);
                    metrics::quota_remaining(app_name, &full);
                    self.full_windows.learn(&app.app.appkey, &now);
                    *retry_after = now.reset_after_secs.max(1);
                    *quota = Some(now);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the quota window after a 2050")
                }
            }
        }
        Err(err)
    }

    /// Admission: quota slot, idempotency claim and pending row in one atomic step.
    /// Anything but a go-ahead is answered here.
    async fn admit(
        &self,
        app: &AppRuntime,
        new: NewPush,
        quota: Option<QuotaClaim>,
    ) -> Result<Admitted, ApiError> {
        let out_biz_no = new.out_biz_no.clone();
        let app_name = app.app.name.as_str();
        // A push that would take its slot now, for a window known full, is refused here.
        let takes_slot_now = !new.delivery.as_ref().is_some_and(|d| d.defer_quota);
        if let Some(claim) = quota.filter(|_| takes_slot_now) {
            if let Some(full) = self.known_full(app, claim, out_biz_no.as_deref()).await {
                metrics::quota_full_window_answer(app_name, claim.kind.as_str());
                return Ok(rate_limited(app, full));
            }
        }
        let admission = self.store.admit(new, quota).await.map_err(|e| match e {
            crate::store::StoreError::Unavailable(m) => {
                ApiError::Unavailable(format!("cannot record the push, nothing was sent: {m}"))
            }
            other => ApiError::Internal(other.to_string()),
        })?;
        Ok(match admission {
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
                    self.full_windows.learn(&app.app.appkey, q);
                }
                Admitted::Go { push_id, quota }
            }
            Admission::RateLimited { quota } => {
                metrics::quota_remaining(app_name, &quota);
                self.full_windows.learn(&app.app.appkey, &quota);
                rate_limited(app, quota)
            }
            Admission::Replay { push } => Admitted::Answer(PushOutcome::Replayed, replay(&push)),
            Admission::InFlight { push_id } => Admitted::Answer(
                PushOutcome::InFlight,
                Err(ApiError::InFlight {
                    out_biz_no: out_biz_no.unwrap_or_default(),
                    push_id,
                }),
            ),
            Admission::Mismatch { push_id } => Admitted::Answer(
                PushOutcome::Mismatch,
                Err(ApiError::IdempotencyMismatch {
                    out_biz_no: out_biz_no.unwrap_or_default(),
                    push_id,
                }),
            ),
        })
    }

    /// The state of the window `claim` would take a slot of, if this replica knows it is
    /// full ([`FullWindows`]). A push with an `out_biz_no` that names a push already is
    /// left to the database, which answers it as a replay, 409 or 422 whatever the quota.
    async fn known_full(
        &self,
        app: &AppRuntime,
        claim: QuotaClaim,
        out_biz_no: Option<&str>,
    ) -> Option<QuotaState> {
        let appkey = &app.app.appkey;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let full = self
            .full_windows
            .full_now(appkey, claim.kind, claim.limit, now)?;
        match out_biz_no {
            None => Some(full),
            Some(key) => match self.store.key_taken(appkey, key).await {
                Ok(false) => Some(full),
                Ok(true) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "idempotency key lookup failed; admitting as usual");
                    None
                }
            },
        }
    }

    /// This replica gave a slot of `kind`'s current window back: the window is no longer
    /// known full.
    pub fn slot_returned(&self, appkey: &str, kind: Option<QuotaKind>) {
        if let Some(kind) = kind {
            self.full_windows.forget(appkey, kind);
        }
    }

    /// Upload a token/alias file, reusing an earlier upload of identical content.
    async fn upload(
        &self,
        app: &AppRuntime,
        content: &str,
        calls: &mut Vec<Attempt>,
    ) -> Result<Upload, UmengError> {
        let sha256 = hex::encode(sha2::Sha256::digest(content.as_bytes()));
        let max_age = self.config.settings.history.upload_reuse_days as i64 * 86_400;
        match self
            .store
            .find_upload(&app.app.appkey, &sha256, max_age)
            .await
        {
            Ok(Some(file_id)) => {
                return Ok(Upload {
                    file_id,
                    sha256,
                    reused: true,
                })
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "upload lookup failed; uploading again"),
        }
        let file_id = self.upload_fresh(app, content, &sha256, calls).await?;
        Ok(Upload {
            file_id,
            sha256,
            reused: false,
        })
    }

    /// Upload `content` and remember its file_id for reuse. An upload that sent nothing is
    /// tried once more at once.
    async fn upload_fresh(
        &self,
        app: &AppRuntime,
        content: &str,
        sha256: &str,
        calls: &mut Vec<Attempt>,
    ) -> Result<String, UmengError> {
        let mut result = self.upload_once(app, content, calls).await;
        if let Err(UmengError::NotSent { reason }) = &result {
            tracing::info!(error = %reason, "the upload sent nothing; trying once more");
            result = self.upload_once(app, content, calls).await;
        }
        let id = result?;
        if let Err(e) = self.store.save_upload(&app.app.appkey, sha256, &id).await {
            tracing::warn!(error = %e, "could not remember the uploaded file");
        }
        Ok(id)
    }

    /// Send `prepared` to Umeng. A first attempt that sent nothing (refused, DNS, TLS,
    /// connect timeout) is tried once more at once: a fresh connection often gets through,
    /// and nothing can be duplicated.
    async fn send(
        &self,
        app: &AppRuntime,
        body: &Map<String, Value>,
        calls: &mut Vec<Attempt>,
    ) -> SendAttempt {
        let first = self.send_once(app, body, calls).await;
        match &first.result {
            Err(UmengError::NotSent { reason }) => {
                tracing::info!(error = %reason, "the send reached nothing; trying once more");
                let mut second = self.send_once(app, body, calls).await;
                second.latency += first.latency;
                second
            }
            _ => first,
        }
    }

    /// One `/api/send` call, recorded in `calls`.
    async fn send_once(
        &self,
        app: &AppRuntime,
        body: &Map<String, Value>,
        calls: &mut Vec<Attempt>,
    ) -> SendAttempt {
        let started_at = OffsetDateTime::now_utc();
        let sent = self.umeng.send_fields(&app.credentials, body).await;
        let error = sent.result.as_ref().err();
        calls.push(attempt(
            "send",
            calls.len(),
            started_at,
            sent.latency,
            error,
        ));
        sent
    }

    /// One `/upload` call, recorded in `calls`.
    async fn upload_once(
        &self,
        app: &AppRuntime,
        content: &str,
        calls: &mut Vec<Attempt>,
    ) -> Result<String, UmengError> {
        let started_at = OffsetDateTime::now_utc();
        let clock = std::time::Instant::now();
        let result = self.umeng.upload(&app.credentials, content).await;
        let error = result.as_ref().err();
        calls.push(attempt(
            "upload",
            calls.len(),
            started_at,
            clock.elapsed(),
            error,
        ));
        result
    }

    /// The Umeng calls of one delivery: upload the token file (or reuse an identical
    /// earlier upload), then send. A reused `file_id` that Umeng no longer knows (2019) is
    /// forgotten, uploaded again and sent once more. `Err` is an upload that failed
    /// (nothing was sent); otherwise the send's result and the `file_id` used.
    async fn call_umeng(
        &self,
        app: &AppRuntime,
        push_id: &str,
        body: &mut Map<String, Value>,
        upload: Option<&str>,
        calls: &mut Vec<Attempt>,
    ) -> Result<(SendAttempt, Option<String>), UmengError> {
        let mut file = None;
        if let Some(content) = upload {
            let uploaded = self.upload(app, content, calls).await?;
            body.insert("file_id".into(), Value::String(uploaded.file_id.clone()));
            file = Some(uploaded);
        }
        let mut attempt = self.send(app, body, calls).await;
        if let (Some(content), Some(uploaded)) = (upload, &file) {
            let forgotten = matches!(&attempt.result, Err(e) if e.code() == Some(FILE_NOT_FOUND));
            if forgotten && uploaded.reused {
                // Umeng no longer knows a file_id we reused (expired or lost): forget it,
                // upload the content again and send once more. A file_id that was fresh a
                // moment ago is not retried: that is Umeng's problem, not a stale record.
                tracing::warn!(push.id = %push_id, "umeng no longer knows a reused file_id; uploading again");
                if let Err(e) = self
                    .store
                    .forget_upload(&app.app.appkey, &uploaded.sha256, &uploaded.file_id)
                    .await
                {
                    tracing::warn!(error = %e, "could not forget the stale upload");
                }
                match self
                    .upload_fresh(app, content, &uploaded.sha256, calls)
                    .await
                {
                    Ok(id) => {
                        body.insert("file_id".into(), Value::String(id.clone()));
                        file = Some(Upload {
                            file_id: id,
                            sha256: uploaded.sha256.clone(),
                            reused: false,
                        });
                        attempt = self.send(app, body, calls).await;
                    }
                    Err(e) => {
                        // Nothing more was sent: the push failed with Umeng's 2019.
                        tracing::warn!(push.id = %push_id, error = %e, "uploading the file again failed");
                    }
                }
            }
        }
        Ok((attempt, file.map(|f| f.file_id)))
    }

    /// The rules for `send_at` and `on_quota_exhausted` that need the settings.
    fn check_async_fields(
        &self,
        prepared: &PreparedPush,
        asynchronous: bool,
        now: OffsetDateTime,
    ) -> Result<(), FieldError> {
        if prepared.quota_wait && !asynchronous {
            return Err(FieldError::new(
                "on_quota_exhausted",
                "\"wait\" needs an asynchronous push: send the header Prefer: respond-async, or give send_at",
            ));
        }
        let days = self.config.settings.delivery.max_send_at_days;
        if let Some(at) = prepared.send_at {
            let horizon = now + time::Duration::days(i64::try_from(days).unwrap_or(365));
            if at > horizon {
                return Err(FieldError::new(
                    "send_at",
                    format!("is more than {days} days ahead (delivery.max_send_at_days)"),
                ));
            }
        }
        Ok(())
    }

    /// How an asynchronous push is stored: the Umeng body for the worker (a task-class
    /// push without `out_biz_no` gets `umgw-<push id>`, so that Umeng dedupes the
    /// gateway's own re-sends), when it is due, and its deadline: `delivery.max_age_hours`
    /// after it is due, or its `policy.expire_time` if earlier.
    fn async_delivery(
        &self,
        id: &str,
        prepared: &PreparedPush,
        quota: Option<QuotaClaim>,
        now: OffsetDateTime,
    ) -> AsyncDelivery {
        let mut body = prepared.json.clone();
        if prepared.task_class && prepared.out_biz_no.is_none() {
            let policy = body
                .entry("policy")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(policy) = policy.as_object_mut() {
                policy.insert("out_biz_no".into(), Value::String(format!("umgw-{id}")));
            }
        }
        let mut outbox = Map::new();
        outbox.insert("body".into(), Value::Object(body));
        if let Some(content) = &prepared.upload_content {
            outbox.insert("upload".into(), Value::String(content.clone()));
        }
        let hold = prepared.send_at.is_some_and(|at| at > now);
        let due = prepared.send_at.map_or(now, |at| at.max(now));
        let hours = self.config.settings.delivery.max_age_hours;
        let mut deliver_by = due + time::Duration::hours(i64::try_from(hours).unwrap_or(24));
        let expire = prepared
            .body
            .policy
            .as_ref()
            .and_then(|p| p.expire_time.as_deref())
            .and_then(crate::umeng::parse_policy_time);
        if let Some(expire) = expire {
            deliver_by = deliver_by.min(expire);
        }
        AsyncDelivery {
            outbox: Value::Object(outbox),
            hold,
            deliver_by,
            quota_wait: prepared.quota_wait,
            // A held push, or one that may wait, takes its slot when it is sent; an
            // immediate one with "reject" takes it now, so a full window answers 429.
            defer_quota: quota.is_some() && (hold || prepared.quota_wait),
        }
    }

    /// Admission of an asynchronous push: stored in a waiting state (or answered as a
    /// repeat, or refused: 409, 422, 429), and answered 202 at once. Umeng's breaker does
    /// not matter here: the push waits until it can be sent.
    async fn admit_async(
        &self,
        app: AppRuntime,
        new: NewPush,
        quota: Option<QuotaClaim>,
        prepared: PreparedPush,
        respond_async: bool,
    ) -> Result<PushAnswer, ApiError> {
        let app_name = app.app.name.clone();
        let status = new
            .delivery
            .as_ref()
            .map_or(PushStatus::AwaitingSend, |d| d.status());
        let send_at = new.send_at;
        let count = |outcome| metrics::push(&app_name, prepared.cast_type.as_str(), outcome);
        match self.admit(&app, new, quota).await? {
            Admitted::Go { push_id, quota } => {
                count(PushOutcome::Queued);
                self.delivery_wake.app(&app_name);
                tracing::info!(push.id = %push_id, push.status = %status, "push stored for asynchronous delivery");
                Ok(PushAnswer {
                    status: StatusCode::ACCEPTED,
                    push: PushView {
                        id: push_id,
                        app: app_name.clone(),
                        cast_type: prepared.cast_type.as_str().to_string(),
                        status,
                        production_mode: prepared.production_mode,
                        out_biz_no: prepared.out_biz_no.clone(),
                        msg_id: None,
                        task_id: None,
                        file_id: None,
                        send_at,
                        parts: Vec::new(),
                        resent_parts: Vec::new(),
                    },
                    replayed: false,
                    quota,
                    async_applied: respond_async,
                })
            }
            Admitted::Answer(outcome, answer) => {
                count(outcome);
                answer.map(|mut a| {
                    a.async_applied = respond_async && a.status == StatusCode::ACCEPTED;
                    a
                })
            }
        }
    }

    /// Send one claimed asynchronous push and record what happened: final (accepted,
    /// failed, unknown), or back to waiting with a backoff (nothing was sent, Umeng's
    /// transient errors, or a task-class timeout that Umeng dedupes), or waiting for the
    /// next quota window (2050 with `on_quota_exhausted: "wait"`).
    pub async fn deliver_claimed(&self, claim: DeliveryClaim, permit: Option<Permit>) {
        let settings = &self.config.settings.delivery;
        let Some(app) = self
            .apps
            .get(&claim.app)
            .filter(|a| a.app.appkey == claim.appkey)
            .cloned()
        else {
            // Claims are made for configured apps only: the configuration changed under
            // a running worker, which cannot happen. Leave it to the lease.
            tracing::error!(push.id = %claim.push_id, app = %claim.app, "claimed a push of an app this replica does not have");
            return;
        };
        let app_name = app.app.name.as_str();
        let permit = match permit.map_or_else(|| self.breaker.try_call(), Ok) {
            Ok(permit) => permit,
            Err(wait) => {
                // Umeng is unreachable: back to waiting, nothing sent, the slot goes back.
                self.put_back(&claim, wait, claim.attempts.clone(), None, true)
                    .await;
                return;
            }
        };
        let Some(mut body) = claim.outbox.get("body").and_then(Value::as_object).cloned() else {
            self.breaker.release(permit);
            tracing::error!(push.id = %claim.push_id, "the stored push has nothing to send");
            self.finish_claim(
                &claim,
                failed_finish(
                    &claim,
                    "outbox_missing",
                    "the stored push has nothing to send",
                    claim.attempts.clone(),
                ),
            )
            .await;
            return;
        };
        let upload = claim
            .outbox
            .get("upload")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut calls = claim.attempts.clone();
        let sent_at = OffsetDateTime::now_utc();
        let called = self
            .call_umeng(
                &app,
                &claim.push_id,
                &mut body,
                upload.as_deref(),
                &mut calls,
            )
            .await;
        let (result, sent_body, latency, file_id) = match called {
            Ok((attempt, file_id)) => (
                delivery::outcome::missing_task_id(attempt.result, claim.task_class),
                attempt.sent_body,
                Some(attempt.latency),
                file_id,
            ),
            // The upload failed: nothing was sent; judged like a send that failed alike.
            Err(e) => (Err(e), None, None, None),
        };
        // Every asynchronous task-class push carries an out_biz_no upstream.
        let verdict = delivery::classify(&result, claim.task_class);
        self.breaker.record(permit, verdict.reached_umeng);
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(e @ UmengError::Fail { .. }) if verdict.status == PushStatus::Failed => {
                if e.code() == Some("2050") {
                    "rate_limited"
                } else {
                    "failed"
                }
            }
            Err(e) => e.record_code(),
        };
        metrics::delivery_attempt(app_name, outcome);
        let latency_ms = latency.map(|l| i64::try_from(l.as_millis()).unwrap_or(i64::MAX));
        let e = match result {
            Ok(ok) => {
                count_final(app_name, &claim, verdict.metric);
                tracing::info!(push.id = %claim.push_id, umeng.msg_id = ok.msg_id.as_deref(), umeng.task_id = ok.task_id.as_deref(), attempt = claim.claim, "umeng accepted the push");
                self.finish_claim(
                    &claim,
                    Finish {
                        status: verdict.status,
                        umeng_request: sent_body,
                        umeng_response: Some(ok.raw),
                        msg_id: ok.msg_id,
                        task_id: ok.task_id,
                        file_id,
                        error_code: None,
                        error_msg: None,
                        http_status: StatusCode::CREATED.as_u16(),
                        latency_ms,
                        sent_at: Some(sent_at),
                        quota: QuotaAction::Keep,
                        attempts: calls,
                        claim: Some(claim.claim),
                    },
                )
                .await;
                return;
            }
            Err(e) => e,
        };
        let (code, msg) = umeng_code(&e);
        let now = OffsetDateTime::now_utc();
        let is_2050 = matches!(
            &e,
            UmengError::Fail {
                class: ErrorClass::Quota,
                ..
            }
        );
        if is_2050 && claim.quota_wait && claim.quota_kind.is_some() {
            tracing::info!(push.id = %claim.push_id, "umeng says the quota window is full; waiting for the next one");
            let retry = DeliveryRetry {
                status: PushStatus::AwaitingQuota,
                delay: Duration::ZERO,
                error_code: Some(code),
                error_msg: Some(msg),
                umeng_response: umeng_raw(&e),
                attempts: calls,
                refund: false,
            };
            self.retry_claim(&claim, retry).await;
            return;
        }
        let wait = delivery::backoff::full_jitter(
            settings.backoff_base_ms,
            settings.backoff_cap_ms,
            claim.claim,
        );
        let within_deadline = claim.deliver_by.is_none_or(|by| now + wait < by);
        if verdict.retryable && claim.claim < settings.max_attempts && within_deadline {
            tracing::info!(push.id = %claim.push_id, umeng.error_code = %code, attempt = claim.claim, retry_in_ms = wait.as_millis() as u64, "push not delivered; retrying later");
            let refund = verdict.quota == QuotaEffect::Refund;
            self.put_back(
                &claim,
                wait,
                calls,
                Some((code, msg, umeng_raw(&e))),
                refund,
            )
            .await;
            return;
        }
        tracing::warn!(push.id = %claim.push_id, umeng.error_code = %code, push.status = %verdict.status, attempt = claim.claim, "push delivery ended without success");
        count_final(app_name, &claim, verdict.metric);
        let umeng = UmengDetail {
            error_code: code.clone(),
            error_msg: msg.clone(),
            retryable: verdict.retryable,
        };
        let err = failure_error(&e, &verdict, umeng, &claim.push_id, app_name, None);
        let quota = quota_action(verdict.quota, claim.quota_kind, &app);
        self.finish_claim(
            &claim,
            Finish {
                status: verdict.status,
                umeng_request: sent_body,
                umeng_response: umeng_raw(&e),
                msg_id: None,
                task_id: None,
                file_id,
                error_code: Some(code),
                error_msg: Some(msg),
                http_status: err.status().as_u16(),
                latency_ms,
                sent_at: Some(sent_at),
                quota,
                attempts: calls,
                claim: Some(claim.claim),
            },
        )
        .await;
    }

    /// Back to `awaiting_send` after `wait`, with the last error if any.
    async fn put_back(
        &self,
        claim: &DeliveryClaim,
        wait: Duration,
        attempts: Vec<Attempt>,
        error: Option<(String, String, Option<Value>)>,
        refund: bool,
    ) {
        let (error_code, error_msg, umeng_response) = match error {
            Some((code, msg, raw)) => (Some(code), Some(msg), raw),
            None => (None, None, None),
        };
        let retry = DeliveryRetry {
            status: PushStatus::AwaitingSend,
            delay: wait,
            error_code,
            error_msg,
            umeng_response,
            attempts,
            refund,
        };
        self.retry_claim(claim, retry).await;
    }

    async fn retry_claim(&self, claim: &DeliveryClaim, retry: DeliveryRetry) {
        let refund = retry.refund;
        let recorded = self.store.retry_delivery(claim, retry).await;
        if refund {
            self.slot_returned(&claim.appkey, claim.quota_kind);
        }
        match recorded {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(push.id = %claim.push_id, "the push's delivery claim was taken over (its lease ran out); this attempt's record was dropped")
            }
            // The lease runs out and the push is recovered: re-sent if task-class (Umeng
            // dedupes it), else unknown.
            Err(e) => {
                tracing::error!(push.id = %claim.push_id, error = %e, "recording a delivery attempt failed; the lease will run out")
            }
        }
    }

    /// Record a claimed push's final outcome, retried while the database is unreachable
    /// (as for synchronous pushes).
    async fn finish_claim(&self, claim: &DeliveryClaim, finish: Finish) {
        let recorder = Recorder {
            gateway: self,
            push_id: &claim.push_id,
            admitted_at: tokio::time::Instant::now(),
            slot: (&claim.appkey, claim.quota_kind),
        };
        recorder.finish(finish).await;
        if let Some(parent) = &claim.parent_id {
            self.settle_parent_of(parent).await;
        }
    }

    /// Run `work` as a tracked task: shutdown ([`Gateway::drain`]) waits for it.
    pub fn spawn_tracked<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        // Boxed, as in [`Gateway::create_push`].
        self.tasks.spawn(Box::pin(work));
    }

    /// Outcomes whose record is still being retried (the database was unreachable).
    pub fn unrecorded_outcomes(&self) -> usize {
        self.unrecorded.load(Ordering::Relaxed)
    }

    /// Wait for admitted pushes and outcome records still running (after the HTTP server
    /// stopped), until `deadline`. Returns how many were left unfinished.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> usize {
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            let left = self.tasks.len();
            tracing::error!(
                tasks = left,
                outcomes.unrecorded = self.unrecorded_outcomes(),
                "shutdown deadline reached with pushes or outcome records unfinished; their rows stay pending and the sweeper marks them unknown"
            );
            return left;
        }
        0
    }
}

/// The quota action for a verdict's effect on a push counted in `kind`'s bucket (2050
/// saturates that bucket's window; a push counted nowhere keeps nothing to act on).
fn quota_action(effect: QuotaEffect, kind: Option<QuotaKind>, app: &AppRuntime) -> QuotaAction {
    match (effect, kind) {
        (QuotaEffect::Keep, _) => QuotaAction::Keep,
        (QuotaEffect::Refund, _) => QuotaAction::Refund,
        (QuotaEffect::Saturate, Some(kind)) => QuotaAction::Saturate(app.app.quotas[&kind].window),
        (QuotaEffect::Saturate, None) => QuotaAction::Keep,
    }
}

/// A 429 for a full window, counted as the gateway's own refusal.
fn rate_limited(app: &AppRuntime, quota: QuotaState) -> Admitted {
    metrics::quota_rejection(&app.app.name, quota.kind.as_str(), false);
    Admitted::Answer(
        PushOutcome::RateLimited,
        Err(ApiError::RateLimited {
            retry_after: quota.reset_after_secs.max(1),
            quota: Some(quota),
            app: app.app.name.clone(),
            from_umeng: false,
            push_id: None,
        }),
    )
}

/// Counts a claimed push's final outcome in `pushes_total`.
fn count_final(app: &str, claim: &DeliveryClaim, outcome: PushOutcome) {
    metrics::push(app, &claim.cast_type, outcome);
}

/// A definite failure of a claimed push decided without calling Umeng.
fn failed_finish(claim: &DeliveryClaim, code: &str, msg: &str, attempts: Vec<Attempt>) -> Finish {
    Finish {
        status: PushStatus::Failed,
        umeng_request: None,
        umeng_response: None,
        msg_id: None,
        task_id: None,
        file_id: None,
        error_code: Some(code.to_owned()),
        error_msg: Some(msg.to_owned()),
        http_status: StatusCode::INTERNAL_SERVER_ERROR.as_u16(),
        latency_ms: None,
        sent_at: None,
        quota: QuotaAction::Refund,
        attempts,
        claim: Some(claim.claim),
    }
}

/// The error answer for an Umeng call that did not succeed (the synchronous answer, and
/// the HTTP status an asynchronous push records).
fn failure_error(
    e: &UmengError,
    verdict: &Verdict,
    umeng: UmengDetail,
    push_id: &str,
    app: &str,
    quota: Option<QuotaState>,
) -> ApiError {
    let code = &umeng.error_code;
    let msg = &umeng.error_msg;
    let push_id = Some(push_id.to_owned());
    match e {
        UmengError::Fail {
            class: ErrorClass::Quota,
            ..
        } => ApiError::RateLimited {
            quota,
            app: app.to_owned(),
            from_umeng: true,
            retry_after: 60,
            push_id,
        },
        UmengError::Fail { .. } if verdict.status == PushStatus::Unknown => ApiError::Upstream {
            detail: format!("Umeng answered FAIL {code} (an internal error): {msg}; the push may or may not have been queued and is recorded as unknown"),
            umeng,
            push_id,
        },
        UmengError::Fail { .. } => ApiError::Upstream {
            detail: format!("Umeng answered FAIL {code}: {msg}"),
            umeng,
            push_id,
        },
        UmengError::NotSent { .. } => ApiError::Upstream {
            detail: format!("Umeng could not be reached, nothing was sent: {msg}"),
            umeng,
            push_id,
        },
        UmengError::Unknown { timed_out: true, .. } => ApiError::UpstreamTimeout {
            detail: format!("Umeng did not answer ({msg}); the push may or may not have been delivered and is recorded as unknown"),
            umeng,
            push_id,
        },
        UmengError::Unknown { .. } => ApiError::UpstreamUnclear {
            detail: format!("Umeng's answer could not be used ({msg}); the push may or may not have been accepted and is recorded as unknown"),
            umeng,
            push_id,
        },
    }
}

/// The record of one Umeng call: `done` calls were made before it.
fn attempt(
    call: &str,
    done: usize,
    started_at: OffsetDateTime,
    latency: Duration,
    error: Option<&UmengError>,
) -> Attempt {
    let (outcome, error_code) = match error {
        None => ("accepted".to_owned(), None),
        Some(e @ UmengError::Fail { .. }) => ("failed".to_owned(), e.code().map(str::to_owned)),
        // not_sent, timeout or unknown: the same code the push's record gets.
        Some(e) => (e.record_code().to_owned(), None),
    };
    Attempt {
        number: u32::try_from(done + 1).unwrap_or(u32::MAX),
        call: call.to_owned(),
        started_at,
        outcome,
        error_code,
        latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
    }
}

/// What admission decided. Short-lived (returned once per request), so the size of the
/// answer variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Admitted {
    /// Go ahead and send.
    Go {
        push_id: String,
        quota: Option<QuotaState>,
    },
    /// Answer without sending (replay, 409, 422 mismatch, 429).
    Answer(PushOutcome, Result<PushAnswer, ApiError>),
}

/// A file_id for `file_lines` content.
struct Upload {
    file_id: String,
    /// Hex SHA-256 of the content (the reuse key).
    sha256: String,
    /// Taken from an earlier upload rather than uploaded now.
    reused: bool,
}

/// Umeng's code for "the file of this file_id does not exist".
const FILE_NOT_FOUND: &str = "2019";

/// Records one push's outcome.
struct Recorder<'a> {
    gateway: &'a Gateway,
    push_id: &'a str,
    admitted_at: tokio::time::Instant,
    /// The appkey and the bucket the push counts in, if any: a refund reopens its window.
    slot: (&'a str, Option<QuotaKind>),
}

impl Recorder<'_> {
    /// Record the outcome (the Umeng call already happened, so it must not be lost). If
    /// the database is unreachable the caller gets the real outcome anyway and the record
    /// keeps being retried in the background (backing off to 5 s) until
    /// [`Recorder::deadline`] after admission. A record that lands after the sweeper marked
    /// the row `unknown` replaces that guess (unless a retry took the key over meanwhile).
    /// A slot given back reopens its window in this replica's memory once recorded (or
    /// handed to the background retries).
    async fn finish(&self, finish: Finish) {
        let refund = finish.quota == QuotaAction::Refund;
        self.record(finish).await;
        if refund {
            self.gateway.slot_returned(self.slot.0, self.slot.1);
        }
    }

    async fn record(&self, finish: Finish) {
        let push_id = self.push_id;
        let finish = Arc::new(finish);
        let e = match self
            .gateway
            .store
            .finish(push_id, Arc::clone(&finish))
            .await
        {
            Ok(true) => return,
            Ok(false) => return not_recorded(push_id, &finish),
            Err(e) => e,
        };
        tracing::error!(push.id = %push_id, error = %e, "recording the push outcome failed; retrying in the background");
        let store = Arc::clone(&self.gateway.store);
        let push_id = push_id.to_string();
        let deadline = self.admitted_at + self.deadline();
        let gateway_unrecorded = Arc::clone(&self.gateway.unrecorded);
        gateway_unrecorded.fetch_add(1, Ordering::Relaxed);
        self.gateway.tasks.spawn(
            async move {
                let mut delay = Duration::from_millis(100);
                loop {
                    if tokio::time::Instant::now() + delay >= deadline {
                        tracing::error!(push.id = %push_id, status = %finish.status, "gave up recording the push outcome: it is lost, and the row stays as the sweeper leaves it");
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    match store.finish(&push_id, Arc::clone(&finish)).await {
                        Ok(true) => {
                            tracing::info!(push.id = %push_id, "push outcome recorded after a retry");
                            break;
                        }
                        Ok(false) => {
                            not_recorded(&push_id, &finish);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(push.id = %push_id, error = %e, "recording the push outcome failed again")
                        }
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                gateway_unrecorded.fetch_sub(1, Ordering::Relaxed);
            }
            .in_current_span(),
        );
    }

    /// How long after admission an outcome record is retried: twice the pending timeout,
    /// and at least ten minutes. Past the pending timeout the sweeper has marked the row
    /// `unknown`; a record that lands later still replaces that guess.
    fn deadline(&self) -> Duration {
        let pending = self.gateway.config.settings.history.pending_timeout_secs;
        Duration::from_secs(pending.saturating_mul(2).max(600))
    }
}

/// The row was no longer waiting for this outcome: a retry took its key over after the
/// sweeper marked it unknown. The outcome is in the log only.
fn not_recorded(push_id: &str, finish: &Finish) {
    let why = if finish.claim.is_some() {
        "the delivery worker's lease ran out and the push was claimed again (a task-class re-send, which Umeng dedupes), or it was already recorded"
    } else {
        "the row was marked unknown and its out_biz_no has since been taken over by a retry"
    };
    tracing::error!(
        push.id = %push_id,
        status = %finish.status,
        umeng.error_code = ?finish.error_code,
        "the push outcome was not recorded: {why}"
    );
}

/// The stored answer for a repeat of a known request. An `unknown` outcome (a unicast-class
/// push that may or may not have reached Umeng: it is never sent again) is answered 409
/// `outcome-unknown`, not the 502/504 of the first answer: a client or proxy that retries
/// 5xx would otherwise loop on it for the key's whole lifetime.
pub fn replay(push: &PushRecord) -> Result<PushAnswer, ApiError> {
    if push.status == PushStatus::Unknown {
        return Err(ApiError::OutcomeUnknown {
            push_id: push.id.clone(),
            out_biz_no: push.out_biz_no.clone().unwrap_or_default(),
        });
    }
    // An asynchronous push not sent yet (or being sent) is still accepted for delivery.
    let not_final = push.status.is_waiting() || push.status == PushStatus::Pending;
    let status = if push.delivery == DeliveryMode::Async && not_final {
        StatusCode::ACCEPTED
    } else {
        push.http_status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .filter(StatusCode::is_success)
            .unwrap_or(StatusCode::OK)
    };
    Ok(PushAnswer {
        status,
        push: PushView::from_record(push),
        replayed: true,
        quota: None,
        async_applied: false,
    })
}

fn umeng_code(e: &UmengError) -> (String, String) {
    let message = match e {
        UmengError::Fail { message, .. } => message,
        UmengError::NotSent { reason } | UmengError::Unknown { reason, .. } => reason,
    };
    (e.record_code().to_owned(), message.clone())
}

/// Whatever Umeng answered (a FAIL envelope, or a SUCCESS that could not be used).
fn umeng_raw(e: &UmengError) -> Option<Value> {
    match e {
        UmengError::Fail { raw, .. } => Some(raw.clone()),
        UmengError::Unknown { raw, .. } => raw.clone(),
        UmengError::NotSent { .. } => None,
    }
}
