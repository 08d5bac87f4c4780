//! The integration tests, as one binary: each file beside this one is a module, and the
//! helpers they share (`common`: the model in-process; `api_support`: a `sluice serve` child
//! and the Python environments; `batch_support`) are compiled once. Filter by file as by module:
//! `cargo test --release --test integration engine::`.
//!
//! Tests of different files run side by side in this one process (two at a time on two cores,
//! as libtest runs any binary's), so nothing here may set the process's environment or assume
//! it is alone: `fetch` and `plan` are binaries of their own for that reason.

mod api_support;
mod batch_support;
mod common;

mod api_connections;
mod api_embeddings;
mod api_errors;
mod api_grpc;
mod api_kv_cache;
mod api_metrics;
mod api_observability;
mod api_openai;
mod api_reliability;
mod api_speculative;
mod api_stream;
mod architectures;
mod batch_api;
mod bench_client;
mod cli_flags;
mod cuda_kernels_compile;
mod device_sampling;
mod embeddings;
mod engine;
mod fault_isolation;
mod fuzz_regressions;
mod gguf_types;
mod kubernetes;
mod kv_cache_int8;
mod kv_cache_props;
mod model_fixtures;
mod overlap;
mod parallel;
mod promtool;
mod quant_reference;
mod registry;
mod safetensors;
mod scale_out;
mod scheduler_sim;
mod schemathesis;
mod soak;
mod speculative;
mod structured;
mod tokenizer;
mod tools;
