//! What the operator does to models (the admin API and start-up): load a version, make it
//! live, roll back, split traffic, unload. Each change publishes a new routing table and
//! saves the state file.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::served::{Budget, ServedModel};
use super::state::{Entry, ModelStatus, Slot};
use super::{check_name, ModelConfig, ModelRegistry, ModelSource, RegistryError};

/// What a successful load does to the model's live version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Nothing: it serves pinned requests (and a traffic split that names it).
    Keep,
    /// It becomes live; the live one before it is what a rollback returns to.
    Promote,
    /// It becomes live without becoming a rollback target itself (a rollback's reload).
    Restore,
}

impl ModelRegistry {
    /// Loads `name@version` from `source` (or the source it already has), warms it up, and
    /// applies `activation`. A new model name is added. A failed load changes nothing that
    /// serves; the version shows `failed` with the reason.
    pub async fn load_version(
        self: &Arc<Self>,
        name: &str,
        version: &str,
        source: Option<ModelSource>,
        activation: Activation,
    ) -> Result<ModelStatus, RegistryError> {
        check_name("model name", name)?;
        check_name("version", version)?;
        let _one_at_a_time = self.load_lock.lock().await;
        let source = 'locked: {
            let mut inner = self.lock();
            if self
                .shutting_down
                .load(std::sync::atomic::Ordering::Acquire)
            {
                return Err(RegistryError::ShuttingDown);
            }
            let inner = &mut *inner;
            if !inner.models.contains_key(name) {
                let source = source
                    .clone()
                    .ok_or_else(|| RegistryError::UnknownModel(name.to_string()))?;
                inner.order.push(name.to_string());
                inner.models.insert(
                    name.to_string(),
                    Entry::new(ModelConfig {
                        name: name.to_string(),
                        versions: BTreeMap::from([(version.to_string(), source)]),
                        live: version.to_string(),
                        traffic: BTreeMap::new(),
                    }),
                );
            }
            let e = inner
                .models
                .get_mut(name)
                .ok_or_else(|| RegistryError::UnknownModel(name.to_string()))?;
            if let Some(m) = e.ready(version) {
                if source.is_some() && source.as_ref() != Some(&m.source) {
                    return Err(RegistryError::Conflict(format!(
                        "`{name}@{version}` is loaded from another source; unload it first or \
                         load under a new version"
                    )));
                }
                break 'locked Err(m.clone());
            }
            let source = match source.or_else(|| e.sources.get(version).cloned()) {
                Some(s) => s,
                None => {
                    return Err(RegistryError::Invalid(format!(
                        "`{name}` has no version `{version}`; give a path to load it from"
                    )))
                }
            };
            e.slots.insert(version.to_string(), Slot::Loading);
            self.publish(inner);
            Ok(source)
        };
        // Already loaded: only the activation is left to do.
        let source = match source {
            Ok(s) => s,
            Err(loaded) => return self.activate_loaded(name, &loaded, activation),
        };
        if let Err(e) = self.make_room(name) {
            // Recorded as the version's failure; the caller gets the same error.
            let _ = self.settle(name, version, Err(e.clone()));
            return Err(e);
        }
        let budget = self.budget();
        let loader = self.loader.clone();
        let (n, v, src) = (name.to_string(), version.to_string(), source.clone());
        let timeout = self.options.warm_up_timeout;
        let loaded = tokio::task::spawn_blocking(move || {
            let m = loader.load(&n, &v, &src, &budget)?;
            m.warm_up(timeout)
                .map_err(|reason| RegistryError::LoadFailed {
                    model: n.clone(),
                    version: v.clone(),
                    reason,
                })?;
            Ok(m)
        })
        .await
        .unwrap_or_else(|e| {
            Err(RegistryError::LoadFailed {
                model: name.to_string(),
                version: version.to_string(),
                reason: format!("the loader panicked: {e}"),
            })
        });
        let loaded = loaded.map(|m| {
            let m = Arc::new(m);
            self.lock()
                .models
                .get_mut(name)
                .map(|e| e.sources.insert(version.to_string(), source));
            m
        });
        match self.settle(name, version, loaded) {
            Ok(m) => self.activate_loaded(name, &m, activation),
            Err(e) => Err(e),
        }
    }

    /// Records a load's outcome in the version's slot.
    fn settle(
        &self,
        name: &str,
        version: &str,
        loaded: Result<Arc<ServedModel>, RegistryError>,
    ) -> Result<Arc<ServedModel>, RegistryError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(e) = inner.models.get_mut(name) else {
            return Err(RegistryError::UnknownModel(name.to_string()));
        };
        let out = match loaded {
            // Unloaded while it loaded: the unload wins.
            Ok(_) if !matches!(e.slots.get(version), Some(Slot::Loading)) => Err(
                RegistryError::Conflict(format!("`{name}@{version}` was unloaded while it loaded")),
            ),
            Ok(m) => {
                tracing::info!("{name}@{version}: loaded and warmed up");
                e.slots.insert(version.to_string(), Slot::Ready(m.clone()));
                Ok(m)
            }
            Err(err) => {
                tracing::warn!("{err}");
                e.slots
                    .insert(version.to_string(), Slot::Failed(err.to_string()));
                Err(err)
            }
        };
        self.publish(inner);
        out
    }

    fn activate_loaded(
        &self,
        name: &str,
        m: &Arc<ServedModel>,
        activation: Activation,
    ) -> Result<ModelStatus, RegistryError> {
        match activation {
            Activation::Keep => {}
            Activation::Promote => self.set_live(name, &m.version, true)?,
            Activation::Restore => self.set_live(name, &m.version, false)?,
        }
        self.save();
        self.model_status(name)
    }

    /// Makes a loaded version live: new requests go to it, running ones finish where they
    /// are. The previous live version stays loaded (`--keep-previous`, the default) or drains.
    pub fn promote(&self, name: &str, version: &str) -> Result<ModelStatus, RegistryError> {
        self.set_live(name, version, true)?;
        self.save();
        self.model_status(name)
    }

    fn set_live(&self, name: &str, version: &str, remember: bool) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let e = entry(inner, name)?;
        if e.ready(version).is_none() {
            return Err(RegistryError::Conflict(format!(
                "`{name}@{version}` is not loaded; load it first"
            )));
        }
        let old = std::mem::replace(&mut e.live, version.to_string());
        e.traffic.clear();
        if old != version {
            if remember {
                e.previous.retain(|v| v != &old);
                e.previous.push(old.clone());
            }
            if !self.options.keep_previous {
                e.retire(&old);
            }
            tracing::info!("{name}: live version {old} -> {version}");
        }
        self.publish(inner);
        Ok(())
    }

    /// The previous live version is live again: at once when it is still loaded, else after
    /// it reloads (the current live version serves meanwhile).
    pub async fn rollback(self: &Arc<Self>, name: &str) -> Result<ModelStatus, RegistryError> {
        let (target, loaded) = {
            let mut inner = self.lock();
            let e = entry(&mut inner, name)?;
            let Some(target) = e.previous.pop() else {
                return Err(RegistryError::Conflict(format!(
                    "`{name}` has no previous version to roll back to"
                )));
            };
            (target.clone(), e.ready(&target).is_some())
        };
        let out = if loaded {
            self.set_live(name, &target, false).and_then(|()| {
                self.save();
                self.model_status(name)
            })
        } else {
            self.load_version(name, &target, None, Activation::Restore)
                .await
        };
        if out.is_err() {
            // Nothing changed: the target stays the rollback target.
            if let Ok(e) = entry(&mut self.lock(), name) {
                e.previous.push(target);
            }
        }
        out
    }

    /// Splits `name`'s unpinned traffic among loaded versions by weight (an empty split sends
    /// everything to the live version).
    pub fn set_traffic(
        &self,
        name: &str,
        traffic: BTreeMap<String, u32>,
    ) -> Result<ModelStatus, RegistryError> {
        {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let e = entry(inner, name)?;
            super::config::check_traffic(name, &traffic, |v| e.ready(v).is_some())?;
            e.traffic = traffic;
            self.publish(inner);
        }
        self.save();
        self.model_status(name)
    }

    /// Takes one version out of service (it drains). The live version goes only with the
    /// whole model (`unload_model`), so a model never serves half-configured.
    pub fn unload_version(&self, name: &str, version: &str) -> Result<ModelStatus, RegistryError> {
        {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let e = entry(inner, name)?;
            if version == e.live && e.slots.len() > 1 {
                return Err(RegistryError::Conflict(format!(
                    "`{name}@{version}` is live: promote another version first, or unload the model"
                )));
            }
            if !e.slots.contains_key(version) {
                return Err(RegistryError::Conflict(format!(
                    "`{name}@{version}` is not loaded"
                )));
            }
            e.retire(version);
            self.publish(inner);
        }
        self.save();
        self.model_status(name)
    }

    /// Takes every version of `name` out of service; requests for it then load it again
    /// (`--autoload`) or get a 404 saying it is not loaded.
    pub fn unload_model(&self, name: &str) -> Result<ModelStatus, RegistryError> {
        {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let e = entry(inner, name)?;
            for v in e.slots.keys().cloned().collect::<Vec<_>>() {
                e.retire(&v);
            }
            e.slots.clear();
            self.publish(inner);
        }
        self.save();
        self.model_status(name)
    }

    /// Under `--models-max`, unloads the least recently used idle model so `name` can load.
    fn make_room(&self, name: &str) -> Result<(), RegistryError> {
        let max = self.options.models_max;
        if max == 0 {
            return Ok(());
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        let others = |e: &(&String, &Entry)| e.0 != name && e.1.is_loaded();
        let loaded = inner.models.iter().filter(others).count();
        if loaded < max {
            return Ok(());
        }
        let victim = inner
            .models
            .iter()
            .filter(others)
            .filter(|(_, e)| e.is_idle())
            .min_by_key(|(_, e)| e.last_used.load(std::sync::atomic::Ordering::Relaxed))
            .map(|(n, _)| n.clone())
            .ok_or(RegistryError::NoIdleModel { max })?;
        tracing::info!("--models-max {max}: unloading {victim}, the least recently used");
        if let Some(e) = inner.models.get_mut(&victim) {
            for v in e.slots.keys().cloned().collect::<Vec<_>>() {
                e.retire(&v);
            }
        }
        self.publish(inner);
        Ok(())
    }

    /// `--memory-budget` and what loaded and draining versions hold of it.
    fn budget(&self) -> Budget {
        let engines = self.engines();
        let charged: u64 = engines.iter().map(|m| m.memory.total()).sum();
        let list: Vec<String> = engines
            .iter()
            .map(|m| format!("{} {} MiB", m.id(), m.memory.total() >> 20))
            .collect();
        Budget {
            total: self.options.memory_budget,
            left: self.options.memory_budget.saturating_sub(charged),
            charged: if list.is_empty() {
                "nothing loaded".into()
            } else {
                format!("loaded: {}", list.join(", "))
            },
        }
    }
}

pub(super) fn entry<'a>(
    inner: &'a mut super::state::Inner,
    name: &str,
) -> Result<&'a mut Entry, RegistryError> {
    inner
        .models
        .get_mut(name)
        .ok_or_else(|| RegistryError::UnknownModel(name.to_string()))
}
