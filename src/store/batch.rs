//! Group commit: a queue of writes drained in batches by writer tasks. There is no
//! artificial delay: a writer takes whatever is waiting when it is free, so a lone write goes
//! at once and a burst shares one transaction. Used by both stores ([`super::pg_batch`],
//! [`super::sqlite_batch`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool};
use tokio::sync::{mpsc, oneshot, watch, Mutex, MutexGuard};

use super::{StoreError, StoreResult};

/// Most jobs in one batch.
const MAX_BATCH: usize = 64;
/// Jobs waiting for a writer; a caller waits when it is full.
const QUEUE: usize = 4096;
/// How long a writer with a job waits for another writer's write to end before it writes
/// too: longer than a batch takes on a healthy database under load (1 to 3 ms here), short
/// enough that a write stuck on a lock holds up the others only briefly.
pub(crate) const STANDBY_AFTER: Duration = Duration::from_millis(10);

/// The writer tasks of a [`Batcher`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crew {
    /// How many.
    pub writers: usize,
    /// How long a writer with a job waits for another's write to end (see
    /// [`Batcher::start`]).
    pub standby_after: Duration,
}

impl Crew {
    /// One writer (SQLite writes one transaction at a time anyway).
    pub(crate) fn one() -> Self {
        Crew {
            writers: 1,
            standby_after: STANDBY_AFTER,
        }
    }
}

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
    /// Starts the crew's writer tasks (on the current tokio runtime); each calls `write`
    /// with its own copy of `context` and whatever is waiting, up to [`MAX_BATCH`]. `write`
    /// hands the context back, so a writer keeps what it holds (a connection) from one
    /// batch to the next; after [`KEEP_IDLE`] without a job it calls `idle` on it, to give
    /// that back.
    /// The writers end when every clone of the batcher is dropped and the queue is empty.
    ///
    /// One writer writes at a time while writes go quickly: a writer that takes a job while
    /// another one is writing gathers what arrives until that write ends, and then writes
    /// it as one batch. A batch then waits no longer than it would behind a single writer,
    /// and batches are as large as the load makes them (one transaction per batch is what
    /// each write costs the database). More than one write is in flight when one batch is
    /// not enough: when a full batch ([`MAX_BATCH`]) is waiting, or when a write takes
    /// longer than `crew.standby_after` (a row lock another replica holds, a slow disk).
    pub(crate) fn start<C, W, F, I>(context: C, crew: Crew, write: W, idle: I) -> Self
    where
        C: Clone + Send + 'static,
        W: Fn(C, Vec<J>) -> F + Clone + Send + 'static,
        F: std::future::Future<Output = C> + Send,
        I: Fn(&mut C) + Clone + Send + 'static,
    {
        let (queue, jobs) = mpsc::channel::<J>(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        let (writing, _) = watch::channel(0_usize);
        let writing = Arc::new(writing);
        for _ in 0..crew.writers.max(1) {
            let jobs = Arc::clone(&jobs);
            let writing = Arc::clone(&writing);
            let mut context = context.clone();
            let write = write.clone();
            let idle = idle.clone();
            tokio::spawn(async move {
                loop {
                    // Waiting for the queue's lock counts as idle too: the other writer
                    // may be the one waiting for a job.
                    let first = match tokio::time::timeout(KEEP_IDLE, first_job(&jobs)).await {
                        Ok(first) => first,
                        Err(_) => {
                            idle(&mut context);
                            first_job(&jobs).await
                        }
                    };
                    let Some((mut queue, first)) = first else {
                        return;
                    };
                    let batch = gather(&mut queue, first, &writing, crew.standby_after).await;
                    drop(queue);
                    let _writing = Writing::start(&writing);
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
/// statement that fails gives the connection back too, and so does every other writer of
/// the crew before its next statement (the database may have restarted under all of them):
/// the pool's ping then finds out whether each is still alive.
pub(crate) struct Lane<DB: Database> {
    pool: Pool<DB>,
    conn: Option<PoolConnection<DB>>,
    keep: bool,
    /// Statements that failed on any lane of the crew (clones share it).
    failures: Arc<AtomicU64>,
    /// `failures` when the kept connection was taken from the pool.
    taken_at: u64,
}

impl<DB: Database> Clone for Lane<DB> {
    /// A lane of its own, on the same pool, holding nothing yet.
    fn clone(&self) -> Self {
        Lane {
            pool: self.pool.clone(),
            conn: None,
            keep: self.keep,
            failures: Arc::clone(&self.failures),
            taken_at: 0,
        }
    }
}

impl<DB: Database> Lane<DB> {
    pub(crate) fn new(pool: Pool<DB>, keep: bool) -> Self {
        Lane {
            pool,
            conn: None,
            keep,
            failures: Arc::new(AtomicU64::new(0)),
            taken_at: 0,
        }
    }

    pub(crate) fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The kept connection (unless a statement failed on another lane since it was taken),
    /// or one from the pool.
    pub(crate) async fn conn(&mut self) -> Result<&mut DB::Connection, sqlx::Error> {
        let failures = self.failures.load(Ordering::Relaxed);
        let kept = self.conn.take().filter(|_| self.taken_at == failures);
        let conn = match kept {
            Some(conn) => conn,
            None => {
                self.taken_at = failures;
                self.pool.acquire().await?
            }
        };
        Ok(&mut **self.conn.insert(conn))
    }

    /// After a statement or transaction: keep the connection if it worked and may be kept.
    pub(crate) fn after(&mut self, ok: bool) {
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        if !ok || !self.keep {
            self.conn = None;
        }
    }

    /// No work for a while: the connection goes back to the pool.
    pub(crate) fn idle(&mut self) {
        self.conn = None;
    }
}

/// The first job waiting (or the next to come), with the queue held; `None` once every
/// sender is gone and the queue is empty. Cancel-safe: a job is taken only when it is
/// returned.
async fn first_job<J>(
    jobs: &Mutex<mpsc::Receiver<J>>,
) -> Option<(MutexGuard<'_, mpsc::Receiver<J>>, J)> {
    let mut queue = jobs.lock().await;
    let first = queue.recv().await?;
    Some((queue, first))
}

/// A batch from its first job. If other writers are writing, jobs join it as they arrive
/// until one of those writes ends, the batch is full ([`MAX_BATCH`]) or `standby_after`
/// has passed; then whatever else is waiting joins it too, up to [`MAX_BATCH`].
async fn gather<J>(
    queue: &mut mpsc::Receiver<J>,
    first: J,
    writing: &watch::Sender<usize>,
    standby_after: Duration,
) -> Vec<J> {
    let mut batch = vec![first];
    let mut others = writing.subscribe();
    let busy = *others.borrow_and_update();
    if busy > 0 {
        let ended = others.wait_for(|n| *n < busy);
        let standby = tokio::time::sleep(standby_after);
        tokio::pin!(ended, standby);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                biased;
                _ = &mut ended => break,
                _ = &mut standby => break,
                job = queue.recv() => match job {
                    Some(job) => batch.push(job),
                    None => break,
                },
            }
        }
    }
    while batch.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    batch
}

/// Counts a writer as writing while it lives (a write that panics counts as ended).
struct Writing<'a>(&'a watch::Sender<usize>);

impl<'a> Writing<'a> {
    fn start(writing: &'a watch::Sender<usize>) -> Self {
        writing.send_modify(|n| *n += 1);
        Writing(writing)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
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
            Crew::one(),
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

    /// A job and what the test's writer does with it.
    struct Held {
        id: u32,
        /// The writer waits for this before answering the batch that holds the job.
        gate: Option<oneshot::Receiver<()>>,
        done: oneshot::Sender<StoreResult<u32>>,
    }

    /// A crew of two writers that log "start" and "end" of each batch (with its job ids).
    fn logging_crew(
        standby_after: Duration,
    ) -> (Batcher<Held>, Arc<std::sync::Mutex<Vec<String>>>) {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer_log = Arc::clone(&log);
        let writer = Batcher::start(
            writer_log,
            Crew {
                writers: 2,
                standby_after,
            },
            |log: Arc<std::sync::Mutex<Vec<String>>>, batch: Vec<Held>| async move {
                let ids: Vec<u32> = batch.iter().map(|h| h.id).collect();
                log.lock().unwrap().push(format!("start {ids:?}"));
                let mut answers = Vec::new();
                for held in batch {
                    if let Some(gate) = held.gate {
                        let _ = gate.await;
                    }
                    answers.push(held.done);
                }
                log.lock().unwrap().push(format!("end {ids:?}"));
                for (done, id) in answers.into_iter().zip(ids) {
                    let _ = done.send(Ok(id));
                }
                log
            },
            |_: &mut Arc<std::sync::Mutex<Vec<String>>>| {},
        );
        (writer, log)
    }

    /// Queues job `id` (held until `gate` fires, if given); its answer comes on the receiver.
    async fn queue(
        writer: &Batcher<Held>,
        id: u32,
        gate: Option<oneshot::Receiver<()>>,
    ) -> oneshot::Receiver<StoreResult<u32>> {
        let (done, answer) = oneshot::channel();
        writer.queue.send(Held { id, gate, done }).await.unwrap();
        answer
    }

    async fn started(log: &std::sync::Mutex<Vec<String>>, entry: &str) {
        for _ in 0..1000 {
            if log.lock().unwrap().iter().any(|e| e == entry) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never logged {entry:?}: {:?}", log.lock().unwrap());
    }

    /// A [`logging_crew`] whose first writer is writing job 1 until `open` is sent; the
    /// receiver is job 1's answer.
    async fn writing_job_1(
        standby_after: Duration,
    ) -> (
        Batcher<Held>,
        Arc<std::sync::Mutex<Vec<String>>>,
        oneshot::Sender<()>,
        oneshot::Receiver<StoreResult<u32>>,
    ) {
        let (writer, log) = logging_crew(standby_after);
        let (open, gate) = oneshot::channel();
        let first = queue(&writer, 1, Some(gate)).await;
        started(&log, "start [1]").await;
        (writer, log, open, first)
    }

    #[tokio::test]
    async fn jobs_that_arrive_during_a_write_share_the_next_batch() {
        let (writer, log, open, first) = writing_job_1(Duration::from_secs(600)).await;
        // The other writer takes job 2 and waits for the write in progress; 3 and 4 join it.
        let rest = [
            queue(&writer, 2, None).await,
            queue(&writer, 3, None).await,
            queue(&writer, 4, None).await,
        ];
        open.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        for (answer, id) in rest.into_iter().zip(2..) {
            assert_eq!(answer.await.unwrap().unwrap(), id);
        }
        assert_eq!(
            *log.lock().unwrap(),
            ["start [1]", "end [1]", "start [2, 3, 4]", "end [2, 3, 4]"]
        );
    }

    #[tokio::test]
    async fn a_write_that_does_not_end_does_not_hold_up_the_others() {
        let (writer, log, open, stuck) = writing_job_1(Duration::from_millis(10)).await;
        let next = queue(&writer, 2, None).await;
        assert_eq!(
            next.await.unwrap().unwrap(),
            2,
            "written beside the stuck one"
        );
        assert_eq!(*log.lock().unwrap(), ["start [1]", "start [2]", "end [2]"]);
        open.send(()).unwrap();
        assert_eq!(stuck.await.unwrap().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_full_batch_does_not_wait_for_a_write_in_progress() {
        let (writer, log, open, stuck) = writing_job_1(Duration::from_secs(600)).await;
        let ids: Vec<u32> = (2..).take(MAX_BATCH).collect();
        let mut answers = Vec::new();
        for &id in &ids {
            answers.push(queue(&writer, id, None).await);
        }
        for (answer, &id) in answers.into_iter().zip(&ids) {
            assert_eq!(answer.await.unwrap().unwrap(), id);
        }
        assert_eq!(
            log.lock().unwrap()[..3],
            [
                "start [1]".to_owned(),
                format!("start {ids:?}"),
                format!("end {ids:?}")
            ],
            "written while the first write was still in progress"
        );
        open.send(()).unwrap();
        assert_eq!(stuck.await.unwrap().unwrap(), 1);
    }
}
