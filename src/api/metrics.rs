//! `/metrics`: every engine's registry in Prometheus text, every series labelled with its
//! `model_name` and `version`, under sluice's names, vLLM's, or both (`--metrics-names`).
//!
//! vLLM's names are what the tools an operator already runs read: the Gateway API Inference
//! Extension's endpoint picker (`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
//! `vllm:cache_config_info`, ...) and the community dashboards. The engine records each
//! quantity once, with vLLM's buckets; the vLLM family is the same data renamed at render
//! time, with vLLM's `engine` label, so both sets cost nothing on the hot path.

use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

use std::sync::Arc;
use std::time::Duration;

use crate::engine::EngineInfo;
use crate::registry::ServedModel;

/// Which names `/metrics` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricNames {
    /// `sluice:*` only.
    Sluice,
    /// vLLM's names only (`vllm:*`), for tools that read nothing else.
    Vllm,
    /// Both: dashboards and the inference gateway read `vllm:*`, sluice's own alerts and
    /// tests `sluice:*`; the cost is a second copy of the text.
    #[default]
    Both,
}

/// sluice's name and vLLM's, for each metric vLLM exports with the same meaning, type, unit
/// and buckets (vLLM V1, `vllm/v1/metrics/loggers.py`).
pub const VLLM_NAMES: [(&str, &str); 26] = [
    ("sluice:num_requests_running", "vllm:num_requests_running"),
    ("sluice:num_requests_waiting", "vllm:num_requests_waiting"),
    ("sluice:kv_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    (
        "sluice:prefix_cache_queries_total",
        "vllm:prefix_cache_queries_total",
    ),
    (
        "sluice:prefix_cache_hits_total",
        "vllm:prefix_cache_hits_total",
    ),
    ("sluice:num_preemptions_total", "vllm:num_preemptions_total"),
    ("sluice:prompt_tokens_total", "vllm:prompt_tokens_total"),
    (
        "sluice:generation_tokens_total",
        "vllm:generation_tokens_total",
    ),
    ("sluice:request_success_total", "vllm:request_success_total"),
    ("sluice:request_prompt_tokens", "vllm:request_prompt_tokens"),
    (
        "sluice:request_generation_tokens",
        "vllm:request_generation_tokens",
    ),
    (
        "sluice:iteration_tokens_total",
        "vllm:iteration_tokens_total",
    ),
    (
        "sluice:request_max_num_generation_tokens",
        "vllm:request_max_num_generation_tokens",
    ),
    ("sluice:request_params_n", "vllm:request_params_n"),
    (
        "sluice:request_params_max_tokens",
        "vllm:request_params_max_tokens",
    ),
    (
        "sluice:time_to_first_token_seconds",
        "vllm:time_to_first_token_seconds",
    ),
    (
        "sluice:inter_token_latency_seconds",
        "vllm:inter_token_latency_seconds",
    ),
    (
        "sluice:e2e_request_latency_seconds",
        "vllm:e2e_request_latency_seconds",
    ),
    (
        "sluice:request_queue_time_seconds",
        "vllm:request_queue_time_seconds",
    ),
    (
        "sluice:request_inference_time_seconds",
        "vllm:request_inference_time_seconds",
    ),
    (
        "sluice:request_prefill_time_seconds",
        "vllm:request_prefill_time_seconds",
    ),
    (
        "sluice:request_decode_time_seconds",
        "vllm:request_decode_time_seconds",
    ),
    (
        "sluice:spec_decode_num_drafts_total",
        "vllm:spec_decode_num_drafts_total",
    ),
    (
        "sluice:spec_decode_num_draft_tokens_total",
        "vllm:spec_decode_num_draft_tokens_total",
    ),
    (
        "sluice:spec_decode_num_accepted_tokens_total",
        "vllm:spec_decode_num_accepted_tokens_total",
    ),
    (
        "sluice:spec_decode_num_accepted_tokens_per_pos_total",
        "vllm:spec_decode_num_accepted_tokens_per_pos_total",
    ),
];

fn vllm_name(sluice_name: &str) -> Option<&'static str> {
    VLLM_NAMES
        .iter()
        .find(|(s, _)| *s == sluice_name)
        .map(|(_, v)| *v)
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

/// Puts `extra` labels first on every series of `family`.
fn with_labels(mut family: MetricFamily, extra: &[LabelPair]) -> MetricFamily {
    for m in family.mut_metric() {
        let mut labels = extra.to_vec();
        labels.extend(m.take_label());
        m.set_label(labels);
    }
    family
}

/// vLLM's `cache_config_info`: a gauge at 1 whose labels describe the KV cache (the
/// inference gateway reads `block_size` and `num_gpu_blocks` from it).
fn cache_config_info(info: &EngineInfo, engine: &str, model: &[LabelPair]) -> MetricFamily {
    let num_blocks = info.kv_cache_tokens / info.block_size.max(1);
    let mut gauge = Gauge::default();
    gauge.set_value(1.0);
    let mut metric = Metric::from_gauge(gauge);
    metric.set_label(vec![
        label("block_size", &info.block_size.to_string()),
        label("cache_dtype", "auto"),
        label("enable_prefix_caching", &info.prefix_caching.to_string()),
        label("engine", engine),
        model[0].clone(),
        label("num_gpu_blocks", &num_blocks.to_string()),
        model[1].clone(),
    ]);
    let mut family = MetricFamily::default();
    family.set_name("vllm:cache_config_info".into());
    family.set_help("Information of the LLMEngine CacheConfig".into());
    family.set_field_type(MetricType::GAUGE);
    family.set_metric(vec![metric]);
    family
}

/// `sluice:engine_ready`: 1 while a version's engine makes progress (a step completed, or
/// idle and awake, within `--health-max-silence`: what `/health/ready` asks), 0 when wedged or
/// stopped; read at scrape time, so an alert sees a wedged engine that no counter would show.
fn engine_ready(served: &ServedModel, max_silence: Duration, labels: &[LabelPair]) -> MetricFamily {
    let mut gauge = Gauge::default();
    gauge.set_value(f64::from(u8::from(served.engine.is_healthy(max_silence))));
    let mut metric = Metric::from_gauge(gauge);
    metric.set_label(labels.to_vec());
    let mut family = MetricFamily::default();
    family.set_name("sluice:engine_ready".into());
    family.set_help(
        "1 when the engine completed a step or idled within --health-max-silence, else 0.".into(),
    );
    family.set_field_type(MetricType::GAUGE);
    family.set_metric(vec![metric]);
    family
}

/// The Prometheus text `/metrics` serves: every loaded version's engine (serving or
/// draining), each series labelled with its `model_name` and `version`, the families of
/// several engines merged under one header each.
pub fn exposition(
    engines: &[Arc<ServedModel>],
    names: MetricNames,
    max_silence: Duration,
) -> String {
    let mut families: Vec<MetricFamily> = Vec::new();
    let mut add =
        |family: MetricFamily| match families.iter_mut().find(|f| f.name() == family.name()) {
            Some(f) => f.mut_metric().extend(family.get_metric().iter().cloned()),
            None => families.push(family),
        };
    for (i, served) in engines.iter().enumerate() {
        let (model, version) = (served.name.as_str(), served.version.as_str());
        let labels = [label("model_name", model), label("version", version)];
        let engine = i.to_string();
        let vllm_labels = [
            label("engine", &engine),
            labels[0].clone(),
            labels[1].clone(),
        ];
        for family in served.engine.metrics.registry.gather() {
            if names != MetricNames::Sluice {
                if let Some(vllm) = vllm_name(family.name()) {
                    let mut renamed = family.clone();
                    renamed.set_name(vllm.to_string());
                    add(with_labels(renamed, &vllm_labels));
                }
            }
            if names != MetricNames::Vllm {
                add(with_labels(family, &labels));
            }
        }
        if names != MetricNames::Sluice {
            add(cache_config_info(&served.engine.info, &engine, &labels));
        }
        if names != MetricNames::Vllm {
            add(engine_ready(served, max_silence, &labels));
        }
    }
    let mut buf = Vec::new();
    // Encoding into a Vec cannot fail for well-formed metric families.
    let _ = TextEncoder::new().encode(&families, &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
