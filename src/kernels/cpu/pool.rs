//! A persistent thread pool for the CPU backend's ops.
//!
//! A decode step calls a few hundred small parallel ops (one per matmul, norm or attention
//! call), each a few microseconds to a millisecond long, so the cost of waking threads matters
//! more than their scheduling. Workers spin briefly on an epoch counter after each job and only
//! then sleep on a condition variable; the calling thread takes part in every job. Tasks are
//! handed out by an atomic counter, so uneven tasks balance themselves.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(200);
/// Spins of the calling thread, waiting for tasks in flight on other threads, before it
/// starts yielding its core (a worker descheduled mid-task must get to run).
const WAIT_SPINS: u32 = 2_000;

type Job = dyn Fn(usize) + Sync;

#[derive(Clone, Copy)]
struct JobRef(*const Job);
// SAFETY: the pointee is `Sync`; see `run` for why it is alive whenever it is called.
unsafe impl Send for JobRef {}

/// Task claims are `(epoch << 32) | next_task` in one atomic, so a thread can only claim a
/// task of the job it read: a claim of a finished job's epoch fails, and a job stays alive
/// until every claimed task of it is done. The caller never waits for workers that have not
/// joined, only for tasks in flight.
struct Shared {
    claims: AtomicU64,
    job: Mutex<JobSlot>,
    wake: Condvar,
    /// Tasks of the current job completed (or panicked).
    done: AtomicUsize,
    /// The first panic of the current job's tasks, re-raised on the caller by `run`.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    shutdown: AtomicBool,
}

/// The current job and who sleeps waiting for the next.
struct JobSlot {
    epoch: u32,
    job: Option<JobRef>,
    num_tasks: usize,
    /// Workers sleep as soon as this job is done, without spinning (see `run_then_rest`).
    rest: bool,
    /// Workers asleep on `wake`: a job is announced with a (system call) wake-up only when
    /// some are, not on each of a step's hundreds of jobs.
    sleepers: usize,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes `run` calls from different threads (the pool has one job slot).
    run_lock: Mutex<u32>,
}

impl ThreadPool {
    /// A pool of `num_threads` threads in all, the caller's included.
    pub fn new(num_threads: usize) -> Self {
        let shared = Arc::new(Shared {
            claims: AtomicU64::new(0),
            job: Mutex::new(JobSlot {
                epoch: 0,
                job: None,
                num_tasks: 0,
                rest: false,
                sleepers: 0,
            }),
            wake: Condvar::new(),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
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
            run_lock: Mutex::new(0),
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
    /// are done. If a task panics, the others still run and the first panic is re-raised here,
    /// on the caller (the pool's threads live on).
    pub fn run<F: Fn(usize) + Sync>(&self, num_tasks: usize, f: F) {
        self.run_job(num_tasks, f, false);
    }

    /// [`run`](Self::run) for the last job before the caller works alone for a while (the
    /// engine's sampling, before it streams a step's tokens): the workers sleep as soon as
    /// it is done instead of spinning, leaving their cores to other threads.
    pub fn run_then_rest<F: Fn(usize) + Sync>(&self, num_tasks: usize, f: F) {
        self.run_job(num_tasks, f, true);
    }

    fn run_job<F: Fn(usize) + Sync>(&self, num_tasks: usize, f: F, rest: bool) {
        if num_tasks == 0 {
            return;
        }
        if num_tasks == 1 || self.workers.is_empty() {
            (0..num_tasks).for_each(f);
            return;
        }
        let mut epoch_guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        *epoch_guard = epoch_guard.wrapping_add(1);
        let epoch = *epoch_guard;
        let s = &*self.shared;
        let job: &(dyn Fn(usize) + Sync + '_) = &f;
        // SAFETY: the lifetime is erased only while this call runs. A task can only be
        // claimed under this epoch (see `Shared`), and we return only once every claimed
        // task is done and the epoch is closed, so `f` is never called after we return.
        let job: &'static Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(job) };
        s.done.store(0, Ordering::Relaxed);
        let sleepers = {
            let mut slot = s.job.lock().unwrap_or_else(|e| e.into_inner());
            slot.epoch = epoch;
            slot.job = Some(JobRef(job));
            slot.num_tasks = num_tasks;
            slot.rest = rest;
            s.claims.store((epoch as u64) << 32, Ordering::Release);
            slot.sleepers
        };
        // A worker counts itself a sleeper under the lock before it waits, having seen no
        // new epoch; the epoch was published under the lock, so none can be missed.
        if sleepers > 0 {
            s.wake.notify_all();
        }
        work_on(s, epoch, job, num_tasks);
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < num_tasks {
            if spins < WAIT_SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let panicked = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = panicked {
            drop(epoch_guard);
            std::panic::resume_unwind(p);
        }
    }
}

/// Claims and runs tasks of job `epoch` until none are left.
fn work_on(s: &Shared, epoch: u32, job: &Job, num_tasks: usize) {
    let mut cur = s.claims.load(Ordering::Acquire);
    loop {
        if (cur >> 32) as u32 != epoch {
            return;
        }
        let i = (cur & 0xffff_ffff) as usize;
        if i >= num_tasks {
            return;
        }
        match s
            .claims
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // A panicking task must still count as done, or `run` would wait forever and a
                // worker thread would die; the caller re-raises it.
                if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(i))) {
                    let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
                    slot.get_or_insert(p);
                }
                s.done.fetch_add(1, Ordering::AcqRel);
                cur = s.claims.load(Ordering::Acquire);
            }
            Err(actual) => cur = actual,
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u32;
    let mut spin = SPIN;
    loop {
        let start = Instant::now();
        // Spin, then sleep, until a new epoch is published. The clock is read every 64th
        // spin: reading it each time was 3% of a busy step's samples.
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            if (s.claims.load(Ordering::Acquire) >> 32) as u32 != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            if spin.is_zero() || (spins.is_multiple_of(64) && start.elapsed() > spin) {
                let mut slot = s.job.lock().unwrap_or_else(|e| e.into_inner());
                while slot.epoch == seen && !s.shutdown.load(Ordering::Relaxed) {
                    slot.sleepers += 1;
                    slot = s.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                    slot.sleepers -= 1;
                }
                break;
            }
            std::hint::spin_loop();
        }
        let (epoch, job, n, rest) = {
            let slot = s.job.lock().unwrap_or_else(|e| e.into_inner());
            (slot.epoch, slot.job, slot.num_tasks, slot.rest)
        };
        seen = epoch;
        spin = if rest { Duration::ZERO } else { SPIN };
        if let Some(job) = job {
            // SAFETY: `work_on` calls the job only after claiming a task of its epoch, which
            // keeps the job alive (see `ThreadPool::run`).
            work_on(s, epoch, unsafe { &*job.0 }, n);
        }
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
    fn a_panicking_task_reaches_the_caller_and_the_pool_lives_on() {
        let pool = ThreadPool::new(2);
        for _ in 0..20 {
            let ran = AtomicU64::new(0);
            let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(8, |i| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    if i == 5 {
                        panic!("task 5");
                    }
                })
            }));
            assert!(got.is_err(), "the panic must reach the caller");
            assert_eq!(ran.load(Ordering::Relaxed), 8, "the other tasks still run");
        }
        let total = AtomicU64::new(0);
        pool.run(4, |i| {
            total.fetch_add(i as u64, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 6);
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
