//! Parent pushes and their parts (fan-out to an app group, lists split into calls of at
//! most 500), both halves (PostgreSQL and SQLite).
//!
//! A parent is the row of what the caller sent: its idempotency key, history line and
//! callbacks. Each part is an asynchronous push of its own (one app, one Umeng call's
//! audience) that the delivery worker claims, sends, retries and polls like any other. The
//! parent stays `pending` until every part has its outcome; then [`derive`] gives it one
//! status. Admission is one transaction: the key, every part's quota slot (all or
//! nothing), the parent and its parts.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::types::Json;
use sqlx::Row;
use time::OffsetDateTime;

use super::sqlite::{from_ms, to_ms};
use super::{attempts_of, non_negative, Attempt, NewPush, PushRecord, PushStatus, QuotaClaim};
use crate::quota::QuotaState;

/// One part of a parent push, as admitted (and as a parent that waits as a whole keeps
/// its parts until it is released).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewPart {
    /// The part as an asynchronous push of its member app (`delivery` set: its outbox,
    /// hold and deadline; `defer_quota` and `quota_wait` are not used).
    pub push: NewPush,
    /// 1, 2, ... within the parent; the same numbering on every repeat of the request.
    pub part_no: u32,
    /// Tokens or aliases it addresses (`None`: a filter, or the whole app).
    pub audience: Option<u32>,
    /// The quota slot it takes at admission.
    pub quota: Option<QuotaClaim>,
}

/// The result of [`super::Store::admit_parts`].
#[derive(Debug, Clone)]
pub enum PartsAdmission {
    /// Stored: the parent and every part (`resent` empty), or, for a repeat of a parent
    /// with parts that definitely failed, those parts (by number) are waiting again.
    Admitted {
        push_id: String,
        resent: Vec<u32>,
        /// The windows slots were taken from, with the app each belongs to.
        quotas: Vec<(String, QuotaState)>,
    },
    /// Nothing was written: `app`'s window is full.
    RateLimited { app: String, quota: QuotaState },
    /// Nothing was written: a repeat; answer with the parent as it is.
    Replay { push: Box<PushRecord> },
    /// Nothing was written: the key's owner is a synchronous push still being sent.
    InFlight { push_id: String },
    /// Nothing was written: same key, a different request.
    Mismatch { push_id: String },
}

/// One part, as its parent's record shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PushPart {
    /// The part's own push id (`GET /v1/pushes/{id}` shows its whole record).
    pub id: String,
    /// 1, 2, ... within the parent.
    pub part: u32,
    pub app: String,
    pub platform: String,
    /// Tokens or aliases it addresses (absent for a filter or the whole app).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<u32>,
    pub status: PushStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Task-class parts: the `out_biz_no` sent to Umeng (derived from the parent's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_biz_no: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_msg: Option<String>,
    /// The HTTP status this part alone would have been answered with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Every Umeng call made for this part, in order.
    pub attempts: Vec<Attempt>,
    /// Waiting parts: when a worker will try next.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
}

/// A parent's settled outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentOutcome {
    pub status: PushStatus,
    pub http_status: Option<u16>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
}

/// The HTTP status of a partial outcome: 207 Multi-Status. It is a 2xx because part of the
/// audience was reached (a client must not resend the whole request), and not a 200/201
/// because the body must be read: `parts` says which parts failed, and a repeat with the
/// same `out_biz_no` re-sends exactly those.
pub const PARTIAL_HTTP_STATUS: u16 = 207;

/// The parent's status once every part has its outcome (`None` while a part is waiting
/// or being sent). A part that Umeng accepted counts as accepted whatever its task state
/// since (queued, done, cancelled, ...):
/// - `accepted` (201): every part accepted;
/// - `withdrawn`: every part withdrawn before it was sent;
/// - `failed`: no part accepted or unknown (at least one failed; any others withdrawn);
///   answered with the failed parts' common HTTP status, else 502;
/// - `unknown`: no part failed, at least one may or may not have reached Umeng (504 when
///   one timed out, else 502);
/// - `partial` (207): at least one part failed or was withdrawn, and at least one was
///   accepted or is unknown.
pub fn derive(parts: &[(PushStatus, Option<u16>)]) -> Option<ParentOutcome> {
    if parts.is_empty() {
        return None;
    }
    let (mut accepted, mut failed, mut unknown, mut withdrawn) = (0, 0, 0, 0);
    for (status, _) in parts {
        match status {
            s if s.is_waiting() => return None,
            PushStatus::Pending => return None,
            PushStatus::Failed | PushStatus::Partial => failed += 1,
            PushStatus::Unknown => unknown += 1,
            PushStatus::Withdrawn => withdrawn += 1,
            _ => accepted += 1,
        }
    }
    let total = parts.len();
    let http_of = |want: PushStatus| -> Vec<u16> {
        parts
            .iter()
            .filter(|(s, _)| *s == want)
            .filter_map(|(_, h)| *h)
            .collect()
    };
    let summary = |what: &str| {
        let mut text = format!("{} of {total} parts {what}", failed + withdrawn);
        if unknown > 0 {
            text.push_str(&format!(", {unknown} unknown"));
        }
        text.push_str("; see parts");
        text
    };
    let outcome = if accepted == total {
        ParentOutcome {
            status: PushStatus::Accepted,
            http_status: Some(201),
            error_code: None,
            error_msg: None,
        }
    } else if withdrawn == total {
        ParentOutcome {
            status: PushStatus::Withdrawn,
            http_status: None,
            error_code: None,
            error_msg: None,
        }
    } else if accepted == 0 && unknown == 0 {
        let codes = http_of(PushStatus::Failed);
        let common = codes
            .first()
            .copied()
            .filter(|first| codes.iter().all(|c| c == first));
        ParentOutcome {
            status: PushStatus::Failed,
            http_status: Some(common.unwrap_or(502)),
            error_code: Some("parts_failed".into()),
            error_msg: Some(summary("failed")),
        }
    } else if failed == 0 && withdrawn == 0 {
        let timed_out = http_of(PushStatus::Unknown).contains(&504);
        ParentOutcome {
            status: PushStatus::Unknown,
            http_status: Some(if timed_out { 504 } else { 502 }),
            error_code: Some("parts_unknown".into()),
            error_msg: Some(format!(
                "{unknown} of {total} parts may or may not have reached Umeng; see parts"
            )),
        }
    } else {
        ParentOutcome {
            status: PushStatus::Partial,
            http_status: Some(PARTIAL_HTTP_STATUS),
            error_code: Some("parts_failed".into()),
            error_msg: Some(summary("did not go out")),
        }
    };
    Some(outcome)
}

/// The statuses a part is in while it still waits or is being sent (SQL list).
const OPEN_PART_STATES: &str = "('pending', 'awaiting_send', 'awaiting_send_at', 'awaiting_quota')";

fn decode_err(message: String) -> sqlx::Error {
    sqlx::Error::Decode(message.into())
}

/// `(status, http_status)` of each part row (columns `status` text, `http_status` as a
/// 64-bit integer), either backend.
fn part_states<R: Row>(rows: &[R]) -> Result<Vec<(PushStatus, Option<u16>)>, sqlx::Error>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
{
    rows.iter()
        .map(|row| {
            let status: String = row.try_get("status")?;
            let http: Option<i64> = row.try_get("http_status")?;
            let status = PushStatus::parse(&status)
                .ok_or_else(|| decode_err(format!("unknown push status {status:?}")))?;
            Ok((status, http.and_then(|h| u16::try_from(h).ok())))
        })
        .collect()
}

/// The numbers of the parts that definitely failed, and how many part rows there are
/// (columns `part_no` as a 64-bit integer, `failed` boolean), either backend.
fn part_outcomes<R: Row>(rows: &[R]) -> Result<(Vec<u32>, usize), sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
{
    let mut failed = Vec::new();
    for row in rows {
        if row.try_get::<bool, _>("failed")? {
            failed.extend(u32::try_from(row.try_get::<i64, _>("part_no")?).ok());
        }
    }
    Ok((failed, rows.len()))
}

/// What a repeat of a parent's key leads to, once the owner is known.
enum Repeat {
    Answer(PartsAdmission),
    Replay(String),
    Resend(String, Vec<u32>),
    /// The owner is a parent that failed before any part was created (its quota window
    /// was full when it was due, or its deadline passed): the key moves to a new parent.
    Reclaim(String),
}

/// Judges a repeat of the key: `failed_parts` lists the owner's parts that definitely
/// failed (read only when the owner is a settled parent).
fn judge_repeat(
    parent: &NewPush,
    owner_id: String,
    fingerprint: &str,
    status: &str,
    owner_async: bool,
    parts: Option<(Vec<u32>, usize)>,
) -> Repeat {
    if fingerprint != parent.fingerprint {
        return Repeat::Answer(PartsAdmission::Mismatch { push_id: owner_id });
    }
    if status == PushStatus::Pending.as_str() && !owner_async {
        return Repeat::Answer(PartsAdmission::InFlight { push_id: owner_id });
    }
    match parts {
        Some((_, 0)) if status == PushStatus::Failed.as_str() => Repeat::Reclaim(owner_id),
        Some((failed, _)) if !failed.is_empty() => Repeat::Resend(owner_id, failed),
        _ => Repeat::Replay(owner_id),
    }
}

/// Whether a parent in `status` may re-send failed parts.
fn resumable(status: &str, is_parent: bool) -> bool {
    is_parent && (status == PushStatus::Partial.as_str() || status == PushStatus::Failed.as_str())
}

/// The parts to take quota slots for, in a fixed order (appkey, kind) so that two
/// admissions never wait for each other's counters in opposite orders.
fn slots_to_take<'a>(parts: &'a [NewPart], only: Option<&[u32]>) -> Vec<&'a NewPart> {
    let mut out: Vec<&NewPart> = parts
        .iter()
        .filter(|p| p.quota.is_some())
        .filter(|p| only.is_none_or(|o| o.contains(&p.part_no)))
        .collect();
    out.sort_by(|a, b| {
        let ka = (&a.push.appkey, a.quota.map(|q| q.kind.as_str()));
        let kb = (&b.push.appkey, b.quota.map(|q| q.kind.as_str()));
        ka.cmp(&kb)
    });
    out
}

/// What releasing a due parent that waits as a whole came to, short of going out.
enum Release {
    /// Its deadline passed.
    Expired { waited_for_quota: bool },
    /// A member's window is full.
    Full {
        app: String,
        quota: QuotaState,
        wait: bool,
    },
}

impl Release {
    /// `(error_code, error_msg, http_status)` when the parent fails; `None` when it waits.
    fn failure(&self) -> Option<(&'static str, String, u16)> {
        match self {
            Release::Expired {
                waited_for_quota: true,
            } => Some((
                "quota_wait_expired",
                "no window had room for every part before the push's deadline".into(),
                429,
            )),
            Release::Expired { .. } => Some((
                "delivery_expired",
                "the push could not be sent before its deadline".into(),
                504,
            )),
            Release::Full {
                app,
                quota,
                wait: false,
            } => Some((
                "quota_exhausted",
                format!(
                    "the {} quota window of app {app} was full when the push was due",
                    quota.kind.as_str()
                ),
                429,
            )),
            Release::Full { wait: true, .. } => None,
        }
    }

    /// Seconds until the full window ends.
    fn wait_secs(&self) -> i64 {
        match self {
            Release::Full { quota, .. } => quota.reset_after_secs.max(1),
            Release::Expired { .. } => 1,
        }
    }
}

// ---------------------------------------------------------------- PostgreSQL

const PG_INSERT_KEY: &str =
    "insert into idempotency_keys (appkey, out_biz_no, fingerprint, push_id)
values ($1, $2, $3, $4) on conflict (appkey, out_biz_no) do nothing";

/// The key's owner, its row locked: concurrent repeats of one parent queue here.
const PG_KEY_OWNER: &str = "select k.fingerprint, k.push_id, p.status, p.delivery, p.parts
  from idempotency_keys k join pushes p on p.id = k.push_id
 where k.appkey = $1 and k.out_biz_no = $2
   for update of p";

/// A parent's parts: their numbers and whether each definitely failed.
const PG_PART_OUTCOMES: &str = "select part_no::bigint as part_no, status = 'failed' as failed
  from pushes where parent_id = $1 order by part_no";

const PG_MOVE_KEY: &str = "update idempotency_keys
   set push_id = $3, fingerprint = $4, created_at = now()
 where appkey = $1 and out_biz_no = $2 and push_id = $5";

const PG_TAKE_SLOT: &str = "with w as (
    select (floor((extract(epoch from now()) + 28800) / $3::bigint) * $3::bigint - 28800)::bigint
               as ws,
           extract(epoch from now())::float8 as e
)
select w.ws as window_start,
       greatest(1, ceil(w.ws + $3::bigint - w.e))::bigint as reset_after_secs,
       umgw_take_slot($1, $2, w.ws, $4) as used
  from w";

const PG_SLOT_USED: &str = "select coalesce((select used from quota_counters
     where appkey = $1 and kind = $2 and window_start = $3), 0) as used";

/// Slots still held by the parts about to be re-sent go back first (one logical part
/// holds one slot).
const PG_GIVE_BACK: &str = "with r as (
    update pushes set quota_refunded = true, updated_at = now()
     where parent_id = $1 and part_no = any($2) and quota_window is not null
       and not quota_refunded
 returning appkey, quota_kind, quota_window
), n as (
    select appkey, quota_kind, quota_window, count(*)::integer as held from r group by 1, 2, 3
)
update quota_counters c set used = greatest(c.used - n.held, 0)
  from n
 where c.appkey = n.appkey and c.kind = n.quota_kind and c.window_start = n.quota_window";

const PG_INSERT_PARENT: &str = "insert into pushes (id, app, appkey, platform, cast_type,
    task_class, production_mode, client, out_biz_no, fingerprint, status, description, request,
    delivery, send_at, parts)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending', $11, $12, 'async', $13, $14)";

const PG_INSERT_PART: &str = "insert into pushes (id, app, appkey, platform, cast_type,
    task_class, production_mode, client, out_biz_no, fingerprint, status, description, request,
    quota_kind, quota_window, quota_limit, quota_unit, delivery, outbox, next_attempt_at,
    send_at, deliver_by, parent_id, part_no, audience)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, 'async',
        $18, coalesce($19, now()), $20, $21, $22, $23, $24)";

const PG_REOPEN_PARENT: &str = "update pushes
   set status = 'pending', http_status = null, error_code = null, error_msg = null,
       finished_at = null, updated_at = now()
 where id = $1 and status in ('partial', 'failed')";

const PG_RESEND_PART: &str = "update pushes
   set status = $3, outbox = $4, next_attempt_at = coalesce($5, now()), deliver_by = $6,
       deliver_claims = 0, deliver_lease_until = null, quota_window = $7,
       quota_refunded = false, error_code = null, error_msg = null, http_status = null,
       finished_at = null, updated_at = now()
 where parent_id = $1 and part_no = $2 and status = 'failed'";

const PG_PART_STATES: &str = "select status, http_status::bigint as http_status from pushes
 where parent_id = $1 order by part_no";

const PG_SETTLE: &str = "update pushes
   set status = $2, http_status = $3, error_code = $4, error_msg = $5, finished_at = now(),
       updated_at = now(),
       sent_at = (select min(c.sent_at) from pushes c where c.parent_id = $1)
 where id = $1 and status = 'pending'";

fn pg_settleable() -> String {
    format!(
        "select p.id from pushes p
          where p.parts is not null and p.status = 'pending'
            and not exists (select 1 from pushes c
                             where c.parent_id = p.id and c.status in {OPEN_PART_STATES})
          order by p.created_at limit $1"
    )
}

const PART_COLUMNS: &str = "id, part_no, app, platform, audience, status, msg_id, task_id, \
     out_biz_no, error_code, error_msg, http_status, attempts, next_attempt_at, finished_at";

const PG_INSERT_GATED: &str = "insert into pushes (id, app, appkey, platform, cast_type,
    task_class, production_mode, client, out_biz_no, fingerprint, status, description, request,
    delivery, send_at, parts, outbox, next_attempt_at, deliver_by, quota_wait)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'async', $14, $15, $16,
        coalesce($17, now()), $18, $19)";

/// Parents that wait as a whole (held, or waiting for quota) and are due.
const PG_DUE_GATED: &str = "select id from pushes
 where parts is not null and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
   and next_attempt_at <= now()
 order by next_attempt_at, created_at, id limit $1";

const PG_LOCK_GATED: &str = "select status, outbox, quota_wait, deliver_by <= now() as expired
  from pushes
 where id = $1 and parts is not null
   and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
   and next_attempt_at <= now()
   for update skip locked";

const PG_RELEASED: &str = "update pushes
   set status = 'pending', outbox = null, next_attempt_at = null, updated_at = now()
 where id = $1";

const PG_GATED_WAITS: &str = "update pushes
   set status = 'awaiting_quota', updated_at = now(),
       next_attempt_at = least(now() + $2::bigint * interval '1 second', deliver_by)
 where id = $1 and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')";

const PG_GATED_FAILS: &str = "update pushes
   set status = 'failed', error_code = $2, error_msg = $3, http_status = $4, outbox = null,
       next_attempt_at = null, finished_at = now(), updated_at = now()
 where id = $1 and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')";

/// Slots taken for parts: the window each part's slot came from, and the states.
#[derive(Default)]
struct Taken {
    windows: Vec<(u32, i64)>,
    quotas: Vec<(String, QuotaState)>,
}

impl Taken {
    fn window_of(&self, part_no: u32) -> Option<i64> {
        self.windows
            .iter()
            .find(|(p, _)| *p == part_no)
            .map(|(_, w)| *w)
    }
}

/// Takes every slot (`only`: of those parts), all or nothing: `Err((app, state))` names
/// the first full window; the caller rolls back what was taken.
async fn pg_take(
    conn: &mut sqlx::PgConnection,
    parts: &[NewPart],
    only: Option<&[u32]>,
) -> Result<Result<Taken, (String, QuotaState)>, sqlx::Error> {
    let mut taken = Taken::default();
    for part in slots_to_take(parts, only) {
        let Some(claim) = part.quota else { continue };
        let row = sqlx::query(PG_TAKE_SLOT)
            .bind(&part.push.appkey)
            .bind(claim.kind.as_str())
            .bind(claim.limit.window.seconds())
            .bind(i32::try_from(claim.limit.limit).unwrap_or(i32::MAX))
            .fetch_one(&mut *conn)
            .await?;
        let window_start: i64 = row.try_get("window_start")?;
        let mut state = QuotaState {
            kind: claim.kind,
            limit: claim.limit.limit,
            window: claim.limit.window,
            used: 0,
            window_start,
            reset_after_secs: row.try_get("reset_after_secs")?,
        };
        match row.try_get::<Option<i32>, _>("used")? {
            Some(used) => {
                state.used = u32::try_from(used).unwrap_or(0);
                taken.windows.push((part.part_no, window_start));
                taken.quotas.push((part.push.app.clone(), state));
            }
            None => {
                let used: i32 = sqlx::query_scalar(PG_SLOT_USED)
                    .bind(&part.push.appkey)
                    .bind(claim.kind.as_str())
                    .bind(window_start)
                    .fetch_one(&mut *conn)
                    .await?;
                state.used = u32::try_from(used).unwrap_or(0);
                return Ok(Err((part.push.app.clone(), state)));
            }
        }
    }
    Ok(Ok(taken))
}

/// Inserts the part rows: waiting (`awaiting_send`, or `awaiting_send_at` when held and
/// not `released`) with their slots' windows.
async fn pg_insert_parts(
    conn: &mut sqlx::PgConnection,
    parent_id: &str,
    parts: &[NewPart],
    taken: &Taken,
    released: bool,
) -> Result<(), sqlx::Error> {
    for part in parts {
        let p = &part.push;
        let Some(d) = &p.delivery else { continue };
        let held = d.hold && !released;
        let status = if held {
            PushStatus::AwaitingSendAt
        } else {
            PushStatus::AwaitingSend
        };
        sqlx::query(PG_INSERT_PART)
            .bind(&p.id)
            .bind(&p.app)
            .bind(&p.appkey)
            .bind(&p.platform)
            .bind(&p.cast_type)
            .bind(p.task_class)
            .bind(p.production_mode)
            .bind(&p.client)
            .bind(&p.out_biz_no)
            .bind(&p.fingerprint)
            .bind(status.as_str())
            .bind(&p.description)
            .bind(&p.request)
            .bind(part.quota.map(|c| c.kind.as_str()))
            .bind(taken.window_of(part.part_no))
            .bind(
                part.quota
                    .map(|c| i32::try_from(c.limit.limit).unwrap_or(i32::MAX)),
            )
            .bind(part.quota.map(|c| c.limit.window.seconds()))
            .bind(&d.outbox)
            .bind(held.then_some(p.send_at).flatten())
            .bind(p.send_at)
            .bind(d.deliver_by)
            .bind(parent_id)
            .bind(part.part_no as i32)
            .bind(part.audience.map(|a| a as i32))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Inserts a parent that waits as a whole, its parts in its outbox until it is released.
async fn pg_insert_gated(
    conn: &mut sqlx::PgConnection,
    parent: &NewPush,
    parts: &[NewPart],
    status: PushStatus,
    next_attempt_at: Option<OffsetDateTime>,
) -> Result<(), sqlx::Error> {
    let Some(d) = &parent.delivery else {
        return Err(decode_err("a waiting parent needs its delivery".into()));
    };
    let outbox = serde_json::to_value(parts).map_err(|e| decode_err(e.to_string()))?;
    sqlx::query(PG_INSERT_GATED)
        .bind(&parent.id)
        .bind(&parent.app)
        .bind(&parent.appkey)
        .bind(&parent.platform)
        .bind(&parent.cast_type)
        .bind(parent.task_class)
        .bind(parent.production_mode)
        .bind(&parent.client)
        .bind(&parent.out_biz_no)
        .bind(&parent.fingerprint)
        .bind(status.as_str())
        .bind(&parent.description)
        .bind(&parent.request)
        .bind(parent.send_at)
        .bind(i32::try_from(parts.len()).unwrap_or(i32::MAX))
        .bind(outbox)
        .bind(next_attempt_at)
        .bind(d.deliver_by)
        .bind(d.quota_wait)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// See [`super::Store::admit_parts`]. One transaction; any early return rolls back.
pub(crate) async fn pg_admit(
    pool: &PgPool,
    parent: NewPush,
    parts: Vec<NewPart>,
) -> Result<PartsAdmission, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut resend: Option<(String, Vec<u32>)> = None;
    if let Some(key) = &parent.out_biz_no {
        let claimed = sqlx::query(PG_INSERT_KEY)
            .bind(&parent.appkey)
            .bind(key)
            .bind(&parent.fingerprint)
            .bind(&parent.id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !claimed {
            let Some(owner) = sqlx::query(PG_KEY_OWNER)
                .bind(&parent.appkey)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?
            else {
                return Err(decode_err(format!(
                    "the owner of out_biz_no {key:?} vanished during admission"
                )));
            };
            let owner_id: String = owner.try_get("push_id")?;
            let status: String = owner.try_get("status")?;
            let is_parent = owner.try_get::<Option<i32>, _>("parts")?.is_some();
            let parts_state = if resumable(&status, is_parent) {
                let rows = sqlx::query(PG_PART_OUTCOMES)
                    .bind(&owner_id)
                    .fetch_all(&mut *tx)
                    .await?;
                Some(part_outcomes(&rows)?)
            } else {
                None
            };
            let fingerprint: String = owner.try_get("fingerprint")?;
            let owner_async = owner.try_get::<Option<String>, _>("delivery")?.is_some();
            match judge_repeat(
                &parent,
                owner_id,
                &fingerprint,
                &status,
                owner_async,
                parts_state,
            ) {
                Repeat::Answer(answer) => {
                    tx.rollback().await?;
                    return Ok(answer);
                }
                Repeat::Replay(id) => {
                    tx.rollback().await?;
                    let record = super::postgres::get_push_with_parts(pool, &id)
                        .await?
                        .ok_or_else(|| decode_err(format!("push {id} owning the key is gone")))?;
                    return Ok(PartsAdmission::Replay {
                        push: Box::new(record),
                    });
                }
                Repeat::Resend(id, numbers) => resend = Some((id, numbers)),
                Repeat::Reclaim(old) => {
                    // The key's foreign key is checked at commit: the new parent is
                    // inserted below.
                    sqlx::query(PG_MOVE_KEY)
                        .bind(&parent.appkey)
                        .bind(key)
                        .bind(&parent.id)
                        .bind(&parent.fingerprint)
                        .bind(&old)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
    }

    // A parent held until its send_at waits as a whole: its slots are taken when it is due.
    let gate = parent.delivery.as_ref().filter(|_| resend.is_none());
    if let Some(d) = gate.filter(|d| d.hold) {
        pg_insert_gated(&mut tx, &parent, &parts, d.status(), parent.send_at).await?;
        tx.commit().await?;
        return Ok(PartsAdmission::Admitted {
            push_id: parent.id,
            resent: Vec::new(),
            quotas: Vec::new(),
        });
    }

    if let Some((owner, numbers)) = &resend {
        let numbers_i32: Vec<i32> = numbers.iter().map(|&n| n as i32).collect();
        sqlx::query(PG_GIVE_BACK)
            .bind(owner)
            .bind(&numbers_i32)
            .execute(&mut *tx)
            .await?;
    }

    // Every slot, all or nothing. With "wait", in a savepoint: a full window undoes the
    // slots alone, and the parent (its key claimed) waits as a whole for the window's end.
    let only = resend.as_ref().map(|(_, n)| n.as_slice());
    let waits = gate.filter(|d| d.quota_wait);
    let taken = if let Some(d) = waits {
        sqlx::query("savepoint slots").execute(&mut *tx).await?;
        match pg_take(&mut tx, &parts, only).await? {
            Ok(taken) => taken,
            Err((_, quota)) => {
                sqlx::query("rollback to savepoint slots")
                    .execute(&mut *tx)
                    .await?;
                let next = OffsetDateTime::now_utc()
                    + time::Duration::seconds(quota.reset_after_secs.max(1));
                let status = PushStatus::AwaitingQuota;
                pg_insert_gated(
                    &mut tx,
                    &parent,
                    &parts,
                    status,
                    Some(next.min(d.deliver_by)),
                )
                .await?;
                tx.commit().await?;
                return Ok(PartsAdmission::Admitted {
                    push_id: parent.id,
                    resent: Vec::new(),
                    quotas: Vec::new(),
                });
            }
        }
    } else {
        match pg_take(&mut tx, &parts, only).await? {
            Ok(taken) => taken,
            Err((app, quota)) => {
                tx.rollback().await?;
                return Ok(PartsAdmission::RateLimited { app, quota });
            }
        }
    };

    let (push_id, resent) = match resend {
        Some((owner, numbers)) => {
            let reopened = sqlx::query(PG_REOPEN_PARENT)
                .bind(&owner)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if reopened != 1 {
                tx.rollback().await?;
                return Ok(PartsAdmission::InFlight { push_id: owner });
            }
            for part in parts.iter().filter(|p| numbers.contains(&p.part_no)) {
                let Some(d) = &part.push.delivery else {
                    continue;
                };
                sqlx::query(PG_RESEND_PART)
                    .bind(&owner)
                    .bind(part.part_no as i32)
                    .bind(d.status().as_str())
                    .bind(&d.outbox)
                    .bind(d.hold.then_some(part.push.send_at).flatten())
                    .bind(d.deliver_by)
                    .bind(taken.window_of(part.part_no))
                    .execute(&mut *tx)
                    .await?;
            }
            (owner, numbers)
        }
        None => {
            sqlx::query(PG_INSERT_PARENT)
                .bind(&parent.id)
                .bind(&parent.app)
                .bind(&parent.appkey)
                .bind(&parent.platform)
                .bind(&parent.cast_type)
                .bind(parent.task_class)
                .bind(parent.production_mode)
                .bind(&parent.client)
                .bind(&parent.out_biz_no)
                .bind(&parent.fingerprint)
                .bind(&parent.description)
                .bind(&parent.request)
                .bind(parent.send_at)
                .bind(i32::try_from(parts.len()).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await?;
            pg_insert_parts(&mut tx, &parent.id, &parts, &taken, false).await?;
            (parent.id, Vec::new())
        }
    };
    tx.commit().await?;
    Ok(PartsAdmission::Admitted {
        push_id,
        resent,
        quotas: taken.quotas,
    })
}

/// See [`super::Store::release_parents`].
pub(crate) async fn pg_release(pool: &PgPool, limit: u32) -> Result<u64, sqlx::Error> {
    let ids: Vec<String> = sqlx::query_scalar(PG_DUE_GATED)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    let mut released = 0;
    for id in ids {
        if pg_release_one(pool, &id).await? {
            released += 1;
        }
    }
    Ok(released)
}

/// Releases one due parent (see [`Release`]); false when another replica has it.
async fn pg_release_one(pool: &PgPool, id: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(row) = sqlx::query(PG_LOCK_GATED)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Ok(false);
    };
    let status: String = row.try_get("status")?;
    let quota_wait: bool = row.try_get("quota_wait")?;
    let expired: Option<bool> = row.try_get("expired")?;
    let parts: Vec<NewPart> = serde_json::from_value(
        row.try_get::<Option<Value>, _>("outbox")?
            .unwrap_or(Value::Null),
    )
    .map_err(|e| decode_err(format!("the parts of parent {id} cannot be read: {e}")))?;
    let verdict = if expired == Some(true) {
        Release::Expired {
            waited_for_quota: status == PushStatus::AwaitingQuota.as_str(),
        }
    } else {
        match pg_take(&mut tx, &parts, None).await? {
            Ok(taken) => {
                pg_insert_parts(&mut tx, id, &parts, &taken, true).await?;
                sqlx::query(PG_RELEASED).bind(id).execute(&mut *tx).await?;
                tx.commit().await?;
                return Ok(true);
            }
            Err((app, quota)) => Release::Full {
                app,
                quota,
                wait: quota_wait,
            },
        }
    };
    tx.rollback().await?;
    match verdict.failure() {
        Some((code, msg, http)) => {
            sqlx::query(PG_GATED_FAILS)
                .bind(id)
                .bind(code)
                .bind(msg)
                .bind(i32::from(http))
                .execute(pool)
                .await?;
        }
        None => {
            sqlx::query(PG_GATED_WAITS)
                .bind(id)
                .bind(verdict.wait_secs())
                .execute(pool)
                .await?;
        }
    }
    Ok(true)
}

pub(crate) async fn pg_settle(
    pool: &PgPool,
    parent_id: &str,
) -> Result<Option<PushStatus>, sqlx::Error> {
    let rows = sqlx::query(PG_PART_STATES)
        .bind(parent_id)
        .fetch_all(pool)
        .await?;
    let Some(outcome) = derive(&part_states(&rows)?) else {
        return Ok(None);
    };
    let done = sqlx::query(PG_SETTLE)
        .bind(parent_id)
        .bind(outcome.status.as_str())
        .bind(outcome.http_status.map(i32::from))
        .bind(&outcome.error_code)
        .bind(&outcome.error_msg)
        .execute(pool)
        .await?;
    Ok((done.rows_affected() == 1).then_some(outcome.status))
}

pub(crate) async fn pg_settle_all(pool: &PgPool, limit: u32) -> Result<u64, sqlx::Error> {
    let ids: Vec<String> = sqlx::query_scalar(&pg_settleable())
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    let mut settled = 0;
    for id in ids {
        if pg_settle(pool, &id).await?.is_some() {
            settled += 1;
        }
    }
    Ok(settled)
}

pub(crate) async fn pg_list(pool: &PgPool, parent_id: &str) -> Result<Vec<PushPart>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "select {PART_COLUMNS} from pushes where parent_id = $1 order by part_no"
    ))
    .bind(parent_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let status: String = row.try_get("status")?;
            let http: Option<i32> = row.try_get("http_status")?;
            Ok(PushPart {
                id: row.try_get("id")?,
                part: non_negative(row.try_get::<Option<i32>, _>("part_no")?.map(i64::from))
                    .unwrap_or(0),
                app: row.try_get("app")?,
                platform: row.try_get("platform")?,
                audience: non_negative(row.try_get::<Option<i32>, _>("audience")?.map(i64::from)),
                status: PushStatus::parse(&status)
                    .ok_or_else(|| decode_err(format!("unknown push status {status:?}")))?,
                msg_id: row.try_get("msg_id")?,
                task_id: row.try_get("task_id")?,
                out_biz_no: row.try_get("out_biz_no")?,
                error_code: row.try_get("error_code")?,
                error_msg: row.try_get("error_msg")?,
                http_status: http.and_then(|h| u16::try_from(h).ok()),
                attempts: attempts_of(row.try_get::<Value, _>("attempts")?)?,
                next_attempt_at: row.try_get("next_attempt_at")?,
                finished_at: row.try_get("finished_at")?,
            })
        })
        .collect()
}

// ---------------------------------------------------------------- SQLite

const SQLITE_KEY_OWNER: &str = "select k.fingerprint, k.push_id, p.status, p.delivery, p.parts
  from idempotency_keys k join pushes p on p.id = k.push_id
 where k.appkey = ?1 and k.out_biz_no = ?2";

const SQLITE_INSERT_KEY: &str = "insert into idempotency_keys (appkey, out_biz_no, fingerprint,
    push_id, created_at)
values (?1, ?2, ?3, ?4, ?5)";

const SQLITE_PART_OUTCOMES: &str = "select part_no, status = 'failed' as failed from pushes
 where parent_id = ?1 order by part_no";

const SQLITE_MOVE_KEY: &str = "update idempotency_keys
   set push_id = ?3, fingerprint = ?4, created_at = ?5
 where appkey = ?1 and out_biz_no = ?2 and push_id = ?6";

const SQLITE_HELD_BY_PARTS: &str = "update pushes set quota_refunded = 1, updated_at = ?3
 where parent_id = ?1 and part_no in (select value from json_each(?2))
   and quota_window is not null and not quota_refunded
returning appkey, quota_kind, quota_window";

const SQLITE_INSERT_PARENT: &str = "insert into pushes (id, app, appkey, platform, cast_type,
    task_class, production_mode, client, out_biz_no, fingerprint, status, description, request,
    delivery, send_at, parts, created_at, updated_at)
values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'pending', ?11, ?12, 'async', ?13, ?14, ?15,
        ?15)";

const SQLITE_INSERT_PART: &str = "insert into pushes (id, app, appkey, platform, cast_type,
    task_class, production_mode, client, out_biz_no, fingerprint, status, description, request,
    quota_kind, quota_window, quota_limit, quota_unit, delivery, outbox, next_attempt_at,
    send_at, deliver_by, parent_id, part_no, audience, created_at, updated_at)
values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, 'async',
        ?18, coalesce(?19, ?25), ?20, ?21, ?22, ?23, ?24, ?25, ?25)";

const SQLITE_REOPEN_PARENT: &str = "update pushes
   set status = 'pending', http_status = null, error_code = null, error_msg = null,
       finished_at = null, updated_at = ?2
 where id = ?1 and status in ('partial', 'failed')";

const SQLITE_RESEND_PART: &str = "update pushes
   set status = ?3, outbox = ?4, next_attempt_at = coalesce(?5, ?8), deliver_by = ?6,
       deliver_claims = 0, deliver_lease_until = null, quota_window = ?7,
       quota_refunded = 0, error_code = null, error_msg = null, http_status = null,
       finished_at = null, updated_at = ?8
 where parent_id = ?1 and part_no = ?2 and status = 'failed'";

const SQLITE_PART_STATES: &str = "select status, http_status from pushes
 where parent_id = ?1 order by part_no";

const SQLITE_SETTLE: &str = "update pushes
   set status = ?2, http_status = ?3, error_code = ?4, error_msg = ?5, finished_at = ?6,
       updated_at = ?6,
       sent_at = (select min(c.sent_at) from pushes c where c.parent_id = ?1)
 where id = ?1 and status = 'pending'";

fn sqlite_settleable_sql() -> String {
    format!(
        "select p.id from pushes p
          where p.parts is not null and p.status = 'pending'
            and not exists (select 1 from pushes c
                             where c.parent_id = p.id and c.status in {OPEN_PART_STATES})
          order by p.created_at limit ?1"
    )
}

const SQLITE_INSERT_GATED: &str = "insert into pushes (id, app, appkey, platform, cast_type,
    task_class, production_mode, client, out_biz_no, fingerprint, status, description, request,
    delivery, send_at, parts, outbox, next_attempt_at, deliver_by, quota_wait, created_at,
    updated_at)
values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 'async', ?14, ?15, ?16,
        coalesce(?17, ?20), ?18, ?19, ?20, ?20)";

/// Through the small partial index: the status index SQLite picked otherwise read every
/// queued push, parts or not, and sorted them, every time the worker looked.
const SQLITE_DUE_GATED: &str = "select id from pushes indexed by pushes_due_parents_idx
 where parts is not null and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
   and next_attempt_at <= ?1
 order by next_attempt_at, created_at, id limit ?2";

const SQLITE_LOCK_GATED: &str = "select status, outbox, quota_wait, deliver_by <= ?2 as expired
  from pushes
 where id = ?1 and parts is not null
   and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
   and next_attempt_at <= ?2";

const SQLITE_RELEASED: &str = "update pushes
   set status = 'pending', outbox = null, next_attempt_at = null, updated_at = ?2
 where id = ?1";

const SQLITE_GATED_WAITS: &str = "update pushes
   set status = 'awaiting_quota', updated_at = ?3,
       next_attempt_at = min(?3 + ?2 * 1000, coalesce(deliver_by, ?3 + ?2 * 1000))
 where id = ?1 and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')";

const SQLITE_GATED_FAILS: &str = "update pushes
   set status = 'failed', error_code = ?2, error_msg = ?3, http_status = ?4, outbox = null,
       next_attempt_at = null, finished_at = ?5, updated_at = ?5
 where id = ?1 and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')";

/// [`pg_take`] for SQLite (writers are serialised: no race between the counters).
async fn sqlite_take(
    conn: &mut sqlx::SqliteConnection,
    parts: &[NewPart],
    only: Option<&[u32]>,
    now: i64,
) -> Result<Result<Taken, (String, QuotaState)>, sqlx::Error> {
    let mut taken = Taken::default();
    for part in slots_to_take(parts, only) {
        let Some(claim) = part.quota else { continue };
        let mut state = super::sqlite::window_of(claim, now, 0);
        let used: Option<i64> = if claim.limit.limit > 0 {
            sqlx::query_scalar(super::sqlite::TAKE_SLOT)
                .bind(&part.push.appkey)
                .bind(claim.kind.as_str())
                .bind(state.window_start)
                .bind(i64::from(claim.limit.limit))
                .fetch_optional(&mut *conn)
                .await?
        } else {
            None
        };
        match used {
            Some(used) => {
                state.used = u32::try_from(used).unwrap_or(u32::MAX);
                taken.windows.push((part.part_no, state.window_start));
                taken.quotas.push((part.push.app.clone(), state));
            }
            None => {
                let used: Option<i64> = sqlx::query_scalar(super::sqlite::SLOT_USED)
                    .bind(&part.push.appkey)
                    .bind(claim.kind.as_str())
                    .bind(state.window_start)
                    .fetch_optional(&mut *conn)
                    .await?;
                state.used = used.and_then(|u| u32::try_from(u).ok()).unwrap_or(0);
                return Ok(Err((part.push.app.clone(), state)));
            }
        }
    }
    Ok(Ok(taken))
}

/// [`pg_insert_parts`] for SQLite.
async fn sqlite_insert_parts(
    conn: &mut sqlx::SqliteConnection,
    parent_id: &str,
    parts: &[NewPart],
    taken: &Taken,
    released: bool,
    now: i64,
) -> Result<(), sqlx::Error> {
    for part in parts {
        let p = &part.push;
        let Some(d) = &p.delivery else { continue };
        let held = d.hold && !released;
        let status = if held {
            PushStatus::AwaitingSendAt
        } else {
            PushStatus::AwaitingSend
        };
        sqlx::query(SQLITE_INSERT_PART)
            .bind(&p.id)
            .bind(&p.app)
            .bind(&p.appkey)
            .bind(&p.platform)
            .bind(&p.cast_type)
            .bind(p.task_class)
            .bind(p.production_mode)
            .bind(&p.client)
            .bind(&p.out_biz_no)
            .bind(&p.fingerprint)
            .bind(status.as_str())
            .bind(&p.description)
            .bind(Json(&p.request))
            .bind(part.quota.map(|c| c.kind.as_str()))
            .bind(taken.window_of(part.part_no))
            .bind(part.quota.map(|c| i64::from(c.limit.limit)))
            .bind(part.quota.map(|c| c.limit.window.seconds()))
            .bind(Json(&d.outbox))
            .bind(held.then_some(p.send_at).flatten().map(to_ms))
            .bind(p.send_at.map(to_ms))
            .bind(to_ms(d.deliver_by))
            .bind(parent_id)
            .bind(i64::from(part.part_no))
            .bind(part.audience.map(i64::from))
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// [`pg_insert_gated`] for SQLite.
async fn sqlite_insert_gated(
    conn: &mut sqlx::SqliteConnection,
    parent: &NewPush,
    parts: &[NewPart],
    status: PushStatus,
    next_attempt_at: Option<OffsetDateTime>,
    now: i64,
) -> Result<(), sqlx::Error> {
    let Some(d) = &parent.delivery else {
        return Err(decode_err("a waiting parent needs its delivery".into()));
    };
    let outbox = serde_json::to_value(parts).map_err(|e| decode_err(e.to_string()))?;
    sqlx::query(SQLITE_INSERT_GATED)
        .bind(&parent.id)
        .bind(&parent.app)
        .bind(&parent.appkey)
        .bind(&parent.platform)
        .bind(&parent.cast_type)
        .bind(parent.task_class)
        .bind(parent.production_mode)
        .bind(&parent.client)
        .bind(&parent.out_biz_no)
        .bind(&parent.fingerprint)
        .bind(status.as_str())
        .bind(&parent.description)
        .bind(Json(&parent.request))
        .bind(parent.send_at.map(to_ms))
        .bind(i64::try_from(parts.len()).unwrap_or(i64::MAX))
        .bind(Json(outbox))
        .bind(next_attempt_at.map(to_ms))
        .bind(to_ms(d.deliver_by))
        .bind(d.quota_wait)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// See [`super::Store::admit_parts`]: one `begin immediate` transaction (writers are
/// serialised, so the key check and the guarded counters cannot race).
pub(crate) async fn sqlite_admit(
    pool: &SqlitePool,
    parent: NewPush,
    parts: Vec<NewPart>,
    now: i64,
) -> Result<PartsAdmission, sqlx::Error> {
    let mut tx = pool.begin_with("begin immediate").await?;
    let mut resend: Option<(String, Vec<u32>)> = None;
    let mut reclaim: Option<String> = None;
    if let Some(key) = &parent.out_biz_no {
        let owner = sqlx::query(SQLITE_KEY_OWNER)
            .bind(&parent.appkey)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(owner) = owner {
            let owner_id: String = owner.try_get("push_id")?;
            let status: String = owner.try_get("status")?;
            let is_parent = owner.try_get::<Option<i64>, _>("parts")?.is_some();
            let parts_state = if resumable(&status, is_parent) {
                let rows = sqlx::query(SQLITE_PART_OUTCOMES)
                    .bind(&owner_id)
                    .fetch_all(&mut *tx)
                    .await?;
                Some(part_outcomes(&rows)?)
            } else {
                None
            };
            let fingerprint: String = owner.try_get("fingerprint")?;
            let owner_async = owner.try_get::<Option<String>, _>("delivery")?.is_some();
            match judge_repeat(
                &parent,
                owner_id,
                &fingerprint,
                &status,
                owner_async,
                parts_state,
            ) {
                Repeat::Answer(answer) => {
                    tx.rollback().await?;
                    return Ok(answer);
                }
                Repeat::Replay(id) => {
                    let record = super::sqlite::get_push_with_parts(&mut tx, &id)
                        .await?
                        .ok_or_else(|| decode_err(format!("push {id} owning the key is gone")))?;
                    tx.rollback().await?;
                    return Ok(PartsAdmission::Replay {
                        push: Box::new(record),
                    });
                }
                Repeat::Resend(id, numbers) => resend = Some((id, numbers)),
                Repeat::Reclaim(old) => reclaim = Some(old),
            }
        }
    }
    let fresh = resend.is_none();

    // A parent held until its send_at waits as a whole: its slots are taken when it is due.
    let gate = parent.delivery.as_ref().filter(|_| fresh);
    let waiting = if gate.is_some_and(|d| d.hold) {
        Some((
            gate.map_or(PushStatus::AwaitingSendAt, |d| d.status()),
            parent.send_at,
        ))
    } else {
        None
    };

    if let Some((owner, numbers)) = &resend {
        let held = sqlx::query(SQLITE_HELD_BY_PARTS)
            .bind(owner)
            .bind(Json(numbers))
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        for row in &held {
            sqlx::query(super::sqlite::REFUND)
                .bind(row.try_get::<String, _>("appkey")?)
                .bind(row.try_get::<String, _>("quota_kind")?)
                .bind(row.try_get::<i64, _>("quota_window")?)
                .execute(&mut *tx)
                .await?;
        }
    }

    // Every slot, all or nothing. With "wait", a full window undoes the slots (in a
    // savepoint) and the parent waits as a whole for the window's end.
    let only = resend.as_ref().map(|(_, n)| n.as_slice());
    let (taken, waiting) = match waiting {
        Some(w) => (Taken::default(), Some(w)),
        None => {
            sqlx::query("savepoint slots").execute(&mut *tx).await?;
            match sqlite_take(&mut tx, &parts, only, now).await? {
                Ok(taken) => {
                    sqlx::query("release savepoint slots")
                        .execute(&mut *tx)
                        .await?;
                    (taken, None)
                }
                Err((app, quota)) => match gate.filter(|d| d.quota_wait) {
                    Some(d) => {
                        sqlx::query("rollback to savepoint slots")
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("release savepoint slots")
                            .execute(&mut *tx)
                            .await?;
                        let next =
                            from_ms(now)? + time::Duration::seconds(quota.reset_after_secs.max(1));
                        (
                            Taken::default(),
                            Some((PushStatus::AwaitingQuota, Some(next.min(d.deliver_by)))),
                        )
                    }
                    None => {
                        tx.rollback().await?;
                        return Ok(PartsAdmission::RateLimited { app, quota });
                    }
                },
            }
        }
    };

    let (push_id, resent) = match resend {
        Some((owner, numbers)) => {
            let reopened = sqlx::query(SQLITE_REOPEN_PARENT)
                .bind(&owner)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if reopened != 1 {
                tx.rollback().await?;
                return Ok(PartsAdmission::InFlight { push_id: owner });
            }
            for part in parts.iter().filter(|p| numbers.contains(&p.part_no)) {
                let Some(d) = &part.push.delivery else {
                    continue;
                };
                sqlx::query(SQLITE_RESEND_PART)
                    .bind(&owner)
                    .bind(i64::from(part.part_no))
                    .bind(d.status().as_str())
                    .bind(Json(&d.outbox))
                    .bind(d.hold.then_some(part.push.send_at).flatten().map(to_ms))
                    .bind(to_ms(d.deliver_by))
                    .bind(taken.window_of(part.part_no))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            (owner, numbers)
        }
        None => {
            match waiting {
                Some((status, next)) => {
                    sqlite_insert_gated(&mut tx, &parent, &parts, status, next, now).await?;
                }
                None => {
                    sqlx::query(SQLITE_INSERT_PARENT)
                        .bind(&parent.id)
                        .bind(&parent.app)
                        .bind(&parent.appkey)
                        .bind(&parent.platform)
                        .bind(&parent.cast_type)
                        .bind(parent.task_class)
                        .bind(parent.production_mode)
                        .bind(&parent.client)
                        .bind(&parent.out_biz_no)
                        .bind(&parent.fingerprint)
                        .bind(&parent.description)
                        .bind(Json(&parent.request))
                        .bind(parent.send_at.map(to_ms))
                        .bind(i64::try_from(parts.len()).unwrap_or(i64::MAX))
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    sqlite_insert_parts(&mut tx, &parent.id, &parts, &taken, false, now).await?;
                }
            }
            match (&parent.out_biz_no, &reclaim) {
                (Some(key), Some(old)) => {
                    sqlx::query(SQLITE_MOVE_KEY)
                        .bind(&parent.appkey)
                        .bind(key)
                        .bind(&parent.id)
                        .bind(&parent.fingerprint)
                        .bind(now)
                        .bind(old)
                        .execute(&mut *tx)
                        .await?;
                }
                (Some(key), None) => {
                    sqlx::query(SQLITE_INSERT_KEY)
                        .bind(&parent.appkey)
                        .bind(key)
                        .bind(&parent.fingerprint)
                        .bind(&parent.id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
                (None, _) => {}
            }
            (parent.id, Vec::new())
        }
    };
    tx.commit().await?;
    Ok(PartsAdmission::Admitted {
        push_id,
        resent,
        quotas: taken.quotas,
    })
}

/// The ids of due parents that wait as a whole (see [`super::Store::release_parents`]).
pub(crate) async fn sqlite_due_gated(
    pool: &SqlitePool,
    limit: u32,
    now: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(SQLITE_DUE_GATED)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
}

/// Releases one due parent (one `begin immediate` transaction); false when it is no
/// longer due.
pub(crate) async fn sqlite_release_one(
    pool: &SqlitePool,
    id: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin_with("begin immediate").await?;
    let Some(row) = sqlx::query(SQLITE_LOCK_GATED)
        .bind(id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Ok(false);
    };
    let status: String = row.try_get("status")?;
    let quota_wait: bool = row.try_get("quota_wait")?;
    let expired: Option<bool> = row.try_get("expired")?;
    let parts: Vec<NewPart> = serde_json::from_value(
        row.try_get::<Option<Json<Value>>, _>("outbox")?
            .map_or(Value::Null, |j| j.0),
    )
    .map_err(|e| decode_err(format!("the parts of parent {id} cannot be read: {e}")))?;
    let verdict = if expired == Some(true) {
        Release::Expired {
            waited_for_quota: status == PushStatus::AwaitingQuota.as_str(),
        }
    } else {
        sqlx::query("savepoint slots").execute(&mut *tx).await?;
        match sqlite_take(&mut tx, &parts, None, now).await? {
            Ok(taken) => {
                sqlite_insert_parts(&mut tx, id, &parts, &taken, true, now).await?;
                sqlx::query(SQLITE_RELEASED)
                    .bind(id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Ok(true);
            }
            Err((app, quota)) => {
                sqlx::query("rollback to savepoint slots")
                    .execute(&mut *tx)
                    .await?;
                Release::Full {
                    app,
                    quota,
                    wait: quota_wait,
                }
            }
        }
    };
    match verdict.failure() {
        Some((code, msg, http)) => {
            sqlx::query(SQLITE_GATED_FAILS)
                .bind(id)
                .bind(code)
                .bind(msg)
                .bind(i64::from(http))
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        None => {
            sqlx::query(SQLITE_GATED_WAITS)
                .bind(id)
                .bind(verdict.wait_secs())
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(true)
}

pub(crate) async fn sqlite_settle(
    pool: &SqlitePool,
    parent_id: &str,
    now: i64,
) -> Result<Option<PushStatus>, sqlx::Error> {
    let rows = sqlx::query(SQLITE_PART_STATES)
        .bind(parent_id)
        .fetch_all(pool)
        .await?;
    let Some(outcome) = derive(&part_states(&rows)?) else {
        return Ok(None);
    };
    let done = sqlx::query(SQLITE_SETTLE)
        .bind(parent_id)
        .bind(outcome.status.as_str())
        .bind(outcome.http_status.map(i64::from))
        .bind(&outcome.error_code)
        .bind(&outcome.error_msg)
        .bind(now)
        .execute(pool)
        .await?;
    Ok((done.rows_affected() == 1).then_some(outcome.status))
}

pub(crate) async fn sqlite_settleable(
    pool: &SqlitePool,
    limit: u32,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(&sqlite_settleable_sql())
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
}

pub(crate) async fn sqlite_list(
    conn: &mut sqlx::SqliteConnection,
    parent_id: &str,
) -> Result<Vec<PushPart>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "select {PART_COLUMNS} from pushes where parent_id = ?1 order by part_no"
    ))
    .bind(parent_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            let status: String = row.try_get("status")?;
            let http: Option<i64> = row.try_get("http_status")?;
            Ok(PushPart {
                id: row.try_get("id")?,
                part: non_negative(row.try_get("part_no")?).unwrap_or(0),
                app: row.try_get("app")?,
                platform: row.try_get("platform")?,
                audience: non_negative(row.try_get("audience")?),
                status: PushStatus::parse(&status)
                    .ok_or_else(|| decode_err(format!("unknown push status {status:?}")))?,
                msg_id: row.try_get("msg_id")?,
                task_id: row.try_get("task_id")?,
                out_biz_no: row.try_get("out_biz_no")?,
                error_code: row.try_get("error_code")?,
                error_msg: row.try_get("error_msg")?,
                http_status: http.and_then(|h| u16::try_from(h).ok()),
                attempts: attempts_of(row.try_get::<Json<Value>, _>("attempts")?.0)?,
                next_attempt_at: row
                    .try_get::<Option<i64>, _>("next_attempt_at")?
                    .map(from_ms)
                    .transpose()?,
                finished_at: row
                    .try_get::<Option<i64>, _>("finished_at")?
                    .map(from_ms)
                    .transpose()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use PushStatus as S;

    #[test]
    fn a_parent_is_settled_only_when_every_part_is() {
        assert_eq!(derive(&[]), None);
        assert_eq!(
            derive(&[(S::Accepted, Some(201)), (S::Pending, None)]),
            None
        );
        assert_eq!(derive(&[(S::AwaitingSend, None)]), None);
    }

    #[test]
    fn derived_statuses() {
        let status =
            |parts: &[(PushStatus, Option<u16>)]| derive(parts).map(|o| (o.status, o.http_status));
        assert_eq!(
            status(&[(S::Accepted, Some(201)), (S::Done, Some(201))]),
            Some((S::Accepted, Some(201)))
        );
        assert_eq!(
            status(&[(S::Accepted, Some(201)), (S::Failed, Some(502))]),
            Some((S::Partial, Some(207)))
        );
        assert_eq!(
            status(&[(S::Unknown, Some(504)), (S::Failed, Some(502))]),
            Some((S::Partial, Some(207)))
        );
        assert_eq!(
            status(&[(S::Failed, Some(429)), (S::Failed, Some(429))]),
            Some((S::Failed, Some(429)))
        );
        assert_eq!(
            status(&[(S::Failed, Some(400)), (S::Failed, Some(502))]),
            Some((S::Failed, Some(502)))
        );
        assert_eq!(
            status(&[(S::Accepted, Some(201)), (S::Unknown, Some(504))]),
            Some((S::Unknown, Some(504)))
        );
        assert_eq!(
            status(&[(S::Withdrawn, None), (S::Withdrawn, None)]),
            Some((S::Withdrawn, None))
        );
        assert_eq!(
            status(&[(S::Withdrawn, None), (S::Queued, Some(201))]),
            Some((S::Partial, Some(207)))
        );
        assert_eq!(
            status(&[(S::Withdrawn, None), (S::Failed, Some(400))]),
            Some((S::Failed, Some(400)))
        );
    }
}
