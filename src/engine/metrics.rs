//! The engine's Prometheus metrics, named as vLLM names them with a `sluice:` prefix, with
//! vLLM's buckets, so that `/metrics` can also show them under vLLM's exact names
//! (`api::metrics`). Each engine has its own registry.

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
    /// From the first step that ran the request to its end, its first token, and from its
    /// first token to its end (vLLM's inference, prefill and decode times).
    pub request_inference_time_seconds: Histogram,
    pub request_prefill_time_seconds: Histogram,
    pub request_decode_time_seconds: Histogram,
    /// The longest choice of a finished request, in generated tokens.
    pub request_max_num_generation_tokens: Histogram,
    pub request_params_n: Histogram,
    pub request_params_max_tokens: Histogram,
    /// Tokens computed per engine step.
    pub iteration_tokens_total: Histogram,
    /// Whole engine step (plan, forward pass, sampling, output).
    pub step_seconds: Histogram,
    /// The forward pass of a step (submission to logits; sampling is not in it).
    pub forward_seconds: Histogram,
    /// KV-cache accounting violations found when the engine went idle.
    pub kv_accounting_errors_total: IntCounter,
    /// Speculative decoding: drafts verified, their tokens, the tokens accepted, and the
    /// tokens accepted at each draft position (`position` from 0).
    pub spec_decode_num_drafts_total: IntCounter,
    pub spec_decode_num_draft_tokens_total: IntCounter,
    pub spec_decode_num_accepted_tokens_total: IntCounter,
    pub spec_decode_num_accepted_tokens_per_pos_total: IntCounterVec,
    /// KV blocks the draft model's own pool holds (0 without one, and whenever idle).
    pub spec_decode_draft_kv_blocks: IntGauge,
}

/// vLLM's time-to-first-token buckets (and sluice's engine-step timings).
fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
    ]
}

/// vLLM's inter-token latency buckets.
fn token_latency_buckets() -> Vec<f64> {
    vec![
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0,
    ]
}

/// vLLM's buckets of whole-request times (end to end, queue, prefill, decode).
fn request_latency_buckets() -> Vec<f64> {
    vec![
        0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
        240.0, 480.0, 960.0, 1920.0, 7680.0,
    ]
}

/// vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to `max`.
fn buckets_1_2_5(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1usize;
    'grow: loop {
        for m in [1, 2, 5] {
            let v = m * scale;
            if v > max {
                break 'grow;
            }
            out.push(v as f64);
        }
        scale = scale.saturating_mul(10);
    }
    out
}

impl EngineMetrics {
    /// `max_model_len` bounds the token-count buckets, as in vLLM.
    pub fn new(max_model_len: usize) -> Self {
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
        let metrics = Self {
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
                token_latency_buckets()
            )),
            e2e_request_latency_seconds: reg!(hist(
                "sluice:e2e_request_latency_seconds",
                "Time from arrival to the last token.",
                request_latency_buckets()
            )),
            request_queue_time_seconds: reg!(hist(
                "sluice:request_queue_time_seconds",
                "Time from arrival to the first step that ran the request.",
                request_latency_buckets()
            )),
            request_prompt_tokens: reg!(hist(
                "sluice:request_prompt_tokens",
                "Prompt length of finished requests.",
                buckets_1_2_5(max_model_len)
            )),
            request_generation_tokens: reg!(hist(
                "sluice:request_generation_tokens",
                "Generated tokens of finished requests.",
                buckets_1_2_5(max_model_len)
            )),
            request_inference_time_seconds: reg!(hist(
                "sluice:request_inference_time_seconds",
                "Time from the first step that ran the request to its end.",
                request_latency_buckets()
            )),
            request_prefill_time_seconds: reg!(hist(
                "sluice:request_prefill_time_seconds",
                "Time from the first step that ran the request to its first token.",
                request_latency_buckets()
            )),
            request_decode_time_seconds: reg!(hist(
                "sluice:request_decode_time_seconds",
                "Time from the request's first token to its end.",
                request_latency_buckets()
            )),
            request_max_num_generation_tokens: reg!(hist(
                "sluice:request_max_num_generation_tokens",
                "Generated tokens of the longest choice of a finished request.",
                buckets_1_2_5(max_model_len)
            )),
            request_params_n: reg!(hist(
                "sluice:request_params_n",
                "The n of requests.",
                vec![1.0, 2.0, 5.0, 10.0, 20.0]
            )),
            request_params_max_tokens: reg!(hist(
                "sluice:request_params_max_tokens",
                "The max_tokens of requests (as validated: what the context left).",
                buckets_1_2_5(max_model_len)
            )),
            iteration_tokens_total: reg!(hist(
                "sluice:iteration_tokens_total",
                "Tokens computed per engine step.",
                vec![
                    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
                    8192.0, 16384.0
                ]
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
            spec_decode_num_drafts_total: reg!(IntCounter::new(
                "sluice:spec_decode_num_drafts_total",
                "Drafts verified (one per speculating sequence and step)."
            )),
            spec_decode_num_draft_tokens_total: reg!(IntCounter::new(
                "sluice:spec_decode_num_draft_tokens_total",
                "Draft tokens verified."
            )),
            spec_decode_num_accepted_tokens_total: reg!(IntCounter::new(
                "sluice:spec_decode_num_accepted_tokens_total",
                "Draft tokens accepted (equal to the target's own draw)."
            )),
            spec_decode_num_accepted_tokens_per_pos_total: reg!(IntCounterVec::new(
                Opts::new(
                    "sluice:spec_decode_num_accepted_tokens_per_pos_total",
                    "Draft tokens accepted at each position of their draft."
                ),
                &["position"]
            )),
            spec_decode_draft_kv_blocks: reg!(IntGauge::new(
                "sluice:spec_decode_draft_kv_blocks",
                "KV blocks held in the draft model's own pool."
            )),
            registry,
        };
        // Every label value exported from the start at 0, so `rate()` and alerts see a
        // series before the first error (a counter that appears at 1 loses its first rise).
        for kind in [
            super::EngineErrorKind::InvalidRequest,
            super::EngineErrorKind::Unavailable,
            super::EngineErrorKind::Internal,
        ] {
            metrics
                .request_errors_total
                .with_label_values(&[kind.as_str()]);
        }
        for reason in [
            super::FinishReason::Stop,
            super::FinishReason::Length,
            super::FinishReason::Abort,
        ] {
            metrics
                .request_success_total
                .with_label_values(&[reason.as_str()]);
        }
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_buckets_are_vllms_1_2_5_series_up_to_the_context() {
        assert_eq!(
            super::buckets_1_2_5(999),
            [1., 2., 5., 10., 20., 50., 100., 200., 500.]
        );
        assert_eq!(
            super::buckets_1_2_5(2000),
            [1., 2., 5., 10., 20., 50., 100., 200., 500., 1000., 2000.]
        );
    }
}
