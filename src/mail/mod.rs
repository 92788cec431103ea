//! Mail: messages are rendered from templates in the student's language, queued in the outbox
//! (bodies encrypted at rest) and delivered by the outbox worker over SMTP or to files.
pub mod transport;
pub mod worker;

use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::clock::{random_id, Timestamp};
use crate::store::OutboxJob;
use crate::ui::Locale;

/// What the outbox stores (encrypted) for a mail.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailBody {
    pub to: String,
    pub subject: String,
    pub text: String,
}

/// Renders `templates/mail/<template>.txt` with `subject_key` from the catalog.
pub fn render(
    state: &AppState,
    locale: Locale,
    template: &str,
    subject_key: &str,
    ctx: minijinja::Value,
) -> anyhow::Result<(String, String)> {
    let text = state
        .ui
        .render(&format!("mail/{template}.txt"), locale, ctx)?;
    Ok((state.ui.message(locale, subject_key), text))
}

/// An outbox job for a mail; the body is encrypted under the key-encryption key.
pub fn job(
    state: &AppState,
    to: &str,
    subject: &str,
    text: &str,
    now: Timestamp,
) -> anyhow::Result<OutboxJob> {
    let id = random_id();
    let host = state
        .config
        .issuer_url()
        .host_str()
        .unwrap_or("localhost")
        .to_string();
    let body = MailBody {
        to: to.into(),
        subject: subject.into(),
        text: text.into(),
    };
    Ok(OutboxJob {
        id: id.clone(),
        kind: "mail".into(),
        recipient: to.into(),
        subject: subject.into(),
        payload: state.kek.encrypt(&serde_json::to_vec(&body)?)?,
        message_id: format!("<{id}@{host}>"),
        attempts: 0,
        next_attempt_at: now,
        last_error: None,
        created_at: now,
        sent_at: None,
        failed_at: None,
        lease_owner: None,
        lease_until: None,
    })
}

/// Queues a mail and wakes the worker; delivery is attempted within about a second.
pub async fn send(
    state: &AppState,
    locale: Locale,
    to: &str,
    template: &str,
    subject_key: &str,
    ctx: minijinja::Value,
) -> anyhow::Result<()> {
    let (subject, text) = render(state, locale, template, subject_key, ctx)?;
    let job = job(state, to, &subject, &text, state.clock.now())?;
    state.store.enqueue(&job).await?;
    state.outbox_wakeup.notify_one();
    Ok(())
}

/// `a****@example.ac.jp`: enough for the owner to recognise, not enough to harvest.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}****@{domain}")
        }
        None => "****".into(),
    }
}
