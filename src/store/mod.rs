//! Persistence: one trait, a PostgreSQL and a SQLite implementation.
//!
//! Every push is a row (`pushes`), written before Umeng is called. Idempotency claims
//! (`idempotency_keys`, keyed by appkey + out_biz_no) point at the push that owns the key.
//! Quota counters (`quota_counters`, keyed by appkey + kind + window start) are updated by a
//! guarded upsert inside the same atomic admission, so the count is exact across replicas.
//! Nothing here holds a transaction or a pooled connection across an Umeng call.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::quota::{QuotaKind, QuotaLimit, QuotaState, WindowUnit};

mod batch;
pub mod callbacks;
pub mod parts;
mod pg_batch;
pub mod postgres;
pub mod sqlite;
mod sqlite_batch;

pub use callbacks::{CallbackAttempt, CallbackClaim, CallbackEvent, CallbackNext, CallbackState};
pub use parts::{NewPart, PartsAdmission, PushPart};

/// Errors from the store. The message never carries a secret (the database URL's password
/// is not part of any error produced here).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("invalid database url: {0}")]
    BadUrl(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The life of a push. Stored as the lower-case string of [`PushStatus::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PushStatus {
    /// Recorded, Umeng call in flight (or the process died during it).
    Pending,
    /// Umeng answered SUCCESS with a msg_id or task_id.
    Accepted,
    /// Definitely not sent: Umeng answered FAIL, or the request never left.
    Failed,
    /// Sent, but no answer (timeout, reset, 5xx): Umeng may or may not have it.
    Unknown,
    // Task states, from /api/status (task-class pushes only).
    /// 0: queued.
    Queued,
    /// 1: sending.
    Sending,
    /// 2: done.
    Done,
    /// 3: Umeng failed to send the task.
    SendFailed,
    /// 4: cancelled.
    Cancelled,
    /// 5: expired.
    Expired,
    /// 6: the filter matched nobody.
    NoMatch,
    /// 7: scheduled, start_time not reached yet.
    Scheduled,
    /// The gateway's own state, not one of Umeng's: `/api/status` answered that Umeng does
    /// not know the task (1014 task_id not found, 2005 message does not exist), so the
    /// poller stopped. A refresh that later gets a real task state replaces it.
    TaskLost,
    // The gateway's delivery states (asynchronous pushes), not Umeng's.
    /// Admitted, waiting for a delivery worker: due now, or at a retry's backoff
    /// (`next_attempt_at`).
    AwaitingSend,
    /// Held by the gateway until its `send_at`.
    AwaitingSendAt,
    /// Its quota window is full: it waits for a free slot (first come, first served per
    /// app and bucket) until its deadline.
    AwaitingQuota,
    /// Cancelled locally before it was sent: Umeng never saw it. Final.
    Withdrawn,
    /// A parent push (fan-out or split list): some parts went out, some definitely did
    /// not (or may not have). The gateway's own state, not Umeng's. Final until a repeat
    /// of the request re-sends the parts that failed.
    Partial,
}

impl PushStatus {
    pub const ALL: [PushStatus; 18] = [
        PushStatus::Pending,
        PushStatus::Accepted,
        PushStatus::Failed,
        PushStatus::Unknown,
        PushStatus::Queued,
        PushStatus::Sending,
        PushStatus::Done,
        PushStatus::SendFailed,
        PushStatus::Cancelled,
        PushStatus::Expired,
        PushStatus::NoMatch,
        PushStatus::Scheduled,
        PushStatus::TaskLost,
        PushStatus::AwaitingSend,
        PushStatus::AwaitingSendAt,
        PushStatus::AwaitingQuota,
        PushStatus::Withdrawn,
        PushStatus::Partial,
    ];

    /// The states of a push the gateway has not sent yet (waiting for a delivery worker).
    pub const WAITING: [PushStatus; 3] = [
        PushStatus::AwaitingSend,
        PushStatus::AwaitingSendAt,
        PushStatus::AwaitingQuota,
    ];

    /// Waiting to be sent by the gateway (see [`PushStatus::WAITING`]).
    pub fn is_waiting(self) -> bool {
        Self::WAITING.contains(&self)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PushStatus::Pending => "pending",
            PushStatus::Accepted => "accepted",
            PushStatus::Failed => "failed",
            PushStatus::Unknown => "unknown",
            PushStatus::Queued => "queued",
            PushStatus::Sending => "sending",
            PushStatus::Done => "done",
            PushStatus::SendFailed => "send_failed",
            PushStatus::Cancelled => "cancelled",
            PushStatus::Expired => "expired",
            PushStatus::NoMatch => "no_match",
            PushStatus::Scheduled => "scheduled",
            PushStatus::TaskLost => "task_lost",
            PushStatus::AwaitingSend => "awaiting_send",
            PushStatus::AwaitingSendAt => "awaiting_send_at",
            PushStatus::AwaitingQuota => "awaiting_quota",
            PushStatus::Withdrawn => "withdrawn",
            PushStatus::Partial => "partial",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The status for an Umeng task status code (0-7, `umeng-api.md` section 6).
    pub fn from_task_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => PushStatus::Queued,
            1 => PushStatus::Sending,
            2 => PushStatus::Done,
            3 => PushStatus::SendFailed,
            4 => PushStatus::Cancelled,
            5 => PushStatus::Expired,
            6 => PushStatus::NoMatch,
            7 => PushStatus::Scheduled,
            _ => return None,
        })
    }

    /// A task in this state will not change any more (Umeng's final states).
    pub fn is_final_task_state(self) -> bool {
        matches!(
            self,
            PushStatus::Done
                | PushStatus::SendFailed
                | PushStatus::Cancelled
                | PushStatus::Expired
                | PushStatus::NoMatch
        )
    }

    /// The poller stops at this state: a final task state, or `task_lost`.
    pub fn ends_polling(self) -> bool {
        self.is_final_task_state() || self == PushStatus::TaskLost
    }

    /// Where a task-class push is in its life, for ordering task-state writes: `accepted`
    /// (no status read yet) < `scheduled` (7) < `queued` (0) < `sending` (1) < the final
    /// states (2-6), which rank alike. `task_lost` ranks just below the final states.
    /// `None` for states outside a task's life (pending, failed, unknown).
    pub fn task_rank(self) -> Option<u8> {
        Some(match self {
            PushStatus::Accepted => 0,
            PushStatus::Scheduled => 1,
            PushStatus::Queued => 2,
            PushStatus::Sending => 3,
            PushStatus::TaskLost => 4,
            PushStatus::Done
            | PushStatus::SendFailed
            | PushStatus::Cancelled
            | PushStatus::Expired
            | PushStatus::NoMatch => 5,
            PushStatus::Pending
            | PushStatus::Failed
            | PushStatus::Unknown
            | PushStatus::AwaitingSend
            | PushStatus::AwaitingSendAt
            | PushStatus::AwaitingQuota
            | PushStatus::Withdrawn
            | PushStatus::Partial => return None,
        })
    }

    /// The stored states a write of `self` replaces unconditionally: every task state that
    /// ranks lower, and `task_lost` (a conclusion drawn from one error answer, which a real
    /// task state corrects). A final state is never left. Writing the stored state itself
    /// (same status) needs [`TaskUpdate::seen_checked_at`] to match.
    pub fn replaces(self) -> Vec<PushStatus> {
        let Some(rank) = self.task_rank() else {
            return Vec::new();
        };
        Self::ALL
            .into_iter()
            .filter(|old| *old != self)
            .filter(|old| match old.task_rank() {
                Some(_) if *old == PushStatus::TaskLost => true,
                Some(r) => r < rank,
                None => false,
            })
            .collect()
    }
}

impl std::fmt::Display for PushStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A push about to be sent: everything known before Umeng is called.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NewPush {
    /// Chosen by the caller of `admit` (a UUIDv7 string, so ids sort by creation time).
    pub id: String,
    /// The configured app name callers use.
    pub app: String,
    pub appkey: String,
    /// "android" or "ios".
    pub platform: String,
    /// Umeng cast type: unicast, listcast, broadcast, groupcast, filecast, customizedcast.
    pub cast_type: String,
    /// True for task-class sends (broadcast, groupcast, filecast, customizedcast by file):
    /// those return a task_id and Umeng dedupes them by `policy.out_biz_no`.
    pub task_class: bool,
    pub production_mode: bool,
    /// The calling client's configured name.
    pub client: String,
    pub out_biz_no: Option<String>,
    /// Hex SHA-256 of the canonical request; compared on idempotent repeats.
    pub fingerprint: String,
    /// The caller's request as received (JSON).
    pub request: Value,
    pub description: Option<String>,
    /// When the push goes out, when that is not at once: its `send_at` (held by the
    /// gateway) or Umeng's `policy.start_time` (held by Umeng). Shown in history.
    #[serde(with = "time::serde::rfc3339::option")]
    pub send_at: Option<OffsetDateTime>,
    /// Asynchronous delivery: stored in a waiting state for a delivery worker instead of
    /// `pending` for the caller's own attempt.
    pub delivery: Option<AsyncDelivery>,
}

/// How an asynchronous push is admitted.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AsyncDelivery {
    /// What the worker sends: `{"body": <Umeng body without appkey and timestamp>,
    /// "upload": <file_lines content, if any>}`. Dropped when the push is final.
    pub outbox: Value,
    /// Held until [`NewPush::send_at`] (`awaiting_send_at`), else due at once
    /// (`awaiting_send`).
    pub hold: bool,
    /// No attempt starts after this; the push then fails (`delivery_expired`, or
    /// `quota_wait_expired` while it waits for quota).
    #[serde(with = "time::serde::rfc3339")]
    pub deliver_by: OffsetDateTime,
    /// Wait for a free quota slot instead of failing with `quota_exhausted`.
    pub quota_wait: bool,
    /// The quota slot (if any) is taken when the push is sent, not at admission.
    pub defer_quota: bool,
}

impl AsyncDelivery {
    /// The state the push is stored in at admission.
    pub fn status(&self) -> PushStatus {
        if self.hold {
            PushStatus::AwaitingSendAt
        } else {
            PushStatus::AwaitingSend
        }
    }
}

/// An app whose asynchronous pushes a delivery worker may claim, and how many at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryApp {
    pub app: String,
    pub appkey: String,
    pub limit: u32,
    /// Read the app's queue from pushes due at or after this time, not from its start:
    /// the claims before took the pushes due earlier. On PostgreSQL the entries of pushes
    /// claimed since the last vacuum stay in the queue's index, where each claim starts
    /// reading; this skips them. A push due earlier that was committed late, or that
    /// another transaction held, waits for a claim with `None`.
    pub due_from: Option<OffsetDateTime>,
}

/// An asynchronous push claimed by [`Store::claim_deliveries`]: it is `pending`, and this
/// worker alone sends it until `lease_until`.
#[derive(Debug, Clone)]
pub struct DeliveryClaim {
    pub push_id: String,
    pub app: String,
    pub appkey: String,
    pub cast_type: String,
    pub task_class: bool,
    pub production_mode: bool,
    pub out_biz_no: Option<String>,
    /// See [`AsyncDelivery::outbox`].
    pub outbox: Value,
    /// The calls made by earlier claims; this claim's calls are numbered after them.
    pub attempts: Vec<Attempt>,
    /// How many times the push has been claimed, this claim included: fences the claim's
    /// writes ([`Finish::claim`], [`Store::retry_delivery`]).
    pub claim: u32,
    pub lease_until: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub deliver_by: Option<OffsetDateTime>,
    /// The bucket whose slot the push holds (production task-class pushes).
    pub quota_kind: Option<QuotaKind>,
    pub quota_wait: bool,
    /// A part of a fanned-out or split push: its parent, settled once every part has its
    /// outcome.
    pub parent_id: Option<String>,
    /// When the push was due (its `next_attempt_at` before the claim).
    pub due_at: OffsetDateTime,
}

/// When a claimed push that was not sent (or may be sent again) is due next.
#[derive(Debug, Clone)]
pub struct DeliveryRetry {
    /// `awaiting_send` (after a backoff) or `awaiting_quota` (Umeng said 2050: the
    /// bucket's current window is marked full and the push waits for the next one).
    pub status: PushStatus,
    /// From now, for `awaiting_send`.
    pub delay: Duration,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub umeng_response: Option<Value>,
    /// Every call so far, this claim's included.
    pub attempts: Vec<Attempt>,
    /// Keep the slot (Umeng may have the push: a task-class retry carries its out_biz_no)
    /// or give it back (nothing was accepted; the next attempt takes a slot of its own).
    pub refund: bool,
}

/// One app's asynchronous pushes in one state (see [`Store::queue_stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStat {
    pub app: String,
    /// A waiting state, or `pending` for pushes a worker is sending.
    pub status: PushStatus,
    pub count: u64,
    /// The earliest `next_attempt_at` among them that has passed (how long the oldest due
    /// push has waited), if any is due.
    pub oldest_due: Option<OffsetDateTime>,
}

/// A quota slot to take during admission.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct QuotaClaim {
    pub kind: QuotaKind,
    pub limit: QuotaLimit,
}

/// The result of [`Store::admit`].
#[derive(Debug, Clone)]
pub enum Admission {
    /// The push row is written with status `pending`, the key (if any) is claimed, and the
    /// quota slot (if any) is taken. Go ahead and call Umeng.
    Admitted {
        push_id: String,
        quota: Option<QuotaState>,
        /// True when the key was taken over from an earlier push of the same request that
        /// definitely failed (or, for task-class sends, whose outcome is unknown).
        reclaimed_from: Option<String>,
    },
    /// Nothing was written: the quota window is full.
    RateLimited { quota: QuotaState },
    /// Nothing was written: same key, same request, and the owning push is final
    /// (or unknown for a unicast-class send). Answer with it.
    Replay { push: Box<PushRecord> },
    /// Nothing was written: same key, the owning push is still `pending`.
    InFlight { push_id: String },
    /// Nothing was written: same key, a different request (fingerprint differs).
    Mismatch { push_id: String },
}

/// How a push ended its Umeng call. Applied by [`Store::finish`] only while the push is
/// still `pending`, or `unknown` by the sweeper's guess (`stale_pending`) and still the
/// owner of its key: a late real answer replaces the guess, but a duplicate finisher cannot
/// overwrite a real outcome, nor a push whose key a retry has taken over.
#[derive(Debug, Clone)]
pub struct Finish {
    /// Accepted, Failed or Unknown.
    pub status: PushStatus,
    /// The Umeng body as sent, its exact bytes (appkey and timestamp included; never the
    /// secret or sign).
    pub umeng_request: Option<Box<serde_json::value::RawValue>>,
    /// Umeng's answer as received (JSON), if any.
    pub umeng_response: Option<Value>,
    pub msg_id: Option<String>,
    pub task_id: Option<String>,
    pub file_id: Option<String>,
    /// Umeng's error code, or a gateway code such as "not_sent" / "timeout".
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    /// The HTTP status the gateway answered (or will answer) with; replays reuse it.
    pub http_status: u16,
    /// Milliseconds spent in the Umeng call(s).
    pub latency_ms: Option<i64>,
    pub sent_at: Option<OffsetDateTime>,
    /// What to do with the quota slot taken at admission.
    pub quota: QuotaAction,
    /// Every Umeng call made for this push, in order.
    pub attempts: Vec<Attempt>,
    /// A delivery worker's claim ([`DeliveryClaim::claim`]): the write applies only while
    /// it is still the push's latest claim. `None` for the synchronous path.
    pub claim: Option<u32>,
}

/// One Umeng call made for a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Attempt {
    /// 1, 2, ... in the order the calls were made.
    pub number: u32,
    /// `upload` (a `file_lines` token file) or `send`.
    pub call: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// `accepted` (SUCCESS), `failed` (Umeng's FAIL), `not_sent` (nothing reached Umeng),
    /// `timeout` or `unknown` (sent, no usable answer).
    pub outcome: String,
    /// Umeng's error code, for FAIL answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    pub latency_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaAction {
    /// Keep the slot (success, or an unknown outcome).
    Keep,
    /// Give the slot back to the window it was taken from, exactly once.
    Refund,
    /// Umeng said 2050: mark the bucket's window containing the database's `now` as full
    /// (`used = max(used, limit)`), whichever window the slot came from. The slot itself is
    /// kept. The unit is the bucket's window length.
    Saturate(WindowUnit),
}

/// A task status read from `/api/status` (or written after a cancel). Writes are ordered:
/// see [`Store::update_task`].
#[derive(Debug, Clone)]
pub struct TaskUpdate {
    pub status: PushStatus,
    /// The `data` object Umeng returned (counters and all).
    pub task_status: Value,
    /// The push's `task_checked_at` as the writer read it before asking Umeng (`None`:
    /// never checked). Every task-state write moves `task_checked_at` forward, so a match
    /// means nobody stored an answer in between and this one is the newest.
    pub seen_checked_at: Option<OffsetDateTime>,
    /// The poller's claim ([`TaskClaim::polls`], a fencing token): the write is dropped
    /// when the push has been claimed again since (the lease ran out and another replica
    /// took it). `None` for writes outside the poller (refresh, cancel).
    pub claim: Option<u32>,
}

/// A task-class push claimed by [`Store::claim_task_polls`]: this poller alone asks Umeng
/// about it until `lease_until` (or until it calls [`Store::release_task_poll`]).
#[derive(Debug, Clone)]
pub struct TaskClaim {
    pub push_id: String,
    /// The configured app name (its credentials sign the status call).
    pub app: String,
    /// The appkey the push was sent with.
    pub appkey: String,
    pub task_id: String,
    pub created_at: OffsetDateTime,
    /// The caller's request as stored (for `policy.start_time` and `policy.expire_time`).
    pub request: Value,
    /// When a task status was last stored (see [`TaskUpdate::seen_checked_at`]).
    pub task_checked_at: Option<OffsetDateTime>,
    /// How many times the poller has claimed this push, this claim included. Each claim
    /// gets a new number, so it fences the claim's writes ([`TaskUpdate::claim`]).
    pub polls: u32,
    /// The lease: identifies this claim when releasing it.
    pub lease_until: OffsetDateTime,
}

/// An app whose tasks a poller can ask about: the configured name and its appkey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolledApp {
    pub app: String,
    pub appkey: String,
}

/// What [`Store::purge`] deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeTarget {
    /// Pushes by `created_at` (their idempotency keys go with them).
    Pushes,
    /// Quota counters by window start.
    QuotaCounters,
    /// Remembered uploads by `created_at`.
    Uploads,
}

/// A stored push, as history shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PushRecord {
    pub id: String,
    pub app: String,
    pub appkey: String,
    pub platform: String,
    pub cast_type: String,
    pub task_class: bool,
    pub production_mode: bool,
    pub client: String,
    pub out_biz_no: Option<String>,
    pub fingerprint: String,
    pub status: PushStatus,
    pub description: Option<String>,
    pub request: Value,
    pub umeng_request: Option<Value>,
    pub umeng_response: Option<Value>,
    pub msg_id: Option<String>,
    pub task_id: Option<String>,
    pub file_id: Option<String>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub http_status: Option<u16>,
    pub quota_kind: Option<QuotaKind>,
    /// Start (epoch seconds) of the window the quota slot was taken from.
    pub quota_window: Option<i64>,
    pub quota_refunded: bool,
    /// Last `/api/status` answer (`data` object), for task-class pushes.
    pub task_status: Option<Value>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub task_checked_at: Option<OffsetDateTime>,
    pub latency_ms: Option<i64>,
    /// Every Umeng call made for this push (upload and send), in order.
    pub attempts: Vec<Attempt>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub sent_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// `sync` (the caller's request made the attempt) or `async` (a delivery worker sends
    /// it).
    pub delivery: DeliveryMode,
    /// When the push goes out, when that is not at once: its `send_at` (held by the
    /// gateway), or Umeng's `policy.start_time`.
    #[serde(with = "time::serde::rfc3339::option")]
    pub send_at: Option<OffsetDateTime>,
    /// Asynchronous pushes waiting to be sent: when a worker will try next.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// Asynchronous pushes: no attempt starts after this.
    #[serde(with = "time::serde::rfc3339::option")]
    pub deliver_by: Option<OffsetDateTime>,
    /// Where the push's signed callbacks go (the request's `callback_url`), if anywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The push's callback events with their delivery attempts (filled by
    /// [`Store::get_push`] only; history lists leave it empty and out).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub callbacks: Vec<CallbackEvent>,
    /// Fields cut to [`DETAIL_FIELD_BYTES`] in this answer (absent when none was): a cut
    /// JSON field becomes a string holding the start of its JSON text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub truncated: Vec<String>,
    /// A part of a fanned-out or split push: its parent's id (the parent is what history
    /// lists, and what idempotency and callbacks are about).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// A part: its number within the parent (1, 2, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_no: Option<u32>,
    /// A part: how many tokens or aliases it addresses (absent for a filter or the whole
    /// app).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<u32>,
    /// A parent: how many parts it has.
    #[serde(skip)]
    pub part_count: Option<u32>,
    /// A parent: its parts, in order (filled by [`Store::get_push`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PushPart>,
}

/// Who sends a push: the caller's own request, or a delivery worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    Sync,
    Async,
}

impl DeliveryMode {
    /// From the stored `delivery` column (null for synchronous pushes).
    pub fn from_column(value: Option<&str>) -> Self {
        match value {
            Some("async") => DeliveryMode::Async,
            _ => DeliveryMode::Sync,
        }
    }
}

/// Bytes of any one large field (`request`, `umeng_request`, `umeng_response`,
/// `task_status`, `description`, `error_msg`) that `GET /v1/pushes/{id}` shows.
pub const DETAIL_FIELD_BYTES: usize = 64 * 1024;

impl PushRecord {
    /// This record with every large field cut to [`DETAIL_FIELD_BYTES`] and named in
    /// `truncated`.
    pub fn bounded(mut self) -> Self {
        let mut truncated = Vec::new();
        for (name, field) in [
            ("request", Some(&mut self.request)),
            ("umeng_request", self.umeng_request.as_mut()),
            ("umeng_response", self.umeng_response.as_mut()),
            ("task_status", self.task_status.as_mut()),
        ] {
            let Some(value) = field else { continue };
            if let Some(cut) = cut_json(value) {
                *value = Value::String(cut);
                truncated.push(name.to_owned());
            }
        }
        for (name, field) in [
            ("description", self.description.as_mut()),
            ("error_msg", self.error_msg.as_mut()),
        ] {
            if let Some(text) = field {
                if text.len() > DETAIL_FIELD_BYTES {
                    text.truncate(char_boundary(text, DETAIL_FIELD_BYTES));
                    truncated.push(name.to_owned());
                }
            }
        }
        self.truncated = truncated;
        self
    }
}

/// The first [`DETAIL_FIELD_BYTES`] of `value`'s JSON text when it is longer than that.
fn cut_json(value: &Value) -> Option<String> {
    let mut out = LimitedWriter::default();
    if serde_json::to_writer(&mut out, value).is_ok() {
        return None;
    }
    let mut text = String::from_utf8_lossy(&out.buf).into_owned();
    text.truncate(char_boundary(&text, DETAIL_FIELD_BYTES));
    Some(text)
}

/// The largest index <= `max` that is a char boundary of `s`.
fn char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// Collects at most [`DETAIL_FIELD_BYTES`] bytes, then fails, so serialising a large value
/// stops early instead of building all of it.
#[derive(Default)]
struct LimitedWriter {
    buf: Vec<u8>,
}

impl std::io::Write for LimitedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = DETAIL_FIELD_BYTES - self.buf.len();
        if data.len() > room {
            self.buf.extend_from_slice(&data[..room]);
            return Err(std::io::Error::other("field longer than the bound"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A stored push as a history list shows it: what it was and how it ended, without the
/// stored request and Umeng bodies (those are on `GET /v1/pushes/{id}`). `description` and
/// `error_msg` hold at most [`SUMMARY_TEXT_CHARS`] characters here.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PushSummary {
    pub id: String,
    pub app: String,
    pub platform: String,
    #[serde(rename = "type")]
    pub cast_type: String,
    pub task_class: bool,
    pub production_mode: bool,
    pub client: String,
    pub out_biz_no: Option<String>,
    pub status: PushStatus,
    /// The first 256 characters.
    pub description: Option<String>,
    pub msg_id: Option<String>,
    pub task_id: Option<String>,
    pub file_id: Option<String>,
    pub error_code: Option<String>,
    /// The first 256 characters.
    pub error_msg: Option<String>,
    pub http_status: Option<u16>,
    pub latency_ms: Option<i64>,
    pub delivery: DeliveryMode,
    /// When the push goes out, when that is not at once (`send_at` or `start_time`).
    #[serde(with = "time::serde::rfc3339::option")]
    pub send_at: Option<OffsetDateTime>,
    /// Waiting pushes: when a worker will try next.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// How many Umeng calls were made for it so far (the record's `attempts`, counted).
    pub attempt_count: u32,
    /// A fanned-out or split push: how many parts it has (their calls are counted on the
    /// parts, in `GET /v1/pushes/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parts: Option<u32>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub sent_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl PushSummary {
    /// The summary of a full record (what a history list shows of it).
    pub fn of(r: &PushRecord) -> PushSummary {
        let cut = |s: &Option<String>| {
            s.as_deref()
                .map(|s| s.chars().take(SUMMARY_TEXT_CHARS as usize).collect())
        };
        PushSummary {
            id: r.id.clone(),
            app: r.app.clone(),
            platform: r.platform.clone(),
            cast_type: r.cast_type.clone(),
            task_class: r.task_class,
            production_mode: r.production_mode,
            client: r.client.clone(),
            out_biz_no: r.out_biz_no.clone(),
            status: r.status,
            description: cut(&r.description),
            msg_id: r.msg_id.clone(),
            task_id: r.task_id.clone(),
            file_id: r.file_id.clone(),
            error_code: r.error_code.clone(),
            error_msg: cut(&r.error_msg),
            http_status: r.http_status,
            latency_ms: r.latency_ms,
            delivery: r.delivery,
            send_at: r.send_at,
            next_attempt_at: r.next_attempt_at,
            attempt_count: u32::try_from(r.attempts.len()).unwrap_or(u32::MAX),
            parts: r.part_count,
            created_at: r.created_at,
            sent_at: r.sent_at,
            finished_at: r.finished_at,
            updated_at: r.updated_at,
        }
    }
}

/// Characters of `description` and `error_msg` a [`PushSummary`] carries.
pub const SUMMARY_TEXT_CHARS: u32 = 256;

/// The largest page of history a caller may ask for.
pub const MAX_PAGE: u32 = 200;

/// Where the next (older) page of history starts: rows strictly before this
/// `(created_at, id)` in the history order (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryCursor {
    pub created_at: OffsetDateTime,
    pub id: String,
}

impl HistoryCursor {
    /// The cursor after `row`.
    pub fn after(row: &PushSummary) -> Self {
        HistoryCursor {
            created_at: row.created_at,
            id: row.id.clone(),
        }
    }

    /// The opaque text form: `<unix microseconds>.<id>`.
    pub fn encode(&self) -> String {
        format!(
            "{}.{}",
            self.created_at.unix_timestamp_nanos() / 1000,
            self.id
        )
    }

    /// Parse [`HistoryCursor::encode`]'s form; `None` for anything else.
    pub fn decode(s: &str) -> Option<Self> {
        let (micros, id) = s.split_once('.')?;
        if micros.len() > 20 || id.is_empty() || id.len() > 64 {
            return None;
        }
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return None;
        }
        let micros: i64 = micros.parse().ok()?;
        let created_at =
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).ok()?;
        Some(HistoryCursor {
            created_at,
            id: id.to_owned(),
        })
    }
}

/// The most rows [`Store::count_pushes_by_hour`] returns.
pub const MAX_PUSH_COUNT_ROWS: u32 = 5000;

/// Pushes of one hour with one status and error code (see [`Store::count_pushes_by_hour`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourlyCount {
    /// Start of the hour, Unix seconds.
    pub hour: i64,
    pub status: PushStatus,
    pub error_code: Option<String>,
    pub count: u64,
}

/// One row of [`Store::count_pushes_by_hour`] from its columns.
pub(crate) fn hourly_count(
    hour: i64,
    status: String,
    error_code: Option<String>,
    count: i64,
) -> StoreResult<HourlyCount> {
    Ok(HourlyCount {
        hour,
        status: PushStatus::parse(&status)
            .ok_or_else(|| StoreError::Database(format!("unknown push status {status:?}")))?,
        error_code,
        count: u64::try_from(count).unwrap_or(0),
    })
}

/// One row of [`Store::queue_stats`] from its columns.
pub(crate) fn queue_stat(
    app: String,
    status: String,
    count: i64,
    oldest_due: Option<OffsetDateTime>,
) -> StoreResult<QueueStat> {
    Ok(QueueStat {
        app,
        status: PushStatus::parse(&status)
            .ok_or_else(|| StoreError::Database(format!("unknown push status {status:?}")))?,
        count: u64::try_from(count).unwrap_or(0),
        oldest_due,
    })
}

/// Filters for [`Store::list_pushes`]. All given filters must match (AND).
#[derive(Debug, Clone, Default)]
pub struct PushQuery {
    pub app: Option<String>,
    /// Restrict to these apps (a client's allow-list); `None` means all.
    pub apps_allowed: Option<Vec<String>>,
    pub cast_type: Option<String>,
    pub status: Option<PushStatus>,
    pub client: Option<String>,
    pub out_biz_no: Option<String>,
    pub msg_id: Option<String>,
    pub task_id: Option<String>,
    /// created_at >= from
    pub from: Option<OffsetDateTime>,
    /// created_at < to
    pub to: Option<OffsetDateTime>,
    /// Only rows older than this cursor (the last row of the previous page).
    pub before: Option<HistoryCursor>,
    /// Rows to return, 1..=[`MAX_PAGE`] + 1 (one more than a page, so a caller can tell
    /// whether another page follows).
    pub limit: u32,
}

/// The persistence contract. Every method is atomic on its own; none keeps a transaction
/// open after it returns, and cancelling one of its futures must not leave a pooled
/// connection inside a transaction (run multi-statement work in a spawned task).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// "postgres" or "sqlite".
    fn backend(&self) -> &'static str;

    /// Connections the pool holds right now (for the `db_pool_connections` metric).
    fn pool_status(&self) -> PoolStatus;

    /// Apply pending migrations.
    async fn migrate(&self) -> StoreResult<()>;

    /// Reachable, and every migration known to this build is applied.
    async fn ready(&self) -> StoreResult<()>;

    /// The database clock (all replicas share it).
    async fn now(&self) -> StoreResult<OffsetDateTime>;

    /// Atomically admit a push: check/claim `(appkey, out_biz_no)` when `out_biz_no` is
    /// set, take a quota slot when `quota` is set, and insert the push row as `pending`.
    /// Either all of it happens, or nothing is written.
    ///
    /// With an existing key for the same appkey:
    /// - fingerprint differs -> `Mismatch`;
    /// - owner `pending` -> `InFlight`;
    /// - owner `failed`, or `unknown` and `task_class` -> the key moves to the new push
    ///   (`Admitted` with `reclaimed_from`), quota taken as for a new push; the slot an
    ///   `unknown` owner kept is given back first (Umeng dedupes the retry into the same
    ///   task, so one logical push holds one slot);
    /// - otherwise (accepted, task states, unknown unicast-class) -> `Replay`.
    ///
    /// The quota window is the Beijing-time calendar window containing the database's
    /// `now`; a full window gives `RateLimited` and leaves no trace (the key stays free).
    /// The push row is written last: a rejected request writes nothing.
    async fn admit(&self, push: NewPush, quota: Option<QuotaClaim>) -> StoreResult<Admission>;

    /// Record how the Umeng call ended, and apply the quota action (see [`Finish`] for when
    /// it applies). Returns false when nothing changed: the push already has a real outcome,
    /// or the sweeper marked it `unknown` and a retry has since taken its key over. Shared,
    /// so that a caller that retries the record keeps it without copying its bodies.
    async fn finish(&self, push_id: &str, finish: Arc<Finish>) -> StoreResult<bool>;

    /// Store a task status read from Umeng (also used after a cancel), if it is newer than
    /// the stored one. Task states only move forward ([`PushStatus::task_rank`]): a write
    /// applies when its status ranks higher than the stored one (or the stored one is
    /// `task_lost`), or when it is the same status and `seen_checked_at` still matches.
    /// A final state is never left; a push outside a task's life (pending, failed,
    /// unknown) is left alone; with `claim` set, the claim must still be the push's
    /// latest. `cancelled_by` in the stored `task_status` is kept. Returns whether the
    /// write applied.
    async fn update_task(&self, push_id: &str, update: TaskUpdate) -> StoreResult<bool>;

    async fn get_push(&self, push_id: &str) -> StoreResult<Option<PushRecord>>;

    /// Newest first (by `created_at`, then `id`), at most `query.limit` rows. Reads only
    /// the summary columns, never the stored bodies.
    async fn list_pushes(&self, query: &PushQuery) -> StoreResult<Vec<PushSummary>>;

    /// Pushes created at or after `since`, counted per hour (the hour's start in Unix
    /// seconds), status and Umeng error code, restricted to `apps_allowed` when given.
    /// Oldest hour first; at most [`MAX_PUSH_COUNT_ROWS`] rows.
    async fn count_pushes_by_hour(
        &self,
        since: OffsetDateTime,
        apps_allowed: Option<&[String]>,
    ) -> StoreResult<Vec<HourlyCount>>;

    /// Mark `pending` pushes created more than `older_than_secs` ago as `unknown`
    /// (quota kept). Returns how many changed.
    async fn sweep_stale_pending(&self, older_than_secs: i64) -> StoreResult<u64>;

    /// Claim up to `limit` task-class pushes whose status is due for a refresh, in one
    /// statement, leasing each for `lease`: concurrent callers (other replicas) never get the
    /// same push while its lease runs. Due: status accepted, queued, sending or scheduled, a
    /// task_id, no running lease, and `next_poll_at` passed, or never polled and finished
    /// (accepted) at least `first_poll_after` ago. Only pushes of `apps` (app name and
    /// appkey both matching: the caller can sign their status calls) are claimed; others
    /// stay as they are for a replica that has them. Oldest due first.
    async fn claim_task_polls(
        &self,
        limit: u32,
        lease: Duration,
        first_poll_after: Duration,
        apps: &[PolledApp],
    ) -> StoreResult<Vec<TaskClaim>>;

    /// End a claim: clear the lease and schedule the next poll `next_poll_in` from now, or
    /// never again with `None`. Returns false (nothing changed) when the lease is no longer
    /// this claim's (it expired and another poller took the push).
    async fn release_task_poll(
        &self,
        claim: &TaskClaim,
        next_poll_in: Option<Duration>,
    ) -> StoreResult<bool>;

    /// Delete at most `limit` rows of `target` older than `older_than` (one short statement;
    /// rows another replica is deleting are skipped). Returns how many were deleted; call
    /// again while it returns `limit`.
    async fn purge(
        &self,
        target: PurgeTarget,
        older_than: Duration,
        limit: u32,
    ) -> StoreResult<u64>;

    /// Claim up to `limit` due callback events (pending, `next_attempt_at` passed), in one
    /// statement, leasing each for `lease`: concurrent callers never get the same event
    /// while its lease runs. Each claim counts an attempt ([`CallbackClaim::attempt`]) and
    /// moves `next_attempt_at` to the lease's end, so an event whose worker died is due
    /// again then. Oldest due first.
    async fn claim_callbacks(&self, limit: u32, lease: Duration)
        -> StoreResult<Vec<CallbackClaim>>;

    /// Record an attempt of a claimed event: store `log` (every attempt so far) and the
    /// next step. Returns false (nothing written) when the claim is no longer the latest
    /// (its lease ran out and another worker claimed the event) or the event is done.
    async fn record_callback(
        &self,
        claim: &CallbackClaim,
        log: &[CallbackAttempt],
        next: CallbackNext,
    ) -> StoreResult<bool>;

    /// Claim up to `limit` due asynchronous pushes of `apps` (at most each app's `limit`),
    /// oldest due first, leasing each for `lease`: it becomes `pending` and concurrent
    /// callers (other replicas) never get it while its lease runs. Due: a waiting state
    /// ([`PushStatus::WAITING`]) and `next_attempt_at` passed (and not before the app's
    /// [`DeliveryApp::due_from`]). On the way:
    /// - a push past its `deliver_by` fails (`delivery_expired`, or `quota_wait_expired`
    ///   while waiting for quota; a slot it held is given back) and is not returned;
    /// - a push that needs a quota slot takes one in the window of now, first come first
    ///   served per bucket (behind an older push waiting for the bucket, it waits too);
    ///   with the window full it moves to `awaiting_quota` until the window ends (when it
    ///   waits for quota, or has been tried before), or else fails `quota_exhausted` (429).
    async fn claim_deliveries(
        &self,
        limit: u32,
        lease: Duration,
        apps: &[DeliveryApp],
    ) -> StoreResult<Vec<DeliveryClaim>>;

    /// Put a claimed push back to wait (see [`DeliveryRetry`]), giving its quota slot back
    /// when asked. Returns false (nothing written) when the claim is no longer the push's
    /// latest or the push is no longer `pending`.
    async fn retry_delivery(
        &self,
        claim: &DeliveryClaim,
        retry: DeliveryRetry,
    ) -> StoreResult<bool>;

    /// Asynchronous pushes whose worker's lease ran out while `pending` (the replica died
    /// or stalled mid-send): a task-class push goes back to `awaiting_send` (its re-send
    /// carries the same `out_biz_no`, which Umeng dedupes); any other push may have
    /// reached Umeng and becomes `unknown` (`stale_pending`), never re-sent. Returns how
    /// many changed.
    async fn recover_deliveries(&self) -> StoreResult<u64>;

    /// Cancel a push the gateway has not sent yet (a waiting state): it becomes
    /// `withdrawn`, and a quota slot it held is given back. Returns false when it is not
    /// waiting (any more).
    async fn withdraw(&self, push_id: &str) -> StoreResult<bool>;

    /// Asynchronous pushes not yet final, per app and state (waiting states, and
    /// `pending` for those being sent), with the oldest due time.
    async fn queue_stats(&self) -> StoreResult<Vec<QueueStat>>;

    /// Atomically admit a fanned-out or split push: `parent` (the caller's request; its
    /// key is claimed as in [`Store::admit`]) and its `parts` (asynchronous pushes in
    /// `awaiting_send`, or `awaiting_send_at` when held), with every part's quota slot taken
    /// in the window of now, all or nothing: one full window writes nothing and answers
    /// `RateLimited` naming the part's app. The parent stays `pending` until every part
    /// has its outcome ([`Store::settle_parent`]).
    ///
    /// A repeat (same key and fingerprint) of a parent that is `partial` or `failed`
    /// with parts that definitely failed re-queues only those parts (with their bodies
    /// from `parts`, the same numbering), taking their slots again all or nothing; a slot
    /// a failed part still held is given back first. Any other repeat replays the parent.
    async fn admit_parts(
        &self,
        parent: NewPush,
        parts: Vec<NewPart>,
    ) -> StoreResult<PartsAdmission>;

    /// Release up to `limit` due parents that wait as a whole (held until their
    /// `send_at`, or waiting for a window with room for every part): take every part's
    /// slot in the window of now, all or nothing, and insert the parts (`awaiting_send`).
    /// A full window makes the parent wait for that window's end (`awaiting_quota`, with
    /// `on_quota_exhausted: "wait"`) or fail (`quota_exhausted`, 429); past its deadline
    /// it fails (`delivery_expired`, or `quota_wait_expired`). Parents another replica is
    /// releasing are skipped. Returns how many were handled.
    async fn release_parents(&self, limit: u32) -> StoreResult<u64>;

    /// When every part of `parent_id` has its outcome and the parent is still `pending`,
    /// give the parent its derived status ([`parts::derive`]). Returns the status written,
    /// or `None` (parts still in progress, or settled already).
    async fn settle_parent(&self, parent_id: &str) -> StoreResult<Option<PushStatus>>;

    /// Settle up to `limit` parents whose parts all have their outcome (a part that ended
    /// without the worker that settles: a deadline, a recovered lease, a withdrawal).
    /// Returns how many were settled.
    async fn settle_parents(&self, limit: u32) -> StoreResult<u64>;

    /// The current window's state of one bucket (used 0 when no row exists).
    async fn quota_state(
        &self,
        appkey: &str,
        kind: QuotaKind,
        limit: QuotaLimit,
    ) -> StoreResult<QuotaState>;

    /// Whether the idempotency key `out_biz_no` of `appkey` names a push (whatever its
    /// state). A read: it takes nothing.
    async fn key_taken(&self, appkey: &str, out_biz_no: &str) -> StoreResult<bool>;

    /// A file_id uploaded earlier for the same appkey and content (hex SHA-256), if it
    /// was uploaded less than `max_age_secs` ago.
    async fn find_upload(
        &self,
        appkey: &str,
        content_sha256: &str,
        max_age_secs: i64,
    ) -> StoreResult<Option<String>>;

    /// Forget a remembered upload, if it still names `file_id` (Umeng no longer knows it).
    async fn forget_upload(
        &self,
        appkey: &str,
        content_sha256: &str,
        file_id: &str,
    ) -> StoreResult<()>;

    /// Remember an uploaded file (replaces an older entry for the same content).
    async fn save_upload(
        &self,
        appkey: &str,
        content_sha256: &str,
        file_id: &str,
    ) -> StoreResult<()>;
}

/// A count or number stored as a signed integer column, if it fits a `u32`.
pub(crate) fn non_negative(v: Option<i64>) -> Option<u32> {
    v.and_then(|n| u32::try_from(n).ok())
}

/// The stored form of a push's attempts.
pub(crate) fn attempts_json(attempts: &[Attempt]) -> Value {
    serde_json::to_value(attempts).unwrap_or_else(|_| Value::Array(Vec::new()))
}

/// Reads a push's stored attempts.
pub(crate) fn attempts_of(v: Value) -> Result<Vec<Attempt>, sqlx::Error> {
    serde_json::from_value(v).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// A snapshot of a connection pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStatus {
    /// Open connections waiting in the pool.
    pub idle: u32,
    /// Open connections lent out to a query or transaction.
    pub in_use: u32,
}

impl PoolStatus {
    /// From sqlx's `size()` (all open connections) and `num_idle()`.
    pub fn from_counts(size: u32, idle: usize) -> Self {
        let idle = u32::try_from(idle).unwrap_or(u32::MAX).min(size);
        PoolStatus {
            idle,
            in_use: size - idle,
        }
    }
}

/// Pool settings shared by both backends.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub max_connections: u32,
    pub acquire_timeout: std::time::Duration,
    /// PostgreSQL: how a statement that records outcomes and nothing else commits.
    pub outcome_commit: crate::config::OutcomeCommit,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: std::time::Duration::from_secs(3),
            outcome_commit: crate::config::OutcomeCommit::Durable,
        }
    }
}

/// Open a store for `url`: `postgres://` / `postgresql://` for PostgreSQL, `sqlite:` for
/// SQLite (e.g. `sqlite://data/gateway.db`, `sqlite::memory:`). Migrations are not applied
/// here; call [`Store::migrate`].
pub async fn connect(url: &str, options: &PoolOptions) -> StoreResult<std::sync::Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            postgres::PgStore::connect(url, options).await?,
        ))
    } else if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(
            sqlite::SqliteStore::connect(url, options).await?,
        ))
    } else {
        Err(StoreError::BadUrl(format!(
            "unsupported database url {:?}: expected postgres://, postgresql:// or sqlite:",
            redact_url(url)
        )))
    }
}

/// Check that `url` is a database URL [`connect`] can use, without connecting. The error
/// never carries the URL's password.
pub fn check_url(url: &str) -> StoreResult<()> {
    use std::str::FromStr;
    let bad = |e: sqlx::Error| {
        StoreError::BadUrl(format!(
            "{}: {}",
            redact_url(url),
            scrub(e.to_string(), url)
        ))
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        sqlx::postgres::PgConnectOptions::from_str(url).map_err(bad)?;
        // sqlx accepts some URLs the url crate (and so every other tool) refuses.
        url::Url::parse(url)
            .map_err(|e| StoreError::BadUrl(format!("{}: {e}", redact_url(url))))?;
        Ok(())
    } else if url.starts_with("sqlite:") {
        sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(bad)?;
        Ok(())
    } else {
        Err(StoreError::BadUrl(format!(
            "unsupported database url {:?}: expected postgres://, postgresql:// or sqlite:",
            redact_url(url)
        )))
    }
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // set_password only fails for URLs that cannot carry credentials.
            if parsed.set_password(Some("***")).is_ok() {
                parsed.to_string()
            } else {
                "<unparseable url>".to_owned()
            }
        }
        Ok(_) => url.to_owned(),
        // An unparseable URL may still contain a password; show only its scheme.
        Err(_) => match url.split_once(':') {
            Some((scheme, _)) => format!("{scheme}:<redacted>"),
            None => "<redacted>".to_owned(),
        },
    }
}

/// Milliseconds of `d` for SQL parameters (saturating).
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Remove the password of `url` from `message` (belt and braces for driver errors).
pub(crate) fn scrub(message: String, url: &str) -> String {
    let password = url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(str::to_owned))
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => message.replace(&p, "***"),
        None => message,
    }
}

/// Classify a driver error: anything that says "the database cannot be reached right now"
/// becomes [`StoreError::Unavailable`], the rest [`StoreError::Database`].
pub(crate) fn map_sqlx(err: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match &err {
        E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => {
            StoreError::Unavailable(err.to_string())
        }
        E::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // Postgres: class 08 (connection), 57P01-57P03 (shutdown / cannot connect now),
            // 53300 (too many connections), 55P03 (lock_timeout), 57014 (statement_timeout),
            // 55000 and 3D000 when a new connection finds the database closed to
            // connections (ALLOW_CONNECTIONS false) or gone, 25006 when it is read-only
            // (a standby after a failover, or default_transaction_read_only).
            // SQLite: 5 SQLITE_BUSY, 6 SQLITE_LOCKED (after busy_timeout expired).
            let unavailable = code.starts_with("08")
                || code.starts_with("57P")
                || matches!(
                    code.as_str(),
                    "53300"
                        | "25006"
                        | "55P03"
                        | "57014"
                        | "55000"
                        | "3D000"
                        | "5"
                        | "6"
                        | "261"
                        | "262"
                        | "517"
                        | "773"
                );
            if unavailable {
                StoreError::Unavailable(err.to_string())
            } else {
                StoreError::Database(err.to_string())
            }
        }
        _ => StoreError::Database(err.to_string()),
    }
}

/// Await a spawned store task. The work runs to completion even if the caller's future is
/// dropped, so a cancelled request can never leave a pooled connection mid-transaction.
pub(crate) async fn run_detached<T, F>(work: F) -> StoreResult<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = StoreResult<T>> + Send + 'static,
{
    match tokio::spawn(work).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::Database(format!("store task failed: {e}"))),
    }
}

/// A small accepted unicast record, for unit tests.
#[cfg(test)]
pub(crate) fn sample_record(request: Value, description: Option<String>) -> PushRecord {
    let now = OffsetDateTime::now_utc();
    PushRecord {
        id: "p".into(),
        app: "a".into(),
        appkey: "k".into(),
        platform: "android".into(),
        cast_type: "unicast".into(),
        task_class: false,
        production_mode: false,
        client: "c".into(),
        out_biz_no: None,
        fingerprint: "f".into(),
        status: PushStatus::Accepted,
        description,
        request,
        umeng_request: Some(serde_json::json!({"small": true})),
        umeng_response: None,
        msg_id: None,
        task_id: None,
        file_id: None,
        error_code: None,
        error_msg: None,
        http_status: Some(201),
        quota_kind: None,
        quota_window: None,
        quota_refunded: false,
        task_status: None,
        task_checked_at: None,
        latency_ms: None,
        attempts: Vec::new(),
        delivery: DeliveryMode::Sync,
        send_at: None,
        next_attempt_at: None,
        deliver_by: None,
        callback_url: None,
        callbacks: Vec::new(),
        created_at: now,
        sent_at: None,
        finished_at: None,
        updated_at: now,
        truncated: Vec::new(),
        parent_id: None,
        part_no: None,
        audience: None,
        part_count: None,
        parts: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_states_replace_earlier_states_and_task_lost_only() {
        use PushStatus as S;
        assert_eq!(S::Scheduled.replaces(), [S::Accepted, S::TaskLost]);
        assert_eq!(
            S::Queued.replaces(),
            [S::Accepted, S::Scheduled, S::TaskLost]
        );
        assert_eq!(
            S::Sending.replaces(),
            [S::Accepted, S::Queued, S::Scheduled, S::TaskLost]
        );
        for final_state in S::ALL.into_iter().filter(|s| s.is_final_task_state()) {
            assert_eq!(
                final_state.replaces(),
                [
                    S::Accepted,
                    S::Queued,
                    S::Sending,
                    S::Scheduled,
                    S::TaskLost
                ],
                "{final_state} never replaces another final state"
            );
        }
        assert_eq!(
            S::TaskLost.replaces(),
            [S::Accepted, S::Queued, S::Sending, S::Scheduled]
        );
        for outside in [S::Pending, S::Failed, S::Unknown] {
            assert!(outside.replaces().is_empty(), "{outside}");
        }
    }

    #[test]
    fn redact_url_hides_the_password() {
        let shown = redact_url("postgres://gw:s3cret@db:5432/gw");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }

    #[test]
    fn check_url_refuses_malformed_urls_without_the_password() {
        assert!(check_url("postgres://gw:s3cret@db:5432/gw").is_ok());
        assert!(check_url("sqlite://data/x.db").is_ok());
        for bad in [
            "postgres://gw:s3cret@db:port/gw",
            "mysql://gw:s3cret@db/gw",
            "db.example",
        ] {
            let err = check_url(bad).expect_err(bad).to_string();
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn scrub_removes_the_password_from_messages() {
        let msg = scrub("failed for s3cret".to_owned(), "postgres://gw:s3cret@db/gw");
        assert_eq!(msg, "failed for ***");
    }

    fn record(request: Value, description: Option<String>) -> PushRecord {
        super::sample_record(request, description)
    }

    #[test]
    fn bounded_cuts_large_fields_and_names_them() {
        let big = serde_json::json!({"extra": "é".repeat(DETAIL_FIELD_BYTES)});
        let r = record(big, Some("d".repeat(DETAIL_FIELD_BYTES + 1))).bounded();

        assert_eq!(r.truncated, ["request", "description"]);
        let cut = r.request.as_str().expect("a cut field is a string");
        assert!(cut.len() <= DETAIL_FIELD_BYTES && cut.len() > DETAIL_FIELD_BYTES - 4);
        assert!(cut.starts_with("{\"extra\":\"é"));
        assert_eq!(
            r.description.as_ref().map(String::len),
            Some(DETAIL_FIELD_BYTES)
        );
        assert_eq!(r.umeng_request, Some(serde_json::json!({"small": true})));
        let shown = serde_json::to_value(&r).unwrap();
        assert_eq!(
            shown["truncated"],
            serde_json::json!(["request", "description"])
        );
    }

    #[test]
    fn bounded_leaves_small_records_alone() {
        let request = serde_json::json!({"app": "a", "type": "unicast"});
        let r = record(request.clone(), Some("short".into())).bounded();
        assert!(r.truncated.is_empty());
        assert_eq!(r.request, request);
        assert!(serde_json::to_value(&r).unwrap().get("truncated").is_none());
    }

    #[test]
    fn history_cursors_round_trip_and_refuse_other_text() {
        let c = HistoryCursor {
            created_at: OffsetDateTime::from_unix_timestamp_nanos(1_790_000_000_123_456_000)
                .unwrap(),
            id: "019abcde-0000-7000-8000-000000000001".into(),
        };
        assert_eq!(HistoryCursor::decode(&c.encode()), Some(c));
        for bad in ["", "x", "12", ".id", "12.", "a.b", "1.with space", "1.ü"] {
            assert_eq!(HistoryCursor::decode(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn connect_rejects_unknown_schemes_without_leaking_secrets() {
        let err = match connect("mysql://u:hunter2@h/db", &PoolOptions::default()).await {
            Err(e) => e,
            Ok(_) => panic!("mysql url accepted"),
        };
        assert!(matches!(err, StoreError::BadUrl(_)), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
