//! The engine's Prometheus metrics, named as vLLM names them with a `sluice:` prefix so that
//! dashboards port over. Each engine has its own registry; `/metrics` renders it.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct EngineMetrics {
    pub registry: Registry,
    pub num_requests_running: IntGauge,
    pub num_requests_waiting: IntGauge,
    pub kv_cache_usage_perc: Gauge,
    pub prompt_tokens_total: IntCounter,
    pub generation_tokens_total: IntCounter,
    /// Prompt tokens the model actually computed (prefix-cache hits excluded, recomputation
    /// after preemption included).
    pub prompt_tokens_computed_total: IntCounter,
    pub prefix_cache_queries_total: IntCounter,
    pub prefix_cache_hits_total: IntCounter,
    pub num_preemptions_total: IntCounter,
    pub request_success_total: IntCounterVec,
    pub requests_rejected: IntCounter,
    pub request_errors_total: IntCounterVec,
    pub time_to_first_token_seconds: Histogram,
    pub inter_token_latency_seconds: Histogram,
    pub e2e_request_latency_seconds: Histogram,
    pub request_queue_time_seconds: Histogram,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    /// Whole engine step (plan, forward pass, sampling, output).
    pub step_seconds: Histogram,
    /// The forward pass of a step (submission to logits; sampling is not in it).
    pub forward_seconds: Histogram,
    /// KV-cache accounting violations found when the engine went idle.
    pub kv_accounting_errors_total: IntCounter,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0,
    ]
}

fn token_buckets() -> Vec<f64> {
    vec![
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
    ]
}

impl EngineMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definitions are static and valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };
        Self {
            num_requests_running: reg!(IntGauge::new(
                "sluice:num_requests_running",
                "Requests with sequences in the running batch."
            )),
            num_requests_waiting: reg!(IntGauge::new(
                "sluice:num_requests_waiting",
                "Requests waiting to start."
            )),
            kv_cache_usage_perc: reg!(Gauge::new(
                "sluice:kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (0 to 1)."
            )),
            prompt_tokens_total: reg!(IntCounter::new(
                "sluice:prompt_tokens_total",
                "Prompt tokens of finished and running requests."
            )),
            generation_tokens_total: reg!(IntCounter::new(
                "sluice:generation_tokens_total",
                "Generated tokens."
            )),
            prompt_tokens_computed_total: reg!(IntCounter::new(
                "sluice:prompt_tokens_computed_total",
                "Prompt tokens computed by the model (prefix-cache hits excluded)."
            )),
            prefix_cache_queries_total: reg!(IntCounter::new(
                "sluice:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache."
            )),
            prefix_cache_hits_total: reg!(IntCounter::new(
                "sluice:prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache."
            )),
            num_preemptions_total: reg!(IntCounter::new(
                "sluice:num_preemptions_total",
                "Sequences preempted for lack of KV-cache blocks."
            )),
            request_success_total: reg!(IntCounterVec::new(
                Opts::new("sluice:request_success_total", "Finished requests."),
                &["finished_reason"]
            )),
            requests_rejected: reg!(IntCounter::new(
                "sluice:num_requests_rejected_total",
                "Requests refused because the waiting queue was full."
            )),
            request_errors_total: reg!(IntCounterVec::new(
                Opts::new(
                    "sluice:request_errors_total",
                    "Requests that ended in an error."
                ),
                &["kind"]
            )),
            time_to_first_token_seconds: reg!(hist(
                "sluice:time_to_first_token_seconds",
                "Time from arrival to the first generated token.",
                latency_buckets()
            )),
            inter_token_latency_seconds: reg!(hist(
                "sluice:inter_token_latency_seconds",
                "Time between two generated tokens of a sequence.",
                latency_buckets()
            )),
            e2e_request_latency_seconds: reg!(hist(
                "sluice:e2e_request_latency_seconds",
                "Time from arrival to the last token.",
                latency_buckets()
            )),
            request_queue_time_seconds: reg!(hist(
                "sluice:request_queue_time_seconds",
                "Time from arrival to the first step that ran the request.",
                latency_buckets()
            )),
            request_prompt_tokens: reg!(hist(
                "sluice:request_prompt_tokens",
                "Prompt length of finished requests.",
                token_buckets()
            )),
            request_generation_tokens: reg!(hist(
                "sluice:request_generation_tokens",
                "Generated tokens of finished requests.",
                token_buckets()
            )),
            step_seconds: reg!(hist(
                "sluice:engine_step_seconds",
                "Duration of one engine step.",
                latency_buckets()
            )),
            forward_seconds: reg!(hist(
                "sluice:engine_forward_seconds",
                "Duration of the forward pass of one step (to its logits, before sampling).",
                latency_buckets()
            )),
            kv_accounting_errors_total: reg!(IntCounter::new(
                "sluice:kv_accounting_errors_total",
                "KV-cache accounting violations found when the engine went idle."
            )),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self::new()
    }
}
