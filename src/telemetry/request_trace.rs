//! One request's trace and its summary log line: a server span named `{operation} {model}` with the GenAI semantic
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
    Embeddings,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::TextCompletion => "text_completion",
            Self::Embeddings => "embeddings",
        }
    }
}

/// One generation request from its arrival to its end: its span (when traces are on) and its
/// summary log line (always: target `sluice::request`, with the request id, model, tokens,
/// finish reasons and latencies). Dropped before `finish` or `fail` (the client went away),
/// it ends as `cancelled`.
pub struct RequestTrace(Option<Box<Live>>);

struct Live {
    /// `None` when traces are off.
    span: Option<tracing::Span>,
    operation: Operation,
    /// The `x-request-id` the response carries (`api/access_log.rs`), when there is one.
    request_id: Option<String>,
    model: String,
    finish_reasons: Vec<&'static str>,
    ended: bool,
}

tokio::task_local! {
    /// The id of the HTTP request being handled, set by the access log around the handler.
    pub static REQUEST_ID: String;
}

impl RequestTrace {
    /// Opens the span under the current OpenTelemetry context (the caller's `traceparent`,
    /// attached by the API's router).
    pub fn start(operation: Operation) -> Self {
        let span = super::enabled().then(|| {
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
            span
        });
        Self(Some(Box::new(Live {
            span,
            operation,
            request_id: REQUEST_ID.try_with(String::clone).ok(),
            model: String::new(),
            finish_reasons: Vec::new(),
            ended: false,
        })))
    }

    /// The trace in `slot` (left empty), or one that records nothing.
    pub fn taken(slot: &mut Option<Self>) -> Self {
        slot.take().unwrap_or(Self(None))
    }

    fn span(&self) -> Option<&tracing::Span> {
        self.0.as_ref().and_then(|l| l.span.as_ref())
    }

    /// The model (and version) the request was routed to; names the span.
    pub fn model(&mut self, name: &str, version: &str) {
        let Some(live) = &mut self.0 else { return };
        live.model = format!("{name}@{version}");
        let Some(span) = &live.span else { return };
        span.record("otel.name", format!("{} {name}", live.operation.as_str()));
        span.set_attribute("gen_ai.request.model", name.to_string());
        span.set_attribute("gen_ai.response.model", live.model.clone());
    }

    /// The parameters of a submitted request (the first, when a completions request has
    /// several prompts: they share them) and the response's id.
    pub fn request(&self, response_id: &str, request: &GenerateRequest, num_prompts: usize) {
        let Some(span) = self.span() else { return };
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
    pub fn engine_request_done(&self, t: RequestTimings) {
        let Some(span) = self.span() else { return };
        let clock = Clock::now();
        let tracer = opentelemetry::global::tracer("sluice");
        let parent = span.context();
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
    }

    /// The request completed: usage, finish reasons and latencies (`timings`: every engine
    /// request's, merged).
    pub fn finish(mut self, usage: &Usage, timings: RequestTimings) {
        let Some(live) = &mut self.0 else { return };
        live.ended = true;
        let l = Latencies::of(timings);
        let reasons = live.finish_reasons.join(",");
        tracing::info!(
            target: "sluice::request",
            request_id = live.request_id.as_deref().unwrap_or(""),
            operation = live.operation.as_str(),
            model = %live.model,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            cached_tokens = usage.cached_tokens,
            finish_reasons = %reasons,
            ttft_ms = l.ttft * 1e3,
            e2e_ms = l.e2e * 1e3,
            "request finished"
        );
        let Some(span) = &live.span else { return };
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens as i64);
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens as i64);
        span.set_attribute(
            "gen_ai.usage.cache_read.input_tokens",
            usage.cached_tokens as i64,
        );
        let reasons: Vec<String> = live.finish_reasons.iter().map(|r| r.to_string()).collect();
        span.set_attribute("gen_ai.response.finish_reasons", strings(&reasons));
        span.set_attribute("gen_ai.latency.time_in_queue", l.queue);
        span.set_attribute("gen_ai.latency.time_to_first_token", l.ttft);
        span.set_attribute("gen_ai.latency.time_in_model_prefill", l.prefill);
        span.set_attribute("gen_ai.latency.time_in_model_decode", l.decode);
        span.set_attribute("gen_ai.latency.e2e", l.e2e);
    }

    /// The request failed with an error of `kind` (the HTTP status).
    pub fn fail(mut self, kind: &str, message: &str) {
        if let Some(live) = &mut self.0 {
            live.ended = true;
            live.end_with_error(kind, message);
        }
    }
}

impl Live {
    fn end_with_error(&self, kind: &str, message: &str) {
        tracing::info!(
            target: "sluice::request",
            request_id = self.request_id.as_deref().unwrap_or(""),
            operation = self.operation.as_str(),
            model = %self.model,
            error = kind,
            message,
            "request failed"
        );
        if let Some(span) = &self.span {
            span.set_attribute("error.type", kind.to_string());
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", message);
        }
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        if let Some(live) = &self.0 {
            if !live.ended {
                live.end_with_error("cancelled", "the client went away");
            }
        }
    }
}

/// A finished request's stage times, in seconds.
struct Latencies {
    queue: f64,
    ttft: f64,
    prefill: f64,
    decode: f64,
    e2e: f64,
}

impl Latencies {
    fn of(t: RequestTimings) -> Self {
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        let scheduled = t.scheduled.unwrap_or(t.finished);
        let first = t.first_token.unwrap_or(t.finished);
        Self {
            queue: secs(t.queued, scheduled),
            ttft: secs(t.arrival, first),
            prefill: secs(scheduled, first),
            decode: secs(first, t.finished),
            e2e: secs(t.arrival, t.finished),
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
    fn without_traces_no_span_is_built() {
        let mut t = RequestTrace::start(Operation::Chat);
        assert!(t.span().is_none());
        t.model("m", "1");
        t.seq_finished(FinishReason::Stop);
        let now = Instant::now();
        let timings = RequestTimings {
            arrival: now,
            queued: now,
            scheduled: Some(now),
            first_token: Some(now),
            finished: now,
        };
        t.engine_request_done(timings);
        t.finish(&Usage::default(), timings);
    }
}
