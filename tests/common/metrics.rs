//! Reading the engine's Prometheus metrics in tests, and the leak check's verdict. Shared by
//! `common` (engine-level tests) and `api_support` (tests against a real server).
#![allow(dead_code)]

use std::time::Duration;

/// The value of a metric in Prometheus text: the sum over its series, or over those whose
/// labels include every label of a selector such as `name{finished_reason="abort"}` (series
/// carry other labels too, `model_name` at least); 0 when absent. Read as `f64`, since gauges
/// such as `kv_cache_usage_perc` are fractions.
pub fn metric(text: &str, selector: &str) -> f64 {
    let (name, wanted) = match selector.split_once('{') {
        Some((name, labels)) => (name, labels.trim_end_matches('}')),
        None => (selector, ""),
    };
    let wanted: Vec<&str> = wanted.split(',').filter(|l| !l.is_empty()).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = match series.strip_prefix(name)? {
                "" => "",
                rest => rest.strip_prefix('{')?.strip_suffix('}')?,
            };
            let have: Vec<&str> = labels.split(',').collect();
            wanted
                .iter()
                .all(|w| have.contains(w))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[test]
fn metric_selectors_match_label_subsets() {
    let text = "# TYPE x counter\nx_total{model_name=\"m\",reason=\"abort\"} 2\n\
                x_total{model_name=\"m\",reason=\"stop\"} 3\nx_total_more 7\ny 1.5\n";
    assert_eq!(metric(text, "x_total"), 5.0);
    assert_eq!(metric(text, "x_total{reason=\"abort\"}"), 2.0);
    assert_eq!(metric(text, "y"), 1.5);
    assert_eq!(metric(text, "z"), 0.0);
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
    assert_eq!(
        metric(text, "sluice:spec_decode_draft_kv_blocks"),
        0.0,
        "draft-model KV blocks still in use while idle"
    );
}
