//! The gRPC front (`api/grpc/`) against a real server: Triton's Python client and grpcio's
//! health client (`tests/python/grpc_checks.py`: health, metadata, unary and streamed
//! inference, errors, the greedy text equal to `/v1/completions`', a cancelled stream and a
//! client process that exits mid-stream), then with sluice's own tonic client: a cancelled
//! call frees every KV block, and SIGTERM drains gRPC streams as it drains SSE.

use crate::api_support;

use std::time::{Duration, Instant};

use api_support::{metric, metrics, wait_for_metrics, Server, API_KEY};
use futures::channel::mpsc::UnboundedSender;
use futures::StreamExt;
use sluice::api::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use sluice::api::grpc::proto::infer_parameter::ParameterChoice;
use sluice::api::grpc::proto::model_infer_request::InferInputTensor;
use sluice::api::grpc::proto::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelStreamInferResponse,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const TRITONCLIENT: &str = "tritonclient[grpc]==2.73.0 grpcio-health-checking==1.81.1";
/// A cancelled request must be gone from the engine this soon (a step is milliseconds).
const ABORT_WITHIN: Duration = Duration::from_secs(5);
const SHUTDOWN_TIMEOUT: u64 = 4;

type Client = GrpcInferenceServiceClient<
    InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn with_key(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let value = format!("Bearer {API_KEY}").parse().expect("metadata value");
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

async fn client(server: &Server) -> Client {
    let channel = Channel::from_shared(server.url.clone())
        .expect("an endpoint")
        .connect()
        .await
        .expect("connecting over HTTP/2");
    GrpcInferenceServiceClient::with_interceptor(channel, with_key as fn(_) -> _)
}

fn request(prompt: &str, max_tokens: i64) -> ModelInferRequest {
    let p = |c| InferParameter {
        parameter_choice: Some(c),
    };
    ModelInferRequest {
        model_name: sluice::assets::SERVED_NAME.into(),
        id: "r".into(),
        inputs: vec![InferInputTensor {
            name: "text_input".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                bytes_contents: vec![prompt.as_bytes().to_vec()],
                ..Default::default()
            }),
        }],
        parameters: [
            ("stream".to_string(), p(ParameterChoice::BoolParam(true))),
            (
                "max_tokens".into(),
                p(ParameterChoice::Int64Param(max_tokens)),
            ),
            ("ignore_eos".into(), p(ParameterChoice::BoolParam(true))),
        ]
        .into(),
        ..Default::default()
    }
}

/// A `ModelStreamInfer` call: the sending half (open until dropped) and the responses.
/// Dropping both cancels the call (RST_STREAM), as any gRPC client's cancel does.
type Call = (
    UnboundedSender<ModelInferRequest>,
    tonic::Streaming<ModelStreamInferResponse>,
);

/// Opens a `ModelStreamInfer` call with one streaming request and reads `n` responses.
async fn open_stream(client: &mut Client, max_tokens: i64, n: usize) -> Call {
    let (tx, outbound) = futures::channel::mpsc::unbounded();
    tx.unbounded_send(request("Count: 1, 2, 3,", max_tokens))
        .expect("queue the request");
    let mut inbound = client
        .model_stream_infer(outbound)
        .await
        .expect("the stream opens")
        .into_inner();
    for _ in 0..n {
        let r = tokio::time::timeout(Duration::from_secs(120), inbound.next())
            .await
            .expect("a response within 120 s")
            .expect("an open stream")
            .expect("a response");
        assert!(r.error_message.is_empty(), "{}", r.error_message);
    }
    (tx, inbound)
}

fn no_requests_running(text: &str) -> bool {
    metric(text, "sluice:num_requests_running") == 0.0
        && metric(text, "sluice:num_requests_waiting") == 0.0
}

async fn dropped_streams_free_their_blocks(server: &Server) {
    let aborts = |t: &str| metric(t, "sluice:request_success_total{finished_reason=\"abort\"}");
    let before = aborts(&metrics(server).await);
    // Cancelling the call (dropping its response stream) aborts the request.
    let mut c = client(server).await;
    let stream = open_stream(&mut c, 2000, 2).await;
    let during = metrics(server).await;
    assert!(
        metric(&during, "sluice:kv_cache_usage_perc") > 0.0,
        "{during}"
    );
    drop(stream);
    let took = wait_for_metrics(server, ABORT_WITHIN, no_requests_running)
        .await
        .expect("the request still runs after its call was cancelled");
    println!("gRPC cancel: request freed after {took:?}");
    // Dropping the client with the call (its connection closes) does too.
    let mut c = client(server).await;
    let stream = open_stream(&mut c, 2000, 2).await;
    drop((stream, c));
    let took = wait_for_metrics(server, ABORT_WITHIN, no_requests_running)
        .await
        .expect("the request still runs after its connection closed");
    println!("gRPC disconnect: request freed after {took:?}");
    api_support::assert_idle_without_leaks(server).await;
    assert!(
        aborts(&metrics(server).await) >= before + 2.0,
        "aborts not counted"
    );
}

async fn sigterm_drains_grpc_streams(server: &mut Server) {
    let mut c = client(server).await;
    // One that finishes within the shutdown timeout, one that outlives it.
    let (_short_tx, mut short) = open_stream(&mut c, 24, 1).await;
    let (_endless_tx, mut endless) = open_stream(&mut c, 8000, 1).await;
    server.signal_term();
    let started = Instant::now();
    let mut last = None;
    while let Some(r) = short.next().await {
        last = Some(r.expect("the short stream ends cleanly"));
    }
    let last = last.expect("responses after SIGTERM");
    assert!(last.error_message.is_empty(), "{}", last.error_message);
    let params = last.infer_response.expect("a response").parameters;
    assert!(
        matches!(
            params["triton_final_response"].parameter_choice,
            Some(ParameterChoice::BoolParam(true))
        ),
        "{params:?}"
    );
    // The endless one gets an error in-band at the deadline.
    let mut error = String::new();
    while let Some(Ok(r)) = endless.next().await {
        if !r.error_message.is_empty() {
            error = r.error_message;
        }
    }
    assert!(error.starts_with("Unavailable"), "{error:?}");
    drop(c);
    let status = tokio::task::block_in_place(|| {
        server.wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT + 20))
    });
    assert!(status.success(), "exit status {status}");
    println!(
        "gRPC shutdown: exited {:?} after SIGTERM",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_cancel_and_drain() {
    let mut server = Server::start(&[
        "--api-key",
        API_KEY,
        "--admin-api-key",
        "grpc-admin-key",
        "--shutdown-timeout",
        &SHUTDOWN_TIMEOUT.to_string(),
        "--max-model-len",
        "8192",
        "--kv-cache-memory",
        "536870912",
    ]);
    let out = tokio::task::spawn_blocking({
        let url = server.url.clone();
        move || {
            let python = api_support::venv::pip_venv("test-venv-grpc", TRITONCLIENT)
                .join("bin")
                .join("python");
            api_support::run_python_with(
                &python,
                "grpc_checks.py",
                &url,
                &[("SLUICE_ADMIN_KEY", "grpc-admin-key")],
            )
        }
    })
    .await
    .expect("python task");
    print!("{out}");
    assert!(out.contains("DISCONNECTED"), "{out}");
    let took = wait_for_metrics(&server, ABORT_WITHIN, no_requests_running)
        .await
        .expect("the request of a client that exited mid-stream still runs");
    println!("client exited mid-stream: request freed {took:?} after the process ended");
    api_support::assert_idle_without_leaks(&server).await;
    dropped_streams_free_their_blocks(&server).await;
    sigterm_drains_grpc_streams(&mut server).await;
}
