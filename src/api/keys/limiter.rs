//! One key's rate limits: requests and tokens per minute, each a bucket that refills
//! continuously (a minute's allowance at most), as OpenAI describes its own limits.
//!
//! A request takes one request from its bucket when it is admitted; its tokens (prompt plus
//! completion, as the usage reports them) are taken when it ends, so a key may go below zero
//! on tokens and then waits until the bucket refills above zero. A request is admitted only
//! while both buckets hold something.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Limits per minute; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

/// Which limit refused a request (OpenAI's error `type`: `requests` or `tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Self::Requests => "requests per min (RPM)",
            Self::Tokens => "tokens per min (TPM)",
        }
    }
}

/// A refusal: which limit, its numbers, and when to try again.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "Rate limit reached for API key `{key}` on {}: Limit {limit}, Used {used}, Requested \
     {requested}. Please try again in {}.",
    kind.unit(),
    format_reset(*retry_after)
)]
pub struct RateLimited {
    pub key: String,
    pub kind: LimitKind,
    pub limit: u64,
    pub used: u64,
    pub requested: u64,
    pub retry_after: Duration,
}

/// What the `x-ratelimit-*` headers report for one limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitState {
    pub kind: LimitKind,
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

#[derive(Debug)]
struct Bucket {
    limit: f64,
    /// What is left now; tokens may go below zero.
    level: f64,
}

impl Bucket {
    fn new(limit: f64) -> Self {
        Self {
            limit,
            level: limit,
        }
    }

    fn per_second(&self) -> f64 {
        self.limit / 60.0
    }

    fn refill(&mut self, elapsed: Duration) {
        self.level = (self.level + elapsed.as_secs_f64() * self.per_second()).min(self.limit);
    }

    /// How long until the bucket holds `level`.
    fn time_to(&self, level: f64) -> Duration {
        Duration::from_secs_f64(((level - self.level) / self.per_second()).clamp(0.0, 3600.0))
    }

    fn state(&self, kind: LimitKind) -> LimitState {
        LimitState {
            kind,
            limit: self.limit as u64,
            remaining: self.level.max(0.0).floor() as u64,
            reset: self.time_to(self.limit),
        }
    }
}

#[derive(Debug)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    updated: Instant,
}

/// A key's buckets, shared by its requests.
#[derive(Debug)]
pub struct RateLimiter {
    key: String,
    buckets: Mutex<Buckets>,
}

impl RateLimiter {
    /// `None` when `limits` limits nothing.
    pub fn new(key: &str, limits: Limits, now: Instant) -> Option<Self> {
        let requests = limits
            .requests_per_minute
            .map(|l| Bucket::new(f64::from(l)));
        let tokens = limits.tokens_per_minute.map(|l| Bucket::new(l as f64));
        (requests.is_some() || tokens.is_some()).then(|| Self {
            key: key.to_string(),
            buckets: Mutex::new(Buckets {
                requests,
                tokens,
                updated: now,
            }),
        })
    }

    fn with<T>(&self, now: Instant, f: impl FnOnce(&mut Buckets) -> T) -> T {
        let mut guard = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut *guard;
        let elapsed = now.saturating_duration_since(b.updated);
        b.updated = b.updated.max(now);
        for bucket in [&mut b.requests, &mut b.tokens].into_iter().flatten() {
            bucket.refill(elapsed);
        }
        f(b)
    }

    /// Admits one request (taking it from the requests bucket) or says which limit refuses.
    pub fn admit(&self, now: Instant) -> Result<(), RateLimited> {
        self.with(now, |b| {
            let refuse =
                |kind: LimitKind, bucket: &Bucket, needed: f64, requested: u64| RateLimited {
                    key: self.key.clone(),
                    kind,
                    limit: bucket.limit as u64,
                    used: (bucket.limit - bucket.level).max(0.0).ceil() as u64,
                    requested,
                    retry_after: bucket.time_to(needed),
                };
            if let Some(r) = &b.requests {
                if r.level < 1.0 {
                    return Err(refuse(LimitKind::Requests, r, 1.0, 1));
                }
            }
            if let Some(t) = &b.tokens {
                if t.level <= 0.0 {
                    return Err(refuse(LimitKind::Tokens, t, 1.0, 0));
                }
            }
            if let Some(r) = &mut b.requests {
                r.level -= 1.0;
            }
            Ok(())
        })
    }

    /// Charges a finished request's tokens.
    pub fn charge_tokens(&self, tokens: u64, now: Instant) {
        self.with(now, |b| {
            if let Some(t) = &mut b.tokens {
                // At most a minute's worth of debt: one huge request does not lock a key out
                // for longer than a minute.
                t.level = (t.level - tokens as f64).max(-t.limit);
            }
        });
    }

    /// Each configured limit's state, for the response headers.
    pub fn state(&self, now: Instant) -> Vec<LimitState> {
        self.with(now, |b| {
            let mut out = Vec::with_capacity(2);
            if let Some(r) = &b.requests {
                out.push(r.state(LimitKind::Requests));
            }
            if let Some(t) = &b.tokens {
                out.push(t.state(LimitKind::Tokens));
            }
            out
        })
    }
}

/// A duration as OpenAI writes its resets: `250ms`, `1.5s`, `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{}ms", ms.max(1));
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        return format!("{}s", s.trim_end_matches('0').trim_end_matches('.'));
    }
    let whole = d.as_secs();
    format!("{}m{}s", whole / 60, whole % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rpm: Option<u32>, tpm: Option<u64>, now: Instant) -> RateLimiter {
        let limits = Limits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        };
        RateLimiter::new("team-a", limits, now).unwrap()
    }

    #[test]
    fn requests_run_out_and_refill_continuously() {
        let t0 = Instant::now();
        let l = limiter(Some(3), None, t0);
        for _ in 0..3 {
            l.admit(t0).unwrap();
        }
        let e = l.admit(t0).unwrap_err();
        assert_eq!(
            (e.kind, e.limit, e.used, e.requested),
            (LimitKind::Requests, 3, 3, 1)
        );
        // Three a minute: one more every 20 s.
        assert_eq!(e.retry_after, Duration::from_secs(20));
        assert!(l.admit(t0 + Duration::from_secs(19)).is_err());
        l.admit(t0 + Duration::from_secs(20)).unwrap();
        let s = l.state(t0 + Duration::from_secs(20));
        assert_eq!(s[0].remaining, 0);
        assert_eq!(s[0].reset, Duration::from_secs(60));
    }

    #[test]
    fn tokens_are_charged_after_the_fact_and_block_until_refilled() {
        let t0 = Instant::now();
        let l = limiter(None, Some(600), t0);
        l.admit(t0).unwrap();
        l.charge_tokens(900, t0);
        let e = l.admit(t0).unwrap_err();
        assert_eq!(e.kind, LimitKind::Tokens);
        // 300 in debt at 10 tokens a second: above zero after 30.1 s.
        assert_eq!(e.retry_after, Duration::from_secs_f64(30.1));
        l.admit(t0 + Duration::from_secs(31)).unwrap();
        assert!(
            e.to_string().contains("tokens per min (TPM): Limit 600"),
            "{e}"
        );
        // Debt is bounded by one minute's allowance.
        l.charge_tokens(1_000_000, t0 + Duration::from_secs(31));
        assert!(l.admit(t0 + Duration::from_secs(31 + 121)).is_ok());
    }

    #[test]
    fn no_limits_means_no_limiter() {
        assert!(RateLimiter::new("k", Limits::default(), Instant::now()).is_none());
    }

    #[test]
    fn resets_read_as_openai_writes_them() {
        assert_eq!(format_reset(Duration::from_millis(250)), "250ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(20)), "20s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::ZERO), "1ms");
    }
}
