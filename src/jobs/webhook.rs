//! Webhook delivery of finished async jobs, at least once, across crashes. When a job with a
//! `webhook_url` finishes (`completed`, `failed` or `cancelled`), the same transaction that records its end
//! adds its row to `webhooks` (`pending`, no attempts, due now; `store_jobs.rs`). A delivery
//! task POSTs the job object, and after each failed attempt records the attempt count and when
//! the next one is due (0.5 s doubling), so a server killed between two attempts resumes the
//! same schedule at its next start (`JobService::start`). A delivery that succeeded just before
//! a crash, not yet recorded, is sent again: receivers must accept duplicates (the job id
//! identifies one). After `WEBHOOK_ATTEMPTS` failures, or when the host is no longer allowed,
//! the row is `gave_up` with the last error.

use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, OptionalExtension};

use super::async_job::{check_webhook, job_json};
use super::store::Store;
use super::{JobError, JobService};

/// Attempts to deliver a webhook (the first and its retries).
pub const WEBHOOK_ATTEMPTS: u32 = 5;

/// A webhook's stored delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// `pending`, `delivered` or `gave_up`.
    pub state: String,
    /// Attempts made (and recorded) so far.
    pub attempts: u32,
    /// When the next attempt is due, in Unix milliseconds.
    pub next_at_ms: i64,
}

/// The delay after the `failures`th failed attempt (1-based): 0.5 s, 1 s, 2 s, 4 s, …
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64 << failures.saturating_sub(1).min(10))
}

pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    pub async fn delivery(&self, job_id: String) -> Result<Option<Delivery>, JobError> {
        self.call(move |c| {
            c.query_row(
                "SELECT state, attempts, next_at_ms FROM webhooks WHERE job_id = ?1",
                [job_id],
                |r| {
                    Ok(Delivery {
                        state: r.get(0)?,
                        attempts: r.get::<_, i64>(1)?.clamp(0, u32::MAX as i64) as u32,
                        next_at_ms: r.get(2)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    /// Jobs whose webhook is still to be delivered (to resume at start-up).
    pub async fn pending_deliveries(&self) -> Result<Vec<String>, JobError> {
        self.call(|c| {
            let mut st = c.prepare(
                "SELECT job_id FROM webhooks WHERE state = 'pending' ORDER BY next_at_ms",
            )?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    /// Records one attempt's outcome: `delivered`, or a failure, after which the next is due
    /// at `next_at_ms`, or none (`gave_up`) once `WEBHOOK_ATTEMPTS` were made.
    pub async fn record_attempt(
        &self,
        job_id: String,
        outcome: Result<(), String>,
        now_ms: i64,
    ) -> Result<(), JobError> {
        self.call(move |c| {
            let (state, next, error) = match outcome {
                Ok(()) => ("delivered", now_ms, None),
                Err(e) => {
                    let made: i64 = c.query_row(
                        "SELECT attempts + 1 FROM webhooks WHERE job_id = ?1",
                        [&job_id],
                        |r| r.get(0),
                    )?;
                    let made = made.clamp(0, u32::MAX as i64) as u32;
                    let next = now_ms + backoff(made).as_millis() as i64;
                    let state = if made >= WEBHOOK_ATTEMPTS {
                        "gave_up"
                    } else {
                        "pending"
                    };
                    (state, next, Some(e))
                }
            };
            c.execute(
                "UPDATE webhooks SET state = ?2, attempts = attempts + 1, next_at_ms = ?3, \
                 last_error = ?4 WHERE job_id = ?1 AND state = 'pending'",
                params![job_id, state, next, error],
            )
            .map(|_| ())
        })
        .await
    }

    /// Gives up without an attempt (the host is no longer allowed).
    pub async fn give_up_delivery(&self, job_id: String, error: String) -> Result<(), JobError> {
        self.call(move |c| {
            c.execute(
                "UPDATE webhooks SET state = 'gave_up', last_error = ?2 \
                 WHERE job_id = ?1 AND state = 'pending'",
                params![job_id, error],
            )
            .map(|_| ())
        })
        .await
    }
}

impl JobService {
    /// Delivers `job_id`'s webhook on its own task, from its stored state.
    pub(super) fn spawn_delivery(self: &Arc<Self>, job_id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.deliver(&job_id).await {
                tracing::error!("webhook of {job_id}: {e}");
            }
        });
    }

    async fn deliver(&self, job_id: &str) -> Result<(), JobError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| JobError::Internal(format!("no HTTP client for webhooks: {e}")))?;
        loop {
            let Some(d) = self.store.delivery(job_id.to_string()).await? else {
                return Ok(());
            };
            if d.state != "pending" {
                return Ok(());
            }
            let Some(job) = self.store.job(job_id.to_string()).await? else {
                return Ok(());
            };
            let Some(url) = job.webhook_url.clone() else {
                return Ok(());
            };
            // The operator may have narrowed the allowed hosts since the job was submitted.
            if let Err(e) = check_webhook(&url, &self.config.webhook_allowed_hosts) {
                tracing::warn!("webhook {url} of {job_id}: {e}");
                return self.store.give_up_delivery(job_id.to_string(), e).await;
            }
            let wait = d.next_at_ms.saturating_sub(unix_now_ms()).max(0) as u64;
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let outcome = match client.post(&url).json(&job_json(&job)).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("answered {}", r.status())),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = &outcome {
                tracing::warn!("webhook {url} of {job_id}, attempt {}: {e}", d.attempts + 1);
                if d.attempts + 1 >= WEBHOOK_ATTEMPTS {
                    tracing::warn!(
                        "webhook {url} of {job_id}: gave up after {WEBHOOK_ATTEMPTS} attempts"
                    );
                }
            }
            self.store
                .record_attempt(job_id.to_string(), outcome, unix_now_ms())
                .await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_half_a_second() {
        let ms: Vec<u128> = (1..=5).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 8000]);
        assert_eq!(backoff(0), backoff(1));
        assert_eq!(backoff(u32::MAX), backoff(11));
    }

    /// The delivery state is the database's: finishing a job with a webhook makes it pending,
    /// failed attempts keep their count and next time across a reopen (a restart), and the
    /// last allowed failure gives up.
    #[tokio::test]
    async fn the_delivery_state_survives_a_reopen() {
        let dir = std::env::temp_dir().join(format!("sluice-webhook-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir).unwrap();
        for (id, hook) in [
            ("job_a", Some("http://h/x")),
            ("job_b", None),
            ("job_c", Some("http://h/y")),
        ] {
            store
                .insert_job(crate::jobs::store::JobRow {
                    id: id.into(),
                    endpoint: "/v1/completions".into(),
                    body: "{}".into(),
                    status: "queued".into(),
                    webhook_url: hook.map(String::from),
                    result: None,
                    error: None,
                    created_at: 1,
                    started_at: None,
                    finished_at: None,
                })
                .await
                .unwrap();
        }
        store
            .finish_job("job_a".into(), "completed", Some("{}".into()), None, 10)
            .await
            .unwrap();
        store
            .finish_job("job_b".into(), "completed", Some("{}".into()), None, 10)
            .await
            .unwrap();
        // Cancelled jobs are announced too; a job without a webhook is not.
        store
            .finish_job("job_c".into(), "cancelled", None, None, 10)
            .await
            .unwrap();
        assert_eq!(
            store.pending_deliveries().await.unwrap(),
            ["job_a", "job_c"]
        );
        store
            .record_attempt("job_c".into(), Ok(()), 10_000)
            .await
            .unwrap();
        assert_eq!(store.pending_deliveries().await.unwrap(), ["job_a"]);
        let due = Delivery {
            state: "pending".into(),
            attempts: 0,
            next_at_ms: 10_000,
        };
        assert_eq!(store.delivery("job_a".into()).await.unwrap(), Some(due));

        store
            .record_attempt("job_a".into(), Err("500".into()), 20_000)
            .await
            .unwrap();
        store
            .record_attempt("job_a".into(), Err("500".into()), 30_000)
            .await
            .unwrap();
        drop(store);
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.pending_deliveries().await.unwrap(), ["job_a"]);
        let retrying = Delivery {
            state: "pending".into(),
            attempts: 2,
            next_at_ms: 31_000,
        };
        assert_eq!(
            store.delivery("job_a".into()).await.unwrap(),
            Some(retrying)
        );

        for n in 3..=WEBHOOK_ATTEMPTS {
            store
                .record_attempt("job_a".into(), Err("refused".into()), n as i64)
                .await
                .unwrap();
        }
        let d = store.delivery("job_a".into()).await.unwrap().unwrap();
        assert_eq!(
            (d.state.as_str(), d.attempts),
            ("gave_up", WEBHOOK_ATTEMPTS)
        );
        assert!(store.pending_deliveries().await.unwrap().is_empty());
        // Nothing changes a row that is no longer pending.
        store
            .record_attempt("job_a".into(), Ok(()), 99)
            .await
            .unwrap();
        assert_eq!(
            store.delivery("job_a".into()).await.unwrap().unwrap().state,
            "gave_up"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
