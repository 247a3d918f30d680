//! Intake of a push that becomes several Umeng calls (an app group, or a list longer than
//! 500): plan the parts, validate and translate each for its app, admit the parent with
//! every part (quota slots all or nothing), and answer: 202 at once when asynchronous,
//! else once every part has its outcome (or 202 when that takes longer than the request
//! may wait). The delivery worker sends the parts; the last part to end settles the parent.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Map, Value};
use sha2::Digest;
use time::OffsetDateTime;
use tracing::Instrument;

use super::{AppRuntime, Gateway, PushAnswer, PushView};
use crate::error::ApiError;
use crate::metrics::{self, PushOutcome};
use crate::push::fanout::{self, PartPlan};
use crate::push::{PreparedPush, PushRequest};
use crate::store::{
    AsyncDelivery, NewPart, NewPush, PartsAdmission, PushRecord, PushStatus, QuotaClaim,
};
use crate::umeng::FieldError;

/// A push's audience: one app, or an app group's members.
pub struct Audience<'a> {
    /// What the caller named in `app`.
    pub name: &'a str,
    /// Whether that is a group.
    pub group: bool,
    pub members: Vec<&'a AppRuntime>,
}

/// One part, validated and translated.
struct Prepared<'a> {
    plan: PartPlan,
    app: &'a AppRuntime,
    push: PreparedPush,
}

impl Gateway {
    /// Validate, admit and (unless asynchronous) wait for a push with parts.
    pub async fn create_parent_push(
        self: &Arc<Self>,
        client: &str,
        audience: Audience<'_>,
        req: PushRequest,
        raw: Value,
        respond_async: bool,
    ) -> Result<PushAnswer, ApiError> {
        let invalid = |errors| {
            metrics::push(audience.name, req.cast_type.as_str(), PushOutcome::Invalid);
            ApiError::Validation(errors)
        };
        if let Some(url) = &req.callback_url {
            let caller = self.config.clients.iter().find(|c| c.name == client);
            crate::callbacks::check_url(caller, url).map_err(|e| invalid(vec![e]))?;
        }
        let now = OffsetDateTime::now_utc();
        let parts = self.prepare_parts(&req, &audience, now).map_err(invalid)?;
        let asynchronous = respond_async || parts.iter().any(|p| p.push.send_at.is_some());
        self.check_parts_async(&parts, asynchronous, now)
            .map_err(|e| invalid(vec![e]))?;
        if !asynchronous {
            // As for one synchronous push: while Umeng is unreachable nothing is stored,
            // and the caller hears it at once instead of waiting for the parts.
            match self.breaker.try_call() {
                Ok(permit) => self.breaker.release(permit),
                Err(wait) => {
                    metrics::push(
                        audience.name,
                        req.cast_type.as_str(),
                        PushOutcome::Unavailable,
                    );
                    return Err(ApiError::UmengUnavailable {
                        retry_after: wait.as_secs().max(1),
                    });
                }
            }
        }

        let parent_id = uuid::Uuid::now_v7().to_string();
        let (mut parent, new_parts) =
            self.parent_rows(client, &audience, &req, raw, &parent_id, parts, now);
        parent.delivery = self.gate(&new_parts, now);
        let name = audience.name.to_owned();
        let cast_type = req.cast_type;
        let this = Arc::clone(self);
        // Admission runs to completion even if the caller goes away.
        let admitted = self
            .tasks
            .spawn(async move { this.store.admit_parts(parent, new_parts).await }.in_current_span())
            .await
            .map_err(|e| ApiError::Internal(format!("admission task failed: {e}")))?
            .map_err(|e| match e {
                crate::store::StoreError::Unavailable(m) => {
                    ApiError::Unavailable(format!("cannot record the push, nothing was sent: {m}"))
                }
                other => ApiError::Internal(other.to_string()),
            })?;
        let count = |outcome| metrics::push(&name, cast_type.as_str(), outcome);
        let (push_id, resent) = match admitted {
            PartsAdmission::Admitted {
                push_id,
                resent,
                quotas,
            } => {
                for (app, q) in &quotas {
                    metrics::quota_remaining(app, q);
                }
                (push_id, resent)
            }
            PartsAdmission::RateLimited { app, quota } => {
                count(PushOutcome::RateLimited);
                metrics::quota_rejection(&app, quota.kind.as_str(), false);
                metrics::quota_remaining(&app, &quota);
                return Err(ApiError::RateLimited {
                    retry_after: quota.reset_after_secs.max(1),
                    quota: Some(quota),
                    app,
                    from_umeng: false,
                    push_id: None,
                });
            }
            PartsAdmission::Replay { push } => {
                count(PushOutcome::Replayed);
                return parent_answer(&push, true, Vec::new(), respond_async, false);
            }
            PartsAdmission::InFlight { push_id } => {
                count(PushOutcome::InFlight);
                return Err(ApiError::InFlight {
                    out_biz_no: req.out_biz_no.clone().unwrap_or_default(),
                    push_id,
                });
            }
            PartsAdmission::Mismatch { push_id } => {
                count(PushOutcome::Mismatch);
                return Err(ApiError::IdempotencyMismatch {
                    out_biz_no: req.out_biz_no.clone().unwrap_or_default(),
                    push_id,
                });
            }
        };
        count(PushOutcome::Queued);
        self.delivery_wake.any();
        if resent.is_empty() {
            tracing::info!(push.id = %push_id, "push with parts stored for delivery");
        } else {
            tracing::info!(push.id = %push_id, parts = ?resent, "re-sending the parts of a repeat that had failed");
        }
        let record = if asynchronous {
            self.store.get_push(&push_id).await?
        } else {
            self.wait_settled(&push_id).await?
        };
        let record =
            record.ok_or_else(|| ApiError::Internal(format!("push {push_id} vanished")))?;
        // Stored for delivery: 202 even if the delivery worker settled it before the record
        // above was read.
        parent_answer(&record, false, resent, respond_async, asynchronous)
    }

    /// Plans the parts and prepares each for its app; every error, by the caller's path.
    fn prepare_parts<'a>(
        &self,
        req: &PushRequest,
        audience: &Audience<'a>,
        now: OffsetDateTime,
    ) -> Result<Vec<Prepared<'a>>, Vec<FieldError>> {
        let profiles: Vec<_> = audience.members.iter().map(|a| &a.profile).collect();
        let max = self.config.settings.delivery.max_audience;
        let plans = fanout::plan(req, audience.group, &profiles, max)?;
        let mut errors: Vec<FieldError> = Vec::new();
        let mut parts = Vec::with_capacity(plans.len());
        for plan in plans {
            let app = audience.members[plan.member];
            match crate::push::prepare(&plan.request, &app.profile, now) {
                Ok(push) => parts.push(Prepared { plan, app, push }),
                Err(found) => {
                    for e in found {
                        let e = fanout::caller_error(e, &plan, &app.app.name, audience.group);
                        // A shared field broken in every part is named once.
                        if !errors
                            .iter()
                            .any(|x| x.field == e.field && x.message == e.message)
                        {
                            errors.push(e);
                        }
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(parts)
        } else {
            errors.truncate(50);
            Err(errors)
        }
    }

    /// `send_at` and `on_quota_exhausted` for parts (the rules of one push, per part).
    fn check_parts_async(
        &self,
        parts: &[Prepared<'_>],
        asynchronous: bool,
        now: OffsetDateTime,
    ) -> Result<(), FieldError> {
        for part in parts {
            self.check_async_fields(&part.push, asynchronous, now)?;
        }
        Ok(())
    }

    /// A parent whose parts count against a quota and that is held (`send_at`) or may
    /// wait for quota waits as a whole: every part's slot is taken together when it is
    /// due, in that moment's windows, so either every member sends or none does.
    fn gate(&self, parts: &[NewPart], now: OffsetDateTime) -> Option<AsyncDelivery> {
        let counted = parts.iter().any(|p| p.quota.is_some());
        let deliveries: Vec<&AsyncDelivery> = parts
            .iter()
            .filter_map(|p| p.push.delivery.as_ref())
            .collect();
        let hold = deliveries.iter().any(|d| d.hold);
        let wait = deliveries.iter().any(|d| d.quota_wait);
        if !counted || !(hold || wait) {
            return None;
        }
        let deliver_by = deliveries.iter().map(|d| d.deliver_by).min().unwrap_or(now);
        Some(AsyncDelivery {
            outbox: Value::Null,
            hold,
            deliver_by,
            quota_wait: wait,
            defer_quota: true,
        })
    }

    /// The parent row and the part rows.
    #[allow(clippy::too_many_arguments)]
    fn parent_rows(
        &self,
        client: &str,
        audience: &Audience<'_>,
        req: &PushRequest,
        raw: Value,
        parent_id: &str,
        parts: Vec<Prepared<'_>>,
        now: OffsetDateTime,
    ) -> (NewPush, Vec<NewPart>) {
        let mut platforms: Vec<&str> = parts.iter().map(|p| p.app.app.platform.as_str()).collect();
        platforms.dedup();
        let platform = if platforms.len() == 1 {
            platforms[0].to_owned()
        } else {
            "all".to_owned()
        };
        let appkey = if audience.group {
            format!("group:{}", audience.name)
        } else {
            audience.members[0].app.appkey.clone()
        };
        let task_class = parts.iter().any(|p| p.push.task_class);
        let production_mode = req.production_mode.unwrap_or(true);
        // The parent's fingerprint: every part's (its Umeng body and gateway fields), the
        // audience's name, the key and the callback.
        let mut hash = sha2::Sha256::new();
        hash.update(audience.name.as_bytes());
        hash.update([0]);
        hash.update(req.out_biz_no.as_deref().unwrap_or("").as_bytes());
        hash.update([0]);
        hash.update(req.callback_url.as_deref().unwrap_or("").as_bytes());
        for p in &parts {
            hash.update([0]);
            hash.update(p.push.fingerprint.as_bytes());
        }
        let fingerprint = hex::encode(hash.finalize());
        let send_at = parts
            .iter()
            .filter_map(|p| p.push.send_at.or(p.push.start_time))
            .min();
        let parent = NewPush {
            id: parent_id.to_owned(),
            app: audience.name.to_owned(),
            appkey,
            platform,
            cast_type: req.cast_type.as_str().to_owned(),
            task_class,
            production_mode,
            client: client.to_owned(),
            out_biz_no: req.out_biz_no.clone(),
            fingerprint,
            request: raw,
            description: req.description.clone(),
            send_at,
            delivery: None,
        };
        let new_parts = parts
            .into_iter()
            .map(|p| {
                let id = uuid::Uuid::now_v7().to_string();
                // Each task-class part carries its own key upstream, so Umeng dedupes a
                // re-send of that part and no other: `<parent's out_biz_no>/<n>` ('/' is
                // not allowed in callers' keys, so it never equals one), or the part's id.
                let key = p.push.task_class.then(|| match &req.out_biz_no {
                    Some(k) => format!("{k}/{}", p.plan.part_no),
                    None => format!("umgw-{id}"),
                });
                let quota = match (p.push.production_mode, p.push.quota_kind) {
                    (true, Some(kind)) => Some(QuotaClaim {
                        kind,
                        limit: p.app.app.quotas[&kind],
                    }),
                    _ => None,
                };
                let mut delivery = self.async_delivery(&id, &p.push, None, now);
                if let Some(key) = &key {
                    set_out_biz_no(&mut delivery.outbox, key);
                }
                NewPart {
                    push: NewPush {
                        id,
                        app: p.app.app.name.clone(),
                        appkey: p.app.app.appkey.clone(),
                        platform: p.app.app.platform.as_str().to_owned(),
                        cast_type: p.push.cast_type.as_str().to_owned(),
                        task_class: p.push.task_class,
                        production_mode: p.push.production_mode,
                        client: client.to_owned(),
                        out_biz_no: key,
                        fingerprint: p.push.fingerprint.clone(),
                        request: json!({
                            "parent": parent_id,
                            "part": p.plan.part_no,
                            "app": p.app.app.name,
                            "audience": p.plan.audience,
                        }),
                        description: p.push.description.clone(),
                        send_at: p.push.send_at.or(p.push.start_time),
                        delivery: Some(delivery),
                    },
                    part_no: p.plan.part_no,
                    audience: p.plan.audience,
                    quota,
                }
            })
            .collect();
        (parent, new_parts)
    }

    /// Waits until the parent is settled, at most until the request would time out (then
    /// the caller gets 202 and the parent's current state).
    async fn wait_settled(&self, push_id: &str) -> Result<Option<PushRecord>, ApiError> {
        let limit = self
            .config
            .settings
            .server
            .request_timeout_secs
            .saturating_sub(2)
            .max(1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(limit);
        loop {
            let settled = self.parents_settled.notified();
            let record = self.store.get_push(push_id).await?;
            let waiting = record
                .as_ref()
                .is_some_and(|r| r.status == PushStatus::Pending);
            if !waiting || tokio::time::Instant::now() >= deadline {
                return Ok(record);
            }
            // Settled here (a notification), or by another replica's worker (the poll).
            let _ = tokio::time::timeout(Duration::from_millis(250), settled).await;
        }
    }

    /// After a part's outcome is recorded: settle its parent if that was the last part.
    pub(super) async fn settle_parent_of(&self, parent_id: &str) {
        match self.store.settle_parent(parent_id).await {
            Ok(Some(status)) => {
                tracing::info!(push.id = %parent_id, push.status = %status, "every part has its outcome");
                self.parents_settled.notify_waiters();
            }
            Ok(None) => {}
            // The worker's upkeep settles it later.
            Err(e) => {
                tracing::warn!(push.id = %parent_id, error = %e, "settling the parent failed; the upkeep will")
            }
        }
    }

    /// Settle a parent now if every part has its outcome (after a cancel withdrew parts).
    pub async fn settle_parent_now(&self, parent_id: &str) {
        self.settle_parent_of(parent_id).await;
    }

    /// Release due parents that wait as a whole (held, or waiting for quota): their parts
    /// go to the delivery queue, or they wait on, or fail.
    pub async fn release_parents(&self) {
        match self.store.release_parents(100).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(parents = n, "due parents released (or rescheduled)");
                self.delivery_wake.any();
                self.parents_settled.notify_waiters();
            }
            Err(e) => tracing::warn!(error = %e, "releasing due parents failed"),
        }
    }

    /// Settle parents whose parts ended without their worker settling them (deadlines,
    /// recovered leases, withdrawals, a settle that failed).
    pub async fn settle_parents(&self) {
        match self.store.settle_parents(100).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(parents = n, "settled parents whose parts all ended");
                self.parents_settled.notify_waiters();
            }
            Err(e) => tracing::warn!(error = %e, "settling parents failed"),
        }
    }
}

/// Puts `key` in the outbox body's `policy.out_biz_no`.
fn set_out_biz_no(outbox: &mut Value, key: &str) {
    let Some(body) = outbox.get_mut("body").and_then(Value::as_object_mut) else {
        return;
    };
    let policy = body
        .entry("policy")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(policy) = policy.as_object_mut() {
        policy.insert("out_biz_no".into(), Value::String(key.to_owned()));
    }
}

/// The answer for a parent: 202 while parts are in progress, or when this request `queued`
/// it for asynchronous delivery; once settled, the status stored with its outcome (201
/// accepted, 207 partial, the parts' error status when every part failed); a repeat of an
/// `unknown` parent is 409 `outcome-unknown`, as for one push.
pub fn parent_answer(
    push: &PushRecord,
    replayed: bool,
    resent: Vec<u32>,
    respond_async: bool,
    queued: bool,
) -> Result<PushAnswer, ApiError> {
    if replayed && push.status == PushStatus::Unknown {
        return Err(ApiError::OutcomeUnknown {
            push_id: push.id.clone(),
            out_biz_no: push.out_biz_no.clone().unwrap_or_default(),
        });
    }
    let status = if queued || push.status == PushStatus::Pending || push.status.is_waiting() {
        StatusCode::ACCEPTED
    } else {
        push.http_status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK)
    };
    let mut view = PushView::from_record(push);
    view.resent_parts = resent;
    Ok(PushAnswer {
        status,
        push: view,
        replayed,
        quota: None,
        async_applied: respond_async && status == StatusCode::ACCEPTED,
    })
}
