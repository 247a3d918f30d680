//! The PostgreSQL store: an admission is one `umgw_admit` call and an outcome record one
//! guarded update, each gathered with those of concurrent pushes into one call per burst
//! (group commit, [`super::pg_batch`]).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};
use time::OffsetDateTime;

use super::{
    attempts_json, attempts_of, hourly_count, map_sqlx, millis, queue_stat, redact_url,
    run_detached, scrub, Admission, CallbackAttempt, CallbackClaim, CallbackNext, DeliveryApp,
    DeliveryClaim, DeliveryMode, DeliveryRetry, Finish, HourlyCount, NewPart, NewPush,
    PartsAdmission, PolledApp, PoolOptions, PoolStatus, PurgeTarget, PushQuery, PushRecord,
    PushStatus, PushSummary, QueueStat, QuotaClaim, Store, StoreError, StoreResult, TaskClaim,
    TaskUpdate, MAX_PAGE, MAX_PUSH_COUNT_ROWS,
};
use crate::quota::{QuotaKind, QuotaLimit, QuotaState};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Session settings for every connection: no statement, lock wait or forgotten
/// transaction can hold a connection (and the rows it locked) for long. No JIT: the
/// gateway's statements are short, and compiling one costs 100 ms or more whenever the
/// planner's estimate passes `jit_above_cost` (stale statistics, a wide history filter).
const SESSION_OPTIONS: [(&str, &str); 4] = [
    ("statement_timeout", "5s"),
    ("lock_timeout", "2s"),
    ("idle_in_transaction_session_timeout", "10s"),
    ("jit", "off"),
];
/// Connections are recycled so server-side state (and failovers) cannot linger.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

const COUNT_BY_HOUR: &str =
    "select (floor(extract(epoch from created_at) / 3600) * 3600)::bigint as hour, \
    status, error_code, count(*) as n from pushes \
    where created_at >= $1 and ($2::text[] is null or app = any($2)) and parent_id is null \
    group by 1, 2, 3 order by 1, 2, 3 limit $3";
const PUSH_COLUMNS: &str = "id, app, appkey, platform, cast_type, task_class, production_mode, \
     client, out_biz_no, fingerprint, status, description, request, umeng_request, \
     umeng_response, msg_id, task_id, file_id, error_code, error_msg, http_status, quota_kind, \
     quota_window, quota_refunded, task_status, task_checked_at, latency_ms, attempts, created_at, \
     sent_at, finished_at, updated_at, callback_url, delivery, send_at, next_attempt_at, \
     deliver_by, parent_id, part_no, audience, parts";

/// How `max_connections` is shared: a quarter (1 to 4) for history reads, the rest (at
/// least 1) for everything else.
fn split_pool(max_connections: u32) -> (u32, u32) {
    let read = (max_connections / 4).clamp(1, 4);
    let write = max_connections.saturating_sub(read).max(1);
    (write, read)
}

/// A pooled connection idle at least this long is pinged before it is handed out; one
/// that went back to the pool just now is used as it is.
pub(super) const PING_IF_IDLE: Duration = Duration::from_secs(1);

/// The options both pools share. Under load every push took a round trip for the pool's
/// liveness ping before its statement (sqlx's `test_before_acquire`): a connection that
/// was in use a moment ago is alive as far as a ping can tell. A connection idle for a
/// second or more (after a quiet spell, or a database restart) is still pinged, and a dead
/// one replaced; one that dies between two statements fails its statement (503, or an
/// outcome record retried), as it could after a ping too.
fn pool_options(size: u32, options: &PoolOptions) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(options.acquire_timeout)
        .max_lifetime(MAX_LIFETIME)
        .idle_timeout(IDLE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// True when this session cannot write: a standby, or `default_transaction_read_only`.
const READ_ONLY: &str =
    "select pg_is_in_recovery() or current_setting('transaction_read_only') = 'on'";

/// What a history list reads: no stored bodies, long texts cut in the database.
const SUMMARY_COLUMNS: &str = "id, app, platform, cast_type, task_class, production_mode, \
     client, out_biz_no, status, substr(description, 1, 256) as description, msg_id, task_id, \
     file_id, error_code, substr(error_msg, 1, 256) as error_msg, http_status, latency_ms, \
     created_at, sent_at, finished_at, updated_at, delivery, send_at, next_attempt_at, \
     jsonb_array_length(attempts) as attempt_count, parts";

const ADMIT: &str = "select outcome, push_id, reclaimed_from, used, window_start, \
     reset_after_secs \
     from umgw_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
     $17, $18, $19, $20, $21)";

/// One admission without a quota slot whose key, if it has one, is new: all `umgw_admit`
/// would do is claim the key and insert the row (its steps 1 and 3, the same columns and
/// values), so it goes as a plain prepared statement and skips the function call's fixed
/// cost. A key already held inserts nothing and answers no row: `umgw_admit` then finds
/// out who holds it ([`ADMIT`]). The parameters are [`ADMIT`]'s; the quota's go unused.
const ADMIT_PLAIN: &str = "with k as ( \
     insert into idempotency_keys (appkey, out_biz_no, fingerprint, push_id) \
     select $3, $9, $10, $1 where $9 is not null \
     on conflict (appkey, out_biz_no) do nothing returning push_id) \
     insert into pushes (id, app, appkey, platform, cast_type, task_class, production_mode, \
     client, out_biz_no, fingerprint, request, description, status, delivery, outbox, \
     next_attempt_at, send_at, deliver_by, quota_wait) \
     select $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $16, \
     case when $16 = 'pending' then null else 'async' end, $18, \
     case when $16 = 'pending' then null when $16 = 'awaiting_send_at' then $19 else now() end, \
     $19, $20, $21 \
     where $9 is null or exists (select 1 from k) \
     returning id";

/// An ordered, fenced task-state write (see [`Store::update_task`]). `$5` lists the stored
/// states this status replaces outright; the same status needs `task_checked_at` unchanged
/// since the writer read it (`$6`), and a poller's write its claim (`$7`) to be the latest.
/// `task_checked_at` moves strictly forward, so it identifies the stored answer.
const UPDATE_TASK: &str = "update pushes
   set status = $2,
       task_status = case
           when jsonb_typeof($3::jsonb) = 'object' and task_status ? 'cancelled_by'
                and not $3::jsonb ? 'cancelled_by'
           then $3::jsonb || jsonb_build_object('cancelled_by', task_status -> 'cancelled_by')
           else $3::jsonb end,
       task_checked_at = greatest(now(), task_checked_at + interval '1 microsecond'),
       updated_at = now(),
       finished_at = case when $4 and status <> $2 then now() else finished_at end
 where id = $1
   and (status = any($5::text[])
        or (status = $2 and task_checked_at is not distinct from $6::timestamptz))
   and ($7::integer is null or poll_count = $7::integer)";

/// Lease due tasks in one statement. `next_poll_at` moves to the lease's end too, so a task
/// whose poller died is due again once the lease runs out. The materialized CTE locks the chosen rows (skipping
/// rows another replica is claiming right now) and is evaluated once; a row claimed and
/// committed by another replica meanwhile is re-checked against its new lease and dropped.
const CLAIM_TASK_POLLS: &str = "with due as materialized (
    select id from pushes
     where task_class and task_id is not null
       and status in ('accepted', 'queued', 'sending', 'scheduled')
       and (app, appkey) in (select a, k from unnest($4::text[], $5::text[]) as c(a, k))
       and (poll_locked_until is null or poll_locked_until <= now())
       and (next_poll_at <= now()
            or (next_poll_at is null and poll_count = 0
                and finished_at <= now() - $3::bigint * interval '1 millisecond'))
     order by coalesce(next_poll_at, finished_at)
     limit $1
     for update skip locked
)
update pushes p
   set poll_locked_until = now() + $2::bigint * interval '1 millisecond',
       next_poll_at = now() + $2::bigint * interval '1 millisecond',
       poll_count = p.poll_count + 1
  from due
 where p.id = due.id
returning p.id, p.app, p.appkey, p.task_id, p.created_at, p.request, p.task_checked_at,
          p.poll_count, p.poll_locked_until";

const RELEASE_TASK_POLL: &str = "update pushes
   set poll_locked_until = null,
       next_poll_at = now() + $3::bigint * interval '1 millisecond'
 where id = $1 and poll_locked_until = $2";

const PURGE_PUSHES: &str = "with old as materialized (
    select id from pushes
     where created_at < now() - $1::bigint * interval '1 millisecond'
     order by created_at
     limit $2
     for update skip locked
)
delete from pushes p using old where p.id = old.id";

const PURGE_QUOTA_COUNTERS: &str = "with old as materialized (
    select appkey, kind, window_start from quota_counters
     where window_start < extract(epoch from now())::bigint - $1::bigint / 1000
     limit $2
     for update skip locked
)
delete from quota_counters q using old
 where q.appkey = old.appkey and q.kind = old.kind and q.window_start = old.window_start";

const PURGE_UPLOADS: &str = "with old as materialized (
    select appkey, content_sha256 from uploads
     where created_at < now() - $1::bigint * interval '1 millisecond'
     order by created_at
     limit $2
     for update skip locked
)
delete from uploads u using old
 where u.appkey = old.appkey and u.content_sha256 = old.content_sha256";

const SWEEP: &str = "update pushes
   set status = 'unknown', error_code = 'stale_pending',
       error_msg = 'still pending after the sweep threshold: the outcome of the umeng call is unknown',
       finished_at = now(), updated_at = now()
 where status = 'pending' and delivery is null
   and created_at < now() - $1::bigint * interval '1 second'";

/// One round trip: the function returns the claimed rows' columns from its own update.
const CLAIM_DELIVERIES: &str = "select id, claims, lease_until, app, appkey, cast_type, \
     task_class, production_mode, out_biz_no, outbox, attempts, created_at, deliver_by, \
     quota_kind, quota_wait, parent_id, due_at \
     from umgw_claim_deliveries($1, $2, $3, $4, $5, $6)";

/// Put a claimed push back to wait: `awaiting_send` after `$3` ms, or `awaiting_quota`
/// until its bucket's next window (the current one is marked full: Umeng said 2050). A
/// refund gives the slot back once; after a 2050 the slot is released without a refund
/// (the window is full either way) and the next attempt takes one of its own.
const RETRY_DELIVERY: &str = "with o as (
    select id, quota_refunded as was_refunded from pushes where id = $1
), f as (
    update pushes p
       set status = $2,
           next_attempt_at = case when $2 = 'awaiting_quota'
               then to_timestamp((floor((extract(epoch from now()) + 28800) / p.quota_unit)
                                  * p.quota_unit - 28800) + p.quota_unit)
               else now() + $3::bigint * interval '1 millisecond' end,
           error_code = $4, error_msg = $5, umeng_response = $6, attempts = $7,
           quota_refunded = p.quota_refunded or (($8 or $2 = 'awaiting_quota')
                                                 and p.quota_window is not null),
           deliver_lease_until = null, updated_at = now()
      from o
     where p.id = o.id and p.status = 'pending' and p.deliver_claims = $9
 returning p.appkey, p.quota_kind, p.quota_window, p.quota_limit, p.quota_unit, o.was_refunded
), r as (
    update quota_counters c
       set used = greatest(c.used - 1, 0)
      from f
     where $8 and $2 <> 'awaiting_quota' and not f.was_refunded
       and c.appkey = f.appkey and c.kind = f.quota_kind and c.window_start = f.quota_window
), s as (
    insert into quota_counters as c (appkey, kind, window_start, used)
    select f.appkey, f.quota_kind,
           (floor((extract(epoch from now()) + 28800) / f.quota_unit) * f.quota_unit
               - 28800)::bigint,
           f.quota_limit
      from f
     where $2 = 'awaiting_quota' and f.quota_kind is not null and f.quota_limit is not null
    on conflict (appkey, kind, window_start)
    do update set used = greatest(c.used, excluded.used)
)
select count(*) from f";

/// Pushes whose delivery lease ran out mid-send: task-class ones are due again (Umeng
/// dedupes the re-send by out_biz_no), the rest may have reached Umeng and are unknown.
const RECOVER_DELIVERIES: &str = "update pushes
   set status = case when task_class then 'awaiting_send' else 'unknown' end,
       next_attempt_at = case when task_class then now() else null end,
       error_code = case when task_class then error_code else 'stale_pending' end,
       error_msg = case when task_class then error_msg
           else 'the delivery worker''s lease ran out mid-send: the outcome of the umeng call is unknown' end,
       outbox = case when task_class then outbox else null end,
       finished_at = case when task_class then null else now() end,
       deliver_lease_until = null, updated_at = now()
 where status = 'pending' and delivery is not null and deliver_lease_until < now()";

/// Local cancel of a push not sent yet; a slot it held goes back once.
const WITHDRAW: &str = "with f as (
    update pushes p
       set status = 'withdrawn', error_code = 'withdrawn',
           error_msg = 'cancelled before it was sent', outbox = null, next_attempt_at = null,
           quota_refunded = p.quota_refunded or p.quota_window is not null,
           finished_at = now(), updated_at = now()
      from (select id, quota_refunded as was_refunded from pushes where id = $1) o
     where p.id = o.id
       and p.status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
 returning p.appkey, p.quota_kind, p.quota_window, o.was_refunded
), r as (
    update quota_counters c
       set used = greatest(c.used - 1, 0)
      from f
     where not f.was_refunded and f.quota_window is not null
       and c.appkey = f.appkey and c.kind = f.quota_kind and c.window_start = f.quota_window
)
select count(*) from f";

const QUEUE_STATS: &str = "select app, status, count(*) as n,
       min(next_attempt_at) filter (where next_attempt_at <= now()) as oldest_due
  from pushes
 where status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
    or (status = 'pending' and delivery is not null and parts is null)
 group by app, status";

/// Whether a key names a push ([`Store::key_taken`]).
const KEY_TAKEN: &str = "select 1 from idempotency_keys where appkey = $1 and out_biz_no = $2";

const QUOTA_STATE: &str = "with c as (
    select extract(epoch from now())::float8 as e
), w as (
    select (floor((c.e + 28800) / $3::bigint) * $3::bigint - 28800)::bigint as ws, c.e from c
)
select w.ws as window_start,
       greatest(1, ceil(w.ws + $3::bigint - w.e))::bigint as reset_after_secs,
       coalesce((select q.used from quota_counters q
                  where q.appkey = $1 and q.kind = $2 and q.window_start = w.ws), 0) as used
  from w";

const FIND_UPLOAD: &str = "select file_id from uploads
 where appkey = $1 and content_sha256 = $2
   and created_at > now() - $3::bigint * interval '1 second'";

const FORGET_UPLOAD: &str =
    "delete from uploads where appkey = $1 and content_sha256 = $2 and file_id = $3";

const SAVE_UPLOAD: &str = "insert into uploads (appkey, content_sha256, file_id)
values ($1, $2, $3)
on conflict (appkey, content_sha256)
do update set file_id = excluded.file_id, created_at = now()";

const APPLIED_MIGRATIONS: &str = "select version from _sqlx_migrations where success";

/// A [`Store`] on PostgreSQL. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// A few connections of their own for history reads, so a slow history query cannot
    /// take the connections admissions need.
    read_pool: PgPool,
    /// Admissions and outcome records, written in batches (group commit).
    writers: super::pg_batch::Writers,
    /// The delivery worker's claims, one at a time ([`ClaimLane`]).
    claims: Arc<tokio::sync::Mutex<ClaimLane>>,
}

/// The connection of the delivery worker's claims. sqlx pings every connection given back
/// to its pool, a round trip per claim, so a claim that took pushes keeps its connection
/// for the next one. A claim that found nothing gives it back (the worker may be idle
/// now), and so does a failed one; a connection kept unused for [`PING_IF_IDLE`] goes back
/// before its next claim, so that the pool's ping checks it as it checks any idle one.
struct ClaimLane {
    lane: super::batch::Lane<Postgres>,
    last_used: std::time::Instant,
}

impl std::fmt::Debug for ClaimLane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimLane")
            .field("last_used", &self.last_used)
            .finish_non_exhaustive()
    }
}

/// Claims keep a connection only when the pool has at least this many: with the writers'
/// (`pg_batch::KEEP_FROM`), the kept connections are then at most half of the pool.
const KEEP_CLAIMS_FROM: u32 = 8;

impl PgStore {
    /// Connect to `url` (`postgres://` or `postgresql://`). Fails fast when the server
    /// cannot be reached. Errors never include the URL's password.
    pub async fn connect(url: &str, options: &PoolOptions) -> StoreResult<Self> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| {
                StoreError::BadUrl(format!(
                    "{}: {}",
                    redact_url(url),
                    scrub(e.to_string(), url)
                ))
            })?
            .application_name("umeng-push-gateway")
            .options(SESSION_OPTIONS);
        let (write_size, read_size) = split_pool(options.max_connections);
        let read_pool = pool_options(read_size, options).connect_lazy_with(connect.clone());
        let pool = pool_options(write_size, options)
            .connect_with(connect)
            .await
            .map_err(|e| match map_sqlx(e) {
                StoreError::Unavailable(m) => StoreError::Unavailable(format!(
                    "cannot connect to {}: {}",
                    redact_url(url),
                    scrub(m, url)
                )),
                StoreError::Database(m) => StoreError::Database(format!(
                    "cannot connect to {}: {}",
                    redact_url(url),
                    scrub(m, url)
                )),
                other => other,
            })?;
        let writers = super::pg_batch::Writers::start(pool.clone(), options.outcome_commit);
        let keep_claims = pool.options().get_max_connections() >= KEEP_CLAIMS_FROM;
        let claims = Arc::new(tokio::sync::Mutex::new(ClaimLane {
            lane: super::batch::Lane::new(pool.clone(), keep_claims),
            last_used: std::time::Instant::now(),
        }));
        Ok(Self {
            pool,
            read_pool,
            writers,
            claims,
        })
    }

    /// The underlying pool (for tests and operational queries).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn pool_status(&self) -> PoolStatus {
        let write = PoolStatus::from_counts(self.pool.size(), self.pool.num_idle());
        let read = PoolStatus::from_counts(self.read_pool.size(), self.read_pool.num_idle());
        PoolStatus {
            idle: write.idle + read.idle,
            in_use: write.in_use + read.in_use,
        }
    }

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))
    }

    async fn ready(&self) -> StoreResult<()> {
        let applied: Vec<i64> = sqlx::query_scalar(APPLIED_MIGRATIONS)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| match map_sqlx(e) {
                StoreError::Database(m) => StoreError::Migration(format!("not migrated: {m}")),
                other => other,
            })?;
        missing_migration(&MIGRATOR, &applied)?;
        let read_only: bool = sqlx::query_scalar(READ_ONLY)
            .fetch_one(&self.pool)
            .await
            .map_err(map_sqlx)?;
        if read_only {
            return Err(StoreError::Unavailable(
                "the database is read-only (a standby, or default_transaction_read_only)".into(),
            ));
        }
        Ok(())
    }

    async fn now(&self) -> StoreResult<OffsetDateTime> {
        sqlx::query_scalar("select now()")
            .fetch_one(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    // The store spans are debug: nothing in the store logs at info or above, and each span
    // costs a formatted field set on every call.
    #[tracing::instrument(level = "debug", skip_all, fields(store.backend = "postgres", push.id = %push.id))]
    async fn admit(&self, push: NewPush, quota: Option<QuotaClaim>) -> StoreResult<Admission> {
        // Gathered with the admissions of concurrent pushes into one call.
        self.writers.admit(push, quota).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(store.backend = "postgres", push.id = %push_id))]
    async fn finish(&self, push_id: &str, finish: Arc<Finish>) -> StoreResult<bool> {
        // Gathered with the outcomes of concurrent pushes into one call.
        self.writers.finish(push_id, finish).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(store.backend = "postgres", push.id = %push_id))]
    async fn update_task(&self, push_id: &str, update: TaskUpdate) -> StoreResult<bool> {
        let replaces: Vec<String> = update
            .status
            .replaces()
            .into_iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        let done = sqlx::query(UPDATE_TASK)
            .bind(push_id)
            .bind(update.status.as_str())
            .bind(update.task_status)
            .bind(update.status.is_final_task_state())
            .bind(replaces)
            .bind(update.seen_checked_at)
            .bind(update.claim.map(|c| i32::try_from(c).unwrap_or(i32::MAX)))
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected() > 0)
    }

    async fn get_push(&self, push_id: &str) -> StoreResult<Option<PushRecord>> {
        let Some(mut push) = get_push(&self.read_pool, push_id).await? else {
            return Ok(None);
        };
        if push.callback_url.is_some() {
            push.callbacks = super::callbacks::pg_list(&self.read_pool, push_id).await?;
        }
        if push.part_count.is_some() {
            push.parts = super::parts::pg_list(&self.read_pool, push_id)
                .await
                .map_err(map_sqlx)?;
        }
        Ok(Some(push))
    }

    async fn list_pushes(&self, query: &PushQuery) -> StoreResult<Vec<PushSummary>> {
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "select {SUMMARY_COLUMNS} from pushes where parent_id is null"
        ));
        if let Some(app) = &query.app {
            qb.push(" and app = ").push_bind(app.clone());
        }
        if let Some(apps) = &query.apps_allowed {
            qb.push(" and app = any(").push_bind(apps.clone()).push(")");
        }
        if let Some(cast_type) = &query.cast_type {
            qb.push(" and cast_type = ").push_bind(cast_type.clone());
        }
        if let Some(status) = query.status {
            qb.push(" and status = ").push_bind(status.as_str());
        }
        if let Some(client) = &query.client {
            qb.push(" and client = ").push_bind(client.clone());
        }
        if let Some(out_biz_no) = &query.out_biz_no {
            qb.push(" and out_biz_no = ").push_bind(out_biz_no.clone());
        }
        // A part's msg_id or task_id finds its parent.
        if let Some(msg_id) = &query.msg_id {
            qb.push(" and id in (select coalesce(parent_id, id) from pushes where msg_id = ")
                .push_bind(msg_id.clone())
                .push(")");
        }
        if let Some(task_id) = &query.task_id {
            qb.push(" and id in (select coalesce(parent_id, id) from pushes where task_id = ")
                .push_bind(task_id.clone())
                .push(")");
        }
        if let Some(from) = query.from {
            qb.push(" and created_at >= ").push_bind(from);
        }
        if let Some(to) = query.to {
            qb.push(" and created_at < ").push_bind(to);
        }
        // A row comparison the (created_at desc, id desc) indexes serve directly.
        if let Some(before) = &query.before {
            qb.push(" and (created_at, id) < (")
                .push_bind(before.created_at)
                .push(", ")
                .push_bind(before.id.clone())
                .push(")");
        }
        qb.push(" order by created_at desc, id desc limit ")
            .push_bind(i64::from(query.limit.clamp(1, MAX_PAGE + 1)));
        let rows = qb
            .build()
            .fetch_all(&self.read_pool)
            .await
            .map_err(map_sqlx)?;
        rows.iter()
            .map(|r| summary_from_row(r).map_err(map_sqlx))
            .collect()
    }

    async fn count_pushes_by_hour(
        &self,
        since: OffsetDateTime,
        apps_allowed: Option<&[String]>,
    ) -> StoreResult<Vec<HourlyCount>> {
        let rows = sqlx::query(COUNT_BY_HOUR)
            .bind(since)
            .bind(apps_allowed.map(<[String]>::to_vec))
            .bind(i64::from(MAX_PUSH_COUNT_ROWS))
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        rows.iter()
            .map(|r| {
                hourly_count(
                    r.try_get("hour").map_err(map_sqlx)?,
                    r.try_get("status").map_err(map_sqlx)?,
                    r.try_get("error_code").map_err(map_sqlx)?,
                    r.try_get("n").map_err(map_sqlx)?,
                )
            })
            .collect()
    }

    async fn sweep_stale_pending(&self, older_than_secs: i64) -> StoreResult<u64> {
        let done = sqlx::query(SWEEP)
            .bind(older_than_secs)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected())
    }

    async fn claim_task_polls(
        &self,
        limit: u32,
        lease: Duration,
        first_poll_after: Duration,
        apps: &[PolledApp],
    ) -> StoreResult<Vec<TaskClaim>> {
        let names: Vec<&str> = apps.iter().map(|a| a.app.as_str()).collect();
        let appkeys: Vec<&str> = apps.iter().map(|a| a.appkey.as_str()).collect();
        let rows = sqlx::query(CLAIM_TASK_POLLS)
            .bind(i64::from(limit))
            .bind(millis(lease))
            .bind(millis(first_poll_after))
            .bind(names)
            .bind(appkeys)
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        rows.iter()
            .map(|row| {
                let polls: i32 = row.try_get("poll_count")?;
                Ok(TaskClaim {
                    push_id: row.try_get("id")?,
                    app: row.try_get("app")?,
                    appkey: row.try_get("appkey")?,
                    task_id: row.try_get("task_id")?,
                    created_at: row.try_get("created_at")?,
                    request: row.try_get("request")?,
                    task_checked_at: row.try_get("task_checked_at")?,
                    polls: u32::try_from(polls).unwrap_or(0),
                    lease_until: row.try_get("poll_locked_until")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_sqlx)
    }

    async fn release_task_poll(
        &self,
        claim: &TaskClaim,
        next_poll_in: Option<Duration>,
    ) -> StoreResult<bool> {
        let done = sqlx::query(RELEASE_TASK_POLL)
            .bind(&claim.push_id)
            .bind(claim.lease_until)
            .bind(next_poll_in.map(millis))
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected() > 0)
    }

    async fn purge(
        &self,
        target: PurgeTarget,
        older_than: Duration,
        limit: u32,
    ) -> StoreResult<u64> {
        let sql = match target {
            PurgeTarget::Pushes => PURGE_PUSHES,
            PurgeTarget::QuotaCounters => PURGE_QUOTA_COUNTERS,
            PurgeTarget::Uploads => PURGE_UPLOADS,
        };
        let done = sqlx::query(sql)
            .bind(millis(older_than))
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected())
    }

    async fn claim_deliveries(
        &self,
        limit: u32,
        lease: Duration,
        apps: &[DeliveryApp],
    ) -> StoreResult<Vec<DeliveryClaim>> {
        let names: Vec<String> = apps.iter().map(|a| a.app.clone()).collect();
        let appkeys: Vec<String> = apps.iter().map(|a| a.appkey.clone()).collect();
        let limits: Vec<i32> = apps
            .iter()
            .map(|a| i32::try_from(a.limit).unwrap_or(i32::MAX))
            .collect();
        let due_from: Vec<Option<OffsetDateTime>> = apps.iter().map(|a| a.due_from).collect();
        let query = sqlx::query(CLAIM_DELIVERIES)
            .bind(i32::try_from(limit).unwrap_or(i32::MAX))
            .bind(millis(lease))
            .bind(names)
            .bind(appkeys)
            .bind(limits)
            .bind(due_from);
        let claims = Arc::clone(&self.claims);
        // The claim locks rows and takes quota slots: it runs to completion even if the
        // caller is dropped.
        let claimed = run_detached(async move {
            let mut claims = claims.lock().await;
            if claims.last_used.elapsed() >= PING_IF_IDLE {
                claims.lane.idle();
            }
            let result = match claims.lane.conn().await {
                Ok(conn) => query.fetch_all(conn).await,
                Err(e) => Err(e),
            };
            claims.lane.after(result.is_ok());
            if result.as_ref().is_ok_and(Vec::is_empty) {
                claims.lane.idle();
            }
            claims.last_used = std::time::Instant::now();
            result.map_err(map_sqlx)
        })
        .await?;
        let mut out = Vec::with_capacity(claimed.len());
        for row in &claimed {
            let id: String = row.try_get("id").map_err(map_sqlx)?;
            let claims: i32 = row.try_get("claims").map_err(map_sqlx)?;
            let lease_until: OffsetDateTime = row.try_get("lease_until").map_err(map_sqlx)?;
            let quota_kind: Option<String> = row.try_get("quota_kind").map_err(map_sqlx)?;
            out.push(DeliveryClaim {
                app: row.try_get("app").map_err(map_sqlx)?,
                appkey: row.try_get("appkey").map_err(map_sqlx)?,
                cast_type: row.try_get("cast_type").map_err(map_sqlx)?,
                task_class: row.try_get("task_class").map_err(map_sqlx)?,
                production_mode: row.try_get("production_mode").map_err(map_sqlx)?,
                out_biz_no: row.try_get("out_biz_no").map_err(map_sqlx)?,
                outbox: row
                    .try_get::<Option<Value>, _>("outbox")
                    .map_err(map_sqlx)?
                    .unwrap_or(Value::Null),
                attempts: attempts_of(row.try_get::<Value, _>("attempts").map_err(map_sqlx)?)
                    .map_err(map_sqlx)?,
                claim: u32::try_from(claims).unwrap_or(0),
                lease_until,
                created_at: row.try_get("created_at").map_err(map_sqlx)?,
                deliver_by: row.try_get("deliver_by").map_err(map_sqlx)?,
                quota_kind: quota_kind.as_deref().and_then(QuotaKind::parse),
                quota_wait: row.try_get("quota_wait").map_err(map_sqlx)?,
                parent_id: row.try_get("parent_id").map_err(map_sqlx)?,
                due_at: row.try_get("due_at").map_err(map_sqlx)?,
                push_id: id,
            });
        }
        out.sort_by(|a, b| (a.created_at, &a.push_id).cmp(&(b.created_at, &b.push_id)));
        Ok(out)
    }

    async fn retry_delivery(
        &self,
        claim: &DeliveryClaim,
        retry: DeliveryRetry,
    ) -> StoreResult<bool> {
        let query = sqlx::query_scalar::<_, i64>(RETRY_DELIVERY)
            .bind(claim.push_id.clone())
            .bind(retry.status.as_str())
            .bind(millis(retry.delay))
            .bind(retry.error_code)
            .bind(retry.error_msg)
            .bind(retry.umeng_response)
            .bind(attempts_json(&retry.attempts))
            .bind(retry.refund)
            .bind(i32::try_from(claim.claim).unwrap_or(i32::MAX));
        let pool = self.pool.clone();
        let changed =
            run_detached(async move { query.fetch_one(&pool).await.map_err(map_sqlx) }).await?;
        Ok(changed > 0)
    }

    async fn recover_deliveries(&self) -> StoreResult<u64> {
        let done = sqlx::query(RECOVER_DELIVERIES)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected())
    }

    async fn withdraw(&self, push_id: &str) -> StoreResult<bool> {
        let query = sqlx::query_scalar::<_, i64>(WITHDRAW).bind(push_id.to_owned());
        let pool = self.pool.clone();
        let changed =
            run_detached(async move { query.fetch_one(&pool).await.map_err(map_sqlx) }).await?;
        Ok(changed > 0)
    }

    async fn queue_stats(&self) -> StoreResult<Vec<QueueStat>> {
        let rows = sqlx::query(QUEUE_STATS)
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        rows.iter()
            .map(|r| {
                queue_stat(
                    r.try_get("app").map_err(map_sqlx)?,
                    r.try_get("status").map_err(map_sqlx)?,
                    r.try_get("n").map_err(map_sqlx)?,
                    r.try_get("oldest_due").map_err(map_sqlx)?,
                )
            })
            .collect()
    }

    async fn claim_callbacks(
        &self,
        limit: u32,
        lease: Duration,
    ) -> StoreResult<Vec<CallbackClaim>> {
        super::callbacks::pg_claim(&self.pool, limit, lease).await
    }

    async fn record_callback(
        &self,
        claim: &CallbackClaim,
        log: &[CallbackAttempt],
        next: CallbackNext,
    ) -> StoreResult<bool> {
        super::callbacks::pg_record(&self.pool, claim, log, next).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(store.backend = "postgres", push.id = %parent.id))]
    async fn admit_parts(
        &self,
        parent: NewPush,
        parts: Vec<NewPart>,
    ) -> StoreResult<PartsAdmission> {
        let pool = self.pool.clone();
        run_detached(async move {
            super::parts::pg_admit(&pool, parent, parts)
                .await
                .map_err(map_sqlx)
        })
        .await
    }

    async fn release_parents(&self, limit: u32) -> StoreResult<u64> {
        let pool = self.pool.clone();
        run_detached(async move {
            super::parts::pg_release(&pool, limit)
                .await
                .map_err(map_sqlx)
        })
        .await
    }

    async fn settle_parent(&self, parent_id: &str) -> StoreResult<Option<PushStatus>> {
        super::parts::pg_settle(&self.pool, parent_id)
            .await
            .map_err(map_sqlx)
    }

    async fn settle_parents(&self, limit: u32) -> StoreResult<u64> {
        super::parts::pg_settle_all(&self.pool, limit)
            .await
            .map_err(map_sqlx)
    }

    async fn quota_state(
        &self,
        appkey: &str,
        kind: QuotaKind,
        limit: QuotaLimit,
    ) -> StoreResult<QuotaState> {
        let row = sqlx::query(QUOTA_STATE)
            .bind(appkey)
            .bind(kind.as_str())
            .bind(limit.window.seconds())
            .fetch_one(&self.pool)
            .await
            .map_err(map_sqlx)?;
        let used: i32 = row.try_get("used").map_err(map_sqlx)?;
        Ok(QuotaState {
            kind,
            limit: limit.limit,
            window: limit.window,
            used: u32::try_from(used).unwrap_or(0),
            window_start: row.try_get("window_start").map_err(map_sqlx)?,
            reset_after_secs: row.try_get("reset_after_secs").map_err(map_sqlx)?,
        })
    }

    async fn key_taken(&self, appkey: &str, out_biz_no: &str) -> StoreResult<bool> {
        let taken: Option<i32> = sqlx::query_scalar(KEY_TAKEN)
            .bind(appkey)
            .bind(out_biz_no)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(taken.is_some())
    }

    async fn find_upload(
        &self,
        appkey: &str,
        content_sha256: &str,
        max_age_secs: i64,
    ) -> StoreResult<Option<String>> {
        sqlx::query_scalar(FIND_UPLOAD)
            .bind(appkey)
            .bind(content_sha256)
            .bind(max_age_secs)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    async fn forget_upload(
        &self,
        appkey: &str,
        content_sha256: &str,
        file_id: &str,
    ) -> StoreResult<()> {
        sqlx::query(FORGET_UPLOAD)
            .bind(appkey)
            .bind(content_sha256)
            .bind(file_id)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    async fn save_upload(
        &self,
        appkey: &str,
        content_sha256: &str,
        file_id: &str,
    ) -> StoreResult<()> {
        sqlx::query(SAVE_UPLOAD)
            .bind(appkey)
            .bind(content_sha256)
            .bind(file_id)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }
}

/// The first migration of `migrator` missing from `applied`, as an error.
pub(crate) fn missing_migration(migrator: &Migrator, applied: &[i64]) -> StoreResult<()> {
    match migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .find(|m| !applied.contains(&m.version))
    {
        Some(m) => Err(StoreError::Migration(format!(
            "migration {} ({}) is not applied",
            m.version, m.description
        ))),
        None => Ok(()),
    }
}

/// One admission, alone on `conn` ([`ADMIT_PLAIN`] when it can, else `umgw_admit`); a
/// replay reads its owner through `pool`.
pub(super) async fn admit(
    conn: &mut PgConnection,
    pool: &PgPool,
    push: NewPush,
    quota: Option<QuotaClaim>,
) -> StoreResult<Admission> {
    if quota.is_none() {
        let inserted = admit_query(ADMIT_PLAIN, &push, None)
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_sqlx)?;
        if inserted.is_some() {
            return Ok(Admission::Admitted {
                push_id: push.id,
                quota: None,
                reclaimed_from: None,
            });
        }
    }
    let row = admit_query(ADMIT, &push, quota)
        .fetch_one(conn)
        .await
        .map_err(map_sqlx)?;
    let answer = AdmitRow::from_row(&row).map_err(map_sqlx)?;
    admission_of(pool, answer, &push, quota).await
}

/// [`ADMIT`] or [`ADMIT_PLAIN`] with the push's arguments (those of `umgw_admit`).
fn admit_query<'q>(
    sql: &'static str,
    push: &'q NewPush,
    quota: Option<QuotaClaim>,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    let delivery = push.delivery.as_ref();
    sqlx::query(sql)
        .bind(&push.id)
        .bind(&push.app)
        .bind(&push.appkey)
        .bind(&push.platform)
        .bind(&push.cast_type)
        .bind(push.task_class)
        .bind(push.production_mode)
        .bind(&push.client)
        .bind(&push.out_biz_no)
        .bind(&push.fingerprint)
        .bind(&push.request)
        .bind(&push.description)
        .bind(quota.map(|c| c.kind.as_str()))
        .bind(quota.map(|c| i32::try_from(c.limit.limit).unwrap_or(i32::MAX)))
        .bind(quota.map(|c| c.limit.window.seconds()))
        .bind(
            delivery
                .map_or(PushStatus::Pending, |d| d.status())
                .as_str(),
        )
        .bind(delivery.is_some_and(|d| d.defer_quota))
        .bind(delivery.map(|d| &d.outbox))
        .bind(push.send_at)
        .bind(delivery.map(|d| d.deliver_by))
        .bind(delivery.is_some_and(|d| d.quota_wait))
}

/// What `umgw_admit` answered for one push.
#[derive(Debug, Clone)]
pub(super) struct AdmitRow {
    pub outcome: String,
    pub push_id: Option<String>,
    pub reclaimed_from: Option<String>,
    pub used: Option<i32>,
    pub window_start: Option<i64>,
    pub reset_after_secs: Option<i64>,
}

impl AdmitRow {
    /// The columns of `umgw_admit`'s answer (also in each row of `umgw_admit_batch`'s).
    pub(super) fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(AdmitRow {
            outcome: row.try_get("outcome")?,
            push_id: row.try_get("push_id")?,
            reclaimed_from: row.try_get("reclaimed_from")?,
            used: row.try_get("used")?,
            window_start: row.try_get("window_start")?,
            reset_after_secs: row.try_get("reset_after_secs")?,
        })
    }
}

/// The [`Admission`] for `umgw_admit`'s answer (reading the owner of a replayed key).
pub(super) async fn admission_of(
    pool: &PgPool,
    answer: AdmitRow,
    push: &NewPush,
    quota: Option<QuotaClaim>,
) -> StoreResult<Admission> {
    let AdmitRow {
        outcome,
        push_id,
        reclaimed_from,
        used,
        window_start,
        reset_after_secs,
    } = answer;
    let deferred = push.delivery.as_ref().is_some_and(|d| d.defer_quota);
    let state = match quota {
        Some(claim) if !deferred => Some(QuotaState {
            kind: claim.kind,
            limit: claim.limit.limit,
            window: claim.limit.window,
            used: used.and_then(|u| u32::try_from(u).ok()).unwrap_or(0),
            window_start: window_start.unwrap_or_default(),
            reset_after_secs: reset_after_secs.unwrap_or(1),
        }),
        _ => None,
    };
    let owner = || {
        push_id.clone().ok_or_else(|| {
            StoreError::Database(format!("admission outcome {outcome} without a push id"))
        })
    };
    match outcome.as_str() {
        "admitted" => Ok(Admission::Admitted {
            push_id: owner()?,
            quota: state,
            reclaimed_from,
        }),
        "rate_limited" => match state {
            Some(quota) => Ok(Admission::RateLimited { quota }),
            None => Err(StoreError::Database(
                "rate limited without a quota claim".into(),
            )),
        },
        "in_flight" => Ok(Admission::InFlight { push_id: owner()? }),
        "mismatch" => Ok(Admission::Mismatch { push_id: owner()? }),
        "replay" => {
            let id = owner()?;
            match get_push(pool, &id).await? {
                Some(record) => Ok(Admission::Replay {
                    push: Box::new(record),
                }),
                None => Err(StoreError::Database(format!(
                    "push {id} owning the key is gone"
                ))),
            }
        }
        other => Err(StoreError::Database(format!(
            "unexpected admission outcome {other:?}"
        ))),
    }
}

/// A push with its parts (for a parent), as admission replays it.
pub(super) async fn get_push_with_parts(
    pool: &PgPool,
    push_id: &str,
) -> Result<Option<PushRecord>, sqlx::Error> {
    let row = sqlx::query(&format!("select {PUSH_COLUMNS} from pushes where id = $1"))
        .bind(push_id)
        .fetch_optional(pool)
        .await?;
    let Some(mut push) = row.as_ref().map(push_from_row).transpose()? else {
        return Ok(None);
    };
    if push.part_count.is_some() {
        push.parts = super::parts::pg_list(pool, push_id).await?;
    }
    Ok(Some(push))
}

async fn get_push(pool: &PgPool, push_id: &str) -> StoreResult<Option<PushRecord>> {
    let row = sqlx::query(&format!("select {PUSH_COLUMNS} from pushes where id = $1"))
        .bind(push_id)
        .fetch_optional(pool)
        .await
        .map_err(map_sqlx)?;
    row.as_ref()
        .map(push_from_row)
        .transpose()
        .map_err(map_sqlx)
}

fn decode_err(message: String) -> sqlx::Error {
    sqlx::Error::Decode(message.into())
}

fn summary_from_row(row: &PgRow) -> Result<PushSummary, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let http_status: Option<i32> = row.try_get("http_status")?;
    Ok(PushSummary {
        id: row.try_get("id")?,
        app: row.try_get("app")?,
        platform: row.try_get("platform")?,
        cast_type: row.try_get("cast_type")?,
        task_class: row.try_get("task_class")?,
        production_mode: row.try_get("production_mode")?,
        client: row.try_get("client")?,
        out_biz_no: row.try_get("out_biz_no")?,
        status: PushStatus::parse(&status)
            .ok_or_else(|| decode_err(format!("unknown push status {status:?}")))?,
        description: row.try_get("description")?,
        msg_id: row.try_get("msg_id")?,
        task_id: row.try_get("task_id")?,
        file_id: row.try_get("file_id")?,
        error_code: row.try_get("error_code")?,
        error_msg: row.try_get("error_msg")?,
        http_status: http_status.and_then(|s| u16::try_from(s).ok()),
        latency_ms: row.try_get("latency_ms")?,
        delivery: DeliveryMode::from_column(row.try_get::<Option<&str>, _>("delivery")?),
        send_at: row.try_get("send_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        attempt_count: u32::try_from(row.try_get::<i32, _>("attempt_count")?).unwrap_or(0),
        parts: super::non_negative(row.try_get::<Option<i32>, _>("parts")?.map(i64::from)),
        created_at: row.try_get("created_at")?,
        sent_at: row.try_get("sent_at")?,
        finished_at: row.try_get("finished_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn push_from_row(row: &PgRow) -> Result<PushRecord, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let quota_kind: Option<String> = row.try_get("quota_kind")?;
    let http_status: Option<i32> = row.try_get("http_status")?;
    Ok(PushRecord {
        id: row.try_get("id")?,
        app: row.try_get("app")?,
        appkey: row.try_get("appkey")?,
        platform: row.try_get("platform")?,
        cast_type: row.try_get("cast_type")?,
        task_class: row.try_get("task_class")?,
        production_mode: row.try_get("production_mode")?,
        client: row.try_get("client")?,
        out_biz_no: row.try_get("out_biz_no")?,
        fingerprint: row.try_get("fingerprint")?,
        status: PushStatus::parse(&status)
            .ok_or_else(|| decode_err(format!("unknown push status {status:?}")))?,
        description: row.try_get("description")?,
        request: row.try_get::<Value, _>("request")?,
        umeng_request: row.try_get("umeng_request")?,
        umeng_response: row.try_get("umeng_response")?,
        msg_id: row.try_get("msg_id")?,
        task_id: row.try_get("task_id")?,
        file_id: row.try_get("file_id")?,
        error_code: row.try_get("error_code")?,
        error_msg: row.try_get("error_msg")?,
        http_status: http_status.and_then(|s| u16::try_from(s).ok()),
        quota_kind: match quota_kind {
            Some(k) => Some(
                QuotaKind::parse(&k)
                    .ok_or_else(|| decode_err(format!("unknown quota kind {k:?}")))?,
            ),
            None => None,
        },
        quota_window: row.try_get("quota_window")?,
        quota_refunded: row.try_get("quota_refunded")?,
        task_status: row.try_get("task_status")?,
        task_checked_at: row.try_get("task_checked_at")?,
        latency_ms: row.try_get("latency_ms")?,
        attempts: attempts_of(row.try_get::<Value, _>("attempts")?)?,
        delivery: DeliveryMode::from_column(row.try_get::<Option<&str>, _>("delivery")?),
        send_at: row.try_get("send_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        deliver_by: row.try_get("deliver_by")?,
        created_at: row.try_get("created_at")?,
        sent_at: row.try_get("sent_at")?,
        finished_at: row.try_get("finished_at")?,
        updated_at: row.try_get("updated_at")?,
        truncated: Vec::new(),
        callback_url: row.try_get("callback_url")?,
        callbacks: Vec::new(),
        parent_id: row.try_get("parent_id")?,
        part_no: super::non_negative(row.try_get::<Option<i32>, _>("part_no")?.map(i64::from)),
        audience: super::non_negative(row.try_get::<Option<i32>, _>("audience")?.map(i64::from)),
        part_count: super::non_negative(row.try_get::<Option<i32>, _>("parts")?.map(i64::from)),
        parts: Vec::new(),
    })
}
