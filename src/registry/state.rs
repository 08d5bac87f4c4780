//! `ModelRegistry`: the state (one mutex, never held across an await), the routing table
//! published from it, the status `/v1/models` shows, and routing itself.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

use super::served::{Budget, Lease, ServedModel};
use super::table::{Route, RoutingTable};
use super::{ModelConfig, ModelSource, RegistryError};

/// Loads a version and starts its engine. Implemented by `cli/serve.rs` over the model and
/// engine flags; blocking.
pub trait ModelLoader: Send + Sync {
    /// Refuses (`budget.check`) before allocating the KV cache when the version would not
    /// fit what is left of the budget.
    fn load(
        &self,
        name: &str,
        version: &str,
        source: &ModelSource,
        budget: &Budget,
    ) -> Result<ServedModel, RegistryError>;
}

#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Most models loaded at once (0: no limit).
    pub models_max: usize,
    /// A request for a model that is not loaded loads it (else 404).
    pub autoload: bool,
    /// Bytes all loaded versions may hold together (weights and KV caches).
    pub memory_budget: u64,
    /// A swapped-out version stays loaded, so a rollback is instant.
    pub keep_previous: bool,
    /// Where the live versions are saved (written atomically on every change).
    pub state_file: Option<PathBuf>,
    /// How long a new version has to answer its warm-up request.
    pub warm_up_timeout: Duration,
}

pub(super) enum Slot {
    Loading,
    Ready(Arc<ServedModel>),
    Failed(String),
}

/// One model's state.
pub(super) struct Entry {
    /// Every version the model has a source for (configured or loaded through the admin
    /// API): what a reload or a rollback loads.
    pub sources: BTreeMap<String, ModelSource>,
    pub slots: BTreeMap<String, Slot>,
    /// The version unpinned requests go to (when no traffic split is set), also the one a
    /// load of the whole model loads.
    pub live: String,
    /// Earlier live versions, most recent last: what `rollback` returns to.
    pub previous: Vec<String>,
    /// A canary split, version to weight; empty: all to `live`.
    pub traffic: BTreeMap<String, u32>,
    /// Versions taken out of service whose requests are still finishing.
    pub draining: Vec<Weak<ServedModel>>,
    pub last_used: Arc<AtomicU64>,
    /// Versions the state file says were loaded, until `start` loads them.
    pub pending_start: Option<Vec<String>>,
}

impl Entry {
    pub fn new(config: ModelConfig) -> Self {
        Self {
            sources: config.versions,
            slots: BTreeMap::new(),
            live: config.live,
            previous: Vec::new(),
            traffic: config.traffic,
            draining: Vec::new(),
            last_used: Arc::new(AtomicU64::new(0)),
            pending_start: None,
        }
    }

    pub fn ready(&self, version: &str) -> Option<&Arc<ServedModel>> {
        match self.slots.get(version) {
            Some(Slot::Ready(m)) => Some(m),
            _ => None,
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.slots
            .values()
            .any(|s| matches!(s, Slot::Ready(_) | Slot::Loading))
    }

    pub fn is_idle(&self) -> bool {
        self.slots.values().all(|s| match s {
            Slot::Ready(m) => m.in_flight() == 0,
            Slot::Loading => false,
            Slot::Failed(_) => true,
        })
    }

    /// Takes `version` out of service: it drains, then frees itself.
    pub fn retire(&mut self, version: &str) {
        if let Some(Slot::Ready(m)) = self.slots.remove(version) {
            self.draining.push(Arc::downgrade(&m));
        }
        self.traffic.remove(version);
    }

    fn route(&self) -> Option<Route> {
        let by_version: std::collections::HashMap<_, _> = self
            .slots
            .iter()
            .filter_map(|(v, s)| match s {
                Slot::Ready(m) => Some((v.clone(), m.clone())),
                _ => None,
            })
            .collect();
        if by_version.is_empty() {
            return None;
        }
        let split: Vec<(Arc<ServedModel>, u32)> = if self.traffic.is_empty() {
            self.ready(&self.live)
                .map(|m| (m.clone(), 1))
                .into_iter()
                .collect()
        } else {
            self.traffic
                .iter()
                .filter_map(|(v, &w)| self.ready(v).map(|m| (m.clone(), w)))
                .collect()
        };
        Some(Route::new(by_version, split, self.last_used.clone()))
    }
}

pub(super) struct Inner {
    /// In configuration order; the first is the default model.
    pub order: Vec<String>,
    pub models: BTreeMap<String, Entry>,
}

/// Every model the server serves. Cheap to share (`Arc`).
pub struct ModelRegistry {
    pub(super) table: ArcSwap<RoutingTable>,
    pub(super) inner: Mutex<Inner>,
    pub(super) loader: Arc<dyn ModelLoader>,
    pub(super) options: RegistryOptions,
    /// One load at a time: loads are CPU-bound, and a budget check must see the charges of
    /// every load before it.
    pub(super) load_lock: tokio::sync::Mutex<()>,
    /// Bumped on every change; routing waits on it while a model loads.
    pub(super) changed: tokio::sync::watch::Sender<u64>,
    pub(super) shutting_down: AtomicBool,
    /// `start` has loaded what serves at start-up (until then the server is not ready).
    pub(super) started: AtomicBool,
}

/// A version's state as `/v1/models` and the admin API show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    Unloaded,
    Loading,
    Ready,
    Draining,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionStatus {
    pub version: String,
    pub state: VersionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Share of unpinned traffic, 0 to 1.
    pub traffic: f64,
    pub in_flight: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    pub name: String,
    /// The model's state: its live version's (`unloaded` when nothing of it is loaded).
    pub state: VersionState,
    pub live_version: String,
    pub versions: Vec<VersionStatus>,
    pub created: u64,
    pub max_model_len: Option<usize>,
}

impl ModelRegistry {
    pub fn new(
        loader: Arc<dyn ModelLoader>,
        options: RegistryOptions,
        models: Vec<ModelConfig>,
    ) -> Result<Self, RegistryError> {
        let mut inner = Inner {
            order: Vec::new(),
            models: BTreeMap::new(),
        };
        for m in models {
            if inner.models.contains_key(&m.name) {
                return Err(RegistryError::Invalid(format!(
                    "the model name `{}` is given twice",
                    m.name
                )));
            }
            inner.order.push(m.name.clone());
            inner.models.insert(m.name.clone(), Entry::new(m));
        }
        Ok(Self {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            inner: Mutex::new(inner),
            loader,
            options,
            load_lock: tokio::sync::Mutex::new(()),
            changed: tokio::sync::watch::channel(0).0,
            shutting_down: AtomicBool::new(false),
            started: AtomicBool::new(false),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding it leaves consistent data (every change is one
        // assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds the routing table from `inner` and wakes requests waiting on a load.
    pub(super) fn publish(&self, inner: &mut Inner) {
        let mut table = RoutingTable::default();
        for (name, e) in inner.models.iter_mut() {
            e.draining.retain(|w| w.strong_count() > 0);
            if let Some(route) = e.route() {
                table.models.insert(name.clone(), Arc::new(route));
            }
        }
        self.table.store(Arc::new(table));
        self.changed.send_modify(|n| *n += 1);
    }

    /// The model a request without `model` gets: the first configured.
    pub fn default_model(&self) -> Option<String> {
        self.lock().order.first().cloned()
    }

    /// The version a request for `requested` (`name`, `name@version`, or none: the default
    /// model) runs on. Waits while the model loads; loads it when `--autoload` is on.
    pub async fn route(self: &Arc<Self>, requested: Option<&str>) -> Result<Lease, RegistryError> {
        let requested = requested.filter(|m| !m.is_empty());
        let (name, version) = match requested {
            Some(m) => match m.split_once('@') {
                Some((n, v)) => (n.to_string(), Some(v)),
                None => (m.to_string(), None),
            },
            None => (
                self.default_model()
                    .ok_or_else(|| RegistryError::UnknownModel(String::new()))?,
                None,
            ),
        };
        let mut changes = self.changed.subscribe();
        loop {
            if let Some(route) = self.table.load().models.get(&name) {
                let lease = match version {
                    Some(v) => route.pinned(v),
                    None => route.pick(),
                };
                if let Some(lease) = lease {
                    return Ok(lease);
                }
            }
            if self.shutting_down.load(Ordering::Acquire) {
                return Err(RegistryError::ShuttingDown);
            }
            let (loading, live) = {
                let inner = self.lock();
                let e = inner.models.get(&name).ok_or_else(|| {
                    RegistryError::UnknownModel(requested.unwrap_or_default().to_string())
                })?;
                if let Some(v) = version {
                    if !matches!(e.slots.get(v), Some(Slot::Loading)) {
                        return Err(self.not_serving(&name, v, e));
                    }
                }
                (
                    e.slots.values().any(|s| matches!(s, Slot::Loading)),
                    e.live.clone(),
                )
            };
            if loading {
                // Someone's load finishes (or fails) and publishes.
                if changes.changed().await.is_err() {
                    return Err(RegistryError::ShuttingDown);
                }
            } else if self.options.autoload {
                self.load_version(&name, &live, None, super::ops::Activation::Keep)
                    .await?;
            } else {
                return Err(RegistryError::NotLoaded(name));
            }
        }
    }

    fn not_serving(&self, name: &str, version: &str, e: &Entry) -> RegistryError {
        let serving: Vec<&str> = e
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Ready(_)))
            .map(|(v, _)| v.as_str())
            .collect();
        RegistryError::VersionNotServing {
            model: name.to_string(),
            version: version.to_string(),
            serving: if serving.is_empty() {
                "none".into()
            } else {
                serving.join(", ")
            },
        }
    }

    /// Every model's status, in configuration order (then the ones added since).
    pub fn status(&self) -> Vec<ModelStatus> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .filter_map(|n| inner.models.get(n).map(|e| model_status(n, e)))
            .collect()
    }

    pub fn model_status(&self, name: &str) -> Result<ModelStatus, RegistryError> {
        let inner = self.lock();
        let e = inner
            .models
            .get(name)
            .ok_or_else(|| RegistryError::UnknownModel(name.to_string()))?;
        Ok(model_status(name, e))
    }

    /// Every version holding an engine: serving and draining (what `/metrics` renders).
    pub fn engines(&self) -> Vec<Arc<ServedModel>> {
        let inner = self.lock();
        let mut out = Vec::new();
        for e in inner.models.values() {
            out.extend(e.slots.values().filter_map(|s| match s {
                Slot::Ready(m) => Some(m.clone()),
                _ => None,
            }));
            out.extend(e.draining.iter().filter_map(Weak::upgrade));
        }
        out
    }

    /// Ready once the start-up loads are done, while some model serves and every loaded
    /// engine makes progress.
    pub fn is_healthy(&self, max_silence: Duration) -> bool {
        let table = self.table.load();
        self.started.load(Ordering::Acquire)
            && !table.models.is_empty()
            && self
                .engines()
                .iter()
                .all(|m| m.engine.is_healthy(max_silence))
    }

    pub fn is_alive(&self) -> bool {
        self.engines().iter().all(|m| m.engine.is_alive())
    }

    /// Stops taking requests; every engine finishes its running ones by `deadline`.
    pub fn shutdown(&self, deadline: std::time::Instant) {
        self.shutting_down.store(true, Ordering::Release);
        for m in self.engines() {
            m.engine.shutdown(deadline);
        }
        self.changed.send_modify(|n| *n += 1);
    }
}

fn model_status(name: &str, e: &Entry) -> ModelStatus {
    let total: u64 = e.traffic.values().map(|&w| u64::from(w)).sum();
    let share = |v: &str| -> f64 {
        if e.traffic.is_empty() {
            f64::from(u8::from(v == e.live && e.ready(v).is_some()))
        } else if e.ready(v).is_some() {
            e.traffic.get(v).map_or(0.0, |&w| w as f64 / total as f64)
        } else {
            0.0
        }
    };
    // Every version with a source, and any whose first load failed (it has none yet).
    let names: std::collections::BTreeSet<&String> =
        e.sources.keys().chain(e.slots.keys()).collect();
    let mut versions: Vec<VersionStatus> = names
        .into_iter()
        .map(|v| {
            let (state, reason, model) = match e.slots.get(v) {
                None => (VersionState::Unloaded, None, None),
                Some(Slot::Loading) => (VersionState::Loading, None, None),
                Some(Slot::Ready(m)) => (VersionState::Ready, None, Some(m)),
                Some(Slot::Failed(r)) => (VersionState::Failed, Some(r.clone()), None),
            };
            VersionStatus {
                version: v.clone(),
                state,
                reason,
                traffic: share(v),
                in_flight: model.map_or(0, |m| m.in_flight()),
                max_model_len: model.map(|m| m.engine.info.max_model_len),
                memory_bytes: model.map(|m| m.memory.total()),
                source: e.sources.get(v).and_then(|s| s.path.clone()),
            }
        })
        .collect();
    for m in e.draining.iter().filter_map(Weak::upgrade) {
        versions.push(VersionStatus {
            version: m.version.clone(),
            state: VersionState::Draining,
            reason: None,
            traffic: 0.0,
            in_flight: m.in_flight(),
            max_model_len: Some(m.engine.info.max_model_len),
            memory_bytes: Some(m.memory.total()),
            source: m.source.path.clone(),
        });
    }
    let live = versions.iter().find(|v| v.version == e.live);
    ModelStatus {
        name: name.to_string(),
        state: live.map_or(VersionState::Unloaded, |v| v.state),
        live_version: e.live.clone(),
        created: e.ready(&e.live).map_or(0, |m| m.created),
        max_model_len: live.and_then(|v| v.max_model_len),
        versions,
    }
}
