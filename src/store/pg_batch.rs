//! Group commit on PostgreSQL: concurrent admissions, and concurrent outcome records, are
//! gathered into one call of `umgw_admit_batch` / `umgw_finish_batch` (one round trip, one
//! transaction, one WAL flush) by a couple of writer tasks each. There is no artificial
//! delay: a writer takes whatever is waiting when it is free, so a lone push is written at
//! once and a burst shares its commit.
//!
//! Each row keeps its own semantics inside the function (the same `umgw_admit` for an
//! admission; for an outcome the same guard and quota action as one at a time), applied
//! row by row, so quotas and keys stay exact however many pushes share a batch. A batch of
//! admissions that fails as a whole (one row's error, a deadlock between two batches) is
//! retried one admission at a time.

use serde_json::{json, Value};
use sqlx::postgres::PgPool;
use sqlx::Postgres;
use tokio::sync::oneshot;

use super::batch::Batcher;
use super::postgres::{admission_of, admit, AdmitRow};
use super::{
    attempts_json, map_sqlx, Admission, Finish, NewPush, QuotaAction, QuotaClaim, StoreError,
    StoreResult,
};

/// Writers draining each queue: one may wait on a row lock while another writes.
const WRITERS: usize = 2;
/// Writers keep their connection between batches only when the pool has at least this
/// many: the four writers then hold at most half of it.
const KEEP_FROM: u32 = 4 * WRITERS as u32;

type Lane = super::batch::Lane<Postgres>;

const FINISH_BATCH: &str = "select id from umgw_finish_batch($1) as id";

/// An outcome record waiting for its batch.
#[derive(Debug)]
pub(crate) struct FinishJob {
    push_id: String,
    finish: Finish,
    done: oneshot::Sender<StoreResult<bool>>,
}

/// An admission waiting for its batch.
#[derive(Debug)]
pub(crate) struct AdmitJob {
    push: NewPush,
    quota: Option<QuotaClaim>,
    done: oneshot::Sender<StoreResult<Admission>>,
}

/// The two queues of a PostgreSQL store.
#[derive(Debug, Clone)]
pub(crate) struct Writers {
    finishes: Batcher<FinishJob>,
    admissions: Batcher<AdmitJob>,
}

impl Writers {
    pub(crate) fn start(pool: PgPool) -> Writers {
        let keep = pool.options().get_max_connections() >= KEEP_FROM;
        let lane = Lane::new(pool, keep);
        Writers {
            finishes: Batcher::start(
                lane.clone(),
                WRITERS,
                |mut lane, batch| async move {
                    write_finishes(&mut lane, batch).await;
                    lane
                },
                Lane::idle,
            ),
            admissions: Batcher::start(
                lane,
                WRITERS,
                |mut lane, batch| async move {
                    write_admissions(&mut lane, batch).await;
                    lane
                },
                Lane::idle,
            ),
        }
    }

    /// Record one outcome with those of concurrent pushes; true when it applied.
    pub(crate) async fn finish(&self, push_id: &str, finish: Finish) -> StoreResult<bool> {
        let push_id = push_id.to_owned();
        self.finishes
            .call(|done| FinishJob {
                push_id,
                finish,
                done,
            })
            .await
    }

    /// Admit one push with those of concurrent pushes.
    pub(crate) async fn admit(
        &self,
        push: NewPush,
        quota: Option<QuotaClaim>,
    ) -> StoreResult<Admission> {
        self.admissions
            .call(|done| AdmitJob { push, quota, done })
            .await
    }
}

const ADMIT_BATCH: &str = "select idx, outcome, push_id, reclaimed_from, used, window_start, \
     reset_after_secs from umgw_admit_batch($1)";

/// Admits a batch in one call; answers each job. Admissions of one key never share a
/// call (the later waits for the next), and the batch is ordered by appkey and bucket, so
/// two batches take counter rows in the same order. If the call fails as a whole, each
/// push is admitted alone, so one bad row cannot fail the others.
async fn write_admissions(lane: &mut Lane, mut batch: Vec<AdmitJob>) {
    while !batch.is_empty() {
        let mut now: Vec<AdmitJob> = Vec::with_capacity(batch.len());
        let mut later = Vec::new();
        for job in batch {
            let same_key = |j: &AdmitJob| {
                j.push.out_biz_no.is_some()
                    && j.push.out_biz_no == job.push.out_biz_no
                    && j.push.appkey == job.push.appkey
            };
            if now.iter().any(same_key) {
                later.push(job);
            } else {
                now.push(job);
            }
        }
        now.sort_by(|a, b| {
            let key = |j: &AdmitJob| (j.push.appkey.clone(), j.quota.map(|q| q.kind));
            key(a).cmp(&key(b))
        });
        if now.len() == 1 {
            let job = now.remove(0);
            let _ = job.done.send(admit_alone(lane, job.push, job.quota).await);
        } else {
            let rows: Vec<Value> = now.iter().map(|j| admit_row(&j.push, j.quota)).collect();
            let called = match lane.conn().await {
                Ok(conn) => {
                    sqlx::query(ADMIT_BATCH)
                        .bind(Value::Array(rows))
                        .fetch_all(conn)
                        .await
                }
                Err(e) => Err(e),
            };
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
                Ok(rows) => {
                    let answers = rows
                        .iter()
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
                                let admission =
                                    admission_of(lane.pool(), answer, &job.push, job.quota).await;
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
            }
        }
        batch = later;
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
fn admit_answer(row: &sqlx::postgres::PgRow) -> StoreResult<(i32, AdmitRow)> {
    use sqlx::Row;
    let idx = row.try_get("idx").map_err(map_sqlx)?;
    Ok((idx, AdmitRow::from_row(row).map_err(map_sqlx)?))
}

/// One admission as a row of the batch (the arguments of `umgw_admit`).
fn admit_row(push: &NewPush, quota: Option<QuotaClaim>) -> Value {
    let rfc3339 = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    };
    let d = push.delivery.as_ref();
    json!({
        "id": push.id,
        "app": push.app,
        "appkey": push.appkey,
        "platform": push.platform,
        "cast_type": push.cast_type,
        "task_class": push.task_class,
        "production_mode": push.production_mode,
        "client": push.client,
        "out_biz_no": push.out_biz_no,
        "fingerprint": push.fingerprint,
        "request": push.request,
        "description": push.description,
        "quota_kind": quota.map(|c| c.kind.as_str()),
        "quota_limit": quota.map(|c| c.limit.limit),
        "quota_unit": quota.map(|c| c.limit.window.seconds()),
        "status": d.map_or(super::PushStatus::Pending, |d| d.status()).as_str(),
        "defer_quota": d.is_some_and(|d| d.defer_quota),
        "outbox": d.map(|d| &d.outbox),
        "send_at": push.send_at.and_then(rfc3339),
        "deliver_by": d.and_then(|d| rfc3339(d.deliver_by)),
        "quota_wait": d.is_some_and(|d| d.quota_wait),
    })
}

/// Writes one batch of outcomes and answers each job. Two outcomes for the same push never
/// share a call (the second waits for the next one), so each answer is its own. Rows go in
/// push id order, so two batches lock the pushes they share in the same order. A call that
/// fails as a whole (a deadlock with the other writer's batch over a quota counter) wrote
/// nothing: each outcome is then written alone, so one bad row cannot fail the others
/// (unless the database is unreachable: then every outcome gets the error).
async fn write_finishes(lane: &mut Lane, mut batch: Vec<FinishJob>) {
    while !batch.is_empty() {
        let mut now = Vec::with_capacity(batch.len());
        let mut later = Vec::new();
        for job in batch {
            if now.iter().any(|j: &FinishJob| j.push_id == job.push_id) {
                later.push(job);
            } else {
                now.push(job);
            }
        }
        now.sort_by(|a, b| a.push_id.cmp(&b.push_id));
        match finish_rows(lane, &now).await {
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
                    let answer = finish_rows(lane, alone)
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

/// One call of `umgw_finish_batch`: the ids of the pushes whose outcome applied.
async fn finish_rows(lane: &mut Lane, jobs: &[FinishJob]) -> StoreResult<Vec<String>> {
    let rows: Vec<Value> = jobs.iter().map(|j| row(&j.push_id, &j.finish)).collect();
    let result = match lane.conn().await {
        Ok(conn) => {
            sqlx::query_scalar::<_, String>(FINISH_BATCH)
                .bind(Value::Array(rows))
                .fetch_all(conn)
                .await
        }
        Err(e) => Err(e),
    };
    lane.after(result.is_ok());
    result.map_err(map_sqlx)
}

/// One outcome as a row of the batch.
fn row(push_id: &str, f: &Finish) -> Value {
    let (action, unit) = match f.quota {
        QuotaAction::Keep => ("keep", 60),
        QuotaAction::Refund => ("refund", 60),
        QuotaAction::Saturate(window) => ("saturate", window.seconds()),
    };
    let sent_at = f.sent_at.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    });
    json!({
        "id": push_id,
        "status": f.status.as_str(),
        "umeng_request": f.umeng_request,
        "umeng_response": f.umeng_response,
        "msg_id": f.msg_id,
        "task_id": f.task_id,
        "file_id": f.file_id,
        "error_code": f.error_code,
        "error_msg": f.error_msg,
        "http_status": f.http_status,
        "latency_ms": f.latency_ms,
        "sent_at": sent_at,
        "action": action,
        "unit": unit,
        "attempts": attempts_json(&f.attempts),
        "claim": f.claim,
    })
}
