//! `nidan user import`: moving students in from another system. JSON Lines, one student a line:
//! `{"username": "s2401001", "email": "a@example.ac.jp", "second_password": "..."}` or with
//! `"second_password_hash": "$argon2id$..."`. The email counts as verified. Every line is checked
//! first; with any error nothing is imported. Importing the same file twice changes nothing.
use std::sync::Arc;

use serde::Deserialize;

use crate::auth::normalize_username;
use crate::auth::passwords::PasswordHasher;
use crate::auth::second_password::check;
use crate::clock::{random_bytes, random_id, Timestamp};
use crate::crypto::b64url;
use crate::directory::UserDirectory;
use crate::store::DynStore;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    username: String,
    email: String,
    second_password: Option<String>,
    second_password_hash: Option<String>,
}

struct Checked {
    username: String,
    email: String,
    directory_id: String,
    claims: String,
    second_password: Result<String, String>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub imported: usize,
    pub unchanged: usize,
    pub errors: Vec<String>,
}

pub async fn import(
    store: &DynStore,
    directory: &Arc<dyn UserDirectory>,
    hasher: &PasswordHasher,
    input: &str,
    dry_run: bool,
    now: Timestamp,
) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let mut checked = Vec::new();
    for (number, text) in input.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        match check_line(directory, text).await {
            Ok(line) => checked.push(line),
            Err(e) => report.errors.push(format!("line {number}: {e}")),
        }
    }
    if !report.errors.is_empty() || dry_run {
        return Ok(report);
    }
    for line in checked {
        let account = store
            .upsert_account(
                &line.directory_id,
                &line.username,
                &line.claims,
                &random_id(),
                &b64url(&random_bytes::<16>()),
                now,
            )
            .await?;
        let hash = match &line.second_password {
            Ok(hash) => hash.clone(),
            // Keep an existing hash of the same password, so a re-import changes nothing.
            Err(plain) => match &account.second_password_hash {
                Some(existing) if hasher.verify(Some(existing), plain).await => existing.clone(),
                _ => hasher.hash(plain).await,
            },
        };
        let same = account.email.as_deref() == Some(line.email.as_str())
            && account.email_verified_at.is_some()
            && account.second_password_hash.as_deref() == Some(hash.as_str());
        if same {
            report.unchanged += 1;
            continue;
        }
        if account.email.as_deref() != Some(line.email.as_str())
            || account.email_verified_at.is_none()
        {
            store
                .set_account_email(&account.id, &line.email, now)
                .await?;
        }
        if account.second_password_hash.as_deref() != Some(hash.as_str()) {
            store.set_second_password(&account.id, &hash, now).await?;
        }
        report.imported += 1;
    }
    Ok(report)
}

async fn check_line(directory: &Arc<dyn UserDirectory>, text: &str) -> Result<Checked, String> {
    let line: Line =
        serde_json::from_str(text).map_err(|e| format!("not a valid student record: {e}"))?;
    let username = normalize_username(&line.username);
    if username.is_empty() {
        return Err("username is empty".into());
    }
    let email = super::normalize_email(&line.email);
    if !super::email_is_valid(&email) {
        return Err(format!(
            "{username}: email {email:?} is not a valid address"
        ));
    }
    let second_password = match (line.second_password, line.second_password_hash) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{username}: give second_password or second_password_hash, not both"
            ))
        }
        (None, None) => {
            return Err(format!(
                "{username}: second_password or second_password_hash is required"
            ))
        }
        (Some(plain), None) => {
            let broken = check(&plain, &plain, false);
            if !broken.is_empty() {
                let rules: Vec<&str> = broken.iter().map(|v| v.message_key()).collect();
                return Err(format!(
                    "{username}: the second password breaks the rules ({})",
                    rules.join(", ")
                ));
            }
            Err(plain)
        }
        (None, Some(hash)) => {
            let parsed = argon2::PasswordHash::new(&hash)
                .map_err(|_| format!("{username}: second_password_hash is not a PHC string"))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(format!(
                    "{username}: second_password_hash must be an argon2 hash"
                ));
            }
            Ok(hash)
        }
    };
    let user = directory
        .lookup(&username)
        .await
        .map_err(|e| format!("{username}: the directory could not be asked ({e})"))?
        .ok_or_else(|| format!("{username}: not found in the directory"))?;
    Ok(Checked {
        username,
        email,
        directory_id: user.id,
        claims: serde_json::Value::Object(user.claims).to_string(),
        second_password,
    })
}
