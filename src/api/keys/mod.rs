//! The API keys a server accepts and their rate limits: `--api-key` (one key, no limits) and
//! `--api-keys-file` (TOML, any number of named keys, each with optional requests and tokens
//! per minute). A key is found by its SHA-256 digest, so the lookup's timing says nothing of
//! the key; each limited key owns one `RateLimiter` that all its requests share.
//!
//! ```toml
//! [[key]]
//! name = "team-a"
//! key = "sk-team-a-..."
//! requests_per_minute = 600
//! tokens_per_minute = 200000
//! ```

mod limiter;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use limiter::{format_reset, LimitKind, LimitState, Limits, RateLimited, RateLimiter};

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("--api-keys-file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// One accepted key.
#[derive(Debug)]
pub struct ApiKey {
    /// The name logs and errors use (never the key itself).
    pub name: String,
    /// `None`: unlimited.
    pub limiter: Option<RateLimiter>,
}

/// Every accepted key; empty means the API is open.
#[derive(Debug, Default)]
pub struct ApiKeys {
    by_digest: HashMap<[u8; 32], Arc<ApiKey>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    key: String,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    /// `single` (`--api-key`, unlimited) and the keys of `file` (`--api-keys-file`).
    pub fn load(single: Option<&str>, file: Option<&Path>) -> Result<Self, KeysError> {
        let mut keys = Self::default();
        if let Some(k) = single.filter(|k| !k.is_empty()) {
            keys.insert(k, "api-key", Limits::default());
        }
        if let Some(path) = file {
            let fail = |message: String| KeysError::File {
                path: path.to_path_buf(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            let parsed: KeysFile = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
            if parsed.key.is_empty() {
                return Err(fail("no [[key]] entries".into()));
            }
            for e in parsed.key {
                if e.key.trim().is_empty() || e.name.trim().is_empty() {
                    return Err(fail(
                        "every [[key]] needs a non-empty `name` and `key`".into(),
                    ));
                }
                if e.requests_per_minute == Some(0) || e.tokens_per_minute == Some(0) {
                    return Err(fail(format!(
                        "key `{}`: a limit of 0 would refuse everything; remove the key",
                        e.name
                    )));
                }
                let limits = Limits {
                    requests_per_minute: e.requests_per_minute,
                    tokens_per_minute: e.tokens_per_minute,
                };
                if !keys.insert(&e.key, &e.name, limits) {
                    return Err(fail(format!("key `{}` is listed twice", e.name)));
                }
            }
        }
        Ok(keys)
    }

    /// False when the key was already there.
    fn insert(&mut self, key: &str, name: &str, limits: Limits) -> bool {
        let entry = ApiKey {
            name: name.to_string(),
            limiter: RateLimiter::new(name, limits, Instant::now()),
        };
        self.by_digest
            .insert(digest(key), Arc::new(entry))
            .is_none()
    }

    /// No key configured: every request is let in.
    pub fn is_open(&self) -> bool {
        self.by_digest.is_empty()
    }

    pub fn find(&self, given: &str) -> Option<Arc<ApiKey>> {
        self.by_digest.get(&digest(given)).cloned()
    }
}

tokio::task_local! {
    /// The key of the request being handled, set by the key check around the handler (and
    /// around a WebSocket session): generation requests are admitted and charged against it.
    static CURRENT: Option<Arc<ApiKey>>;
}

/// Runs `f` as a request made with `key`.
pub async fn scope<F: Future>(key: Option<Arc<ApiKey>>, f: F) -> F::Output {
    CURRENT.scope(key, f).await
}

/// The key of the request being handled (`None` outside a key check, or with no keys).
pub fn current() -> Option<Arc<ApiKey>> {
    CURRENT.try_with(Clone::clone).ok().flatten()
}

/// Admits one generation request against the current key's limits.
pub fn admit_current() -> Result<(), RateLimited> {
    match current().as_ref().and_then(|k| k.limiter.as_ref()) {
        Some(limiter) => limiter.admit(Instant::now()),
        None => Ok(()),
    }
}

impl ApiKey {
    /// Charges a finished request's prompt and completion tokens.
    pub fn charge(&self, tokens: usize) {
        if let Some(l) = &self.limiter {
            l.charge_tokens(tokens as u64, Instant::now());
        }
    }

    /// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, for each limit.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let Some(limiter) = &self.limiter else { return };
        for s in limiter.state(Instant::now()) {
            let kind = s.kind.as_str();
            let values = [
                ("limit", s.limit.to_string()),
                ("remaining", s.remaining.to_string()),
                ("reset", format_reset(s.reset)),
            ];
            for (what, value) in values {
                let name = HeaderName::try_from(format!("x-ratelimit-{what}-{kind}"));
                if let (Ok(name), Ok(value)) = (name, HeaderValue::try_from(value)) {
                    headers.insert(name, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keys file, removed on drop.
    struct TempFile(PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file(text: &str) -> TempFile {
        let p = std::env::temp_dir().join(format!("sluice-keys-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&p, text).unwrap();
        TempFile(p)
    }

    #[test]
    fn keys_file_and_single_key() {
        let f = file(
            "[[key]]\nname = \"a\"\nkey = \"ka\"\nrequests_per_minute = 5\n\n\
             [[key]]\nname = \"b\"\nkey = \"kb\"\n",
        );
        let keys = ApiKeys::load(Some("solo"), Some(&f.0)).unwrap();
        assert!(!keys.is_open());
        assert!(keys.find("ka").unwrap().limiter.is_some());
        assert!(keys.find("kb").unwrap().limiter.is_none());
        assert_eq!(keys.find("solo").unwrap().name, "api-key");
        assert!(keys.find("kc").is_none());
        assert!(ApiKeys::load(None, None).unwrap().is_open());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let cases = [
            (
                "[[key]]\nname = \"a\"\nkey = \"k\"\n[[key]]\nname = \"b\"\nkey = \"k\"\n",
                "twice",
            ),
            (
                "[[key]]\nname = \"a\"\nkey = \"k\"\nrpm = 3\n",
                "unknown field",
            ),
            ("[[key]]\nname = \"a\"\nkey = \"\"\n", "non-empty"),
            (
                "[[key]]\nname = \"a\"\nkey = \"k\"\ntokens_per_minute = 0\n",
                "limit of 0",
            ),
            ("", "no [[key]]"),
        ];
        for (text, reason) in cases {
            let f = file(text);
            let e = ApiKeys::load(None, Some(&f.0)).unwrap_err().to_string();
            assert!(e.contains(reason), "{text:?}: {e}");
        }
    }
}
