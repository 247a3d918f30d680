//! Group commit: a queue of writes drained in batches by writer tasks. There is no
//! artificial delay: a writer takes whatever is waiting when it is free, so a lone write goes
//! at once and a burst shares one transaction. Used by both stores ([`super::pg_batch`],
//! [`super::sqlite_batch`]).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};

use super::{StoreError, StoreResult};

/// Most jobs in one batch.
const MAX_BATCH: usize = 64;
/// Jobs waiting for a writer; a caller waits when it is full.
const QUEUE: usize = 4096;

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
    /// context and whatever is waiting, up to [`MAX_BATCH`]. They end when every clone is
    /// dropped and the queue is empty.
    pub(crate) fn start<C, W, F>(context: C, writers: usize, write: W) -> Self
    where
        C: Clone + Send + 'static,
        W: Fn(C, Vec<J>) -> F + Clone + Send + 'static,
        F: std::future::Future<Output = ()> + Send,
    {
        let (queue, jobs) = mpsc::channel::<J>(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..writers.max(1) {
            let jobs = Arc::clone(&jobs);
            let context = context.clone();
            let write = write.clone();
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
                    write(context.clone(), batch).await;
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
