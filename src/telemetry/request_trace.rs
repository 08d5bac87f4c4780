//! One request's trace: a server span named `{operation} {model}` with the GenAI semantic
//! conventions' attributes (`gen_ai.*`; the latency attributes under vLLM's names, which its
//! users' dashboards read), and a `queue`, `prefill` and `decode` child per engine request,
//! timed by the engine.

use std::time::{Instant, SystemTime};

use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
use opentelemetry::{Array, StringValue, Value};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::engine::{FinishReason, GenerateRequest, RequestTimings, Usage};

/// `gen_ai.operation.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Chat,
    TextCompletion,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::TextCompletion => "text_completion",
        }
    }
}

/// The span of one generation request, from its arrival to its end. Inert (every method a
/// no-op) when traces are off. Dropped before `finish` or `fail` (the client went away),
/// it ends marked `error.type = cancelled`.
pub struct RequestTrace(Option<Box<Live>>);

struct Live {
    span: tracing::Span,
    finish_reasons: Vec<&'static str>,
    /// Every engine request's timings so far, merged.
    timings: Option<RequestTimings>,
    ended: bool,
}

impl RequestTrace {
    /// Opens the span under the current OpenTelemetry context (the caller's `traceparent`,
    /// attached by the API's router).
    pub fn start(operation: Operation) -> Self {
        if !super::enabled() {
            return Self(None);
        }
        let span = tracing::info_span!(
            target: super::TARGET,
            "gen_ai.request",
            otel.name = operation.as_str(),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        // An invalid or absent parent leaves the span a root.
        let _ = span.set_parent(opentelemetry::Context::current());
        span.set_attribute("gen_ai.operation.name", operation.as_str());
        span.set_attribute("gen_ai.provider.name", "sluice");
        Self(Some(Box::new(Live {
            span,
            finish_reasons: Vec::new(),
            timings: None,
            ended: false,
        })))
    }

    /// The trace in `slot` (left empty), or an inert one.
    pub fn taken(slot: &mut Option<Self>) -> Self {
        slot.take().unwrap_or(Self(None))
    }

    /// The model (and version) the request was routed to; names the span.
    pub fn model(&self, operation: Operation, name: &str, version: &str) {
        let Some(live) = &self.0 else { return };
        live.span
            .record("otel.name", format!("{} {name}", operation.as_str()));
        live.span
            .set_attribute("gen_ai.request.model", name.to_string());
        live.span
            .set_attribute("gen_ai.response.model", format!("{name}@{version}"));
    }

    /// The parameters of a submitted request (the first, when a completions request has
    /// several prompts: they share them) and the response's id.
    pub fn request(&self, response_id: &str, request: &GenerateRequest, num_prompts: usize) {
        let Some(live) = &self.0 else { return };
        let span = &live.span;
        let s = &request.sampling;
        span.set_attribute("gen_ai.response.id", response_id.to_string());
        span.set_attribute("gen_ai.request.max_tokens", request.max_tokens as i64);
        span.set_attribute("gen_ai.request.temperature", f64::from(s.temperature));
        span.set_attribute("gen_ai.request.top_p", f64::from(s.top_p));
        if s.top_k > 0 {
            span.set_attribute("gen_ai.request.top_k", s.top_k as i64);
        }
        span.set_attribute(
            "gen_ai.request.frequency_penalty",
            f64::from(s.frequency_penalty),
        );
        span.set_attribute(
            "gen_ai.request.presence_penalty",
            f64::from(s.presence_penalty),
        );
        if let Some(seed) = s.seed {
            // OTLP integers are signed 64-bit: a seed above i64::MAX keeps its bits.
            span.set_attribute("gen_ai.request.seed", seed as i64);
        }
        let choices = request.n * num_prompts;
        if choices != 1 {
            span.set_attribute("gen_ai.request.choice.count", choices as i64);
        }
        if !request.stop.is_empty() {
            span.set_attribute("gen_ai.request.stop_sequences", strings(&request.stop));
        }
        span.set_attribute("sluice.request.priority", i64::from(request.priority));
    }

    pub fn seq_finished(&mut self, reason: FinishReason) {
        if let Some(live) = &mut self.0 {
            live.finish_reasons.push(reason.as_str());
        }
    }

    /// One engine request ended: its queue, prefill and decode become children.
    pub fn engine_request_done(&mut self, t: RequestTimings) {
        let Some(live) = &mut self.0 else { return };
        let clock = Clock::now();
        let tracer = opentelemetry::global::tracer("sluice");
        let parent = live.span.context();
        let first_token = t.first_token.unwrap_or(t.finished);
        let stages = [
            ("queue", Some(t.queued), t.scheduled.unwrap_or(t.finished)),
            ("prefill", t.scheduled, first_token),
            ("decode", t.first_token, t.finished),
        ];
        for (name, start, end) in stages {
            let Some(start) = start else { continue };
            let mut child = tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(clock.at(start))
                .start_with_context(&tracer, &parent);
            child.end_with_timestamp(clock.at(end.max(start)));
        }
        live.timings = Some(live.timings.map_or(t, |m| m.merge(t)));
    }

    /// The request completed: usage, finish reasons and latencies.
    pub fn finish(mut self, usage: &Usage) {
        let Some(live) = &mut self.0 else { return };
        live.ended = true;
        let span = &live.span;
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens as i64);
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens as i64);
        span.set_attribute(
            "gen_ai.usage.cache_read.input_tokens",
            usage.cached_tokens as i64,
        );
        let reasons: Vec<String> = live.finish_reasons.iter().map(|r| r.to_string()).collect();
        span.set_attribute("gen_ai.response.finish_reasons", strings(&reasons));
        if let Some(t) = live.timings {
            let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
            let scheduled = t.scheduled.unwrap_or(t.finished);
            let first = t.first_token.unwrap_or(t.finished);
            span.set_attribute("gen_ai.latency.time_in_queue", secs(t.queued, scheduled));
            span.set_attribute("gen_ai.latency.time_to_first_token", secs(t.arrival, first));
            span.set_attribute(
                "gen_ai.latency.time_in_model_prefill",
                secs(scheduled, first),
            );
            span.set_attribute(
                "gen_ai.latency.time_in_model_decode",
                secs(first, t.finished),
            );
            span.set_attribute("gen_ai.latency.e2e", secs(t.arrival, t.finished));
        }
    }

    /// The request failed with an error of `kind` (the OpenAI error type, or a status).
    pub fn fail(mut self, kind: &str, message: &str) {
        if let Some(live) = &mut self.0 {
            live.ended = true;
            live.mark_error(kind, message);
        }
    }
}

impl Live {
    fn mark_error(&self, kind: &str, message: &str) {
        self.span.set_attribute("error.type", kind.to_string());
        self.span.record("otel.status_code", "ERROR");
        self.span.record("otel.status_description", message);
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        if let Some(live) = &self.0 {
            if !live.ended {
                live.span.set_attribute("error.type", "cancelled");
            }
        }
    }
}

fn strings(items: &[String]) -> Value {
    Value::Array(Array::String(
        items.iter().cloned().map(StringValue::from).collect(),
    ))
}

/// Engine `Instant`s as wall-clock times, through one reading of both clocks.
struct Clock {
    instant: Instant,
    system: SystemTime,
}

impl Clock {
    fn now() -> Self {
        Self {
            instant: Instant::now(),
            system: SystemTime::now(),
        }
    }

    fn at(&self, t: Instant) -> SystemTime {
        self.system - self.instant.saturating_duration_since(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_instants_map_to_wall_clock_in_order() {
        let clock = Clock::now();
        let earlier = clock.instant - std::time::Duration::from_millis(250);
        let at = clock.at(earlier);
        let back = clock.system.duration_since(at).unwrap();
        assert_eq!(back, std::time::Duration::from_millis(250));
        assert_eq!(clock.at(clock.instant), clock.system);
    }

    #[test]
    fn off_is_inert() {
        // Traces are off in unit tests: nothing is built, every call is a no-op.
        let mut t = RequestTrace::start(Operation::Chat);
        assert!(t.0.is_none());
        t.seq_finished(FinishReason::Stop);
        t.finish(&Usage::default());
    }
}
