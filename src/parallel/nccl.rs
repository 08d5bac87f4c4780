//! NCCL communicator through cudarc, for one CUDA card per rank.
//!
//! Built behind `--features cuda`; it works on cudarc's own device buffers (`CudaSlice<f32>`)
//! so that it does not depend on the CUDA backend's tensor type. Hooking it to the backend is
//! one `impl Communicator<CudaBackend> for NcclComm` that passes each tensor's `CudaSlice` to
//! the methods below (see `docs/parallelism.md`).
//!
//! Two communicators per rank: the tensor-parallel group's (all-reduce, all-gather) and the
//! world's (pipeline send/recv to the same TP rank of the neighbouring stage:
//! `rank ± tp_size`). Every op is enqueued on the communicator's stream; NCCL orders it with
//! the kernels on that stream, so no host synchronisation is needed between ops.
//!
//! Single process: [`NcclComm::for_devices`] (one thread per rank, `ncclCommInitAll`).
//! Several nodes: [`NcclComm::from_rank`] with a unique id shared out of band; NCCL's own
//! environment (`NCCL_SOCKET_IFNAME`, `NCCL_IB_HCA`, `NCCL_DEBUG`) picks the transport.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::CommError;

/// A cudarc communicator that may move to its rank's thread.
struct RankComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as one thread at a time
// uses it; a `NcclComm` is owned by exactly one rank thread.
unsafe impl Send for RankComm {}

pub struct NcclComm {
    rank: usize,
    tp_size: usize,
    tp: RankComm,
    /// The world communicator, for pipeline send/recv (`None` with one stage).
    world: Option<RankComm>,
    pp_size: usize,
}

fn transport(rank: usize) -> impl Fn(cudarc::nccl::result::NcclError) -> CommError {
    move |e| CommError::Transport {
        rank,
        msg: format!("NCCL: {e:?}"),
    }
}

impl NcclComm {
    /// Communicators for `tp_size × pp_size` ranks in this process, one stream (card) per
    /// rank, indexed by `stage * tp_size + tp_rank`.
    pub fn for_devices(
        streams: Vec<Arc<CudaStream>>,
        tp_size: usize,
        pp_size: usize,
    ) -> Result<Vec<Self>, CommError> {
        let n = tp_size * pp_size;
        if streams.len() != n || n == 0 {
            return Err(CommError::Transport {
                rank: 0,
                msg: format!("{} streams for {tp_size} × {pp_size} ranks", streams.len()),
            });
        }
        let mut tp_comms: Vec<Option<Comm>> = Vec::with_capacity(n);
        for stage in 0..pp_size {
            let group = streams[stage * tp_size..(stage + 1) * tp_size].to_vec();
            tp_comms.extend(
                Comm::from_devices(group)
                    .map_err(transport(stage * tp_size))?
                    .into_iter()
                    .map(Some),
            );
        }
        let mut world: Vec<Option<Comm>> = if pp_size > 1 {
            Comm::from_devices(streams)
                .map_err(transport(0))?
                .into_iter()
                .map(Some)
                .collect()
        } else {
            (0..n).map(|_| None).collect()
        };
        Ok((0..n)
            .map(|rank| Self {
                rank,
                tp_size,
                tp: RankComm(tp_comms[rank].take().expect("one TP comm per rank")),
                world: world[rank].take().map(RankComm),
                pp_size,
            })
            .collect())
    }

    /// This process's rank of a multi-process group: `tp_id` is the unique id of this rank's
    /// TP group, `world_id` that of all ranks (pipeline links), both created by one process
    /// (`Id::new`) and shared out of band.
    pub fn from_rank(
        stream: Arc<CudaStream>,
        rank: usize,
        tp_size: usize,
        pp_size: usize,
        tp_id: Id,
        world_id: Option<Id>,
    ) -> Result<Self, CommError> {
        let tp = Comm::from_rank(stream.clone(), rank % tp_size, tp_size, tp_id)
            .map_err(transport(rank))?;
        let world = match world_id {
            Some(id) if pp_size > 1 => Some(RankComm(
                Comm::from_rank(stream, rank, tp_size * pp_size, id).map_err(transport(rank))?,
            )),
            _ => None,
        };
        Ok(Self {
            rank,
            tp_size,
            tp: RankComm(tp),
            world,
            pp_size,
        })
    }

    pub fn tp_rank(&self) -> usize {
        self.rank % self.tp_size
    }

    pub fn tp_size(&self) -> usize {
        self.tp_size
    }

    /// In place, on the TP group.
    pub fn all_reduce_sum(&self, x: &mut CudaSlice<f32>) -> Result<(), CommError> {
        self.tp
            .0
            .all_reduce_in_place(x, &ReduceOp::Sum)
            .map_err(transport(self.rank))?;
        Ok(())
    }

    /// `out` (`tp_size × x.len()`) receives every rank's `x` in rank order. Column-split
    /// logits arrive rank-major (`[rank][rows, cols_r]`): the caller interleaves rows, and
    /// pads uneven shards to the largest.
    pub fn all_gather(
        &self,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CommError> {
        self.tp.0.all_gather(x, out).map_err(transport(self.rank))?;
        Ok(())
    }

    fn neighbour(&self, next: bool) -> Result<(&Comm, i32), CommError> {
        let stage = self.rank / self.tp_size;
        let op = if next { "send_next" } else { "recv_prev" };
        let peer = match (next, &self.world) {
            (true, Some(_)) if stage + 1 < self.pp_size => self.rank + self.tp_size,
            (false, Some(_)) if stage > 0 => self.rank - self.tp_size,
            _ => {
                return Err(CommError::NoPeer {
                    rank: self.rank,
                    op,
                })
            }
        };
        let world = self.world.as_ref().map(|w| &w.0);
        let world = world.ok_or(CommError::NoPeer {
            rank: self.rank,
            op,
        })?;
        Ok((world, peer as i32))
    }

    pub fn send_next(&self, x: &CudaSlice<f32>) -> Result<(), CommError> {
        let (world, peer) = self.neighbour(true)?;
        world.send(x, peer).map_err(transport(self.rank))
    }

    /// `out` must already have the sender's length (the plan gives every rank the shape).
    pub fn recv_prev(&self, out: &mut CudaSlice<f32>) -> Result<(), CommError> {
        let (world, peer) = self.neighbour(false)?;
        world.recv(out, peer).map_err(transport(self.rank))?;
        Ok(())
    }
}
