//! Shared-memory communicator for CPU ranks: one thread per rank in one process.
//!
//! Collectives use one slot per rank, double-buffered: a rank writes its tensor into its slot
//! of the current parity, waits at the group's barrier, then reads every slot. The next
//! collective uses the other parity, and the one after that can only start writing once every
//! rank has passed the next barrier, i.e. finished reading: one barrier per collective.
//!
//! Every rank sums the slots in rank order, so all ranks hold bit-identical sums. Each rank
//! reads the whole tensor of every peer (`n × size` adds per rank): at a hidden size of a few
//! thousand floats per token this costs less than the barrier; a reduce-scatter would pay a
//! second barrier to save adds.
//!
//! Pipeline links are bounded flume channels carrying host copies of the hidden states.
//!
//! A rank whose communicator is dropped (its thread ended or unwound from a panic) breaks the
//! barrier: peers waiting in a collective get `CommError::PeerGone` instead of hanging.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use super::{CommError, Communicator};
use crate::kernels::cpu::backend::CpuTensor;
use crate::kernels::cpu::CpuBackend;

/// Spins before a waiting rank sleeps: most collectives complete within microseconds, far
/// below a futex wake-up, but spinning forever would starve ranks sharing a core.
const SPIN_ROUNDS: usize = 4096;

/// A reusable barrier that a departing member can break.
struct Barrier {
    size: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    broken: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Barrier {
    fn new(size: usize) -> Self {
        Self {
            size,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// Returns false when the barrier is broken.
    fn wait(&self) -> bool {
        if self.broken.load(Ordering::Acquire) {
            return false;
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.size {
            self.arrived.store(0, Ordering::Release);
            // Under the lock, so a waiter that checked the generation under it cannot miss
            // the wake-up.
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.cv.notify_all();
            return true;
        }
        let passed = |b: &Self| {
            b.generation.load(Ordering::Acquire) != generation || b.broken.load(Ordering::Acquire)
        };
        for i in 0..SPIN_ROUNDS {
            if passed(self) {
                return self.generation.load(Ordering::Acquire) != generation;
            }
            if i % 64 == 63 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while !passed(self) {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        self.generation.load(Ordering::Acquire) != generation
    }

    fn break_(&self) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.broken.store(true, Ordering::Release);
        self.cv.notify_all();
    }
}

/// One rank's contribution to a collective.
#[derive(Default)]
struct Slot {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

/// What the ranks of one tensor-parallel group share.
struct TpShared {
    barrier: Barrier,
    /// `[parity][rank]`
    slots: [Vec<RwLock<Slot>>; 2],
}

/// A host tensor in flight between pipeline stages.
struct Hidden {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

/// One CPU rank's communicator.
pub struct ShmComm {
    rank: usize,
    tp_rank: usize,
    tp: Arc<TpShared>,
    parity: usize,
    next: Option<flume::Sender<Hidden>>,
    prev: Option<flume::Receiver<Hidden>>,
}

/// Communicators for `tp_size × pp_size` ranks, indexed by `stage * tp_size + tp_rank`.
pub fn group(tp_size: usize, pp_size: usize) -> Vec<ShmComm> {
    let tp_size = tp_size.max(1);
    let pp_size = pp_size.max(1);
    let mut comms = Vec::with_capacity(tp_size * pp_size);
    let mut prev_rx: Vec<Option<flume::Receiver<Hidden>>> = (0..tp_size).map(|_| None).collect();
    for stage in 0..pp_size {
        let slots = || (0..tp_size).map(|_| RwLock::new(Slot::default())).collect();
        let shared = Arc::new(TpShared {
            barrier: Barrier::new(tp_size),
            slots: [slots(), slots()],
        });
        for (tp_rank, prev) in prev_rx.iter_mut().enumerate() {
            let (next, rx) = if stage + 1 < pp_size {
                // Room for the residual and delta of every micro-batch in flight.
                let (tx, rx) = flume::bounded(2 * pp_size + 2);
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            comms.push(ShmComm {
                rank: stage * tp_size + tp_rank,
                tp_rank,
                tp: shared.clone(),
                parity: 0,
                next,
                prev: std::mem::replace(prev, rx),
            });
        }
    }
    comms
}

impl ShmComm {
    /// Publishes `x` in this rank's slot and waits for the group. Returns the parity read.
    fn publish(&mut self, x: &[f32], rows: usize, cols: usize) -> Result<usize, CommError> {
        let p = self.parity;
        self.parity ^= 1;
        {
            let mut s = self.tp.slots[p][self.tp_rank]
                .write()
                .unwrap_or_else(|e| e.into_inner());
            s.rows = rows;
            s.cols = cols;
            s.data.clear();
            s.data.extend_from_slice(x);
        }
        if !self.tp.barrier.wait() {
            return Err(CommError::PeerGone { rank: self.rank });
        }
        Ok(p)
    }

    /// `x = Σ_r slot_r`, in rank order (bit-identical on every rank).
    pub fn all_reduce_slice(
        &mut self,
        x: &mut [f32],
        rows: usize,
        cols: usize,
    ) -> Result<(), CommError> {
        let p = self.publish(x, rows, cols)?;
        let slots: Vec<_> = self.tp.slots[p]
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()))
            .collect();
        if let Some(bad) = slots.iter().find(|s| s.data.len() != x.len()) {
            return Err(CommError::Shape {
                rank: self.rank,
                op: "all_reduce_sum",
                detail: format!(
                    "[{rows}, {cols}] here, [{}, {}] on a peer",
                    bad.rows, bad.cols
                ),
            });
        }
        x.copy_from_slice(&slots[0].data);
        for s in &slots[1..] {
            for (a, b) in x.iter_mut().zip(&s.data) {
                *a += b;
            }
        }
        Ok(())
    }

    /// The group's `[rows, cols_r]` tensors side by side, in rank order.
    pub fn all_gather_cols_slice(
        &mut self,
        x: &[f32],
        rows: usize,
        cols: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), CommError> {
        let p = self.publish(x, rows, cols)?;
        let slots: Vec<_> = self.tp.slots[p]
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()))
            .collect();
        if let Some(bad) = slots.iter().find(|s| s.rows != rows) {
            return Err(CommError::Shape {
                rank: self.rank,
                op: "all_gather_cols",
                detail: format!("{rows} rows here, {} on a peer", bad.rows),
            });
        }
        let total: usize = slots.iter().map(|s| s.cols).sum();
        out.clear();
        out.reserve(rows * total);
        for r in 0..rows {
            for s in &slots {
                out.extend_from_slice(&s.data[r * s.cols..(r + 1) * s.cols]);
            }
        }
        Ok(())
    }

    fn send(&mut self, data: Vec<f32>, rows: usize, cols: usize) -> Result<(), CommError> {
        let rank = self.rank;
        let tx = self.next.as_ref().ok_or(CommError::NoPeer {
            rank,
            op: "send_next",
        })?;
        tx.send(Hidden { rows, cols, data })
            .map_err(|_| CommError::PeerGone { rank })
    }

    fn recv(&mut self) -> Result<(Vec<f32>, usize, usize), CommError> {
        let rank = self.rank;
        let rx = self.prev.as_ref().ok_or(CommError::NoPeer {
            rank,
            op: "recv_prev",
        })?;
        let h = rx.recv().map_err(|_| CommError::PeerGone { rank })?;
        Ok((h.data, h.rows, h.cols))
    }
}

impl Drop for ShmComm {
    fn drop(&mut self) {
        self.tp.barrier.break_();
    }
}

impl Communicator<CpuBackend> for ShmComm {
    fn tp_rank(&self) -> usize {
        self.tp_rank
    }
    fn tp_size(&self) -> usize {
        self.tp.barrier.size
    }
    fn all_reduce_sum(&mut self, _be: &CpuBackend, x: &mut CpuTensor) -> Result<(), CommError> {
        let (rows, cols) = (x.rows, x.cols);
        self.all_reduce_slice(&mut x.data[..rows * cols], rows, cols)
    }
    fn all_gather_cols(
        &mut self,
        _be: &CpuBackend,
        x: &CpuTensor,
        out: &mut CpuTensor,
    ) -> Result<(), CommError> {
        let mut data = std::mem::take(&mut out.data);
        self.all_gather_cols_slice(&x.data[..x.rows * x.cols], x.rows, x.cols, &mut data)?;
        out.cols = data.len() / x.rows.max(1);
        out.rows = x.rows;
        out.data = data;
        Ok(())
    }
    fn send_next(&mut self, _be: &CpuBackend, x: &CpuTensor) -> Result<(), CommError> {
        self.send(x.data[..x.rows * x.cols].to_vec(), x.rows, x.cols)
    }
    fn recv_prev(&mut self, _be: &CpuBackend, out: &mut CpuTensor) -> Result<(), CommError> {
        let (data, rows, cols) = self.recv()?;
        out.resize(rows, cols);
        out.data[..rows * cols].copy_from_slice(&data);
        Ok(())
    }
    fn abort(&mut self) {
        self.tp.barrier.break_();
    }
}

#[cfg(test)]
#[path = "shm_tests.rs"]
mod tests;
