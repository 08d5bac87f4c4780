//! Reading the engine's Prometheus metrics in tests, and the leak check's verdict. Shared by
//! `common` (engine-level tests) and `api_support` (tests against a real server).
#![allow(dead_code)]

use std::time::Duration;

/// The value of a metric in Prometheus text: an unlabelled one's value, or the sum over a
/// labelled one's series; 0 when absent. Read as `f64`, since gauges such as
/// `kv_cache_usage_perc` are fractions.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How long a leak check waits for the engine to go idle: far above any test's work, so only
/// a request that never ends (the bug this catches) runs into it.
pub const IDLE_WITHIN: Duration = Duration::from_secs(120);

/// Whether the metrics show nothing running and nothing waiting. The engine publishes these
/// gauges as zero only after its idle accounting check has run (`RequestTable::update_gauges`),
/// so once this holds, `kv_accounting_errors_total` includes that check.
pub fn idle(text: &str) -> bool {
    metric(text, "sluice:num_requests_running") == 0.0
        && metric(text, "sluice:num_requests_waiting") == 0.0
}

/// Every KV block free and no accounting error, in metrics taken while idle.
pub fn assert_no_leaks(text: &str) {
    assert_eq!(
        metric(text, "sluice:kv_cache_usage_perc"),
        0.0,
        "KV blocks still in use while idle"
    );
    assert_eq!(metric(text, "sluice:kv_accounting_errors_total"), 0.0);
}
