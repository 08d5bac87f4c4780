//! The model registry: every model the server serves, its versions, which one is live, and
//! how traffic splits among them (issue 19).
//!
//! ```text
//! request ──route("name" | "name@version")──▶ RoutingTable (arc-swap, no lock)
//!                                               └─▶ Lease on a ServedModel (engine, tokenizer)
//! admin ──load / promote / rollback / traffic / unload──▶ Inner (mutex) ──publish──▶ table
//!                                                            └─▶ state file (atomic)
//! ```
//! Each version has its own engine loop, scheduler and KV pool (`ServedModel`). A request
//! holds a `Lease` for its whole life, so a version taken out of the table (swapped,
//! unloaded) finishes what it started and frees its memory when the last lease ends.
//!
//! Memory: every loaded version is charged its weights (their size on disk, or the dummy
//! weights' size) plus its KV pool; the charges of loaded and draining versions never exceed
//! `--memory-budget`. A load that would is refused with the numbers, before its KV cache is
//! allocated. `--models-max` bounds the models loaded at once; to load another, the least
//! recently used model with nothing in flight is unloaded first.

mod config;
mod error;
mod ops;
mod persist;
mod served;
mod state;
mod table;

pub use config::{
    check_name, parse_model_flag, read_models_file, ModelConfig, ModelSource, FIRST_VERSION,
};
pub use error::RegistryError;
pub use ops::Activation;
pub use persist::StartPlan;
pub use served::{Budget, GaugeSampler, Lease, MemoryCharge, ServedModel};
pub use state::{
    ModelLoader, ModelRegistry, ModelStatus, RegistryOptions, VersionState, VersionStatus,
};
