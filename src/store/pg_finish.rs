//! Group commit of outcome records on PostgreSQL: concurrent [`Finish`] writes are gathered
//! into one call of `umgw_finish_batch` (one round trip, one transaction, one WAL flush)
//! by a couple of writer tasks. There is no artificial delay: a writer takes whatever is
//! waiting when it is free, so a lone outcome is written at once and a burst shares its
//! commit.
//!
//! Each record keeps its own guard (still `pending`, or the sweeper's `unknown` guess for a
//! push that owns its key; the delivery claim's fencing token) and its own quota action,
//! applied row by row inside the function, so counts stay exact however many outcomes of
//! one window share a batch.

use std::sync::Arc;

use serde_json::{json, Value};
use sqlx::postgres::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::{attempts_json, map_sqlx, Finish, QuotaAction, StoreError, StoreResult};

/// Most outcomes in one call.
const MAX_BATCH: usize = 64;
/// Writers draining the queue: one may wait on a row lock while another writes.
const WRITERS: usize = 2;
/// Outcomes waiting for a writer; a caller waits when it is full.
const QUEUE: usize = 4096;

const FINISH_BATCH: &str = "select id from umgw_finish_batch($1) as id";

#[derive(Debug)]
struct Job {
    push_id: String,
    finish: Finish,
    done: oneshot::Sender<StoreResult<bool>>,
}

/// The queue of outcome records and its writers (clones share them).
#[derive(Debug, Clone)]
pub(crate) struct Finisher {
    queue: mpsc::Sender<Job>,
}

impl Finisher {
    /// Starts the writers (on the current tokio runtime). They end when every clone of
    /// the finisher is dropped and the queue is empty.
    pub(crate) fn start(pool: PgPool) -> Finisher {
        let (queue, jobs) = mpsc::channel::<Job>(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..WRITERS {
            let jobs = Arc::clone(&jobs);
            let pool = pool.clone();
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut jobs = jobs.lock().await;
                        let Some(first) = jobs.recv().await else {
                            return;
                        };
                        let mut batch = vec![first];
                        while batch.len() < MAX_BATCH {
                            match jobs.try_recv() {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    write(&pool, batch).await;
                }
            });
        }
        Finisher { queue }
    }

    /// Queue one outcome and wait until its batch is written; true when it applied. The
    /// write happens even if the caller stops waiting.
    pub(crate) async fn finish(&self, push_id: &str, finish: Finish) -> StoreResult<bool> {
        let (done, result) = oneshot::channel();
        let job = Job {
            push_id: push_id.to_owned(),
            finish,
            done,
        };
        let stopped = || StoreError::Unavailable("the outcome writer has stopped".into());
        self.queue.send(job).await.map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }
}

/// Writes one batch and answers each job. Two outcomes for the same push never share a
/// call (the second waits for the next one), so each answer is its own.
async fn write(pool: &PgPool, mut batch: Vec<Job>) {
    while !batch.is_empty() {
        let mut now = Vec::with_capacity(batch.len());
        let mut later = Vec::new();
        for job in batch {
            if now.iter().any(|j: &Job| j.push_id == job.push_id) {
                later.push(job);
            } else {
                now.push(job);
            }
        }
        let rows: Vec<Value> = now.iter().map(|j| row(&j.push_id, &j.finish)).collect();
        let result = sqlx::query_scalar::<_, String>(FINISH_BATCH)
            .bind(Value::Array(rows))
            .fetch_all(pool)
            .await
            .map_err(map_sqlx);
        match result {
            Ok(changed) => {
                for job in now {
                    let applied = changed.contains(&job.push_id);
                    let _ = job.done.send(Ok(applied));
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
