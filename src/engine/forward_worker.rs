//! The model on a thread of its own: `submit` hands the step over and returns at once, as a
//! GPU's stream does, so the engine's overlapped loop (`StepOverlap::OnWorkerThread`) plans
//! the next step while this one runs — on the CPU, where the forward pass is otherwise
//! synchronous. Steps run in submission order; each `collect` takes the oldest.
//!
//! Its use is testing the overlapped loop with real concurrency on any machine; errors come
//! back at `collect`, and a worker that stopped makes every later call an error.

use std::collections::VecDeque;
use std::thread::JoinHandle;

use std::sync::Arc;

use crate::kernels::sampling::{SampledRow, SamplingBatch};
use crate::kernels::Backend;
use crate::model::rank_group::{RankGroup, StepInput};
use crate::model::{HostOutput, ModelError};

enum Request {
    Submit(Arc<StepInput>),
    /// Collect the oldest step: sample it with these rows on the device, or return logits.
    Collect(Option<SamplingBatch>),
}

pub(crate) enum Reply {
    Logits(HostOutput),
    /// The sampled rows and the step's hidden rows.
    Sampled(Vec<SampledRow>, Vec<f32>),
}

pub(crate) struct ForwardWorker {
    tx: Option<flume::Sender<Request>>,
    rx: flume::Receiver<Result<Reply, ModelError>>,
    handle: Option<JoinHandle<()>>,
    pub vocab_size: usize,
    pub samples_on_device: bool,
}

impl ForwardWorker {
    pub fn start<B: Backend>(model: RankGroup<B>) -> Result<Self, ModelError> {
        let vocab_size = model.lead().config.vocab_size;
        let samples_on_device = model.samples_on_device();
        // Two steps at most are submitted and not collected: the bound never blocks.
        let (tx, requests) = flume::bounded::<Request>(4);
        let (replies, rx) = flume::bounded(4);
        let handle = std::thread::Builder::new()
            .name("sluice-forward".into())
            .spawn(move || serve(model, requests, replies))
            .map_err(|e| ModelError::Parallel(format!("spawning the forward worker: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            rx,
            handle: Some(handle),
            vocab_size,
            samples_on_device,
        })
    }

    fn send(&self, r: Request) -> Result<(), ModelError> {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(r).is_ok());
        match sent {
            true => Ok(()),
            false => Err(ModelError::Parallel(
                "the forward worker has stopped".into(),
            )),
        }
    }

    pub fn submit(&self, step: &Arc<StepInput>) -> Result<(), ModelError> {
        self.send(Request::Submit(step.clone()))
    }

    /// The oldest step's logits, or its rows sampled on the device when `rows` is given.
    pub fn collect(&self, rows: Option<&SamplingBatch>) -> Result<Reply, ModelError> {
        self.send(Request::Collect(rows.cloned()))?;
        match self.rx.recv() {
            Ok(r) => r,
            Err(_) => Err(ModelError::Parallel(
                "the forward worker has stopped".into(),
            )),
        }
    }
}

fn serve<B: Backend>(
    mut model: RankGroup<B>,
    requests: flume::Receiver<Request>,
    replies: flume::Sender<Result<Reply, ModelError>>,
) {
    // Submission errors wait for their step's collect.
    let mut submitted: VecDeque<Result<(), ModelError>> = VecDeque::new();
    while let Ok(r) = requests.recv() {
        match r {
            Request::Submit(step) => {
                let done = model.submit(&step);
                submitted.push_back(done);
            }
            Request::Collect(rows) => {
                let reply = match submitted.pop_front() {
                    None => Err(ModelError::Parallel("no step in flight".into())),
                    Some(Err(e)) => Err(e),
                    Some(Ok(())) => match rows {
                        Some(rows) => {
                            let sampled = model.collect_sampled(&rows);
                            sampled.map(|(rows, hidden)| Reply::Sampled(rows, hidden))
                        }
                        None => model.collect().map(Reply::Logits),
                    },
                };
                if replies.send(reply).is_err() {
                    break;
                }
            }
        }
    }
}

impl Drop for ForwardWorker {
    fn drop(&mut self) {
        // Closing the request channel ends the worker after its current step.
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
