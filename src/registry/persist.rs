//! The state file: which versions each model has, which are loaded, which is live, the
//! rollback targets and the traffic split, written atomically (a temporary file, fsync,
//! rename, fsync of the directory) on every change and read at start-up, so the live version
//! of each model survives a restart.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ops::Activation;
use super::state::{Entry, Inner, Slot};
use super::{ModelConfig, ModelRegistry, ModelSource, RegistryError};

/// The versions `start` loads, per model (the live one first), from `plan_start`.
pub struct StartPlan(Vec<(String, Vec<String>, String)>);

#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    models: BTreeMap<String, SavedModel>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedModel {
    live: String,
    previous: Vec<String>,
    loaded: Vec<String>,
    traffic: BTreeMap<String, u32>,
    versions: BTreeMap<String, ModelSource>,
}

impl ModelRegistry {
    /// Saves the state file (when there is one). A failure is logged: serving goes on, and
    /// the next change tries again.
    pub(super) fn save(&self) {
        let inner = self.lock();
        self.save_locked(&inner);
    }

    fn save_locked(&self, inner: &Inner) {
        let Some(path) = &self.options.state_file else {
            return;
        };
        let state = SavedState {
            models: inner
                .models
                .iter()
                .map(|(name, e)| (name.clone(), saved(e)))
                .collect(),
        };
        if let Err(e) = write_atomically(path, &state) {
            tracing::error!(
                "saving the model registry's state to {}: {e}",
                path.display()
            );
        }
    }

    /// What serves at start-up: what the state file says was loaded (its live versions, its
    /// rollback targets and splits), else each configured model's live version and the
    /// versions its split names; within `--models-max`, in configuration order. Marks them
    /// `loading` at once, so requests that arrive before `start` loads them wait instead of
    /// getting a 404.
    pub fn plan_start(&self) -> Result<StartPlan, RegistryError> {
        let max = match self.options.models_max {
            0 => usize::MAX,
            m => m,
        };
        let mut plan = self.restore()?;
        plan.retain(|(_, versions, _)| !versions.is_empty());
        for (name, _, _) in plan.iter().skip(max) {
            tracing::info!("{name}: not loaded at start (--models-max {max})");
        }
        plan.truncate(max);
        let mut inner = self.lock();
        let inner = &mut *inner;
        for (name, versions, _) in &plan {
            if let Some(e) = inner.models.get_mut(name) {
                for v in versions {
                    e.slots.insert(v.clone(), Slot::Loading);
                }
            }
        }
        self.publish(inner);
        Ok(StartPlan(plan))
    }

    /// Loads `plan`; a live version that fails to load fails the start.
    pub async fn start(self: &Arc<Self>, plan: StartPlan) -> Result<(), RegistryError> {
        for (name, versions, live) in plan.0 {
            for v in versions {
                match self.load_version(&name, &v, None, Activation::Keep).await {
                    Ok(_) => {}
                    Err(e) if v == live => return Err(e),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        self.save();
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Applies the state file to the configured models; returns what to load per model (the
    /// live version first).
    fn restore(&self) -> Result<Vec<(String, Vec<String>, String)>, RegistryError> {
        let saved = match &self.options.state_file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    RegistryError::Invalid(format!("reading {}: {e}", path.display()))
                })?;
                serde_json::from_str::<SavedState>(&text)
                    .map_err(|e| RegistryError::Invalid(format!("{}: {e}", path.display())))?
            }
            _ => SavedState::default(),
        };
        let mut inner = self.lock();
        let inner = &mut *inner;
        for (name, s) in saved.models {
            let e = inner.models.entry(name.clone()).or_insert_with(|| {
                Entry::new(ModelConfig {
                    name: name.clone(),
                    versions: BTreeMap::new(),
                    live: s.live.clone(),
                    traffic: BTreeMap::new(),
                })
            });
            if !inner.order.contains(&name) {
                inner.order.push(name.clone());
            }
            for (v, src) in s.versions {
                // The configuration wins for a version both name: the operator edited it.
                e.sources.entry(v).or_insert(src);
            }
            if e.sources.contains_key(&s.live) {
                e.live = s.live;
            }
            e.previous = s.previous;
            e.previous.retain(|v| e.sources.contains_key(v));
            e.traffic = s.traffic;
            e.traffic.retain(|v, _| s.loaded.contains(v));
            e.slots.clear();
            // Remembered as loaded; `start` loads exactly these (none for a model that was
            // unloaded).
            e.pending_start = Some(s.loaded);
        }
        let mut plan = Vec::new();
        for name in &inner.order {
            let Some(e) = inner.models.get_mut(name) else {
                continue;
            };
            let wanted: Vec<String> = match e.pending_start.take() {
                Some(saved) => saved,
                None => std::iter::once(e.live.clone())
                    .chain(e.traffic.keys().cloned())
                    .collect(),
            };
            // The live version first: its failure fails the start.
            let mut versions: Vec<String> = wanted
                .iter()
                .filter(|v| **v == e.live)
                .chain(wanted.iter().filter(|v| **v != e.live))
                .filter(|v| e.sources.contains_key(*v))
                .cloned()
                .collect();
            versions.dedup();
            plan.push((name.clone(), versions, e.live.clone()));
        }
        Ok(plan)
    }
}

fn saved(e: &Entry) -> SavedModel {
    SavedModel {
        live: e.live.clone(),
        previous: e.previous.clone(),
        loaded: e
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, super::state::Slot::Ready(_)))
            .map(|(v, _)| v.clone())
            .collect(),
        traffic: e.traffic.clone(),
        versions: e.sources.clone(),
    }
}

/// Writes `value` as JSON to `path` so that a crash at any point leaves either the old file
/// or the new one.
fn write_atomically(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_whole_files_only() {
        let dir = std::env::temp_dir().join(format!("sluice-persist-{}", uuid::Uuid::new_v4()));
        let path = dir.join("models.json");
        super::write_atomically(&path, &serde_json::json!({"a": 1})).unwrap();
        super::write_atomically(&path, &serde_json::json!({"a": 2})).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["a"], 2);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
