//! The outbox worker: leases due jobs (mail, back-channel logout), delivers them and records the
//! outcome. At-least-once: a crash between delivery and record re-sends with the same Message-ID.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::transport::{Delivery, Transport};
use super::MailBody;
use crate::app::AppState;
use crate::clock::random_id;
use crate::store::OutboxJob;

const LEASE: i64 = 60;
const MAX_BACKOFF: i64 = 60;
const MAX_ATTEMPTS: i64 = 200;
const BACKCHANNEL_MAX_ATTEMPTS: i64 = 30;

/// A queued back-channel logout: the token is signed afresh at each attempt.
#[derive(Debug, Serialize, Deserialize)]
pub struct BackchannelJob {
    pub client_id: String,
    pub account_id: String,
    pub sid: String,
}

/// Seconds until the next attempt: 1, 2, 4, … at most a minute.
pub fn backoff(attempts: i64) -> i64 {
    (1i64 << (attempts - 1).clamp(0, 6)).min(MAX_BACKOFF)
}

pub fn spawn(state: AppState, transport: Transport) {
    let owner = random_id();
    tokio::spawn(async move {
        let transport = std::sync::Arc::new(transport);
        loop {
            // Each job runs in its own task, so a panic costs that attempt, not the worker.
            let job = {
                let (state, transport, owner) = (state.clone(), transport.clone(), owner.clone());
                tokio::spawn(async move { run_once(&state, &transport, &owner).await })
            };
            match job.await {
                Ok(Ok(true)) => continue,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "outbox worker: store unavailable"),
                Err(e) => {
                    tracing::error!(error = %e, "outbox job panicked; it will be retried after its lease")
                }
            }
            tokio::select! {
                _ = state.outbox_wakeup.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    });
}

/// Works on one due job; false when none was due.
pub async fn run_once(
    state: &AppState,
    transport: &Transport,
    owner: &str,
) -> anyhow::Result<bool> {
    let now = state.clock.now();
    let Some(job) = state.store.claim_job(owner, now, now + LEASE).await? else {
        return Ok(false);
    };
    let outcome = match job.kind.as_str() {
        "mail" => deliver_mail(state, transport, &job).await,
        "backchannel_logout" => deliver_backchannel(state, &job).await,
        other => Delivery::Permanent(format!("unknown job kind {other}")),
    };
    let now = state.clock.now();
    crate::metrics::delivery(
        &job.kind,
        match outcome {
            Delivery::Sent(_) => "sent",
            Delivery::Retry(_) => "retry",
            Delivery::Permanent(_) => "failed",
        },
    );
    match outcome {
        Delivery::Sent(reply) => state.store.job_sent(&job.id, owner, now, &reply).await?,
        Delivery::Permanent(error) => {
            tracing::warn!(job = %job.id, kind = %job.kind, error = %error, "delivery failed for good");
            state.store.job_failed(&job.id, owner, now, &error).await?
        }
        Delivery::Retry(error) => {
            let limit = if job.kind == "mail" {
                MAX_ATTEMPTS
            } else {
                BACKCHANNEL_MAX_ATTEMPTS
            };
            if job.attempts >= limit {
                state.store.job_failed(&job.id, owner, now, &error).await?
            } else {
                tracing::info!(job = %job.id, kind = %job.kind, attempts = job.attempts, error = %error, "delivery will be retried");
                state
                    .store
                    .job_retry(&job.id, owner, now + backoff(job.attempts), &error)
                    .await?
            }
        }
    }
    Ok(true)
}

async fn deliver_mail(state: &AppState, transport: &Transport, job: &OutboxJob) -> Delivery {
    let body: MailBody = match state
        .kek
        .decrypt(&job.payload)
        .ok()
        .and_then(|plain| serde_json::from_slice(&plain).ok())
    {
        Some(body) => body,
        None => return Delivery::Permanent("the queued mail cannot be decrypted".into()),
    };
    transport
        .deliver(
            &state.config.mail.from,
            &body,
            &job.message_id,
            state.clock.now(),
        )
        .await
}

async fn deliver_backchannel(state: &AppState, job: &OutboxJob) -> Delivery {
    let Ok(request) = serde_json::from_str::<BackchannelJob>(&job.payload) else {
        return Delivery::Permanent("malformed back-channel job".into());
    };
    let client = match crate::oidc::clients::find(state, &request.client_id).await {
        Ok(Some(client)) => client,
        Ok(None) => return Delivery::Permanent("the client no longer exists".into()),
        Err(_) => return Delivery::Retry("store unavailable".into()),
    };
    let account = match state.store.get_account(&request.account_id).await {
        Ok(Some(account)) => account,
        Ok(None) => return Delivery::Permanent("the account no longer exists".into()),
        Err(_) => return Delivery::Retry("store unavailable".into()),
    };
    match crate::oidc::backchannel::deliver(state, &client, &account, &request.sid).await {
        Ok(status) => Delivery::Sent(status),
        Err(e) => Delivery::Retry(e),
    }
}
