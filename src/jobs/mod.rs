//! Work that is not waited on: OpenAI's Files and Batch APIs and async single requests,
//! durable across crashes (`docs/batch.md`).
//!
//! ```text
//! api/files.rs, api/batches.rs ──► JobService ──► store.rs (SQLite, WAL)   durable state
//!                                     │        └► files.rs (fsync + rename)  JSONL bytes
//!                                     ├► batch.rs: one task per batch, lines through ──┐
//!                                     └► async_job.rs: one task per job ───────────────┤
//!                                        └► webhook.rs: delivery, durable retries
//!                                                         Executor (api/run.rs) ◄──────┘
//! ```
//! The jobs room does not know the API: it runs a request body through an `Executor`, which
//! the API implements with the very function its HTTP handlers call, at the lowest priority.
//! Invariants: a batch line's result is committed before it counts as done, and only a
//! pending line is ever finished, so after a crash finished lines are not rerun and an
//! unfinished one reruns from its start; at most `max_concurrent` batch and async requests
//! are in the engine at once.

pub mod async_job;
pub mod batch;
pub mod files;
pub mod lines;
pub mod store;
mod store_files;
mod store_jobs;
pub mod webhook;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{watch, Semaphore};

pub use lines::Endpoint;
pub use store::Store;

/// Everything the jobs room can fail with.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the job database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("the job database lock was poisoned")]
    Poisoned,
    #[error("{0}")]
    Internal(String),
}

impl JobError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> JobError {
        let context = context.into();
        move |source| JobError::Io { context, source }
    }
}

/// A request that did not succeed: its HTTP status and OpenAI error body. `retry` means it
/// was refused for a passing reason (the server full or shutting down): it was not run, and
/// its line stays pending.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: u16,
    pub body: Value,
    pub retry: bool,
}

pub type Outcome = Result<Value, Failure>;

/// Runs one request body as the endpoint would, at a priority (the API implements it).
pub trait Executor: Send + Sync + 'static {
    fn execute(
        &self,
        endpoint: Endpoint,
        body: Value,
        priority: i32,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send>>;
    /// True once the server began shutting down: results are not recorded from then on.
    fn shutting_down(&self) -> bool;
    /// Requests in the engine now (running or waiting), the jobs' own included.
    fn requests_in_engine(&self) -> usize {
        0
    }
}

/// The scheduler serves lower priorities first and preempts the highest: jobs take the
/// highest there is, which the scheduler also treats as background (`SchedulerConfig::
/// background_priority`): it yields every step that has an online prefill to compute.
pub const JOB_PRIORITY: i32 = i32::MAX;

/// `sluice serve`'s jobs flags.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub data_dir: PathBuf,
    /// Batch and async requests in the engine at once.
    pub max_concurrent: usize,
    /// Batch lines in the engine at once while online requests are there too (new lines wait
    /// until fewer run; 0 pauses the batch while online requests are served).
    pub busy_concurrent: usize,
    /// Largest uploaded file.
    pub max_file_bytes: usize,
    /// Hosts a webhook may be sent to.
    pub webhook_allowed_hosts: Vec<String>,
}

/// The jobs' state and runners. Cheap to share (`Arc`).
pub struct JobService {
    pub config: JobsConfig,
    pub store: Store,
    pub files: files::FileStore,
    permits: Arc<Semaphore>,
    /// Cancel signals of running batches and jobs, by id.
    cancels: Mutex<HashMap<String, watch::Sender<bool>>>,
    executor: std::sync::OnceLock<Arc<dyn Executor>>,
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl JobService {
    /// Opens the data directory (created if missing), checking that it can be written: an
    /// unwritable or full directory is an error here, at start-up, not at the first batch.
    pub fn open(config: JobsConfig) -> Result<Arc<JobService>, JobError> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir)
            .map_err(JobError::io(format!("creating {}", dir.display())))?;
        let files = files::FileStore::open(dir.join("files"))?;
        files.check_writable()?;
        let store = Store::open(dir)?;
        Ok(Arc::new(JobService {
            permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            config,
            store,
            files,
            cancels: Mutex::new(HashMap::new()),
            executor: std::sync::OnceLock::new(),
        }))
    }

    /// Starts the runners with `executor`, resuming every unfinished batch and job.
    pub async fn start(self: &Arc<Self>, executor: Arc<dyn Executor>) -> Result<(), JobError> {
        if self.executor.set(executor).is_err() {
            return Err(JobError::Internal(
                "the job runners were already started".into(),
            ));
        }
        let batches = self.store.unfinished_batches().await?;
        let jobs = self.store.unfinished_jobs().await?;
        if !batches.is_empty() || !jobs.is_empty() {
            tracing::info!(
                "resuming {} batch(es) and {} async job(s)",
                batches.len(),
                jobs.len()
            );
        }
        for id in batches {
            self.spawn_batch(id);
        }
        for id in jobs {
            self.spawn_job(id);
        }
        // Webhooks of jobs that finished before a crash, still pending or between retries.
        for id in self.store.pending_deliveries().await? {
            self.spawn_delivery(id);
        }
        Ok(())
    }

    fn executor(&self) -> Option<Arc<dyn Executor>> {
        self.executor.get().cloned()
    }

    /// A cancel signal for `id`, registered until `unregister`.
    fn register(&self, id: &str) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        if let Ok(mut m) = self.cancels.lock() {
            m.insert(id.to_string(), tx);
        }
        rx
    }

    fn unregister(&self, id: &str) {
        if let Ok(mut m) = self.cancels.lock() {
            m.remove(id);
        }
    }

    /// Signals a running batch or job to stop.
    fn signal_cancel(&self, id: &str) {
        if let Ok(m) = self.cancels.lock() {
            if let Some(tx) = m.get(id) {
                let _ = tx.send(true);
            }
        }
    }

    /// Whether another batch line may start: always under `max_concurrent` (the permits);
    /// under `busy_concurrent` while online requests are in the engine.
    fn admit_more(&self, exec: &dyn Executor) -> bool {
        let ours = self.config.max_concurrent.max(1) - self.permits.available_permits();
        let online = exec.requests_in_engine().saturating_sub(ours);
        online == 0 || ours < self.config.busy_concurrent
    }

    /// Backoff of the `attempt`th retry of a refused request.
    fn retry_delay(attempt: u32) -> Duration {
        Duration::from_millis(50u64 << attempt.min(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Busy(usize);

    impl Executor for Busy {
        fn execute(
            &self,
            _: Endpoint,
            _: Value,
            _: i32,
        ) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
            Box::pin(async { Ok(Value::Null) })
        }
        fn shutting_down(&self) -> bool {
            false
        }
        fn requests_in_engine(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn batch_lines_yield_to_online_requests() {
        let dir = std::env::temp_dir().join(format!("sluice-jobs-admit-{}", std::process::id()));
        let jobs = JobService::open(JobsConfig {
            data_dir: dir.clone(),
            max_concurrent: 4,
            busy_concurrent: 1,
            max_file_bytes: 1 << 20,
            webhook_allowed_hosts: Vec::new(),
        })
        .unwrap();
        assert!(jobs.admit_more(&Busy(0)));
        let one = jobs.permits.clone().try_acquire_owned().unwrap();
        // One batch line in the engine, alone: more may start; with an online request, not.
        assert!(jobs.admit_more(&Busy(1)));
        assert!(!jobs.admit_more(&Busy(2)));
        drop(one);
        assert!(
            jobs.admit_more(&Busy(3)),
            "none of ours runs: one may start"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
