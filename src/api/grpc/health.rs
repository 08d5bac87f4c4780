//! `grpc.health.v1.Health`, so Kubernetes gRPC probes and `grpc_health_probe` work: SERVING
//! while the server would answer `/health` 200 (not draining, the engine making progress),
//! NOT_SERVING otherwise. Never behind the API key (as `/health` is not).

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::INFERENCE_SERVICE;
use crate::api::AppState;

/// How often `Watch` re-reads the status.
const WATCH_PERIOD: Duration = Duration::from_millis(500);

pub struct HealthService {
    pub state: AppState,
}

fn serving(state: &AppState) -> ServingStatus {
    if super::ready(state) {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// The overall server (`""`) and the inference service are known; other names are not.
fn known(service: &str) -> Result<(), Status> {
    if service.is_empty() || service == INFERENCE_SERVICE {
        Ok(())
    } else {
        Err(Status::not_found(format!("unknown service `{service}`")))
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        known(&request.get_ref().service)?;
        Ok(Response::new(HealthCheckResponse {
            status: serving(&self.state) as i32,
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let known = known(&request.get_ref().service).is_ok();
        let state = self.state.clone();
        Ok(Response::new(Box::pin(async_stream::stream! {
            let mut last = None;
            loop {
                let now = if known { serving(&state) } else { ServingStatus::ServiceUnknown };
                if last != Some(now) {
                    last = Some(now);
                    yield Ok(HealthCheckResponse { status: now as i32 });
                }
                tokio::time::sleep(WATCH_PERIOD).await;
            }
        })))
    }
}
