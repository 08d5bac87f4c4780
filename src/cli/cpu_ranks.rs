//! The CPU's ranks of a tensor/pipeline-parallel group: one `CpuBackend` per rank, the
//! threads shared out among them, talking over shared memory. The glue between `model`'s
//! generic loader and the CPU backend, kept here so `model` names no concrete backend.

use crate::kernels::cpu::{CpuBackend, CpuNumerics};
use crate::kernels::dtype::KvCacheDtype;
use crate::model::config::ModelConfig;
use crate::model::rank_group::ModelRanks;
use crate::model::shard::load_ranks;
use crate::model::weights::WeightSource;
use crate::model::ModelError;
use crate::parallel::comm::Communicator;
use crate::parallel::ParallelConfig;

/// Loads every rank of `cfg` on the CPU, in parallel, each rank with its share of `threads`
/// (at least one) and a shared-memory communicator.
pub fn load_cpu_ranks(
    config: &ModelConfig,
    weights: &dyn WeightSource,
    cfg: ParallelConfig,
    threads: usize,
) -> Result<ModelRanks<CpuBackend>, ModelError> {
    load_cpu_ranks_with(
        config,
        weights,
        cfg,
        threads,
        CpuNumerics::Fast,
        KvCacheDtype::F16,
    )
}

/// [`load_cpu_ranks`] with the given CPU numerics and KV-cache storage.
pub fn load_cpu_ranks_with(
    config: &ModelConfig,
    weights: &dyn WeightSource,
    cfg: ParallelConfig,
    threads: usize,
    numerics: CpuNumerics,
    kv_dtype: KvCacheDtype,
) -> Result<ModelRanks<CpuBackend>, ModelError> {
    let n = cfg.num_ranks();
    if threads < n {
        return Err(ModelError::Invalid(format!(
            "{n} CPU ranks (tensor-parallel {} × pipeline-parallel {}) need at least one \
             thread each, and --threads is {threads}",
            cfg.tp_size, cfg.pp_size
        )));
    }
    let comms = crate::parallel::shm::group(cfg.tp_size, cfg.pp_size)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Communicator<CpuBackend>>)
        .collect();
    // The first ranks take the remainder of the threads.
    let backend_for = |shard: &crate::parallel::RankShard| {
        let t = threads / n + usize::from(shard.rank < threads % n);
        CpuBackend::with_numerics(t, numerics).with_kv_cache_dtype(kv_dtype)
    };
    load_ranks(config, weights, cfg, backend_for, comms)
}
