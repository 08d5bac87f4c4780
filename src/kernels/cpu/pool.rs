//! A persistent thread pool for the CPU backend's ops.
//!
//! A decode step calls a few hundred small parallel ops (one per matmul, norm or attention
//! call), each a few microseconds to a millisecond long, so the cost of waking threads matters
//! more than their scheduling. Workers spin briefly on an epoch counter after each job and only
//! then sleep on a condition variable; the calling thread takes part in every job. Tasks are
//! handed out by an atomic counter, so uneven tasks balance themselves.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped once per job; workers wake when it moves.
    epoch: AtomicUsize,
    /// The current job; `run` keeps it alive until `busy` is zero.
    job: Mutex<Option<JobRef>>,
    wake: Condvar,
    next_task: AtomicUsize,
    num_tasks: AtomicUsize,
    /// Workers still inside the current job.
    busy: AtomicUsize,
    shutdown: AtomicBool,
}

#[derive(Clone, Copy)]
struct JobRef(*const Job);
// SAFETY: the pointee is `Sync` and `run` keeps it alive until every worker has left it.
unsafe impl Send for JobRef {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes `run` calls from different threads (the pool has one job slot).
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `num_threads` threads in all, the caller's included.
    pub fn new(num_threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            wake: Condvar::new(),
            next_task: AtomicUsize::new(0),
            num_tasks: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
        });
        let workers = (1..num_threads.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("sluice-cpu-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawning a CPU worker thread")
            })
            .collect();
        Self {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    /// A pool sized to the machine's available parallelism (or `SLUICE_NUM_THREADS`).
    pub fn with_default_threads() -> Self {
        Self::new(default_num_threads())
    }

    pub fn num_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i` in `0..num_tasks`, spread over the pool; returns when all
    /// are done.
    pub fn run<F: Fn(usize) + Sync>(&self, num_tasks: usize, f: F) {
        if num_tasks == 0 {
            return;
        }
        if num_tasks == 1 || self.workers.is_empty() {
            (0..num_tasks).for_each(f);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let job: &(dyn Fn(usize) + Sync + '_) = &f;
        // SAFETY: the reference's lifetime is erased only for the duration of this call; we
        // wait below until `busy` is zero, so no worker touches `f` after we return.
        let job: &'static Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(job) };
        s.next_task.store(0, Ordering::Relaxed);
        s.num_tasks.store(num_tasks, Ordering::Relaxed);
        s.busy.store(self.workers.len(), Ordering::Relaxed);
        {
            let mut slot = s.job.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(JobRef(job));
            s.epoch.fetch_add(1, Ordering::Release);
        }
        s.wake.notify_all();
        work_on(s, job);
        while s.busy.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
    }
}

fn work_on(s: &Shared, job: &Job) {
    let n = s.num_tasks.load(Ordering::Relaxed);
    loop {
        let i = s.next_task.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        job(i);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0usize;
    loop {
        // Spin, then sleep, until the epoch moves.
        let start = Instant::now();
        while s.epoch.load(Ordering::Acquire) == seen {
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            if start.elapsed() > SPIN {
                let mut slot = s.job.lock().unwrap_or_else(|e| e.into_inner());
                while s.epoch.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Relaxed)
                {
                    slot = s.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
                drop(slot);
                break;
            }
            std::hint::spin_loop();
        }
        if s.shutdown.load(Ordering::Relaxed) {
            return;
        }
        seen = s.epoch.load(Ordering::Acquire);
        let job = s.job.lock().unwrap_or_else(|e| e.into_inner()).map(|j| j.0);
        if let Some(job) = job {
            // SAFETY: `run` keeps the job alive until `busy` reaches zero.
            work_on(s, unsafe { &*job });
        }
        s.busy.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        {
            let _slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

pub fn default_num_threads() -> usize {
    std::env::var("SLUICE_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A raw pointer that may cross into pool tasks, for ops whose tasks write disjoint parts of
/// one output buffer.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
// SAFETY: users guarantee that tasks write disjoint elements.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    pub fn new(s: &mut [T]) -> Self {
        Self(s.as_mut_ptr())
    }
    /// # Safety
    /// `start..start + len` must be in bounds and written by no other task at the same time.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn runs_every_task_once() {
        let pool = ThreadPool::new(3);
        for n in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            pool.run(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn many_back_to_back_jobs() {
        let pool = ThreadPool::new(2);
        let total = AtomicU64::new(0);
        for _ in 0..10_000 {
            pool.run(4, |i| {
                total.fetch_add(i as u64, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 60_000);
    }
}
