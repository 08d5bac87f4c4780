//! The communicator interface the forward pass is written against.
//!
//! A communicator belongs to one rank and reaches two kinds of peers: the other ranks of its
//! tensor-parallel group (collectives) and its neighbours in the pipeline (the same TP rank in
//! the previous and next stage: point-to-point). Ops take the backend so that an
//! implementation can reach the tensor's memory (host slices on the CPU, device buffers for
//! NCCL); `kernels` itself knows nothing of communicators.
//!
//! Invariants every implementation keeps:
//! * Every rank of a TP group calls the same collectives in the same order with tensors of the
//!   same shape (the forward pass does, since every rank runs the same plan).
//! * `all_reduce_sum` leaves bit-identical values on every rank (ranks sum in rank order), so
//!   replicated activations (the residual stream) never drift apart between ranks.
//! * After an error the group is unusable; peers blocked in a collective return an error
//!   instead of waiting forever.

use super::CommError;
use crate::kernels::Backend;

pub trait Communicator<B: Backend>: Send {
    /// This rank's index in its tensor-parallel group.
    fn tp_rank(&self) -> usize;
    /// Ranks in the tensor-parallel group.
    fn tp_size(&self) -> usize;
    /// `x = Σ over the TP group of x` (every rank holds the sum afterwards).
    fn all_reduce_sum(&mut self, be: &B, x: &mut B::Tensor) -> Result<(), CommError>;
    /// `out` = the TP group's `[rows, cols_r]` tensors side by side in rank order
    /// (`[rows, Σ cols_r]`): vocabulary-split logits, and the head- or column-split outputs
    /// gathered in the exact mode (`TpMode::Gather`).
    fn all_gather_cols(
        &mut self,
        be: &B,
        x: &B::Tensor,
        out: &mut B::Tensor,
    ) -> Result<(), CommError>;
    /// Sends `x` to the same TP rank of the next pipeline stage.
    fn send_next(&mut self, be: &B, x: &B::Tensor) -> Result<(), CommError>;
    /// Receives from the same TP rank of the previous stage, in the order it was sent.
    fn recv_prev(&mut self, be: &B, out: &mut B::Tensor) -> Result<(), CommError>;
    /// Marks the group broken so that peers blocked in a collective return an error (called
    /// when this rank gives up mid-step).
    fn abort(&mut self) {}
}

/// The communicator of a model run on one rank: collectives are identities, and there is no
/// pipeline neighbour.
pub struct SoloComm;

impl<B: Backend> Communicator<B> for SoloComm {
    fn tp_rank(&self) -> usize {
        0
    }
    fn tp_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _be: &B, _x: &mut B::Tensor) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather_cols(
        &mut self,
        _be: &B,
        _x: &B::Tensor,
        _out: &mut B::Tensor,
    ) -> Result<(), CommError> {
        // The model never gathers in a group of one (its shard is the whole tensor).
        Err(CommError::NoPeer {
            rank: 0,
            op: "all_gather_cols",
        })
    }
    fn send_next(&mut self, _be: &B, _x: &B::Tensor) -> Result<(), CommError> {
        Err(CommError::NoPeer {
            rank: 0,
            op: "send_next",
        })
    }
    fn recv_prev(&mut self, _be: &B, _out: &mut B::Tensor) -> Result<(), CommError> {
        Err(CommError::NoPeer {
            rank: 0,
            op: "recv_prev",
        })
    }
}
