//! What the request table publishes: the gauges, the scheduler's counters, what admission
//! reads (free sequence slots, the queue's drain rate), and the idle accounting check.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::RequestTable;
use crate::scheduler::Scheduler;

impl RequestTable {
    /// Publishes the gauges and the scheduler's counters. `idle`: the engine has nothing to
    /// run and nothing running; the first time since it last went idle, the KV accounting is
    /// checked before the zeros are published.
    pub fn update_gauges(&mut self, scheduler: &Scheduler, idle: bool) {
        if idle && !self.idle_checked {
            self.idle_checked = true;
            self.check_idle_accounting(scheduler);
        }
        self.publish_admission(scheduler);
        let m = &self.metrics;
        // The KV usage before the request counts: whoever reads zero requests then also
        // reads the usage of that moment (the leak checks rely on it).
        m.kv_cache_usage_perc.set(scheduler.kv_usage());
        let running = self.requests.values().filter(|r| r.started).count();
        m.num_requests_waiting
            .set(self.shared.num_waiting.load(Ordering::Acquire) as i64);
        m.num_requests_running.set(running as i64);
        let prefix = scheduler.prefix_cache_stats();
        let (q, h) = (prefix.num_query_tokens, prefix.num_hit_tokens);
        m.prefix_cache_queries_total
            .inc_by(q.saturating_sub(self.exported_prefix.0));
        m.prefix_cache_hits_total
            .inc_by(h.saturating_sub(self.exported_prefix.1));
        self.exported_prefix = (q, h);
        let c = scheduler.counters();
        m.num_preemptions_total.inc_by(
            c.num_preemptions_total
                .saturating_sub(self.exported_counters.0),
        );
        m.prompt_tokens_computed_total.inc_by(
            c.num_computed_prompt_tokens_total
                .saturating_sub(self.exported_counters.1),
        );
        self.exported_counters = (c.num_preemptions_total, c.num_computed_prompt_tokens_total);
    }

    /// What `EngineHandle::submit` admits by: the sequence slots free in the running batch,
    /// and (about once a second while requests wait) the queue's drain rate, smoothed.
    fn publish_admission(&mut self, scheduler: &Scheduler) {
        let max_seqs = scheduler.config().max_num_seqs;
        let free = max_seqs.saturating_sub(scheduler.num_running());
        self.shared.free_seq_slots.store(free, Ordering::Release);
        let (since, started) = self.drain_window;
        let elapsed = since.elapsed().as_secs_f64();
        if elapsed < 1.0 {
            return;
        }
        let waiting = self.shared.num_waiting.load(Ordering::Acquire);
        if waiting > 0 || started > 0 {
            let now = started as f64 / elapsed;
            let old = f64::from_bits(self.shared.drain_per_sec.load(Ordering::Acquire));
            let rate = if old > 0.0 {
                0.5 * old + 0.5 * now
            } else {
                now
            };
            self.shared
                .drain_per_sec
                .store(rate.to_bits(), Ordering::Release);
        }
        self.drain_window = (Instant::now(), 0);
    }

    /// The accounting check whenever the engine goes idle: every block must be free. A panic
    /// in debug and `checked` builds; an error log and `kv_accounting_errors_total` in release.
    fn check_idle_accounting(&self, scheduler: &Scheduler) {
        if let Err(e) = scheduler.check_invariants() {
            self.metrics.kv_accounting_errors_total.inc();
            tracing::error!("KV-cache accounting is wrong while idle: {e}");
            crate::checked_assert!(false, "KV-cache accounting is wrong while idle: {e}");
        }
        let kv = scheduler.kv_cache();
        if kv.num_free_blocks() != kv.num_blocks() {
            self.metrics.kv_accounting_errors_total.inc();
            let msg = format!(
                "{} of {} KV blocks are not free while idle",
                kv.num_blocks() - kv.num_free_blocks(),
                kv.num_blocks()
            );
            tracing::error!("{msg}");
            crate::checked_assert!(false, "{msg}");
        }
    }
}
