//! Group commit on SQLite: concurrent admissions and outcome records share one
//! `begin immediate` transaction, written by one writer task (SQLite has one writer at a
//! time anyway). A burst of pushes then costs one lock, one commit and one write of each
//! page it touched to the WAL, instead of one of each per push.
//!
//! Jobs run in their arrival order, each exactly as it would alone ([`admit_in`],
//! [`finish_in`]), so quotas and keys stay exact within a batch: a second admission of a
//! key sees the first one's row. A refusal writes nothing. If a job fails, or the commit
//! does, the whole transaction is rolled back (nothing of the batch was written) and every
//! job runs again alone, in its own transaction, so one bad row cannot fail the others and
//! nothing is written twice. Answers are sent only after the commit.

use std::sync::Arc;

use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{Connection, Sqlite};
use tokio::sync::{oneshot, Mutex};

use super::batch::{Batcher, Crew};
use super::sqlite::{admit, admit_in, finish_in, finish_push};
use super::{map_sqlx, Admission, Finish, NewPush, QuotaClaim, StoreError, StoreResult};

/// A write waiting for its batch. Admissions are the larger kind and the commoner one, so
/// boxing them would cost an allocation per push to save queue space that only a backlog
/// fills (a job is in the queue only until a writer is free).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Job {
    Admit {
        push: NewPush,
        quota: Option<QuotaClaim>,
        done: oneshot::Sender<StoreResult<Admission>>,
    },
    Finish {
        push_id: String,
        finish: Arc<Finish>,
        done: oneshot::Sender<StoreResult<bool>>,
    },
}

impl Job {
    /// Answer the job with an error.
    fn fail(self, e: StoreError) {
        match self {
            Job::Admit { done, .. } => reply(done, Err(e)),
            Job::Finish { done, .. } => reply(done, Err(e)),
        };
    }
}

/// Send a job its answer; true when the answer is not an error.
fn reply<T>(done: oneshot::Sender<StoreResult<T>>, answer: StoreResult<T>) -> bool {
    let ok = answer.is_ok();
    let _ = done.send(answer);
    ok
}

type Lane = super::batch::Lane<Sqlite>;

/// What a job answered inside the batch's transaction.
enum Answer {
    Admit(Admission),
    Finish(bool),
}

/// The writer of a SQLite store: admissions and outcome records, together.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    jobs: Batcher<Job>,
}

impl Writer {
    /// Starts the writer task; it takes `turn` for each batch, as every other write does,
    /// and signals `wrote` after each.
    pub(crate) fn start(
        pool: SqlitePool,
        turn: Arc<Mutex<()>>,
        wrote: Arc<tokio::sync::Notify>,
    ) -> Writer {
        // The writer keeps a connection between batches unless it is the pool's only one.
        let keep = pool.options().get_max_connections() > 1;
        Writer {
            jobs: Batcher::start(
                (Lane::new(pool, keep), turn, wrote),
                Crew::one(),
                |(mut lane, turn, wrote), batch| async move {
                    {
                        let _turn = turn.lock().await;
                        write(&mut lane, batch).await;
                    }
                    wrote.notify_one();
                    (lane, turn, wrote)
                },
                |(lane, _, _): &mut (Lane, Arc<Mutex<()>>, Arc<tokio::sync::Notify>)| lane.idle(),
            ),
        }
    }

    /// Admit one push with those of concurrent pushes.
    pub(crate) async fn admit(
        &self,
        push: NewPush,
        quota: Option<QuotaClaim>,
    ) -> StoreResult<Admission> {
        self.jobs
            .call(|done| Job::Admit { push, quota, done })
            .await
    }

    /// Record one outcome with those of concurrent pushes; true when it applied.
    pub(crate) async fn finish(&self, push_id: &str, finish: Arc<Finish>) -> StoreResult<bool> {
        let push_id = push_id.to_owned();
        self.jobs
            .call(|done| Job::Finish {
                push_id,
                finish,
                done,
            })
            .await
    }
}

/// Writes one batch and answers each job.
async fn write(lane: &mut Lane, batch: Vec<Job>) {
    if batch.len() > 1 {
        let written = match lane.conn().await {
            Ok(conn) => together(conn, &batch).await,
            Err(e) => Err(e),
        };
        lane.after(written.is_ok());
        match written {
            Ok(answers) => {
                for (job, answer) in batch.into_iter().zip(answers) {
                    match (job, answer) {
                        (Job::Admit { done, .. }, Answer::Admit(a)) => {
                            let _ = done.send(Ok(a));
                        }
                        (Job::Finish { done, .. }, Answer::Finish(applied)) => {
                            let _ = done.send(Ok(applied));
                        }
                        // `together` answers each job with its own kind, in order; the
                        // batch is committed, so a job is never written again.
                        (Job::Admit { done, .. }, _) => {
                            let _ = done.send(Err(mismatched()));
                        }
                        (Job::Finish { done, .. }, _) => {
                            let _ = done.send(Err(mismatched()));
                        }
                    }
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, jobs = batch.len(), "a batch of writes failed; writing each alone");
            }
        }
    }
    for job in batch {
        alone(lane, job).await;
    }
}

fn mismatched() -> StoreError {
    StoreError::Database("a batch answered a job with another kind of answer".into())
}

/// Every job of the batch in one transaction; an error rolls all of it back.
async fn together(conn: &mut SqliteConnection, batch: &[Job]) -> Result<Vec<Answer>, sqlx::Error> {
    let mut tx = conn.begin_with("begin immediate").await?;
    let mut answers = Vec::with_capacity(batch.len());
    for job in batch {
        answers.push(match job {
            Job::Admit { push, quota, .. } => Answer::Admit(admit_in(&mut tx, push, *quota).await?),
            Job::Finish {
                push_id, finish, ..
            } => Answer::Finish(finish_in(&mut tx, push_id, finish).await?),
        });
    }
    tx.commit().await?;
    Ok(answers)
}

/// One job in its own transaction.
async fn alone(lane: &mut Lane, job: Job) {
    let conn = match lane.conn().await {
        Ok(conn) => conn,
        Err(e) => return job.fail(map_sqlx(e)),
    };
    let ok = match job {
        Job::Admit { push, quota, done } => {
            reply(done, admit(conn, &push, quota).await.map_err(map_sqlx))
        }
        Job::Finish {
            push_id,
            finish,
            done,
        } => reply(
            done,
            finish_push(conn, &push_id, &finish).await.map_err(map_sqlx),
        ),
    };
    lane.after(ok);
}
