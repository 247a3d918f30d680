//! Group commit: a queue of writes drained in batches by writer tasks. There is no
//! artificial delay: a writer takes whatever is waiting when it is free, so a lone write goes
//! at once and a burst shares one transaction. Used by both stores ([`super::pg_batch`],
//! [`super::sqlite_batch`]).

use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::{StoreError, StoreResult};

/// Most jobs in one batch.
const MAX_BATCH: usize = 64;
/// Jobs waiting for a writer; a caller waits when it is full.
const QUEUE: usize = 4096;
/// A writer idle this long gives back what it keeps between batches: the idle time after
/// which the pool pings a PostgreSQL connection before handing it out, so a kept one is
/// never used after a longer silence without a ping.
pub(crate) const KEEP_IDLE: Duration = super::postgres::PING_IF_IDLE;

/// A queue drained in batches by writer tasks (clones share them).
#[derive(Debug)]
pub(crate) struct Batcher<J> {
    queue: mpsc::Sender<J>,
}

impl<J> Clone for Batcher<J> {
    fn clone(&self) -> Self {
        Batcher {
            queue: self.queue.clone(),
        }
    }
}

impl<J: Send + 'static> Batcher<J> {
    /// Starts `writers` tasks (on the current tokio runtime); each calls `write` with its
    /// own copy of `context` and whatever is waiting, up to [`MAX_BATCH`]. `write` hands the
    /// context back, so a writer keeps what it holds (a connection) from one batch to the
    /// next; after [`KEEP_IDLE`] without a job it calls `idle` on it, to give that back.
    /// The writers end when every clone of the batcher is dropped and the queue is empty.
    pub(crate) fn start<C, W, F, I>(context: C, writers: usize, write: W, idle: I) -> Self
    where
        C: Clone + Send + 'static,
        W: Fn(C, Vec<J>) -> F + Clone + Send + 'static,
        F: std::future::Future<Output = C> + Send,
        I: Fn(&mut C) + Clone + Send + 'static,
    {
        let (queue, jobs) = mpsc::channel::<J>(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..writers.max(1) {
            let jobs = Arc::clone(&jobs);
            let mut context = context.clone();
            let write = write.clone();
            let idle = idle.clone();
            tokio::spawn(async move {
                loop {
                    // Waiting for the queue's lock counts as idle too: the other writer
                    // may be the one waiting for a job.
                    let batch = match tokio::time::timeout(KEEP_IDLE, next_batch(&jobs)).await {
                        Ok(batch) => batch,
                        Err(_) => {
                            idle(&mut context);
                            next_batch(&jobs).await
                        }
                    };
                    let Some(batch) = batch else {
                        return;
                    };
                    context = write(context, batch).await;
                }
            });
        }
        Batcher { queue }
    }

    /// Queue the job `make` builds around the sender of its answer, and wait for the answer;
    /// the job is done even if the caller stops waiting.
    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> J,
    ) -> StoreResult<T> {
        let stopped = || StoreError::Unavailable("the database writer has stopped".into());
        let (done, result) = oneshot::channel();
        self.queue.send(make(done)).await.map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }
}

/// A writer's connection. sqlx pings every connection given back to its pool (a round
/// trip to PostgreSQL; on SQLite a trip to the connection's thread), so a writer under load
/// keeps its connection from one batch to the next and gives it back after [`KEEP_IDLE`]
/// without work (or at once, when `keep` is false: a pool too small to spare it). A
/// statement that fails gives the connection back too: the pool's ping then finds out
/// whether it is still alive.
pub(crate) struct Lane<DB: Database> {
    pool: Pool<DB>,
    conn: Option<PoolConnection<DB>>,
    keep: bool,
}

impl<DB: Database> Clone for Lane<DB> {
    /// A lane of its own, on the same pool, holding nothing yet.
    fn clone(&self) -> Self {
        Lane {
            pool: self.pool.clone(),
            conn: None,
            keep: self.keep,
        }
    }
}

impl<DB: Database> Lane<DB> {
    pub(crate) fn new(pool: Pool<DB>, keep: bool) -> Self {
        Lane {
            pool,
            conn: None,
            keep,
        }
    }

    pub(crate) fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The kept connection, or one from the pool.
    pub(crate) async fn conn(&mut self) -> Result<&mut DB::Connection, sqlx::Error> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(&mut **self.conn.insert(conn))
    }

    /// After a statement or transaction: keep the connection if it worked and may be kept.
    pub(crate) fn after(&mut self, ok: bool) {
        if !ok || !self.keep {
            self.conn = None;
        }
    }

    /// No work for a while: the connection goes back to the pool.
    pub(crate) fn idle(&mut self) {
        self.conn = None;
    }
}

/// The next batch: the first job waiting (or the next to come), then whatever else is
/// waiting, up to [`MAX_BATCH`]; `None` once every sender is gone and the queue is empty.
/// Cancel-safe: a job is taken only when it is returned.
async fn next_batch<J>(jobs: &Mutex<mpsc::Receiver<J>>) -> Option<Vec<J>> {
    let mut jobs = jobs.lock().await;
    let first = jobs.recv().await?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A writer's context: the batches written since it was last idle.
    #[derive(Clone, Default)]
    struct Kept {
        batches: u32,
        idle: Arc<AtomicU32>,
    }

    type Job = oneshot::Sender<StoreResult<u32>>;

    #[tokio::test]
    async fn a_writer_keeps_its_context_between_batches_and_lets_go_when_idle() {
        let kept = Kept::default();
        let idle = Arc::clone(&kept.idle);
        let writer = Batcher::start(
            kept,
            1,
            |mut kept: Kept, batch: Vec<Job>| async move {
                kept.batches += 1;
                for done in batch {
                    let _ = done.send(Ok(kept.batches));
                }
                kept
            },
            |kept: &mut Kept| {
                kept.batches = 0;
                kept.idle.fetch_add(1, Ordering::SeqCst);
            },
        );
        assert_eq!(writer.call(|done| done).await.unwrap(), 1);
        assert_eq!(
            writer.call(|done| done).await.unwrap(),
            2,
            "kept from the batch before"
        );
        assert_eq!(idle.load(Ordering::SeqCst), 0);

        tokio::time::sleep(KEEP_IDLE + Duration::from_millis(500)).await;
        assert_eq!(
            idle.load(Ordering::SeqCst),
            1,
            "idle once, not again while still idle"
        );
        assert_eq!(
            writer.call(|done| done).await.unwrap(),
            1,
            "let go when idle"
        );
    }
}
