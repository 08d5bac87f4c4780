//! Traces: OpenTelemetry over OTLP/gRPC, on with `--otlp-traces-endpoint`.
//!
//! Each generation request is one `tracing` span (`request_trace.rs`), exported through
//! `tracing-opentelemetry`, whose parent is the caller's W3C `traceparent` when it sent one;
//! its children (queueing, prefill, decode) are built from the engine's own timestamps when
//! the request ends, so they cost the engine thread nothing. Export is batched on a thread of
//! the SDK's, through a tonic channel that lives on a small runtime of its own: the server's
//! runtime never waits on the collector, and a collector that is down loses spans, not
//! requests.

mod request_trace;

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

pub use request_trace::{Operation, RequestTrace, REQUEST_ID};

/// The `tracing` target of request spans: only these (and warnings) reach the exporter.
pub const TARGET: &str = "sluice::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported (requests build no span otherwise).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--otlp-traces-endpoint {endpoint}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("cannot start the trace exporter's runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Exports traces until dropped; dropping flushes what is pending (bounded by the SDK's
/// export timeout) and stops the exporter.
pub struct TracesGuard {
    provider: SdkTracerProvider,
    /// Where the exporter's tonic channel runs; dropped after the provider's shutdown.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for TracesGuard {
    fn drop(&mut self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            eprintln!("warning: flushing traces at exit: {e}");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Starts exporting to `endpoint` (`http://host:4317`, OTLP over gRPC) and returns the
/// layer that feeds it. The service name is `OTEL_SERVICE_NAME` when set, else `sluice`; the
/// sampler is the SDK's default (parent-based, always on), or `OTEL_TRACES_SAMPLER`.
pub fn init_traces<S>(
    endpoint: &str,
) -> Result<(TracesGuard, impl Layer<S> + Send + Sync + 'static), TelemetryError>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let bad = |message: String| TelemetryError::Endpoint {
        endpoint: endpoint.to_string(),
        message,
    };
    let uri: http::Uri = endpoint.parse().map_err(|e| bad(format!("{e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(bad("expected http://host:port (OTLP over gRPC)".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()?;
    // The channel's background task is spawned on the runtime current at its creation.
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| bad(e.to_string()))?
    };
    let resource = Resource::builder()
        .with_service_name(
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "sluice".to_string()),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("sluice"))
        // The span says what the request was; where in our code it was opened, on which
        // thread and how long it was polled are not the operator's business.
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target() == TARGET || (meta.is_event() && *meta.level() <= tracing::Level::WARN)
        }));
    ENABLED.store(true, Ordering::Relaxed);
    Ok((
        TracesGuard {
            provider,
            runtime: Some(runtime),
        },
        layer,
    ))
}

/// The trace context a request carries (`traceparent`, `tracestate`; HTTP headers and gRPC
/// metadata alike), or the empty context when traces are off or it sent none.
pub fn extract_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    if !enabled() {
        return opentelemetry::Context::new();
    }
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)))
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
