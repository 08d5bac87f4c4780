//! What the operator configures: models, their versions and where each comes from, from
//! `--model [NAME=]PATH` flags and a `--models FILE` in TOML.
//!
//! ```toml
//! [[models]]
//! name = "chat"
//! live = "2"                        # default: the last version listed
//! args = ["--max-num-seqs", "64"]   # `serve` flags for every version of this model
//! [[models.versions]]
//! version = "1"
//! path = "/models/chat-v1.gguf"
//! [[models.versions]]
//! version = "2"
//! path = "/models/chat-v2.gguf"
//! args = ["--kv-cache-memory", "268435456"]
//! [models.traffic]                  # optional canary split by weight
//! "1" = 90
//! "2" = 10
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::RegistryError;

/// Where a version's weights come from and the `serve` model and engine flags it loads with
/// (`--load-format dummy`, `--kv-cache-memory`, `--max-num-seqs`, ...), on top of the
/// server's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSource {
    /// A GGUF file or a Hugging Face directory; none: the default model.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub args: Vec<String>,
}

/// A model as configured: its versions and which one serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    pub name: String,
    pub versions: BTreeMap<String, ModelSource>,
    pub live: String,
    /// A canary split, version to weight (empty: all traffic to `live`).
    pub traffic: BTreeMap<String, u32>,
}

/// The version name of a model given by `--model`.
pub const FIRST_VERSION: &str = "1";

/// A model or version name: what fits in a URL path segment and a metrics label, and leaves
/// `@` to separate the two.
pub fn check_name(what: &str, name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "{what} `{name}` must be 1 to 128 of A-Z a-z 0-9 - _ . :"
        )))
    }
}

/// `--model [NAME=]PATH`: a name before the first `=` when it is a valid model name (a
/// path with `=` in its file name can be written `./a=b.gguf`). Without a name the
/// loader names the model after its file.
pub fn parse_model_flag(value: &str) -> (Option<String>, PathBuf) {
    match value.split_once('=') {
        Some((name, path)) if check_name("model name", name).is_ok() && !path.is_empty() => {
            (Some(name.to_string()), PathBuf::from(path))
        }
        _ => (None, PathBuf::from(value)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    models: Vec<ModelEntryFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntryFile {
    name: String,
    live: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    versions: Vec<VersionFile>,
    #[serde(default)]
    traffic: BTreeMap<String, u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionFile {
    version: String,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    args: Vec<String>,
}

/// Reads a `--models` file. Relative paths are relative to the file.
pub fn read_models_file(path: &Path) -> Result<Vec<ModelConfig>, RegistryError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RegistryError::Invalid(format!("reading {}: {e}", path.display())))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_models_file(&text, base)
        .map_err(|e| RegistryError::Invalid(format!("{}: {e}", path.display())))
}

pub fn parse_models_file(text: &str, base: &Path) -> Result<Vec<ModelConfig>, RegistryError> {
    let file: RegistryFile =
        toml::from_str(text).map_err(|e| RegistryError::Invalid(e.to_string()))?;
    let mut out: Vec<ModelConfig> = Vec::new();
    for m in file.models {
        check_name("model name", &m.name)?;
        if out.iter().any(|o| o.name == m.name) {
            return Err(RegistryError::Invalid(format!("model `{}` twice", m.name)));
        }
        let mut versions = BTreeMap::new();
        let mut last = None;
        for v in m.versions {
            check_name("version", &v.version)?;
            let source = ModelSource {
                path: v
                    .path
                    .map(|p| if p.is_relative() { base.join(p) } else { p }),
                args: m.args.iter().chain(&v.args).cloned().collect(),
            };
            if versions.insert(v.version.clone(), source).is_some() {
                return Err(RegistryError::Invalid(format!(
                    "model `{}`: version `{}` twice",
                    m.name, v.version
                )));
            }
            last = Some(v.version);
        }
        let Some(live) = m.live.or(last) else {
            return Err(RegistryError::Invalid(format!(
                "model `{}` lists no versions",
                m.name
            )));
        };
        if !versions.contains_key(&live) {
            return Err(RegistryError::Invalid(format!(
                "model `{}`: live version `{live}` is not listed",
                m.name
            )));
        }
        check_traffic(&m.name, &m.traffic, |v| versions.contains_key(v))?;
        out.push(ModelConfig {
            name: m.name,
            versions,
            live,
            traffic: m.traffic,
        });
    }
    Ok(out)
}

/// A split names known versions, with weights that add up to something.
pub fn check_traffic(
    model: &str,
    traffic: &BTreeMap<String, u32>,
    known: impl Fn(&str) -> bool,
) -> Result<(), RegistryError> {
    if let Some(v) = traffic.keys().find(|v| !known(v)) {
        return Err(RegistryError::Invalid(format!(
            "model `{model}`: traffic names version `{v}`, which it does not have"
        )));
    }
    let total: u64 = traffic.values().map(|&w| u64::from(w)).sum();
    if !traffic.is_empty() && (total == 0 || traffic.values().any(|&w| w > 10_000)) {
        return Err(RegistryError::Invalid(format!(
            "model `{model}`: traffic weights must be 0 to 10000 and not all 0"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_flag_takes_a_name_only_when_it_is_one() {
        assert_eq!(
            parse_model_flag("chat=/m/a.gguf"),
            (Some("chat".into()), PathBuf::from("/m/a.gguf"))
        );
        assert_eq!(
            parse_model_flag("/m/a.gguf"),
            (None, PathBuf::from("/m/a.gguf"))
        );
        assert_eq!(
            parse_model_flag("./x=y.gguf"),
            (None, PathBuf::from("./x=y.gguf"))
        );
    }

    #[test]
    fn models_file_parses_and_refuses_mistakes() {
        let text = r#"
            [[models]]
            name = "chat"
            args = ["--max-num-seqs", "8"]
            versions = [
              { version = "1", path = "a.gguf" },
              { version = "2", path = "/abs/b.gguf", args = ["--load-format", "dummy"] },
            ]
            traffic = { "1" = 90, "2" = 10 }
        "#;
        let m = parse_models_file(text, Path::new("/etc/sluice")).unwrap();
        assert_eq!(m[0].live, "2");
        assert_eq!(
            m[0].versions["1"].path.as_deref(),
            Some(Path::new("/etc/sluice/a.gguf"))
        );
        assert_eq!(m[0].versions["2"].args.len(), 4);
        assert_eq!(m[0].traffic["1"], 90);
        for bad in [
            r#"[[models]]
               name = "a b"
               versions = [{ version = "1" }]"#,
            r#"[[models]]
               name = "a"
               versions = []"#,
            r#"[[models]]
               name = "a"
               live = "9"
               versions = [{ version = "1" }]"#,
            r#"[[models]]
               name = "a"
               versions = [{ version = "1" }]
               traffic = { "7" = 1 }"#,
            r#"[[models]]
               name = "a"
               versions = [{ version = "1", pth = "x" }]"#,
        ] {
            assert!(parse_models_file(bad, Path::new(".")).is_err(), "{bad}");
        }
    }
}
