//! Callback events: the outbox of signed callbacks, both halves (PostgreSQL and SQLite).
//!
//! An event row is written by a trigger (`migrations/*/0006_callbacks.sql`) in the same
//! statement as the push's state change, one per (push, `push.<state>`). The callback worker
//! claims due events with a lease, POSTs them, and records each attempt with the claim's
//! number as a fencing token: a worker whose lease ran out (another one took the event)
//! cannot overwrite the newer claim's record.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::types::Json;
use sqlx::Row;
use time::OffsetDateTime;

use super::{map_sqlx, millis, StoreResult};

/// Where an event is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CallbackState {
    /// Not delivered yet: waiting for its next attempt (or in flight).
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed until `callbacks.max_attempts` or `callbacks.max_age_hours`.
    GaveUp,
}

impl CallbackState {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackState::Pending => "pending",
            CallbackState::Delivered => "delivered",
            CallbackState::GaveUp => "gave_up",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::GaveUp]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// One delivery attempt of a callback event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallbackAttempt {
    /// 1 for the first attempt.
    pub number: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The receiver's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Why the attempt failed without an answer (timeout, connection refused, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub latency_ms: i64,
}

/// A callback event as `GET /v1/pushes/{id}` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CallbackEvent {
    /// The `webhook-id` header of every delivery of this event.
    pub id: String,
    /// `push.<state>`.
    #[serde(rename = "type")]
    pub event_type: String,
    pub url: String,
    pub state: CallbackState,
    /// When the state change happened (the event's `timestamp`).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the next attempt is due (pending events).
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// Every attempt so far, oldest first.
    pub attempts: Vec<CallbackAttempt>,
}

/// An event claimed by [`super::Store::claim_callbacks`]: this worker alone delivers it
/// until the lease runs out.
#[derive(Debug, Clone)]
pub struct CallbackClaim {
    pub id: String,
    pub push_id: String,
    pub event_type: String,
    /// The client whose `callback_secret` signs the event.
    pub client: String,
    pub url: String,
    /// The push view at the state change.
    pub data: Value,
    pub created_at: OffsetDateTime,
    /// This claim's attempt number (1 for the first claim); the fencing token.
    pub attempt: u32,
    /// Attempts recorded so far.
    pub log: Vec<CallbackAttempt>,
}

/// What to do with an event after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackNext {
    Delivered,
    RetryIn(Duration),
    GiveUp,
}

fn next_parts(next: CallbackNext) -> (&'static str, Option<i64>) {
    match next {
        CallbackNext::Delivered => ("delivered", None),
        CallbackNext::RetryIn(d) => ("pending", Some(millis(d))),
        CallbackNext::GiveUp => ("gave_up", None),
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

const PG_CLAIM: &str = "with due as materialized (
    select id from callback_events
     where state = 'pending' and next_attempt_at <= now()
     order by next_attempt_at
     limit $1
     for update skip locked
)
update callback_events e
   set next_attempt_at = now() + $2::bigint * interval '1 millisecond',
       attempts = e.attempts + 1
  from due
 where e.id = due.id
returning e.id, e.push_id, e.event_type, e.client, e.url, e.data, e.created_at, e.attempts,
          e.attempt_log";

const PG_RECORD: &str = "update callback_events
   set state = $3, attempt_log = $4,
       next_attempt_at = case when $5::bigint is null then next_attempt_at
                              else now() + $5::bigint * interval '1 millisecond' end,
       finished_at = case when $3 = 'pending' then null else now() end
 where id = $1 and attempts = $2 and state = 'pending'";

const PG_LIST: &str = "select id, event_type, url, state, created_at, next_attempt_at,
       finished_at, attempt_log
  from callback_events where push_id = $1 order by created_at, id";

pub(crate) async fn pg_claim(
    pool: &PgPool,
    limit: u32,
    lease: Duration,
) -> StoreResult<Vec<CallbackClaim>> {
    let rows = sqlx::query(PG_CLAIM)
        .bind(i64::from(limit))
        .bind(millis(lease))
        .fetch_all(pool)
        .await
        .map_err(map_sqlx)?;
    rows.iter()
        .map(|row| {
            let attempts: i32 = row.try_get("attempts")?;
            Ok(CallbackClaim {
                id: row.try_get("id")?,
                push_id: row.try_get("push_id")?,
                event_type: row.try_get("event_type")?,
                client: row.try_get("client")?,
                url: row.try_get("url")?,
                data: row.try_get("data")?,
                created_at: row.try_get("created_at")?,
                attempt: u32::try_from(attempts).unwrap_or(0),
                log: row
                    .try_get::<Json<Vec<CallbackAttempt>>, _>("attempt_log")?
                    .0,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(map_sqlx)
}

pub(crate) async fn pg_record(
    pool: &PgPool,
    claim: &CallbackClaim,
    log: &[CallbackAttempt],
    next: CallbackNext,
) -> StoreResult<bool> {
    let (state, retry_ms) = next_parts(next);
    let done = sqlx::query(PG_RECORD)
        .bind(&claim.id)
        .bind(i32::try_from(claim.attempt).unwrap_or(i32::MAX))
        .bind(state)
        .bind(Json(log))
        .bind(retry_ms)
        .execute(pool)
        .await
        .map_err(map_sqlx)?;
    Ok(done.rows_affected() > 0)
}

pub(crate) async fn pg_list(pool: &PgPool, push_id: &str) -> StoreResult<Vec<CallbackEvent>> {
    let rows = sqlx::query(PG_LIST)
        .bind(push_id)
        .fetch_all(pool)
        .await
        .map_err(map_sqlx)?;
    rows.iter()
        .map(|row| {
            let state: String = row.try_get("state")?;
            Ok(CallbackEvent {
                id: row.try_get("id")?,
                event_type: row.try_get("event_type")?,
                url: row.try_get("url")?,
                state: parse_state(&state)?,
                created_at: row.try_get("created_at")?,
                next_attempt_at: if state == "pending" {
                    row.try_get("next_attempt_at")?
                } else {
                    None
                },
                finished_at: row.try_get("finished_at")?,
                attempts: row
                    .try_get::<Json<Vec<CallbackAttempt>>, _>("attempt_log")?
                    .0,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(map_sqlx)
}

fn parse_state(s: &str) -> Result<CallbackState, sqlx::Error> {
    CallbackState::parse(s)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown callback state {s:?}").into()))
}

// ---------------------------------------------------------------------------------------
// SQLite (run inside `begin immediate` where it claims: one writer at a time)

const SQLITE_CLAIM: &str = "update callback_events
   set next_attempt_at = ?1 + ?3, attempts = attempts + 1
 where id in (
    select id from callback_events
     where state = 'pending' and next_attempt_at <= ?1
     order by next_attempt_at
     limit ?2)
returning id, push_id, event_type, client, url, data, created_at, attempts, attempt_log";

const SQLITE_RECORD: &str = "update callback_events
   set state = ?3, attempt_log = ?4,
       next_attempt_at = case when ?5 is null then next_attempt_at else ?6 + ?5 end,
       finished_at = case when ?3 = 'pending' then null else ?6 end
 where id = ?1 and attempts = ?2 and state = 'pending'";

const SQLITE_LIST: &str = "select id, event_type, url, state, created_at, next_attempt_at,
       finished_at, attempt_log
  from callback_events where push_id = ?1 order by created_at, id";

pub(crate) async fn sqlite_claim(
    pool: &SqlitePool,
    limit: u32,
    lease: Duration,
    now_ms: i64,
) -> Result<Vec<CallbackClaim>, sqlx::Error> {
    let mut tx = pool.begin_with("begin immediate").await?;
    let rows = sqlx::query(SQLITE_CLAIM)
        .bind(now_ms)
        .bind(i64::from(limit))
        .bind(millis(lease))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    rows.iter()
        .map(|row| {
            let attempts: i64 = row.try_get("attempts")?;
            Ok(CallbackClaim {
                id: row.try_get("id")?,
                push_id: row.try_get("push_id")?,
                event_type: row.try_get("event_type")?,
                client: row.try_get("client")?,
                url: row.try_get("url")?,
                data: row.try_get::<Json<Value>, _>("data")?.0,
                created_at: from_ms(row.try_get("created_at")?)?,
                attempt: u32::try_from(attempts).unwrap_or(0),
                log: row
                    .try_get::<Json<Vec<CallbackAttempt>>, _>("attempt_log")?
                    .0,
            })
        })
        .collect()
}

pub(crate) async fn sqlite_record(
    pool: &SqlitePool,
    claim: &CallbackClaim,
    log: &[CallbackAttempt],
    next: CallbackNext,
    now_ms: i64,
) -> Result<bool, sqlx::Error> {
    let (state, retry_ms) = next_parts(next);
    let done = sqlx::query(SQLITE_RECORD)
        .bind(&claim.id)
        .bind(i64::from(claim.attempt))
        .bind(state)
        .bind(Json(log))
        .bind(retry_ms)
        .bind(now_ms)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub(crate) async fn sqlite_list(
    pool: &SqlitePool,
    push_id: &str,
) -> Result<Vec<CallbackEvent>, sqlx::Error> {
    let rows = sqlx::query(SQLITE_LIST)
        .bind(push_id)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| {
            let state: String = row.try_get("state")?;
            Ok(CallbackEvent {
                id: row.try_get("id")?,
                event_type: row.try_get("event_type")?,
                url: row.try_get("url")?,
                state: parse_state(&state)?,
                created_at: from_ms(row.try_get("created_at")?)?,
                next_attempt_at: if state == "pending" {
                    Some(from_ms(row.try_get("next_attempt_at")?)?)
                } else {
                    None
                },
                finished_at: row
                    .try_get::<Option<i64>, _>("finished_at")?
                    .map(from_ms)
                    .transpose()?,
                attempts: row
                    .try_get::<Json<Vec<CallbackAttempt>>, _>("attempt_log")?
                    .0,
            })
        })
        .collect()
}

fn from_ms(ms: i64) -> Result<OffsetDateTime, sqlx::Error> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| sqlx::Error::Decode(format!("bad timestamp {ms}: {e}").into()))
}
