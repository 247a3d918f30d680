//! The SQLite store: for a single replica or development. Writes that span statements run
//! in a `begin immediate` transaction (writers serialise up front, no lock upgrades), inside
//! a spawned task so a dropped caller cannot leave a connection mid-transaction.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection};
use time::OffsetDateTime;

use super::postgres::missing_migration;
use super::{
    attempts_json, attempts_of, hourly_count, map_sqlx, millis, queue_stat, redact_url,
    run_detached, scrub, Admission, CallbackAttempt, CallbackClaim, CallbackNext, DeliveryApp,
    DeliveryClaim, DeliveryMode, DeliveryRetry, Finish, HourlyCount, NewPart, NewPush,
    PartsAdmission, PolledApp, PoolOptions, PoolStatus, PurgeTarget, PushQuery, PushRecord,
    PushStatus, PushSummary, QueueStat, QuotaAction, QuotaClaim, Store, StoreError, StoreResult,
    TaskClaim, TaskUpdate, MAX_PAGE, MAX_PUSH_COUNT_ROWS,
};
use crate::quota::{QuotaKind, QuotaLimit, QuotaState};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a writer waits for another writer before giving up with SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often, at most, the background checkpointer copies the write-ahead log into the
/// database (it runs only after writes).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(25);
/// WAL pages after which a commit checkpoints by itself (SQLite's default is 1,000): with a
/// background checkpointer, only when it has fallen far behind. About 40 MB.
const COMMIT_CHECKPOINT_PAGES: &str = "10000";
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

const COUNT_BY_HOUR: &str = "select (created_at / 3600000) * 3600 as hour, status, error_code, \
    count(*) as n from pushes where created_at >= ?1 \
    and (?2 is null or app in (select value from json_each(?2))) and parent_id is null \
    group by 1, 2, 3 order by 1, 2, 3 limit ?3";
const PUSH_COLUMNS: &str = "id, app, appkey, platform, cast_type, task_class, production_mode, \
     client, out_biz_no, fingerprint, status, description, request, umeng_request, \
     umeng_response, msg_id, task_id, file_id, error_code, error_msg, http_status, quota_kind, \
     quota_window, quota_refunded, task_status, task_checked_at, latency_ms, attempts, created_at, \
     sent_at, finished_at, updated_at, callback_url, delivery, send_at, next_attempt_at, \
     deliver_by, parent_id, part_no, audience, parts";

/// What a history list reads: no stored bodies, long texts cut in the database.
const SUMMARY_COLUMNS: &str = "id, app, platform, cast_type, task_class, production_mode, \
     client, out_biz_no, status, substr(description, 1, 256) as description, msg_id, task_id, \
     file_id, error_code, substr(error_msg, 1, 256) as error_msg, http_status, latency_ms, \
     created_at, sent_at, finished_at, updated_at, delivery, send_at, next_attempt_at, \
     json_array_length(attempts) as attempt_count, parts";

const KEY_OWNER: &str = "select k.fingerprint, k.push_id, p.status, p.delivery
  from idempotency_keys k join pushes p on p.id = k.push_id
 where k.appkey = ?1 and k.out_biz_no = ?2";

/// Whether a key names a push ([`Store::key_taken`]).
const KEY_TAKEN: &str = "select 1 from idempotency_keys where appkey = ?1 and out_biz_no = ?2";

const INSERT_PUSH: &str = "insert into pushes (id, app, appkey, platform, cast_type, task_class,
    production_mode, client, out_biz_no, fingerprint, status, description, request,
    quota_kind, quota_window, quota_limit, created_at, updated_at, quota_unit, delivery, outbox,
    next_attempt_at, send_at, deliver_by, quota_wait)
values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?17, ?11, ?12, ?13, ?14, ?15, ?16, ?16, ?18, ?19,
    ?20, ?21, ?22, ?23, ?24)";

/// The key for the push, unless it names a push already (then nothing is written).
const INSERT_FREE_KEY: &str = "insert into idempotency_keys (appkey, out_biz_no, fingerprint,
    push_id, created_at)
values (?1, ?2, ?3, ?4, ?5)
on conflict (appkey, out_biz_no) do nothing";

/// Undoes a row just inserted in the same transaction.
const DELETE_PUSH: &str = "delete from pushes where id = ?1";

const RECLAIM_KEY: &str = "update idempotency_keys
   set push_id = ?3, fingerprint = ?4, created_at = ?5
 where appkey = ?1 and out_biz_no = ?2 and push_id = ?6";

pub(super) const TAKE_SLOT: &str =
    "insert into quota_counters as q (appkey, kind, window_start, used)
values (?1, ?2, ?3, 1)
on conflict (appkey, kind, window_start)
do update set used = q.used + 1 where q.used < ?4
returning used";

const REFUND_UNKNOWN_OWNER: &str = "update pushes set quota_refunded = 1, updated_at = ?2
 where id = ?1 and status = 'unknown' and quota_window is not null and not quota_refunded
returning appkey, quota_kind, quota_window";

pub(super) const SLOT_USED: &str =
    "select used from quota_counters where appkey = ?1 and kind = ?2 and window_start = ?3";

/// Which rows a finish may still write: `pending`, or `unknown` by the sweeper's guess
/// while the push still owns its key (a late real answer replaces the guess).
macro_rules! finishable {
    () => {
        "(status = 'pending'
      or (status = 'unknown' and error_code = 'stale_pending'
          and (out_biz_no is null
               or exists (select 1 from idempotency_keys k where k.push_id = pushes.id))))"
    };
}

const PENDING_QUOTA: &str = concat!(
    "select appkey, quota_kind, quota_window, quota_limit, quota_refunded
  from pushes where id = ?1 and (?2 is null or deliver_claims = ?2) and ",
    finishable!()
);

const FINISH: &str = concat!(
    "update pushes
   set status = ?2, umeng_request = ?3, umeng_response = ?4, msg_id = ?5, task_id = ?6,
       file_id = ?7, error_code = ?8, error_msg = ?9, http_status = ?10, latency_ms = ?11,
       sent_at = ?12, quota_refunded = (quota_refunded or ?13), finished_at = ?14,
       updated_at = ?14, attempts = ?15, outbox = null, next_attempt_at = null,
       deliver_lease_until = null
 where id = ?1 and (?16 is null or deliver_claims = ?16) and ",
    finishable!()
);

pub(super) const REFUND: &str = "update quota_counters set used = max(used - 1, 0)
 where appkey = ?1 and kind = ?2 and window_start = ?3";

const SATURATE: &str = "insert into quota_counters as q (appkey, kind, window_start, used)
values (?1, ?2, ?3, ?4)
on conflict (appkey, kind, window_start) do update set used = max(q.used, excluded.used)";

/// An ordered, fenced task-state write (see [`Store::update_task`]). `?6` lists (JSON) the
/// stored states this status replaces outright; the same status needs `task_checked_at`
/// unchanged since the writer read it (`?7`), and a poller's write its claim (`?8`) to be
/// the latest. `task_checked_at` moves strictly forward, so it identifies the stored answer.
const UPDATE_TASK: &str = "update pushes
   set status = ?2,
       task_status = case
           when json_type(?3) = 'object'
                and json_extract(task_status, '$.cancelled_by') is not null
                and json_extract(?3, '$.cancelled_by') is null
           then json_set(?3, '$.cancelled_by', json_extract(task_status, '$.cancelled_by'))
           else ?3 end,
       task_checked_at = max(?5, coalesce(task_checked_at + 1, ?5)),
       updated_at = ?5,
       finished_at = case when ?4 and status <> ?2 then ?5 else finished_at end
 where id = ?1
   and (status in (select value from json_each(?6))
        or (status = ?2 and task_checked_at is ?7))
   and (?8 is null or poll_count = ?8)";

/// Lease due tasks; run inside `begin immediate`, so claimers are serialised. `next_poll_at`
/// moves to the lease's end too, so a task whose poller died is due again then. Read through
/// the partial index of unfinished tasks: SQLite otherwise took the status index and read
/// every accepted push in history (unicasts included) on each round, holding the writer.
const CLAIM_TASK_POLLS: &str = "update pushes
   set poll_locked_until = ?1 + ?3, next_poll_at = ?1 + ?3, poll_count = poll_count + 1
 where id in (
    select p.id from pushes p indexed by pushes_task_poll_idx
     where p.task_class and p.task_id is not null
       and p.status in ('accepted', 'queued', 'sending', 'scheduled')
       and exists (select 1 from json_each(?5) c
                    where json_extract(c.value, '$[0]') = p.app
                      and json_extract(c.value, '$[1]') = p.appkey)
       and (poll_locked_until is null or poll_locked_until <= ?1)
       and (next_poll_at <= ?1
            or (next_poll_at is null and poll_count = 0 and finished_at <= ?1 - ?4))
     order by coalesce(next_poll_at, finished_at)
     limit ?2)
returning id, app, appkey, task_id, created_at, request, task_checked_at, poll_count,
          poll_locked_until";

const RELEASE_TASK_POLL: &str = "update pushes
   set poll_locked_until = null, next_poll_at = ?3 + ?4
 where id = ?1 and poll_locked_until = ?2";

const PURGE_PUSHES: &str = "delete from pushes where id in (
    select id from pushes where created_at < ?1 order by created_at limit ?2)";

const PURGE_QUOTA_COUNTERS: &str = "delete from quota_counters where rowid in (
    select rowid from quota_counters where window_start < ?1 / 1000 limit ?2)";

const PURGE_UPLOADS: &str = "delete from uploads where rowid in (
    select rowid from uploads where created_at < ?1 order by created_at limit ?2)";

const SWEEP: &str = "update pushes
   set status = 'unknown', error_code = 'stale_pending',
       error_msg = 'still pending after the sweep threshold: the outcome of the umeng call is unknown',
       finished_at = ?1, updated_at = ?1
 where status = 'pending' and delivery is null and created_at < ?2";

/// Due asynchronous pushes of one app (`?1`, `?2`), oldest due first, through that app's
/// ordered index, stopping at the limit. Left to itself SQLite took the status index, read
/// every queued row and sorted them all (80 ms per claim with 63,000 queued, against 2 ms);
/// and one ordered scan for several apps walked past every push of the others for an app
/// with nothing due.
const DUE_DELIVERIES: &str = "select id, app, status, appkey, quota_kind, quota_limit, quota_unit,
       quota_window, quota_refunded, quota_wait, deliver_by, created_at, deliver_claims,
       next_attempt_at
  from pushes indexed by pushes_app_due_idx
 where app = ?1 and appkey = ?2
   and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
   and next_attempt_at <= ?3 and next_attempt_at >= ?5
 order by next_attempt_at, created_at, id
 limit ?4";

const EXPIRE_DELIVERY: &str = "update pushes
   set status = 'failed',
       error_code = case when status = 'awaiting_quota' then 'quota_wait_expired'
                         else 'delivery_expired' end,
       error_msg = case when status = 'awaiting_quota'
           then 'no quota slot came free before the push''s deadline'
           else 'the push could not be sent before its deadline' end,
       http_status = case when status = 'awaiting_quota' then 429 else 504 end,
       quota_refunded = (quota_refunded or quota_window is not null),
       outbox = null, next_attempt_at = null, finished_at = ?2, updated_at = ?2
 where id = ?1";

const QUOTA_HEAD: &str = "select min(next_attempt_at) from pushes
 where status = 'awaiting_quota' and appkey = ?1 and quota_kind = ?2
   and (created_at, id) < (?3, ?4)";

const WAIT_FOR_QUOTA: &str = "update pushes
   set status = 'awaiting_quota', next_attempt_at = ?2, updated_at = ?3
 where id = ?1";

const QUOTA_EXHAUSTED: &str = "update pushes
   set status = 'failed', error_code = 'quota_exhausted',
       error_msg = 'the ' || quota_kind || ' quota window was full when the push was due',
       http_status = 429, outbox = null, next_attempt_at = null, finished_at = ?2,
       updated_at = ?2
 where id = ?1";

const SET_SLOT: &str = "update pushes set quota_window = ?2, quota_refunded = 0 where id = ?1";

const CLAIM_DELIVERY: &str = "update pushes
   set status = 'pending', deliver_claims = deliver_claims + 1, deliver_lease_until = ?2,
       updated_at = ?3
 where id = ?1
returning id, app, appkey, cast_type, task_class, production_mode, out_biz_no, outbox,
          attempts, created_at, deliver_by, quota_kind, quota_wait, deliver_claims,
          deliver_lease_until, parent_id, next_attempt_at";

const RETRY_DELIVERY: &str = "update pushes
   set status = ?2, next_attempt_at = ?3, error_code = ?4, error_msg = ?5, umeng_response = ?6,
       attempts = ?7, quota_refunded = (quota_refunded or (?8 and quota_window is not null)),
       deliver_lease_until = null, updated_at = ?10
 where id = ?1 and status = 'pending' and deliver_claims = ?9
returning appkey, quota_kind, quota_window, quota_limit, quota_unit";

const RECOVER_DELIVERIES: &str = "update pushes
   set status = case when task_class then 'awaiting_send' else 'unknown' end,
       next_attempt_at = case when task_class then ?1 else null end,
       error_code = case when task_class then error_code else 'stale_pending' end,
       error_msg = case when task_class then error_msg
           else 'the delivery worker''s lease ran out mid-send: the outcome of the umeng call is unknown' end,
       outbox = case when task_class then outbox else null end,
       finished_at = case when task_class then null else ?1 end,
       deliver_lease_until = null, updated_at = ?1
 where status = 'pending' and delivery is not null and deliver_lease_until < ?1";

const WITHDRAW: &str = "update pushes
   set status = 'withdrawn', error_code = 'withdrawn',
       error_msg = 'cancelled before it was sent', outbox = null, next_attempt_at = null,
       quota_refunded = (quota_refunded or quota_window is not null),
       finished_at = ?2, updated_at = ?2
 where id = ?1 and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')";

const QUEUE_STATS: &str = "select app, status, count(*) as n,
       min(case when next_attempt_at <= ?1 then next_attempt_at end) as oldest_due
  from pushes
 where status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
    or (status = 'pending' and delivery is not null and parts is null)
 group by app, status";

/// A slot a push holds and has not given back: `(appkey, kind, window)`.
const HELD_SLOT: &str = "select appkey, quota_kind, quota_window from pushes
 where id = ?1 and quota_kind is not null and quota_window is not null
   and not quota_refunded";

const FIND_UPLOAD: &str = "select file_id from uploads
 where appkey = ?1 and content_sha256 = ?2 and created_at > ?3";

const FORGET_UPLOAD: &str =
    "delete from uploads where appkey = ?1 and content_sha256 = ?2 and file_id = ?3";

const SAVE_UPLOAD: &str = "insert into uploads (appkey, content_sha256, file_id, created_at)
values (?1, ?2, ?3, ?4)
on conflict (appkey, content_sha256)
do update set file_id = excluded.file_id, created_at = excluded.created_at";

const APPLIED_MIGRATIONS: &str = "select version from _sqlx_migrations where success";

/// A [`Store`] on a SQLite file. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Admissions and finishes take turns here rather than in SQLite's busy handler, which
    /// waits by sleeping (1, 2, 5, 10 ms, ...) and so made the tail latency of concurrent
    /// pushes tens to hundreds of milliseconds.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Admissions and outcome records, committed together when they arrive together.
    batches: super::sqlite_batch::Writer,
    /// The background checkpointer (for a file with more than one connection) stops when
    /// the last clone of the store is dropped, and with it this sender.
    _checkpointer: Option<tokio::sync::mpsc::Sender<()>>,
}

impl SqliteStore {
    /// Open `url` (`sqlite://path/to/file.db`, `sqlite:file.db`, `sqlite::memory:`), creating
    /// the file and its directory if missing; WAL journal, a busy timeout, foreign keys on.
    pub async fn connect(url: &str, options: &PoolOptions) -> StoreResult<Self> {
        let bad_url =
            |e: String| StoreError::BadUrl(format!("{}: {}", redact_url(url), scrub(e, url)));
        let mut connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| bad_url(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        // In WAL mode with `synchronous = NORMAL` a commit does not wait for the disk; a
        // checkpoint does (it syncs the log and the database), and by default the commit
        // that takes the log past 1,000 pages runs it. Each push writes every page it
        // touches (its row and each index) to the log, so that was a checkpoint every few
        // dozen pushes, in some request's commit: the tail latency. A background task
        // checkpoints instead, on a connection of its own; a commit still does when the
        // log is far behind. A pool of one connection keeps SQLite's default.
        let checkpoint_in_background = !in_memory && options.max_connections > 1;
        if checkpoint_in_background {
            connect = connect.pragma("wal_autocheckpoint", COMMIT_CHECKPOINT_PAGES);
        }
        if !in_memory {
            if let Some(dir) = connect.get_filename().parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        StoreError::Unavailable(format!(
                            "cannot create directory {}: {e}",
                            dir.display()
                        ))
                    })?;
                }
            }
        }
        let mut pool = SqlitePoolOptions::new().acquire_timeout(options.acquire_timeout);
        pool = if in_memory {
            // Every connection to ":memory:" is its own database: keep exactly one, forever.
            pool.max_connections(1)
                .min_connections(1)
                .max_lifetime(None)
                .idle_timeout(None)
        } else {
            pool.max_connections(options.max_connections.max(1))
                .max_lifetime(MAX_LIFETIME)
        };
        let pool = pool
            .connect_with(connect)
            .await
            .map_err(|e| match map_sqlx(e) {
                StoreError::Unavailable(m) | StoreError::Database(m) => StoreError::Unavailable(
                    format!("cannot open {}: {}", redact_url(url), scrub(m, url)),
                ),
                other => other,
            })?;
        let writer = Arc::default();
        let wrote = Arc::new(tokio::sync::Notify::new());
        let checkpointer = checkpoint_in_background.then(|| {
            let (alive, gone) = tokio::sync::mpsc::channel(1);
            tokio::spawn(checkpoint_after_writes(
                pool.clone(),
                Arc::clone(&wrote),
                CHECKPOINT_EVERY,
                gone,
            ));
            alive
        });
        Ok(Self {
            batches: super::sqlite_batch::Writer::start(pool.clone(), Arc::clone(&writer), wrote),
            pool,
            writer,
            _checkpointer: checkpointer,
        })
    }

    /// The underlying pool (for tests and operational queries).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Copies the write-ahead log into the database (a passive checkpoint: it waits for no
/// reader or writer, and copies what it can) at most every `every`, and only after the
/// writer of admissions and outcomes has written (an idle store is left alone), until
/// `store_gone` closes. A failure is logged and tried again after the next write.
async fn checkpoint_after_writes(
    pool: SqlitePool,
    wrote: Arc<tokio::sync::Notify>,
    every: Duration,
    mut store_gone: tokio::sync::mpsc::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = store_gone.recv() => return,
            () = wrote.notified() => {}
        }
        tokio::select! {
            _ = store_gone.recv() => return,
            () = tokio::time::sleep(every) => {}
        }
        if let Err(e) = sqlx::query("pragma wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::debug!(error = %e, "a background WAL checkpoint failed");
        }
    }
}

/// The clock: SQLite has no server, so the database clock is this host's clock.
fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub(super) fn from_ms(ms: i64) -> Result<OffsetDateTime, sqlx::Error> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

pub(super) fn to_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The state of `claim`'s window at `now_ms`, with `used` filled in by the caller.
pub(super) fn window_of(claim: QuotaClaim, now_ms: i64, used: u32) -> QuotaState {
    let unit = claim.limit.window.seconds();
    let window_start = claim.limit.window.window_start(now_ms.div_euclid(1000));
    let end_ms = (window_start + unit) * 1000;
    QuotaState {
        kind: claim.kind,
        limit: claim.limit.limit,
        window: claim.limit.window,
        used,
        window_start,
        reset_after_secs: ((end_ms - now_ms + 999) / 1000).max(1),
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn pool_status(&self) -> PoolStatus {
        PoolStatus::from_counts(self.pool.size(), self.pool.num_idle())
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
        // SQLite has no server to lose: what stops the gateway is a write lock it cannot
        // get (another process holding the file), since every admission writes. Readers
        // in WAL mode never notice that, so take the write lock and give it back at once.
        let pool = self.pool.clone();
        run_detached(async move {
            let tx = pool.begin_with("begin immediate").await.map_err(map_sqlx)?;
            tx.rollback().await.map_err(map_sqlx)
        })
        .await
    }

    async fn now(&self) -> StoreResult<OffsetDateTime> {
        from_ms(now_ms()).map_err(map_sqlx)
    }

    // The store spans are debug: nothing in the store logs at info or above, and each span
    // costs a formatted field set on every call.
    #[tracing::instrument(level = "debug", skip_all, fields(store.backend = "sqlite", push.id = %push.id))]
    async fn admit(&self, push: NewPush, quota: Option<QuotaClaim>) -> StoreResult<Admission> {
        self.batches.admit(push, quota).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(store.backend = "sqlite", push.id = %push_id))]
    async fn finish(&self, push_id: &str, finish: Arc<Finish>) -> StoreResult<bool> {
        self.batches.finish(push_id, finish).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(store.backend = "sqlite", push.id = %push_id))]
    async fn update_task(&self, push_id: &str, update: TaskUpdate) -> StoreResult<bool> {
        let replaces: Vec<&str> = update
            .status
            .replaces()
            .into_iter()
            .map(PushStatus::as_str)
            .collect();
        let done = sqlx::query(UPDATE_TASK)
            .bind(push_id)
            .bind(update.status.as_str())
            .bind(Json(update.task_status))
            .bind(update.status.is_final_task_state())
            .bind(now_ms())
            .bind(Json(replaces))
            .bind(update.seen_checked_at.map(to_ms))
            .bind(update.claim.map(i64::from))
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected() > 0)
    }

    async fn get_push(&self, push_id: &str) -> StoreResult<Option<PushRecord>> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
        let Some(mut push) = get_push_with_parts(&mut conn, push_id)
            .await
            .map_err(map_sqlx)?
        else {
            return Ok(None);
        };
        drop(conn);
        if push.callback_url.is_some() {
            push.callbacks = super::callbacks::sqlite_list(&self.pool, push_id)
                .await
                .map_err(map_sqlx)?;
        }
        Ok(Some(push))
    }

    async fn list_pushes(&self, query: &PushQuery) -> StoreResult<Vec<PushSummary>> {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "select {SUMMARY_COLUMNS} from pushes where parent_id is null"
        ));
        if let Some(app) = &query.app {
            qb.push(" and app = ").push_bind(app.clone());
        }
        if let Some(apps) = &query.apps_allowed {
            if apps.is_empty() {
                qb.push(" and 0");
            } else {
                qb.push(" and app in (");
                let mut list = qb.separated(", ");
                for app in apps {
                    list.push_bind(app.clone());
                }
                qb.push(")");
            }
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
            qb.push(" and created_at >= ").push_bind(to_ms(from));
        }
        if let Some(to) = query.to {
            qb.push(" and created_at < ").push_bind(to_ms(to));
        }
        // A row-value comparison the (created_at desc, id desc) indexes serve directly.
        if let Some(before) = &query.before {
            qb.push(" and (created_at, id) < (")
                .push_bind(to_ms(before.created_at))
                .push(", ")
                .push_bind(before.id.clone())
                .push(")");
        }
        qb.push(" order by created_at desc, id desc limit ")
            .push_bind(i64::from(query.limit.clamp(1, MAX_PAGE + 1)));
        let rows = qb.build().fetch_all(&self.pool).await.map_err(map_sqlx)?;
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
            .bind(to_ms(since))
            .bind(apps_allowed.map(|a| Value::from(a.to_vec()).to_string()))
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
        let now = now_ms();
        let done = sqlx::query(SWEEP)
            .bind(now)
            .bind(now.saturating_sub(older_than_secs.saturating_mul(1000)))
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
        let pool = self.pool.clone();
        let apps: Vec<[String; 2]> = apps
            .iter()
            .map(|a| [a.app.clone(), a.appkey.clone()])
            .collect();
        run_detached(async move {
            claim_task_polls(&pool, limit, millis(lease), millis(first_poll_after), apps)
                .await
                .map_err(map_sqlx)
        })
        .await
    }

    async fn release_task_poll(
        &self,
        claim: &TaskClaim,
        next_poll_in: Option<Duration>,
    ) -> StoreResult<bool> {
        let done = sqlx::query(RELEASE_TASK_POLL)
            .bind(&claim.push_id)
            .bind(to_ms(claim.lease_until))
            .bind(now_ms())
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
            .bind(now_ms().saturating_sub(millis(older_than)))
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected())
    }

    async fn claim_callbacks(
        &self,
        limit: u32,
        lease: Duration,
    ) -> StoreResult<Vec<CallbackClaim>> {
        let pool = self.pool.clone();
        run_detached(async move {
            super::callbacks::sqlite_claim(&pool, limit, lease, now_ms())
                .await
                .map_err(map_sqlx)
        })
        .await
    }

    async fn record_callback(
        &self,
        claim: &CallbackClaim,
        log: &[CallbackAttempt],
        next: CallbackNext,
    ) -> StoreResult<bool> {
        super::callbacks::sqlite_record(&self.pool, claim, log, next, now_ms())
            .await
            .map_err(map_sqlx)
    }

    async fn claim_deliveries(
        &self,
        limit: u32,
        lease: Duration,
        apps: &[DeliveryApp],
    ) -> StoreResult<Vec<DeliveryClaim>> {
        let pool = self.pool.clone();
        let writer = Arc::clone(&self.writer);
        let apps = apps.to_vec();
        let lease_ms = millis(lease);
        run_detached(async move {
            let _turn = writer.lock().await;
            claim_deliveries(&pool, limit, lease_ms, apps)
                .await
                .map_err(map_sqlx)
        })
        .await
    }

    async fn retry_delivery(
        &self,
        claim: &DeliveryClaim,
        retry: DeliveryRetry,
    ) -> StoreResult<bool> {
        let pool = self.pool.clone();
        let writer = Arc::clone(&self.writer);
        let push_id = claim.push_id.clone();
        let claim = claim.claim;
        run_detached(async move {
            let _turn = writer.lock().await;
            retry_delivery(&pool, &push_id, claim, retry)
                .await
                .map_err(map_sqlx)
        })
        .await
    }

    async fn recover_deliveries(&self) -> StoreResult<u64> {
        let done = sqlx::query(RECOVER_DELIVERIES)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected())
    }

    async fn withdraw(&self, push_id: &str) -> StoreResult<bool> {
        let pool = self.pool.clone();
        let writer = Arc::clone(&self.writer);
        let push_id = push_id.to_owned();
        run_detached(async move {
            let _turn = writer.lock().await;
            let mut tx = pool.begin_with("begin immediate").await.map_err(map_sqlx)?;
            let held = held_slot(&mut tx, &push_id).await.map_err(map_sqlx)?;
            let done = sqlx::query(WITHDRAW)
                .bind(&push_id)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx)?;
            if done.rows_affected() == 0 {
                tx.rollback().await.map_err(map_sqlx)?;
                return Ok(false);
            }
            give_back(&mut tx, held).await.map_err(map_sqlx)?;
            tx.commit().await.map_err(map_sqlx)?;
            Ok(true)
        })
        .await
    }

    async fn queue_stats(&self) -> StoreResult<Vec<QueueStat>> {
        let rows = sqlx::query(QUEUE_STATS)
            .bind(now_ms())
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        rows.iter()
            .map(|r| {
                queue_stat(
                    r.try_get("app").map_err(map_sqlx)?,
                    r.try_get("status").map_err(map_sqlx)?,
                    r.try_get("n").map_err(map_sqlx)?,
                    opt_time(r, "oldest_due").map_err(map_sqlx)?,
                )
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(store.backend = "sqlite", push.id = %parent.id))]
    async fn admit_parts(
        &self,
        parent: NewPush,
        parts: Vec<NewPart>,
    ) -> StoreResult<PartsAdmission> {
        let pool = self.pool.clone();
        let writer = Arc::clone(&self.writer);
        run_detached(async move {
            let _turn = writer.lock().await;
            super::parts::sqlite_admit(&pool, parent, parts, now_ms())
                .await
                .map_err(map_sqlx)
        })
        .await
    }

    async fn release_parents(&self, limit: u32) -> StoreResult<u64> {
        let ids = super::parts::sqlite_due_gated(&self.pool, limit, now_ms())
            .await
            .map_err(map_sqlx)?;
        let mut released = 0;
        for id in ids {
            let pool = self.pool.clone();
            let writer = Arc::clone(&self.writer);
            let done = run_detached(async move {
                let _turn = writer.lock().await;
                super::parts::sqlite_release_one(&pool, &id, now_ms())
                    .await
                    .map_err(map_sqlx)
            })
            .await?;
            if done {
                released += 1;
            }
        }
        Ok(released)
    }

    async fn settle_parent(&self, parent_id: &str) -> StoreResult<Option<PushStatus>> {
        let pool = self.pool.clone();
        let parent_id = parent_id.to_owned();
        let writer = Arc::clone(&self.writer);
        run_detached(async move {
            let _turn = writer.lock().await;
            super::parts::sqlite_settle(&pool, &parent_id, now_ms())
                .await
                .map_err(map_sqlx)
        })
        .await
    }

    async fn settle_parents(&self, limit: u32) -> StoreResult<u64> {
        let ids = super::parts::sqlite_settleable(&self.pool, limit)
            .await
            .map_err(map_sqlx)?;
        let mut settled = 0;
        for id in ids {
            if self.settle_parent(&id).await?.is_some() {
                settled += 1;
            }
        }
        Ok(settled)
    }

    async fn quota_state(
        &self,
        appkey: &str,
        kind: QuotaKind,
        limit: QuotaLimit,
    ) -> StoreResult<QuotaState> {
        let mut state = window_of(QuotaClaim { kind, limit }, now_ms(), 0);
        let used: Option<i64> = sqlx::query_scalar(SLOT_USED)
            .bind(appkey)
            .bind(kind.as_str())
            .bind(state.window_start)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?;
        state.used = used.and_then(|u| u32::try_from(u).ok()).unwrap_or(0);
        Ok(state)
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
            .bind(now_ms().saturating_sub(max_age_secs.saturating_mul(1000)))
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
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }
}

/// Admission alone: the row in one statement when there is nothing to check or count,
/// otherwise one `begin immediate` transaction (writers are serialised, so the key check and
/// the guarded counter cannot race).
pub(super) async fn admit(
    conn: &mut SqliteConnection,
    push: &NewPush,
    quota: Option<QuotaClaim>,
) -> Result<Admission, sqlx::Error> {
    if is_one_statement(push, quota) {
        return admit_in(conn, push, quota).await;
    }
    let mut tx = conn.begin_with("begin immediate").await?;
    let admission = admit_in(&mut tx, push, quota).await?;
    tx.commit().await?;
    Ok(admission)
}

/// An admission that is the push row alone: no key to check, no slot to take now.
fn is_one_statement(push: &NewPush, quota: Option<QuotaClaim>) -> bool {
    push.out_biz_no.is_none()
        && (quota.is_none() || push.delivery.as_ref().is_some_and(|d| d.defer_quota))
}

/// Admission inside the caller's write transaction (its own, or a batch's). A refusal
/// leaves nothing written: the checks come before the writes, and a reclaim that is
/// refused after giving the old owner's slot back is undone through a savepoint. An error
/// may leave partial writes: the caller rolls the transaction back.
pub(super) async fn admit_in(
    conn: &mut SqliteConnection,
    push: &NewPush,
    quota: Option<QuotaClaim>,
) -> Result<Admission, sqlx::Error> {
    // A deferred slot (asynchronous delivery) is taken when the push is sent: admission
    // records the bucket only.
    let deferred = quota.filter(|_| push.delivery.as_ref().is_some_and(|d| d.defer_quota));
    let now = now_ms();
    if is_one_statement(push, quota) {
        // Nothing to check or count: the row alone, one statement.
        insert_push(conn, push, deferred, None, now).await?;
        return Ok(Admission::Admitted {
            push_id: push.id.clone(),
            quota: None,
            reclaimed_from: None,
        });
    }
    let quota = quota.filter(|_| deferred.is_none());
    if let (Some(key), None) = (&push.out_biz_no, quota) {
        // Nothing to count: the row, and the key if no push holds it yet (the common
        // case, two statements). A key held already undoes the row and is looked at below.
        insert_push(conn, push, deferred, None, now).await?;
        if claim_free_key(conn, push, key, now).await? {
            return Ok(Admission::Admitted {
                push_id: push.id.clone(),
                quota: None,
                reclaimed_from: None,
            });
        }
        sqlx::query(DELETE_PUSH)
            .bind(&push.id)
            .execute(&mut *conn)
            .await?;
    }
    let window = quota.map(|claim| window_of(claim, now, 0));

    let mut reclaimed_from = None;
    if let Some(key) = &push.out_biz_no {
        let owner = sqlx::query(KEY_OWNER)
            .bind(&push.appkey)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(owner) = owner {
            let fingerprint: String = owner.try_get("fingerprint")?;
            let owner_id: String = owner.try_get("push_id")?;
            let status: String = owner.try_get("status")?;
            let owner_async = owner.try_get::<Option<String>, _>("delivery")?.is_some();
            let verdict = if fingerprint != push.fingerprint {
                Some(Admission::Mismatch {
                    push_id: owner_id.clone(),
                })
            } else if status == PushStatus::Pending.as_str() && !owner_async {
                Some(Admission::InFlight {
                    push_id: owner_id.clone(),
                })
            } else if status == PushStatus::Failed.as_str()
                || (status == PushStatus::Unknown.as_str() && push.task_class)
            {
                None
            } else {
                match get_push(conn, &owner_id).await? {
                    Some(record) => Some(Admission::Replay {
                        push: Box::new(record),
                    }),
                    None => return Err(decode_err(format!("push {owner_id} vanished"))),
                }
            };
            if let Some(verdict) = verdict {
                return Ok(verdict);
            }
            reclaimed_from = Some(owner_id);
        }
    }

    let Some(old_owner) = reclaimed_from else {
        return admit_rows(conn, push, quota, deferred, window, None, now).await;
    };
    // One logical push holds one slot: Umeng dedupes a retry of an unknown task-class push
    // into the same task, so the slot the unknown attempt kept goes back first, and comes
    // back again if the new attempt is refused.
    sqlx::query("savepoint umgw_reclaim")
        .execute(&mut *conn)
        .await?;
    refund_unknown_owner(conn, &old_owner).await?;
    let admission = admit_rows(conn, push, quota, deferred, window, Some(old_owner), now).await?;
    if !matches!(admission, Admission::Admitted { .. }) {
        sqlx::query("rollback to umgw_reclaim")
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("release umgw_reclaim")
        .execute(&mut *conn)
        .await?;
    Ok(admission)
}

/// The writes of an admission whose key check passed: the slot, the row, the key. A
/// refusal comes before any write of its own.
async fn admit_rows(
    conn: &mut SqliteConnection,
    push: &NewPush,
    quota: Option<QuotaClaim>,
    deferred: Option<QuotaClaim>,
    window: Option<QuotaState>,
    reclaimed_from: Option<String>,
    now: i64,
) -> Result<Admission, sqlx::Error> {
    let mut state = None;
    if let (Some(claim), Some(mut window)) = (quota, window) {
        let taken: Option<i64> = if claim.limit.limit > 0 {
            sqlx::query_scalar(TAKE_SLOT)
                .bind(&push.appkey)
                .bind(claim.kind.as_str())
                .bind(window.window_start)
                .bind(i64::from(claim.limit.limit))
                .fetch_optional(&mut *conn)
                .await?
        } else {
            None
        };
        match taken {
            Some(used) => {
                window.used = u32::try_from(used).unwrap_or(u32::MAX);
                state = Some(window);
            }
            None => {
                let used: Option<i64> = sqlx::query_scalar(SLOT_USED)
                    .bind(&push.appkey)
                    .bind(claim.kind.as_str())
                    .bind(window.window_start)
                    .fetch_optional(&mut *conn)
                    .await?;
                window.used = used.and_then(|u| u32::try_from(u).ok()).unwrap_or(0);
                return Ok(Admission::RateLimited { quota: window });
            }
        }
    }

    // The row goes in once nothing can reject the request.
    let slot = quota.zip(window);
    insert_push(
        conn,
        push,
        slot.map(|(c, _)| c).or(deferred),
        slot.map(|(_, w)| w.window_start),
        now,
    )
    .await?;

    if let Some(key) = &push.out_biz_no {
        match &reclaimed_from {
            Some(old_owner) => {
                // Writers are serialised, so this cannot miss; the guard keeps it honest
                // (the caller undoes the writes above).
                let moved = sqlx::query(RECLAIM_KEY)
                    .bind(&push.appkey)
                    .bind(key)
                    .bind(&push.id)
                    .bind(&push.fingerprint)
                    .bind(now)
                    .bind(old_owner)
                    .execute(&mut *conn)
                    .await?;
                if moved.rows_affected() != 1 {
                    return Ok(Admission::InFlight {
                        push_id: old_owner.clone(),
                    });
                }
            }
            None => {
                // Checked free above, and writers are serialised.
                if !claim_free_key(conn, push, key, now).await? {
                    return Err(decode_err(format!("key {key} was claimed meanwhile")));
                }
            }
        }
    }
    Ok(Admission::Admitted {
        push_id: push.id.clone(),
        quota: state,
        reclaimed_from,
    })
}

/// Claim `key` for `push` (its row written already); false if a push holds it.
async fn claim_free_key(
    conn: &mut SqliteConnection,
    push: &NewPush,
    key: &str,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let claimed = sqlx::query(INSERT_FREE_KEY)
        .bind(&push.appkey)
        .bind(key)
        .bind(&push.fingerprint)
        .bind(&push.id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(claimed.rows_affected() == 1)
}

/// The start (epoch seconds) of the Beijing-time window of `unit` seconds containing
/// `epoch_secs`.
fn window_start(unit: i64, epoch_secs: i64) -> i64 {
    let unit = unit.max(1);
    (epoch_secs + 28_800).div_euclid(unit) * unit - 28_800
}

/// The slot `push_id` holds and has not given back, if any: `(appkey, kind, window)`.
async fn held_slot(
    conn: &mut SqliteConnection,
    push_id: &str,
) -> Result<Option<(String, String, i64)>, sqlx::Error> {
    let row = sqlx::query(HELD_SLOT)
        .bind(push_id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| {
        Ok((
            r.try_get("appkey")?,
            r.try_get("quota_kind")?,
            r.try_get("quota_window")?,
        ))
    })
    .transpose()
}

/// Gives a held slot back to its window's counter.
async fn give_back(
    conn: &mut SqliteConnection,
    held: Option<(String, String, i64)>,
) -> Result<(), sqlx::Error> {
    if let Some((appkey, kind, window)) = held {
        sqlx::query(REFUND)
            .bind(appkey)
            .bind(kind)
            .bind(window)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The claim in one `begin immediate` transaction (one writer at a time), row by row in
/// due order; see [`Store::claim_deliveries`].
async fn claim_deliveries(
    pool: &SqlitePool,
    limit: u32,
    lease_ms: i64,
    apps: Vec<DeliveryApp>,
) -> Result<Vec<DeliveryClaim>, sqlx::Error> {
    let mut tx = pool.begin_with("begin immediate").await?;
    let now = now_ms();
    // Each app's oldest due pushes, then oldest due first across apps.
    let mut due = Vec::new();
    for a in &apps {
        let rows = sqlx::query(DUE_DELIVERIES)
            .bind(&a.app)
            .bind(&a.appkey)
            .bind(now)
            .bind(i64::from(a.limit.min(limit).max(1)) * 4)
            .bind(a.due_from.map_or(i64::MIN, to_ms))
            .fetch_all(&mut *tx)
            .await?;
        for row in rows {
            let order: (i64, i64, String) = (
                row.try_get("next_attempt_at")?,
                row.try_get("created_at")?,
                row.try_get("id")?,
            );
            due.push((order, row));
        }
    }
    due.sort_by(|a, b| a.0.cmp(&b.0));
    let rows = due.into_iter().map(|(_, row)| row);
    let mut taken: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let mut out = Vec::new();
    for row in rows {
        if out.len() >= limit as usize {
            break;
        }
        let id: String = row.try_get("id")?;
        let app: String = row.try_get("app")?;
        let cap = apps.iter().find(|a| a.app == app).map_or(0, |a| a.limit);
        let count = taken.entry(app).or_default();
        if *count >= cap {
            continue;
        }
        let deliver_by: Option<i64> = row.try_get("deliver_by")?;
        if deliver_by.is_some_and(|by| by <= now) {
            let held = held_slot(&mut tx, &id).await?;
            sqlx::query(EXPIRE_DELIVERY)
                .bind(&id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            give_back(&mut tx, held).await?;
            continue;
        }
        let kind: Option<String> = row.try_get("quota_kind")?;
        let window: Option<i64> = row.try_get("quota_window")?;
        let refunded: bool = row.try_get("quota_refunded")?;
        if let (Some(kind), true) = (kind, window.is_none() || refunded) {
            let appkey: String = row.try_get("appkey")?;
            let unit: i64 = row.try_get::<Option<i64>, _>("quota_unit")?.unwrap_or(60);
            let limit: i64 = row.try_get::<Option<i64>, _>("quota_limit")?.unwrap_or(0);
            let created_at: i64 = row.try_get("created_at")?;
            let start = window_start(unit, now.div_euclid(1000));
            let mut wait = ((start + unit) * 1000).min(deliver_by.unwrap_or(i64::MAX));
            // First come, first served: behind an older push waiting for this bucket.
            let head: Option<i64> = sqlx::query_scalar(QUOTA_HEAD)
                .bind(&appkey)
                .bind(&kind)
                .bind(created_at)
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?;
            let used: Option<i64> = match head {
                Some(head) => {
                    wait = head.max(now);
                    None
                }
                None if limit > 0 => {
                    sqlx::query_scalar(TAKE_SLOT)
                        .bind(&appkey)
                        .bind(&kind)
                        .bind(start)
                        .bind(limit)
                        .fetch_optional(&mut *tx)
                        .await?
                }
                None => None,
            };
            if used.is_none() {
                let quota_wait: bool = row.try_get("quota_wait")?;
                let claims: i64 = row.try_get("deliver_claims")?;
                if quota_wait || claims > 0 {
                    sqlx::query(WAIT_FOR_QUOTA)
                        .bind(&id)
                        .bind(wait)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                } else {
                    sqlx::query(QUOTA_EXHAUSTED)
                        .bind(&id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
                continue;
            }
            sqlx::query(SET_SLOT)
                .bind(&id)
                .bind(start)
                .execute(&mut *tx)
                .await?;
        }
        let claimed = sqlx::query(CLAIM_DELIVERY)
            .bind(&id)
            .bind(now.saturating_add(lease_ms))
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
        out.push(delivery_claim(&claimed)?);
        *count += 1;
    }
    tx.commit().await?;
    Ok(out)
}

fn delivery_claim(row: &SqliteRow) -> Result<DeliveryClaim, sqlx::Error> {
    let kind: Option<String> = row.try_get("quota_kind")?;
    let claims: i64 = row.try_get("deliver_claims")?;
    Ok(DeliveryClaim {
        push_id: row.try_get("id")?,
        app: row.try_get("app")?,
        appkey: row.try_get("appkey")?,
        cast_type: row.try_get("cast_type")?,
        task_class: row.try_get("task_class")?,
        production_mode: row.try_get("production_mode")?,
        out_biz_no: row.try_get("out_biz_no")?,
        outbox: opt_json(row, "outbox")?.unwrap_or(Value::Null),
        attempts: attempts_of(row.try_get::<Json<Value>, _>("attempts")?.0)?,
        claim: u32::try_from(claims).unwrap_or(0),
        lease_until: from_ms(row.try_get("deliver_lease_until")?)?,
        created_at: from_ms(row.try_get("created_at")?)?,
        deliver_by: opt_time(row, "deliver_by")?,
        quota_kind: kind.as_deref().and_then(QuotaKind::parse),
        quota_wait: row.try_get("quota_wait")?,
        parent_id: row.try_get("parent_id")?,
        due_at: from_ms(row.try_get("next_attempt_at")?)?,
    })
}

/// See [`Store::retry_delivery`]: one transaction (the row and its counter).
async fn retry_delivery(
    pool: &SqlitePool,
    push_id: &str,
    claim: u32,
    retry: DeliveryRetry,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin_with("begin immediate").await?;
    let now = now_ms();
    let held = held_slot(&mut tx, push_id).await?;
    let bucket =
        sqlx::query("select quota_kind, quota_limit, quota_unit, appkey from pushes where id = ?1")
            .bind(push_id)
            .fetch_optional(&mut *tx)
            .await?;
    let to_quota = retry.status == PushStatus::AwaitingQuota;
    let (next, saturate) = match (&bucket, to_quota) {
        (Some(b), true) => {
            let unit: i64 = b.try_get::<Option<i64>, _>("quota_unit")?.unwrap_or(60);
            let start = window_start(unit, now.div_euclid(1000));
            let kind: Option<String> = b.try_get("quota_kind")?;
            let limit: Option<i64> = b.try_get("quota_limit")?;
            let appkey: String = b.try_get("appkey")?;
            (
                (start + unit) * 1000,
                kind.zip(limit).map(|(k, l)| (appkey, k, start, l)),
            )
        }
        _ => (now.saturating_add(millis(retry.delay)), None),
    };
    let updated = sqlx::query(RETRY_DELIVERY)
        .bind(push_id)
        .bind(retry.status.as_str())
        .bind(next)
        .bind(retry.error_code)
        .bind(retry.error_msg)
        .bind(retry.umeng_response.map(Json))
        .bind(Json(attempts_json(&retry.attempts)))
        .bind(retry.refund || to_quota)
        .bind(i64::from(claim))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
    if updated.is_none() {
        tx.rollback().await?;
        return Ok(false);
    }
    if retry.refund && !to_quota {
        give_back(&mut tx, held).await?;
    }
    if let Some((appkey, kind, start, limit)) = saturate {
        // Umeng called the window of now full: mark it so here too.
        sqlx::query(SATURATE)
            .bind(appkey)
            .bind(kind)
            .bind(start)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Gives back the slot an `unknown` push kept, once (its `quota_refunded` flag).
async fn refund_unknown_owner(
    conn: &mut SqliteConnection,
    push_id: &str,
) -> Result<(), sqlx::Error> {
    let slot = sqlx::query(REFUND_UNKNOWN_OWNER)
        .bind(push_id)
        .bind(now_ms())
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(row) = slot {
        let appkey: String = row.try_get("appkey")?;
        let kind: String = row.try_get("quota_kind")?;
        let window: i64 = row.try_get("quota_window")?;
        sqlx::query(REFUND)
            .bind(appkey)
            .bind(kind)
            .bind(window)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The claim in one `begin immediate` transaction (one writer at a time).
async fn claim_task_polls(
    pool: &SqlitePool,
    limit: u32,
    lease_ms: i64,
    first_poll_after_ms: i64,
    apps: Vec<[String; 2]>,
) -> Result<Vec<TaskClaim>, sqlx::Error> {
    let mut tx = pool.begin_with("begin immediate").await?;
    let rows = sqlx::query(CLAIM_TASK_POLLS)
        .bind(now_ms())
        .bind(i64::from(limit))
        .bind(lease_ms)
        .bind(first_poll_after_ms)
        .bind(Json(apps))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    rows.iter()
        .map(|row| {
            let polls: i64 = row.try_get("poll_count")?;
            Ok(TaskClaim {
                push_id: row.try_get("id")?,
                app: row.try_get("app")?,
                appkey: row.try_get("appkey")?,
                task_id: row.try_get("task_id")?,
                created_at: from_ms(row.try_get("created_at")?)?,
                request: row.try_get::<Json<Value>, _>("request")?.0,
                task_checked_at: row
                    .try_get::<Option<i64>, _>("task_checked_at")?
                    .map(from_ms)
                    .transpose()?,
                polls: u32::try_from(polls).unwrap_or(0),
                lease_until: from_ms(row.try_get("poll_locked_until")?)?,
            })
        })
        .collect()
}

/// Inserts the push row (`pending`, or a waiting state for asynchronous delivery), with its
/// quota bucket's kind, limit and window length, and the window the slot was taken from
/// (`None` for a slot taken later).
async fn insert_push(
    conn: &mut SqliteConnection,
    push: &NewPush,
    quota: Option<QuotaClaim>,
    window: Option<i64>,
    now: i64,
) -> Result<(), sqlx::Error> {
    let delivery = push.delivery.as_ref();
    let status = delivery.map_or(PushStatus::Pending, |d| d.status());
    let next_attempt_at = delivery.map(|d| match (d.hold, push.send_at) {
        (true, Some(at)) => to_ms(at),
        _ => now,
    });
    sqlx::query(INSERT_PUSH)
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
        .bind(&push.description)
        .bind(Json(&push.request))
        .bind(quota.map(|c| c.kind.as_str()))
        .bind(window)
        .bind(quota.map(|c| i64::from(c.limit.limit)))
        .bind(now)
        .bind(status.as_str())
        .bind(quota.map(|c| c.limit.window.seconds()))
        .bind(delivery.map(|_| "async"))
        .bind(delivery.map(|d| Json(&d.outbox)))
        .bind(next_attempt_at)
        .bind(push.send_at.map(to_ms))
        .bind(delivery.map(|d| to_ms(d.deliver_by)))
        .bind(delivery.is_some_and(|d| d.quota_wait))
        .execute(conn)
        .await?;
    Ok(())
}

/// Binds the outcome columns of [`FINISH`].
fn bind_finish<'q>(
    push_id: &'q str,
    finish: &'q Finish,
    refunded: bool,
    now: i64,
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    let attempts = attempts_json(&finish.attempts);
    let claim = finish.claim.map(i64::from);
    sqlx::query(FINISH)
        .bind(push_id)
        .bind(finish.status.as_str())
        .bind(finish.umeng_request.as_ref().map(|sent| sent.get()))
        .bind(finish.umeng_response.as_ref().map(Json))
        .bind(finish.msg_id.as_deref())
        .bind(finish.task_id.as_deref())
        .bind(finish.file_id.as_deref())
        .bind(finish.error_code.as_deref())
        .bind(finish.error_msg.as_deref())
        .bind(i64::from(finish.http_status))
        .bind(finish.latency_ms)
        .bind(finish.sent_at.map(to_ms))
        .bind(refunded)
        .bind(now)
        .bind(Json(attempts))
        .bind(claim)
}

/// An outcome record alone: the guarded update in one statement when no counter is
/// touched, otherwise one `begin immediate` transaction.
pub(super) async fn finish_push(
    conn: &mut SqliteConnection,
    push_id: &str,
    finish: &Finish,
) -> Result<bool, sqlx::Error> {
    if finish.quota == QuotaAction::Keep {
        return finish_in(conn, push_id, finish).await;
    }
    let mut tx = conn.begin_with("begin immediate").await?;
    let applied = finish_in(&mut tx, push_id, finish).await?;
    tx.commit().await?;
    Ok(applied)
}

/// An outcome record inside the caller's write transaction; true when it applied. When it
/// does not apply nothing was written; an error may leave partial writes (the caller rolls
/// the transaction back).
pub(super) async fn finish_in(
    conn: &mut SqliteConnection,
    push_id: &str,
    finish: &Finish,
) -> Result<bool, sqlx::Error> {
    if finish.quota == QuotaAction::Keep {
        // No counter to touch: the guarded update alone, one statement.
        let updated = bind_finish(push_id, finish, false, now_ms())
            .execute(&mut *conn)
            .await?;
        return Ok(updated.rows_affected() > 0);
    }
    let Some(row) = sqlx::query(PENDING_QUOTA)
        .bind(push_id)
        .bind(finish.claim.map(i64::from))
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(false);
    };
    let appkey: String = row.try_get("appkey")?;
    let kind: Option<String> = row.try_get("quota_kind")?;
    let window: Option<i64> = row.try_get("quota_window")?;
    let limit: Option<i64> = row.try_get("quota_limit")?;
    let was_refunded: bool = row.try_get("quota_refunded")?;
    let has_slot = kind.is_some() && window.is_some();
    let refund = finish.quota == QuotaAction::Refund && has_slot && !was_refunded;
    let now = now_ms();

    let updated = bind_finish(push_id, finish, was_refunded || refund, now)
        .execute(&mut *conn)
        .await?;
    if updated.rows_affected() == 0 {
        return Ok(false);
    }

    if refund {
        sqlx::query(REFUND)
            .bind(&appkey)
            .bind(&kind)
            .bind(window)
            .execute(&mut *conn)
            .await?;
    } else if let (QuotaAction::Saturate(unit), Some(kind), Some(limit)) =
        (finish.quota, &kind, limit)
    {
        // Umeng called the window of now full, whichever window the slot came from.
        sqlx::query(SATURATE)
            .bind(&appkey)
            .bind(kind)
            .bind(unit.window_start(now.div_euclid(1000)))
            .bind(limit)
            .execute(&mut *conn)
            .await?;
    }
    Ok(true)
}

/// A push with its parts (for a parent).
pub(super) async fn get_push_with_parts(
    conn: &mut SqliteConnection,
    push_id: &str,
) -> Result<Option<PushRecord>, sqlx::Error> {
    let Some(mut push) = get_push(&mut *conn, push_id).await? else {
        return Ok(None);
    };
    if push.part_count.is_some() {
        push.parts = super::parts::sqlite_list(conn, push_id).await?;
    }
    Ok(Some(push))
}

async fn get_push(
    conn: &mut SqliteConnection,
    push_id: &str,
) -> Result<Option<PushRecord>, sqlx::Error> {
    let row = sqlx::query(&format!("select {PUSH_COLUMNS} from pushes where id = ?1"))
        .bind(push_id)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(push_from_row).transpose()
}

fn decode_err(message: String) -> sqlx::Error {
    sqlx::Error::Decode(message.into())
}

fn opt_time(row: &SqliteRow, column: &str) -> Result<Option<OffsetDateTime>, sqlx::Error> {
    row.try_get::<Option<i64>, _>(column)?
        .map(from_ms)
        .transpose()
}

fn opt_json(row: &SqliteRow, column: &str) -> Result<Option<Value>, sqlx::Error> {
    Ok(row.try_get::<Option<Json<Value>>, _>(column)?.map(|j| j.0))
}

fn summary_from_row(row: &SqliteRow) -> Result<PushSummary, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let http_status: Option<i64> = row.try_get("http_status")?;
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
        send_at: opt_time(row, "send_at")?,
        next_attempt_at: opt_time(row, "next_attempt_at")?,
        attempt_count: u32::try_from(row.try_get::<i64, _>("attempt_count")?).unwrap_or(0),
        parts: super::non_negative(row.try_get("parts")?),
        created_at: from_ms(row.try_get("created_at")?)?,
        sent_at: opt_time(row, "sent_at")?,
        finished_at: opt_time(row, "finished_at")?,
        updated_at: from_ms(row.try_get("updated_at")?)?,
    })
}

fn push_from_row(row: &SqliteRow) -> Result<PushRecord, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let quota_kind: Option<String> = row.try_get("quota_kind")?;
    let http_status: Option<i64> = row.try_get("http_status")?;
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
        request: row.try_get::<Json<Value>, _>("request")?.0,
        umeng_request: opt_json(row, "umeng_request")?,
        umeng_response: opt_json(row, "umeng_response")?,
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
        task_status: opt_json(row, "task_status")?,
        task_checked_at: opt_time(row, "task_checked_at")?,
        latency_ms: row.try_get("latency_ms")?,
        attempts: attempts_of(row.try_get::<Json<Value>, _>("attempts")?.0)?,
        delivery: DeliveryMode::from_column(row.try_get::<Option<&str>, _>("delivery")?),
        send_at: opt_time(row, "send_at")?,
        next_attempt_at: opt_time(row, "next_attempt_at")?,
        deliver_by: opt_time(row, "deliver_by")?,
        created_at: from_ms(row.try_get("created_at")?)?,
        sent_at: opt_time(row, "sent_at")?,
        finished_at: opt_time(row, "finished_at")?,
        updated_at: from_ms(row.try_get("updated_at")?)?,
        truncated: Vec::new(),
        callback_url: row.try_get("callback_url")?,
        callbacks: Vec::new(),
        parent_id: row.try_get("parent_id")?,
        part_no: super::non_negative(row.try_get("part_no")?),
        audience: super::non_negative(row.try_get("audience")?),
        part_count: super::non_negative(row.try_get("parts")?),
        parts: Vec::new(),
    })
}
