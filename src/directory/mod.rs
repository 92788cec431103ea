//! The university directory that checks user IDs and university passwords.
pub mod file;
pub mod ldap;

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use serde_json::{Map, Value};

/// A student as the directory describes them.
#[derive(Debug, Clone)]
pub struct DirectoryUser {
    /// The directory's immutable id (entryUUID / objectGUID; the file directory's `id` or username).
    pub id: String,
    /// The normalised university user ID.
    pub username: String,
    /// Claims mapped from directory attributes (name, student_id, …).
    pub claims: Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// Unknown user or wrong password: the two are never told apart.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// Active Directory's "password expired / must change".
    #[error("the university password has expired")]
    PasswordExpired,
    #[error("the account is disabled")]
    Disabled,
    #[error("directory unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait UserDirectory: Send + Sync + 'static {
    /// Checks the university password. `username` is already normalised and `password` non-empty.
    async fn authenticate(
        &self,
        username: &str,
        password: &str,
    ) -> Result<DirectoryUser, DirectoryError>;
    /// Looks a student up again (refresh grants) without a password.
    async fn lookup(&self, username: &str) -> Result<Option<DirectoryUser>, DirectoryError>;
    /// Whether the directory answers, for `/readyz`.
    async fn check(&self) -> Result<(), DirectoryError>;
}

/// The directory `[directory]` describes (the embedded default's demo students for "demo").
pub async fn build(
    config: &crate::config::DirectoryConfig,
    hasher: Arc<crate::auth::passwords::PasswordHasher>,
) -> anyhow::Result<Arc<dyn UserDirectory>> {
    Ok(match config.kind.as_str() {
        "file" => Arc::new(file::FileDirectory::load(
            config
                .path
                .as_deref()
                .context("directory.path is required")?,
            hasher,
        )?),
        "demo" => Arc::new(file::demo_directory(hasher).await),
        "ldap" => Arc::new(ldap::LdapDirectory::new(config)?),
        other => anyhow::bail!("directory kind {other:?} is not available"),
    })
}
