//! The send pipeline: validate, admit (quota + idempotency claim + pending row, atomically),
//! upload `file_lines`, sign and send to Umeng, record the outcome, answer.
//!
//! Everything after admission runs in a spawned task, so a caller that disconnects (or a
//! request timeout) cannot cut a push in half: the Umeng call and its record always finish.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use sha2::Digest;
use time::OffsetDateTime;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{App, Config};
use crate::delivery::outcome::QuotaEffect;
use crate::delivery::{self, Breaker, BreakerConfig};
use crate::error::{ApiError, UmengDetail};
use crate::metrics::{self, PushOutcome};
use crate::push::{AppProfile, PreparedPush, PushRequest};
use crate::quota::QuotaState;
use crate::store::{
    Admission, Attempt, Finish, NewPush, PushRecord, PushStatus, QuotaAction, QuotaClaim, Store,
};
use crate::umeng::{AppCredentials, ErrorClass, SendAttempt, UmengClient, UmengError};

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
        let breaker = Breaker::new(BreakerConfig {
            failures: config.settings.umeng.breaker_failures,
            cooldown: Duration::from_secs(config.settings.umeng.breaker_cooldown_secs),
        });
        Gateway {
            config,
            store,
            umeng,
            apps,
            tasks: TaskTracker::new(),
            breaker,
            unrecorded: Arc::new(AtomicUsize::new(0)),
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
        if let Some(url) = &req.callback_url {
            let caller = self.config.clients.iter().find(|c| c.name == client);
            crate::callbacks::check_url(caller, url).map_err(|e| {
                metrics::push(&app.app.name, req.cast_type.as_str(), PushOutcome::Invalid);
                ApiError::Validation(vec![e])
            })?;
        }
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
        self.tasks
            .spawn(work.in_current_span())
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
        };

        // Every Umeng call made for this push, recorded with its outcome.
        let mut calls = Vec::new();
        // A token file given inline is uploaded first (or an identical earlier upload reused).
        let upload = prepared.upload_content.take();
        let mut file = None;
        if let Some(content) = &upload {
            match self.upload(&app, content, &mut calls).await {
                Ok(uploaded) => {
                    prepared.set_file_id(&uploaded.file_id);
                    file = Some(uploaded);
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
                        })
                        .await;
                    return Err(err);
                }
            }
        }

        let sent_at = OffsetDateTime::now_utc();
        let mut attempt = self.send(&app, &prepared, &mut calls).await;
        if let (Some(content), Some(uploaded)) = (&upload, &file) {
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
                    .upload_fresh(&app, content, &uploaded.sha256, &mut calls)
                    .await
                {
                    Ok(id) => {
                        prepared.set_file_id(&id);
                        file = Some(Upload {
                            file_id: id,
                            sha256: uploaded.sha256.clone(),
                            reused: false,
                        });
                        attempt = self.send(&app, &prepared, &mut calls).await;
                    }
                    Err(e) => {
                        // Nothing more was sent: the push failed with Umeng's 2019.
                        tracing::warn!(push.id = %push_id, error = %e, "uploading the file again failed");
                    }
                }
            }
        }
        let file_id = file.map(|f| f.file_id);
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
            attempts: calls,
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
        // A task-class retry carrying the same out_biz_no is deduped by Umeng; anything else
        // sent again may reach the devices twice.
        let dedupes = prepared.task_class && prepared.out_biz_no.is_some();
        let result = delivery::outcome::missing_task_id(attempt.result, prepared.task_class);
        let verdict = delivery::classify(&result, dedupes);
        self.breaker.record(permit, verdict.reached_umeng);
        count(verdict.metric);
        let e = match result {
            Ok(ok) => {
                tracing::info!(push.id = %push_id, umeng.msg_id = ?ok.msg_id, umeng.task_id = ?ok.task_id, umeng.latency_ms = attempt.latency.as_millis() as u64, "umeng accepted the push");
                recorder
                    .finish(Finish {
                        status: verdict.status,
                        umeng_response: Some(ok.raw.clone()),
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
        let push_id_field = Some(push_id.clone());
        let mut err = match &e {
            UmengError::Fail {
                class: ErrorClass::Quota,
                ..
            } => ApiError::RateLimited {
                quota: quota_state,
                app: app.app.name.clone(),
                from_umeng: true,
                retry_after: 60,
                push_id: push_id_field,
            },
            UmengError::Fail { .. } if verdict.status == PushStatus::Unknown => ApiError::Upstream {
                detail: format!("Umeng answered FAIL {code} (an internal error): {msg}; the push may or may not have been queued and is recorded as unknown"),
                umeng,
                push_id: push_id_field,
            },
            UmengError::Fail { .. } => ApiError::Upstream {
                detail: format!("Umeng answered FAIL {code}: {msg}"),
                umeng,
                push_id: push_id_field,
            },
            UmengError::NotSent { .. } => ApiError::Upstream {
                detail: format!("Umeng could not be reached, nothing was sent: {msg}"),
                umeng,
                push_id: push_id_field,
            },
            UmengError::Unknown { timed_out: true, .. } => ApiError::UpstreamTimeout {
                detail: format!("Umeng did not answer ({msg}); the push may or may not have been delivered and is recorded as unknown"),
                umeng,
                push_id: push_id_field,
            },
            UmengError::Unknown { .. } => ApiError::UpstreamUnclear {
                detail: format!("Umeng's answer could not be used ({msg}); the push may or may not have been accepted and is recorded as unknown"),
                umeng,
                push_id: push_id_field,
            },
        };
        let quota_kind = prepared.counted_quota();
        let quota_action = match (verdict.quota, quota_kind) {
            (QuotaEffect::Keep, _) => QuotaAction::Keep,
            (QuotaEffect::Refund, _) => QuotaAction::Refund,
            (QuotaEffect::Saturate, Some(kind)) => {
                QuotaAction::Saturate(app.app.quotas[&kind].window)
            }
            (QuotaEffect::Saturate, None) => QuotaAction::Keep,
        };
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
                }
                Admitted::Go { push_id, quota }
            }
            Admission::RateLimited { quota } => {
                metrics::quota_rejection(app_name, &quota.kind.to_string(), false);
                metrics::quota_remaining(app_name, &quota);
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
        prepared: &PreparedPush,
        calls: &mut Vec<Attempt>,
    ) -> SendAttempt {
        let first = self.send_once(app, prepared, calls).await;
        match &first.result {
            Err(UmengError::NotSent { reason }) => {
                tracing::info!(error = %reason, "the send reached nothing; trying once more");
                let mut second = self.send_once(app, prepared, calls).await;
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
        prepared: &PreparedPush,
        calls: &mut Vec<Attempt>,
    ) -> SendAttempt {
        let started_at = OffsetDateTime::now_utc();
        let sent = self.umeng.send(&app.credentials, &prepared.body).await;
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

/// What admission decided.
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
}

impl Recorder<'_> {
    /// Record the outcome (the Umeng call already happened, so it must not be lost). If
    /// the database is unreachable the caller gets the real outcome anyway and the record
    /// keeps being retried in the background (backing off to 5 s) until
    /// [`Recorder::deadline`] after admission. A record that lands after the sweeper marked
    /// the row `unknown` replaces that guess (unless a retry took the key over meanwhile).
    async fn finish(&self, finish: Finish) {
        let push_id = self.push_id;
        let e = match self.gateway.store.finish(push_id, finish.clone()).await {
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
                    match store.finish(&push_id, finish.clone()).await {
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
    tracing::error!(
        push.id = %push_id,
        status = %finish.status,
        umeng.error_code = ?finish.error_code,
        "the push outcome was not recorded: the row was marked unknown and its out_biz_no has since been taken over by a retry"
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
    let status = push
        .http_status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(StatusCode::is_success)
        .unwrap_or(StatusCode::OK);
    Ok(PushAnswer {
        status,
        push: PushView::from_record(push),
        replayed: true,
        quota: None,
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
