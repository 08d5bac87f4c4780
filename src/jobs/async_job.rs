//! Async single requests: a chat or completion body stored as a job (`queued`), run at the
//! lowest priority (`in_progress`), its response or error kept (`completed`, `failed`), or
//! `cancelled`. With a webhook URL (to a host the operator allowed), the finished job is
//! POSTed there, retried with backoff, durably (`webhook.rs`).

use std::sync::Arc;

use serde_json::{json, Value};

use super::store::JobRow;
use super::{unix_now, Endpoint, Failure, JobError, JobService, JOB_PRIORITY};

/// The job object clients read.
pub fn job_json(j: &JobRow) -> Value {
    let parse = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
    };
    json!({
        "id": j.id,
        "object": "async_job",
        "endpoint": j.endpoint,
        "status": j.status,
        "created_at": j.created_at,
        "started_at": j.started_at,
        "finished_at": j.finished_at,
        "webhook_url": j.webhook_url,
        "result": parse(&j.result),
        "error": parse(&j.error),
    })
}

/// Checks a webhook URL: http(s), to a host in `allowed` (`host` or `host:port`).
pub fn check_webhook(url: &str, allowed: &[String]) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "the scheme must be http or https, got `{}`",
            parsed.scheme()
        ));
    }
    let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
    let with_port = parsed
        .port_or_known_default()
        .map(|p| format!("{host}:{p}"));
    let ok = allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        a == host || Some(&a) == with_port.as_ref()
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "webhooks may go only to the hosts the server allows (--webhook-allowed-hosts); `{host}` is not one"
        ))
    }
}

impl JobService {
    /// Stores a job (`queued`) and starts it.
    pub async fn submit_job(
        self: &Arc<Self>,
        endpoint: Endpoint,
        body: Value,
        webhook_url: Option<String>,
    ) -> Result<JobRow, JobError> {
        let row = JobRow {
            id: format!("job_{}", uuid::Uuid::new_v4().simple()),
            endpoint: endpoint.url().to_string(),
            body: body.to_string(),
            status: "queued".into(),
            webhook_url,
            result: None,
            error: None,
            created_at: unix_now(),
            started_at: None,
            finished_at: None,
        };
        self.store.insert_job(row.clone()).await?;
        self.spawn_job(row.id.clone());
        Ok(row)
    }

    /// Cancels an unfinished job; `None` when there is no such job. A job with a webhook
    /// announces its cancellation there too: whoever waits on the webhook is not left waiting.
    pub async fn cancel_job(self: &Arc<Self>, id: &str) -> Result<Option<JobRow>, JobError> {
        let changed = self
            .store
            .finish_job(id.to_string(), "cancelled", None, None, unix_now())
            .await?;
        if changed {
            self.signal_cancel(id);
        }
        let job = self.store.job(id.to_string()).await?;
        if changed && job.as_ref().is_some_and(|j| j.webhook_url.is_some()) {
            self.spawn_delivery(id.to_string());
        }
        Ok(job)
    }

    pub(super) fn spawn_job(self: &Arc<Self>, id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut cancel = this.register(&id);
            match this.drive_job(&id, &mut cancel).await {
                Ok(Some(job)) => {
                    if job.webhook_url.is_some() {
                        this.spawn_delivery(job.id);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!("async job {id} stopped: {e}"),
            }
            this.unregister(&id);
        });
    }

    /// Runs a job to its end; the finished job when it ended here.
    async fn drive_job(
        &self,
        id: &str,
        cancel: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<JobRow>, JobError> {
        let Some(exec) = self.executor() else {
            return Ok(None);
        };
        let Some(job) = self.store.job(id.to_string()).await? else {
            return Ok(None);
        };
        if !matches!(job.status.as_str(), "queued" | "in_progress") {
            return Ok(None);
        }
        let _permit = tokio::select! {
            Ok(()) = cancel.changed() => return Ok(None),
            p = self.permits.clone().acquire_owned() => p.map_err(|e| JobError::Internal(e.to_string()))?,
        };
        if !self.store.start_job(id.to_string(), unix_now()).await? {
            return Ok(None);
        }
        let (endpoint, body) = match (
            Endpoint::from_url(&job.endpoint),
            serde_json::from_str::<Value>(&job.body),
        ) {
            (Some(e), Ok(b)) => (e, b),
            _ => {
                let error =
                    json!({"message": "the stored job is unreadable", "type": "server_error"});
                self.store
                    .finish_job(
                        id.to_string(),
                        "failed",
                        None,
                        Some(error.to_string()),
                        unix_now(),
                    )
                    .await?;
                return self.store.job(id.to_string()).await;
            }
        };
        let mut attempt = 0;
        let outcome = loop {
            let out = tokio::select! {
                Ok(()) = cancel.changed() => return Ok(None),
                out = exec.execute(endpoint, body.clone(), JOB_PRIORITY) => out,
            };
            match out {
                Err(Failure { retry: true, .. }) if !exec.shutting_down() => {
                    tokio::time::sleep(Self::retry_delay(attempt)).await;
                    attempt += 1;
                }
                other => break other,
            }
        };
        if exec.shutting_down() {
            // Left `in_progress`: it reruns at the next start.
            return Ok(None);
        }
        let (status, result, error) = match outcome {
            Ok(v) => ("completed", Some(v.to_string()), None),
            Err(f) => ("failed", None, Some(f.body.to_string())),
        };
        if !self
            .store
            .finish_job(id.to_string(), status, result, error, unix_now())
            .await?
        {
            return Ok(None);
        }
        self.store.job(id.to_string()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_hosts() {
        let allowed = vec![
            "hooks.example.com".to_string(),
            "127.0.0.1:9000".to_string(),
        ];
        assert!(check_webhook("https://hooks.example.com/x", &allowed).is_ok());
        assert!(check_webhook("http://127.0.0.1:9000/x", &allowed).is_ok());
        assert!(check_webhook("http://127.0.0.1:9001/x", &allowed).is_err());
        assert!(check_webhook("http://evil.com/x", &allowed).is_err());
        assert!(check_webhook("file:///etc/passwd", &allowed).is_err());
        assert!(check_webhook("https://hooks.example.com/x", &[]).is_err());
    }
}
