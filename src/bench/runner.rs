//! Load shapes: when each request is sent.
//!
//! * Closed loop (`--concurrency N`): N workers, each sending its next request as soon as its
//!   last one ends, so exactly N are in flight until the stop condition.
//! * Open loop (`--request-rate R`): arrivals with gamma-distributed gaps of mean 1/R and shape
//!   `burstiness` (1 = Poisson), independent of how fast the server answers, optionally capped
//!   at `max_concurrency` in flight (a capped arrival waits for a free slot).
//!
//! Warm-up requests run first, closed loop, and are discarded. The stop condition is a number
//! of requests or a duration; with a duration, no request starts after it and those in flight
//! finish and count. Requests cycle through the workload's bodies. An interrupt (Ctrl-C in
//! `sluice bench serve`) is one more stop condition: nothing new starts, in-flight requests
//! finish, and the report covers what ran.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{watch, Semaphore};

use super::client::{Driver, RequestRecord};
use super::sysinfo::{cpu_times, CpuTimes};
use super::workload::PreparedRequest;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadShape {
    Closed {
        concurrency: usize,
    },
    Open {
        /// mean arrivals per second; infinite sends everything at once
        rate: f64,
        /// gamma shape of the gaps: 1 is Poisson, < 1 burstier, > 1 more regular
        burstiness: f64,
        max_concurrency: Option<usize>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StopAt {
    Requests(usize),
    Duration(Duration),
}

#[derive(Debug, Clone)]
pub struct RunPlan {
    pub shape: LoadShape,
    pub stop: StopAt,
    pub warmup_requests: usize,
    /// seeds the arrival times
    pub seed: u64,
}

/// What a run measured.
#[derive(Debug)]
pub struct RunOutcome {
    /// sorted by send time
    pub records: Vec<RequestRecord>,
    /// from the first send to the last answer, in seconds
    pub wall_s: f64,
    /// the bench process's own CPU time over `wall_s` (None off Linux)
    pub client_cpu: Option<CpuTimes>,
    /// the run was cut short by the interrupt
    pub interrupted: bool,
    /// the wall-clock time of `origin`, in Unix milliseconds
    pub origin_unix_ms: Option<u64>,
}

/// Runs the warm-up, then the measured load.
pub async fn run_load(
    driver: Arc<Driver>,
    bodies: Arc<Vec<PreparedRequest>>,
    plan: &RunPlan,
    progress: ProgressBar,
) -> RunOutcome {
    // The sender stays alive for the whole run, so the interrupt never fires.
    let (_never, interrupt) = watch::channel(false);
    run_load_until(driver, bodies, plan, progress, interrupt).await
}

/// `run_load`, stopping early (gracefully) once `interrupt` turns true.
pub async fn run_load_until(
    driver: Arc<Driver>,
    bodies: Arc<Vec<PreparedRequest>>,
    plan: &RunPlan,
    progress: ProgressBar,
    interrupt: watch::Receiver<bool>,
) -> RunOutcome {
    let ctx = LoopContext {
        driver,
        bodies,
        interrupt,
    };
    if plan.warmup_requests > 0 && !ctx.bodies.is_empty() {
        let in_flight = match plan.shape {
            LoadShape::Closed { concurrency } => concurrency,
            LoadShape::Open {
                max_concurrency, ..
            } => max_concurrency.unwrap_or(plan.warmup_requests),
        };
        let warmup = StopAt::Requests(plan.warmup_requests);
        let hidden = ProgressBar::hidden();
        let workers = in_flight.clamp(1, plan.warmup_requests);
        closed_loop(&ctx, workers, warmup, Instant::now(), &hidden).await;
    }
    let cpu_before = cpu_times();
    let origin = Instant::now();
    let origin_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64);
    let mut records = if ctx.bodies.is_empty() {
        Vec::new()
    } else {
        match plan.shape {
            LoadShape::Closed { concurrency } => {
                closed_loop(&ctx, concurrency, plan.stop, origin, &progress).await
            }
            LoadShape::Open {
                rate,
                burstiness,
                max_concurrency,
            } => {
                let gaps = Arrivals::new(rate, burstiness, plan.seed);
                let cap = max_concurrency.map(|n| Arc::new(Semaphore::new(n.max(1))));
                open_loop(&ctx, gaps, cap, plan.stop, origin, &progress).await
            }
        }
    };
    let wall_s = origin.elapsed().as_secs_f64();
    let client_cpu = cpu_before.zip(cpu_times()).map(|(a, b)| b.since(&a));
    progress.finish();
    records.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    RunOutcome {
        records,
        wall_s,
        client_cpu,
        interrupted: ctx.interrupted(),
        origin_unix_ms,
    }
}

/// What every loop needs: the driver, the requests, and the interrupt.
struct LoopContext {
    driver: Arc<Driver>,
    bodies: Arc<Vec<PreparedRequest>>,
    interrupt: watch::Receiver<bool>,
}

impl LoopContext {
    fn interrupted(&self) -> bool {
        *self.interrupt.borrow()
    }
}

async fn closed_loop(
    ctx: &LoopContext,
    concurrency: usize,
    stop: StopAt,
    origin: Instant,
    progress: &ProgressBar,
) -> Vec<RequestRecord> {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (driver, bodies, interrupt, next, progress) = (
                ctx.driver.clone(),
                ctx.bodies.clone(),
                ctx.interrupt.clone(),
                next.clone(),
                progress.clone(),
            );
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let go_on = match stop {
                        StopAt::Requests(n) => i < n,
                        StopAt::Duration(d) => origin.elapsed() < d,
                    };
                    if !go_on || *interrupt.borrow() {
                        break;
                    }
                    out.push(send(&driver, &bodies[i % bodies.len()], origin).await);
                    progress.inc(1);
                }
                out
            })
        })
        .collect();
    join_all(workers).await
}

async fn open_loop(
    ctx: &LoopContext,
    mut arrivals: Arrivals,
    cap: Option<Arc<Semaphore>>,
    stop: StopAt,
    origin: Instant,
    progress: &ProgressBar,
) -> Vec<RequestRecord> {
    let mut tasks = Vec::new();
    let mut next_at = origin;
    for i in 0.. {
        let go_on = match stop {
            StopAt::Requests(n) => i < n,
            StopAt::Duration(d) => next_at.saturating_duration_since(origin) < d,
        };
        if !go_on || ctx.interrupted() {
            break;
        }
        let mut interrupt = ctx.interrupt.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(next_at.into()) => {}
            // An error means no interrupt can come any more: the branch is then disabled.
            Ok(()) = interrupt.changed() => continue, // re-checked at the top
        }
        let permit = match &cap {
            // A closed semaphore cannot happen (we never close it); send uncapped if it did.
            Some(sem) => sem.clone().acquire_owned().await.ok(),
            None => None,
        };
        let (driver, bodies, progress) = (ctx.driver.clone(), ctx.bodies.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let record = send(&driver, &bodies[i % bodies.len()], origin).await;
            drop(permit);
            progress.inc(1);
            vec![record]
        }));
        next_at += arrivals.next_gap();
    }
    join_all(tasks).await
}

async fn send(driver: &Driver, req: &PreparedRequest, origin: Instant) -> RequestRecord {
    let mut record = driver.send(&req.body, origin).await;
    if record.input_tokens.is_none() {
        record.input_tokens = req.input_len.map(|n| n as u64);
    }
    record
}

async fn join_all(tasks: Vec<tokio::task::JoinHandle<Vec<RequestRecord>>>) -> Vec<RequestRecord> {
    let mut out = Vec::new();
    for task in tasks {
        match task.await {
            Ok(records) => out.extend(records),
            // A driver never panics on server input; if it did, say so rather than hide it.
            Err(e) => tracing::error!("request task failed: {e}"),
        }
    }
    out
}

/// Gamma-distributed inter-arrival gaps (vLLM's `--burstiness`): shape k = burstiness,
/// scale 1/(rate·k), so the mean gap is 1/rate whatever the shape.
#[derive(Debug)]
pub struct Arrivals {
    rate: f64,
    shape: f64,
    rng: ChaCha8Rng,
}

impl Arrivals {
    pub fn new(rate: f64, burstiness: f64, seed: u64) -> Self {
        Arrivals {
            rate,
            shape: burstiness,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn next_gap(&mut self) -> Duration {
        if !self.rate.is_finite() {
            return Duration::ZERO;
        }
        let gap = sample_gamma(self.shape, &mut self.rng) / (self.rate * self.shape);
        Duration::from_secs_f64(gap.max(0.0))
    }
}

/// A Gamma(shape, 1) sample (Marsaglia–Tsang; boosted for shape < 1).
fn sample_gamma(shape: f64, rng: &mut ChaCha8Rng) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return sample_gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box–Muller; u1 in (0, 1] so the log is finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(rate: f64, burstiness: f64, n: usize) -> Vec<f64> {
        let mut a = Arrivals::new(rate, burstiness, 3);
        (0..n).map(|_| a.next_gap().as_secs_f64()).collect()
    }

    fn mean_and_cv(xs: &[f64]) -> (f64, f64) {
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn poisson_gaps_have_the_right_mean_and_spread() {
        let (mean, cv) = mean_and_cv(&gaps(10.0, 1.0, 20_000));
        assert!((mean - 0.1).abs() < 0.005, "mean {mean}");
        assert!((cv - 1.0).abs() < 0.05, "cv {cv}"); // exponential: cv = 1
    }

    #[test]
    fn burstiness_keeps_the_mean_and_changes_the_spread() {
        // gamma with shape k has cv = 1/sqrt(k)
        for k in [0.25, 4.0] {
            let (mean, cv) = mean_and_cv(&gaps(10.0, k, 40_000));
            assert!((mean - 0.1).abs() < 0.006, "k {k} mean {mean}");
            assert!((cv - 1.0 / f64::sqrt(k)).abs() < 0.1, "k {k} cv {cv}");
        }
    }

    #[test]
    fn infinite_rate_sends_at_once() {
        assert!(gaps(f64::INFINITY, 1.0, 10).iter().all(|&g| g == 0.0));
    }
}
