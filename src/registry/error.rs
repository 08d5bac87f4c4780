//! What the registry refuses, typed; the API edge turns each into an OpenAI error with its
//! status (`api/errors.rs`).

/// A registry refusal or a failed load.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// No model of that name is configured.
    #[error("The model `{0}` does not exist.")]
    UnknownModel(String),
    /// The model exists but none of its versions is loaded (and `--autoload` is off).
    #[error("the model `{0}` is not loaded; an operator loads it through the admin API (or start the server with --autoload)")]
    NotLoaded(String),
    /// `name@version` names a version that is not serving.
    #[error("the model `{model}` has no serving version `{version}` (serving: {serving})")]
    VersionNotServing {
        model: String,
        version: String,
        serving: String,
    },
    /// Loading a version failed; whatever served before still serves.
    #[error("loading `{model}@{version}` failed: {reason}")]
    LoadFailed {
        model: String,
        version: String,
        reason: String,
    },
    /// The memory budget cannot hold the version.
    #[error(
        "`{model}@{version}` needs {needed_mib} MiB (weights {weights_mib} + KV cache {kv_mib}) \
         but {left_mib} MiB of the {budget_mib} MiB budget are left ({charged}); unload a model \
         or raise --memory-budget"
    )]
    OverBudget {
        model: String,
        version: String,
        needed_mib: u64,
        weights_mib: u64,
        kv_mib: u64,
        left_mib: u64,
        budget_mib: u64,
        charged: String,
    },
    /// `--models-max` models are loaded and every one has requests in flight.
    #[error("{max} models are loaded (--models-max) and none is idle; retry shortly")]
    NoIdleModel { max: usize },
    /// The operation does not fit the model's current state (promote an unloaded version,
    /// roll back with no previous version, load a version twice).
    #[error("{0}")]
    Conflict(String),
    /// The operator's request is malformed (a bad name, weights that do not add up).
    #[error("{0}")]
    Invalid(String),
    /// The server is draining.
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl RegistryError {
    /// The kind for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownModel(_) => "unknown_model",
            Self::NotLoaded(_) => "not_loaded",
            Self::VersionNotServing { .. } => "version_not_serving",
            Self::LoadFailed { .. } => "load_failed",
            Self::OverBudget { .. } => "over_budget",
            Self::NoIdleModel { .. } => "no_idle_model",
            Self::Conflict(_) => "conflict",
            Self::Invalid(_) => "invalid",
            Self::ShuttingDown => "shutting_down",
        }
    }
}
