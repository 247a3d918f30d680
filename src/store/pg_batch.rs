//! Group commit on PostgreSQL: concurrent admissions and outcome records are gathered by a
//! few writer tasks, which take whatever is waiting when they are free (there is no
//! artificial delay: a lone push is written at once and a burst shares its commit). A
//! batch's admissions and its outcome records that keep their quota slot go in one
//! statement (`umgw_admit_batch` and `umgw_finish_batch` together: one round trip, one
//! transaction, one WAL flush); otherwise each kind takes a call of its own.
//!
//! Each row keeps its own semantics inside the functions (the same `umgw_admit` for an
//! admission; for an outcome the same guard and quota action as one at a time), applied
//! row by row, so quotas and keys stay exact however many pushes share a batch. A call
//! that fails as a whole (one row's error, a deadlock between two batches) wrote nothing:
//! its admissions and outcomes are then written again by kind, and if that fails too, one
//! at a time.
//!
//! A write that is alone in its batch and needs nothing the functions add (an admission
//! without quota whose key, if any, is new; an outcome record that keeps its slot) goes as
//! the one plain statement the function would run: at one client every batch holds one
//! push, and the function call's fixed cost was most of the statement's. An admission
//! whose key turns out to be held then asks `umgw_admit`.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, Row};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::batch::{Batcher, Crew, STANDBY_AFTER};
use super::postgres::{admission_of, admit, AdmitRow};
use super::{
    map_sqlx, Admission, Attempt, Finish, NewPush, QuotaAction, QuotaClaim, StoreError, StoreResult,
};
use crate::config::OutcomeCommit;

/// Writers draining the queue. One writes at a time while writes go quickly (the batches
/// are then as large as the load makes them); the others stand by for a write that waits
/// on a row lock, such as a key another replica is admitting ([`Batcher::start`]).
const WRITERS: usize = 3;
/// Writers keep their connection between batches only when the pool has at least this
/// many: the writers then hold at most half of it.
const KEEP_FROM: u32 = 2 * WRITERS as u32;

type Lane = super::batch::Lane<Postgres>;

const FINISH_BATCH: &str = "select id from umgw_finish_batch($1) as id";

/// [`FINISH_BATCH`] in a transaction that commits without waiting for its WAL flush
/// (migration 0015; `database.outcome_commit = "relaxed"`). Only for a statement that records
/// outcomes and nothing else: [`ADMIT_AND_FINISH`] always waits, as it admits.
const FINISH_BATCH_RELAXED: &str = "select id from umgw_finish_batch_relaxed($1) as id";

/// One outcome record that keeps its quota slot, alone: the `keep` update of
/// `umgw_finish_batch` (migration 0013; the same assignments and guard) as a plain prepared
/// statement, which skips the function call and the JSON rows' decoding. With `$15` the
/// statement's own transaction commits without waiting for its WAL flush, as
/// `umgw_finish_batch_relaxed` does (migration 0015): a local setting lasts until the end
/// of the transaction, past its commit record.
const FINISH_KEEP_ONE: &str = "update pushes p
   set status = $2, umeng_request = $3, umeng_response = $4, msg_id = $5, task_id = $6,
       file_id = $7, error_code = $8, error_msg = $9, http_status = $10, latency_ms = $11,
       sent_at = $12, attempts = $13,
       outbox = null, next_attempt_at = null, deliver_lease_until = null,
       finished_at = now(), updated_at = now()
 where p.id = $1
   and ($14::integer is null or p.deliver_claims = $14::integer)
   and (p.status = 'pending'
        or (p.status = 'unknown' and p.error_code = 'stale_pending'
            and (p.out_biz_no is null
                 or exists (select 1 from idempotency_keys k where k.push_id = p.id))))
   and (not $15 or set_config('synchronous_commit', 'off', true) is not null)
returning p.id";

const ADMIT_BATCH: &str = "select idx, outcome, push_id, reclaimed_from, used, window_start, \
     reset_after_secs from umgw_admit_batch($1)";

/// Admissions and outcome records in one statement: the admissions' rows (`kind` 0, as
/// [`ADMIT_BATCH`] answers them), then the ids of the pushes whose outcome applied
/// (`kind` 1, in `push_id`).
const ADMIT_AND_FINISH: &str = "select 0 as kind, idx, outcome, push_id, reclaimed_from, used, \
     window_start, reset_after_secs from umgw_admit_batch($1) \
     union all select 1, null::integer, null::text, f.id, null::text, null::integer, \
     null::bigint, null::bigint from umgw_finish_batch($2) as f(id)";

/// An outcome record waiting for its batch.
#[derive(Debug)]
pub(crate) struct FinishJob {
    push_id: String,
    finish: Arc<Finish>,
    done: oneshot::Sender<StoreResult<bool>>,
}

/// An admission waiting for its batch.
#[derive(Debug)]
pub(crate) struct AdmitJob {
    push: NewPush,
    quota: Option<QuotaClaim>,
    done: oneshot::Sender<StoreResult<Admission>>,
}

/// A write waiting for its batch. Admissions are the larger kind and the commoner one, so
/// boxing them would cost an allocation per push to save queue space that only a backlog
/// fills (a job is in the queue only until a writer is free).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Job {
    Admit(AdmitJob),
    Finish(FinishJob),
}

/// The writers of a PostgreSQL store.
#[derive(Debug, Clone)]
pub(crate) struct Writers {
    jobs: Batcher<Job>,
}

impl Writers {
    pub(crate) fn start(pool: PgPool, outcome_commit: OutcomeCommit) -> Writers {
        let keep = pool.options().get_max_connections() >= KEEP_FROM;
        Writers {
            jobs: Batcher::start(
                Lane::new(pool, keep),
                Crew {
                    writers: WRITERS,
                    standby_after: STANDBY_AFTER,
                },
                move |mut lane, batch| async move {
                    write(&mut lane, batch, outcome_commit).await;
                    lane
                },
                Lane::idle,
            ),
        }
    }

    /// Record one outcome with those of concurrent pushes; true when it applied.
    pub(crate) async fn finish(&self, push_id: &str, finish: Arc<Finish>) -> StoreResult<bool> {
        let push_id = push_id.to_owned();
        self.jobs
            .call(|done| {
                Job::Finish(FinishJob {
                    push_id,
                    finish,
                    done,
                })
            })
            .await
    }

    /// Admit one push with those of concurrent pushes.
    pub(crate) async fn admit(
        &self,
        push: NewPush,
        quota: Option<QuotaClaim>,
    ) -> StoreResult<Admission> {
        self.jobs
            .call(|done| Job::Admit(AdmitJob { push, quota, done }))
            .await
    }
}

/// Writes one batch and answers each job. Its admissions and its outcome records that keep
/// their slot share one call; a refund or saturation moves a quota counter, which the
/// admissions take too, so those go in a call of their own (two batches would otherwise
/// take counters in two orders). A key or a push met twice waits for the next call.
/// Outcome records written on their own commit as `commit` says.
async fn write(lane: &mut Lane, batch: Vec<Job>, commit: OutcomeCommit) {
    let mut admissions = Vec::new();
    let mut finishes = Vec::new();
    for job in batch {
        match job {
            Job::Admit(job) => admissions.push(job),
            Job::Finish(job) => finishes.push(job),
        }
    }
    let (admit_now, admit_later) = admissions_now(admissions);
    let (finish_now, finish_later) = finishes_now(finishes);
    let together = !admit_now.is_empty()
        && !finish_now.is_empty()
        && finish_now
            .iter()
            .all(|j| matches!(j.finish.quota, QuotaAction::Keep));
    if together {
        write_together(lane, admit_now, finish_now, commit).await;
    } else {
        write_admissions(lane, admit_now).await;
        write_finishes(lane, finish_now, commit).await;
    }
    write_admissions(lane, admit_later).await;
    write_finishes(lane, finish_later, commit).await;
}

/// Admissions and outcome records in one call. If it fails, nothing of it was written:
/// each kind is written again on its own (the outcome records committed as `commit` says).
async fn write_together(
    lane: &mut Lane,
    admissions: Vec<AdmitJob>,
    finishes: Vec<FinishJob>,
    commit: OutcomeCommit,
) {
    let admit_rows: Vec<AdmitRowIn> = admissions
        .iter()
        .map(|j| admit_row(&j.push, j.quota))
        .collect();
    let finish_rows: Vec<FinishRowIn> = finishes
        .iter()
        .map(|j| row(&j.push_id, &j.finish))
        .collect();
    let called = match lane.conn().await {
        Ok(conn) => {
            sqlx::query(ADMIT_AND_FINISH)
                .bind(Json(&admit_rows))
                .bind(Json(&finish_rows))
                .fetch_all(conn)
                .await
        }
        Err(e) => Err(e),
    };
    drop(admit_rows);
    drop(finish_rows);
    lane.after(called.is_ok());
    let rows = match called {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!(error = %e, admissions = admissions.len(), outcomes = finishes.len(), "a batch of admissions and outcome records failed; writing each kind alone");
            write_admissions(lane, admissions).await;
            write_finishes(lane, finishes, commit).await;
            return;
        }
    };
    // Committed: every job has its answer (never written again).
    let mut admitted = Vec::with_capacity(admissions.len());
    let mut applied = Vec::with_capacity(finishes.len());
    let mut broken = None;
    for row in &rows {
        match row.try_get::<i32, _>("kind") {
            Ok(0) => admitted.push(row),
            Ok(_) => match row.try_get::<String, _>("push_id") {
                Ok(id) => applied.push(id),
                Err(e) => broken = Some(map_sqlx(e)),
            },
            Err(e) => broken = Some(map_sqlx(e)),
        }
    }
    match broken {
        Some(e) => {
            for job in finishes {
                let _ = job.done.send(Err(e.clone()));
            }
            for job in admissions {
                let _ = job.done.send(Err(e.clone()));
            }
        }
        None => {
            for job in finishes {
                let _ = job.done.send(Ok(applied.contains(&job.push_id)));
            }
            answer_admissions(lane, admissions, admitted).await;
        }
    }
}

/// The admissions that may share a call (at most one per key), in appkey and bucket order
/// so that two batches take counter rows in the same order; and those that must wait.
fn admissions_now(batch: Vec<AdmitJob>) -> (Vec<AdmitJob>, Vec<AdmitJob>) {
    let (mut now, later) = first_of_each(batch, |a, b| {
        a.push.out_biz_no.is_some()
            && a.push.out_biz_no == b.push.out_biz_no
            && a.push.appkey == b.push.appkey
    });
    now.sort_by(|a, b| {
        let key = |j: &AdmitJob| (j.push.appkey.clone(), j.quota.map(|q| q.kind));
        key(a).cmp(&key(b))
    });
    (now, later)
}

/// The outcome records that may share a call (at most one per push), in push id order so
/// that two batches lock the pushes they share in the same order; and those that must wait.
fn finishes_now(batch: Vec<FinishJob>) -> (Vec<FinishJob>, Vec<FinishJob>) {
    let (mut now, later) = first_of_each(batch, |a, b| a.push_id == b.push_id);
    now.sort_by(|a, b| a.push_id.cmp(&b.push_id));
    (now, later)
}

/// Splits a batch into the first job of each group of `same` jobs, and the others (in
/// their order).
fn first_of_each<J>(batch: Vec<J>, same: impl Fn(&J, &J) -> bool) -> (Vec<J>, Vec<J>) {
    let mut now: Vec<J> = Vec::with_capacity(batch.len());
    let mut later = Vec::new();
    for job in batch {
        if now.iter().any(|j| same(j, &job)) {
            later.push(job);
        } else {
            now.push(job);
        }
    }
    (now, later)
}

/// Admits a batch in one call; answers each job. Admissions of one key never share a
/// call (the later waits for the next). If the call fails as a whole, each push is
/// admitted alone, so one bad row cannot fail the others.
async fn write_admissions(lane: &mut Lane, mut batch: Vec<AdmitJob>) {
    while !batch.is_empty() {
        let (mut now, later) = admissions_now(batch);
        if now.len() == 1 {
            let job = now.remove(0);
            let _ = job.done.send(admit_alone(lane, job.push, job.quota).await);
        } else {
            let rows: Vec<AdmitRowIn> = now.iter().map(|j| admit_row(&j.push, j.quota)).collect();
            let called = match lane.conn().await {
                Ok(conn) => {
                    sqlx::query(ADMIT_BATCH)
                        .bind(Json(&rows))
                        .fetch_all(conn)
                        .await
                }
                Err(e) => Err(e),
            };
            drop(rows);
            lane.after(called.is_ok());
            match called {
                // The call failed, so its transaction wrote nothing: each push alone.
                Err(e) => {
                    tracing::debug!(error = %e, pushes = now.len(), "a batch of admissions failed; admitting each alone");
                    for job in now {
                        let _ = job.done.send(admit_alone(lane, job.push, job.quota).await);
                    }
                }
                // Committed: every push has its answer (never admitted again).
                Ok(rows) => answer_admissions(lane, now, rows.iter().collect()).await,
            }
        }
        batch = later;
    }
}

/// Answers the admissions of a committed call from its rows (one per admission).
async fn answer_admissions(lane: &mut Lane, now: Vec<AdmitJob>, rows: Vec<&PgRow>) {
    let answers = rows
        .into_iter()
        .map(admit_answer)
        .collect::<StoreResult<Vec<_>>>()
        .and_then(|answers| {
            if answers.len() == now.len() {
                Ok(answers)
            } else {
                Err(StoreError::Database(format!(
                    "a batch of {} admissions answered {} rows",
                    now.len(),
                    answers.len()
                )))
            }
        });
    match answers {
        Ok(mut answers) => {
            answers.sort_by_key(|(i, _)| *i);
            for (job, (_, answer)) in now.into_iter().zip(answers) {
                let admission = admission_of(lane.pool(), answer, &job.push, job.quota).await;
                let _ = job.done.send(admission);
            }
        }
        Err(e) => {
            for job in now {
                let _ = job.done.send(Err(e.clone()));
            }
        }
    }
}

/// One admission in a statement of its own, on the lane's connection.
async fn admit_alone(
    lane: &mut Lane,
    push: NewPush,
    quota: Option<QuotaClaim>,
) -> StoreResult<Admission> {
    let pool = lane.pool().clone();
    let admitted = match lane.conn().await {
        Ok(conn) => admit(conn, &pool, push, quota).await,
        Err(e) => Err(map_sqlx(e)),
    };
    lane.after(admitted.is_ok());
    admitted
}

/// One row of `umgw_admit_batch`'s answer: its position and what `umgw_admit` said.
fn admit_answer(row: &PgRow) -> StoreResult<(i32, AdmitRow)> {
    let idx = row.try_get("idx").map_err(map_sqlx)?;
    Ok((idx, AdmitRow::from_row(row).map_err(map_sqlx)?))
}

/// One admission as a row of the batch (the arguments of `umgw_admit`), borrowed from the
/// push: serialised once, straight into the statement's parameter.
#[derive(Serialize)]
struct AdmitRowIn<'a> {
    id: &'a str,
    app: &'a str,
    appkey: &'a str,
    platform: &'a str,
    cast_type: &'a str,
    task_class: bool,
    production_mode: bool,
    client: &'a str,
    out_biz_no: Option<&'a str>,
    fingerprint: &'a str,
    request: &'a Value,
    description: Option<&'a str>,
    quota_kind: Option<&'static str>,
    quota_limit: Option<u32>,
    quota_unit: Option<i64>,
    status: &'static str,
    defer_quota: bool,
    outbox: Option<&'a Value>,
    #[serde(with = "time::serde::rfc3339::option")]
    send_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    deliver_by: Option<OffsetDateTime>,
    quota_wait: bool,
}

fn admit_row(push: &NewPush, quota: Option<QuotaClaim>) -> AdmitRowIn<'_> {
    let d = push.delivery.as_ref();
    AdmitRowIn {
        id: &push.id,
        app: &push.app,
        appkey: &push.appkey,
        platform: &push.platform,
        cast_type: &push.cast_type,
        task_class: push.task_class,
        production_mode: push.production_mode,
        client: &push.client,
        out_biz_no: push.out_biz_no.as_deref(),
        fingerprint: &push.fingerprint,
        request: &push.request,
        description: push.description.as_deref(),
        quota_kind: quota.map(|c| c.kind.as_str()),
        quota_limit: quota.map(|c| c.limit.limit),
        quota_unit: quota.map(|c| c.limit.window.seconds()),
        status: d
            .map_or(super::PushStatus::Pending, |d| d.status())
            .as_str(),
        defer_quota: d.is_some_and(|d| d.defer_quota),
        outbox: d.map(|d| &d.outbox),
        send_at: push.send_at,
        deliver_by: d.map(|d| d.deliver_by),
        quota_wait: d.is_some_and(|d| d.quota_wait),
    }
}

/// Writes one batch of outcomes and answers each job. Two outcomes for the same push never
/// share a call (the second waits for the next one), so each answer is its own. Rows go in
/// push id order, so two batches lock the pushes they share in the same order. A call that
/// fails as a whole (a deadlock with the other writer's batch over a quota counter) wrote
/// nothing: each outcome is then written alone, so one bad row cannot fail the others
/// (unless the database is unreachable: then every outcome gets the error).
async fn write_finishes(lane: &mut Lane, mut batch: Vec<FinishJob>, commit: OutcomeCommit) {
    while !batch.is_empty() {
        let (now, later) = finishes_now(batch);
        match finish_rows(lane, &now, commit).await {
            Ok(changed) => {
                for job in now {
                    let applied = changed.contains(&job.push_id);
                    let _ = job.done.send(Ok(applied));
                }
            }
            // Not while the database is unreachable: each record would wait for a
            // connection in turn. The callers retry those.
            Err(e) if now.len() > 1 && !matches!(e, StoreError::Unavailable(_)) => {
                tracing::debug!(error = %e, pushes = now.len(), "a batch of outcome records failed; writing each alone");
                for job in now {
                    let alone = std::slice::from_ref(&job);
                    let answer = finish_rows(lane, alone, commit)
                        .await
                        .map(|changed| changed.contains(&job.push_id));
                    let _ = job.done.send(answer);
                }
            }
            Err(e) => {
                for job in now {
                    let _ = job.done.send(Err(e.clone()));
                }
            }
        }
        batch = later;
    }
}

/// One statement recording `jobs`' outcomes ([`FINISH_KEEP_ONE`] for a lone one that keeps
/// its slot, else [`FINISH_BATCH`] or [`FINISH_BATCH_RELAXED`]): the ids of the pushes whose
/// outcome applied.
async fn finish_rows(
    lane: &mut Lane,
    jobs: &[FinishJob],
    commit: OutcomeCommit,
) -> StoreResult<Vec<String>> {
    let relaxed = commit == OutcomeCommit::Relaxed;
    let rows: Vec<FinishRowIn> = jobs.iter().map(|j| row(&j.push_id, &j.finish)).collect();
    let result = match lane.conn().await {
        Ok(conn) => match rows.as_slice() {
            [one] if one.action == "keep" => finish_keep_one(one, relaxed).fetch_all(conn).await,
            _ => {
                let sql = if relaxed {
                    FINISH_BATCH_RELAXED
                } else {
                    FINISH_BATCH
                };
                sqlx::query_scalar::<_, String>(sql)
                    .bind(Json(&rows))
                    .fetch_all(conn)
                    .await
            }
        },
        Err(e) => Err(e),
    };
    lane.after(result.is_ok());
    result.map_err(map_sqlx)
}

/// [`FINISH_KEEP_ONE`] for one row, committed without waiting for its flush when
/// `relaxed`. A JSON `null` body binds as SQL NULL, as the batch's JSON rows decode it.
fn finish_keep_one<'q>(
    r: &'q FinishRowIn<'q>,
    relaxed: bool,
) -> sqlx::query::QueryScalar<'q, Postgres, String, sqlx::postgres::PgArguments> {
    let request = r.umeng_request.filter(|b| b.get() != "null").map(Json);
    let response = r.umeng_response.filter(|v| !v.is_null()).map(Json);
    sqlx::query_scalar(FINISH_KEEP_ONE)
        .bind(r.id)
        .bind(r.status)
        .bind(request)
        .bind(response)
        .bind(r.msg_id)
        .bind(r.task_id)
        .bind(r.file_id)
        .bind(r.error_code)
        .bind(r.error_msg)
        .bind(i32::from(r.http_status))
        .bind(r.latency_ms)
        .bind(r.sent_at)
        .bind(Json(r.attempts))
        .bind(r.claim.map(|c| i32::try_from(c).unwrap_or(i32::MAX)))
        .bind(relaxed)
}

/// One outcome as a row of the batch (a `umgw_finish_row`), borrowed from the record.
#[derive(Serialize)]
struct FinishRowIn<'a> {
    id: &'a str,
    status: &'static str,
    umeng_request: Option<&'a serde_json::value::RawValue>,
    umeng_response: Option<&'a Value>,
    msg_id: Option<&'a str>,
    task_id: Option<&'a str>,
    file_id: Option<&'a str>,
    error_code: Option<&'a str>,
    error_msg: Option<&'a str>,
    http_status: u16,
    latency_ms: Option<i64>,
    #[serde(with = "time::serde::rfc3339::option")]
    sent_at: Option<OffsetDateTime>,
    action: &'static str,
    unit: i64,
    attempts: &'a [Attempt],
    claim: Option<u32>,
}

fn row<'a>(push_id: &'a str, f: &'a Finish) -> FinishRowIn<'a> {
    let (action, unit) = match f.quota {
        QuotaAction::Keep => ("keep", 60),
        QuotaAction::Refund => ("refund", 60),
        QuotaAction::Saturate(window) => ("saturate", window.seconds()),
    };
    FinishRowIn {
        id: push_id,
        status: f.status.as_str(),
        umeng_request: f.umeng_request.as_deref(),
        umeng_response: f.umeng_response.as_ref(),
        msg_id: f.msg_id.as_deref(),
        task_id: f.task_id.as_deref(),
        file_id: f.file_id.as_deref(),
        error_code: f.error_code.as_deref(),
        error_msg: f.error_msg.as_deref(),
        http_status: f.http_status,
        latency_ms: f.latency_ms,
        sent_at: f.sent_at,
        action,
        unit,
        attempts: &f.attempts,
        claim: f.claim,
    }
}
