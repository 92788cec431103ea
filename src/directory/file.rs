//! The file directory: students listed in a TOML file with argon2id password hashes, for demos and
//! small sites. The embedded default uses it with a few demo students.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{DirectoryError, DirectoryUser, UserDirectory};
use crate::auth::normalize_username;
use crate::auth::passwords::PasswordHasher;

#[derive(Debug, Deserialize)]
struct UsersFile {
    #[serde(default)]
    users: Vec<FileUser>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileUser {
    pub username: String,
    /// Immutable id; defaults to the username.
    #[serde(default)]
    pub id: Option<String>,
    pub password_hash: String,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub claims: Map<String, Value>,
}

pub struct FileDirectory {
    users: HashMap<String, FileUser>,
    hasher: Arc<PasswordHasher>,
}

impl FileDirectory {
    pub fn load(path: &Path, hasher: Arc<PasswordHasher>) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read directory file {}", path.display()))?;
        let file: UsersFile = toml::from_str(&text)
            .with_context(|| format!("directory file {} is not valid", path.display()))?;
        Ok(Self::from_users(file.users, hasher))
    }

    pub fn from_users(users: Vec<FileUser>, hasher: Arc<PasswordHasher>) -> Self {
        let users = users
            .into_iter()
            .map(|u| (normalize_username(&u.username), u))
            .collect();
        Self { users, hasher }
    }

    fn to_directory_user(username: &str, user: &FileUser) -> DirectoryUser {
        DirectoryUser {
            id: user.id.clone().unwrap_or_else(|| username.to_string()),
            username: username.to_string(),
            claims: user.claims.clone(),
        }
    }
}

#[async_trait]
impl UserDirectory for FileDirectory {
    async fn authenticate(
        &self,
        username: &str,
        password: &str,
    ) -> Result<DirectoryUser, DirectoryError> {
        let user = self.users.get(username);
        // Unknown users cost the same dummy verification as a wrong password.
        let ok = self
            .hasher
            .verify(user.map(|u| u.password_hash.as_str()), password)
            .await;
        match user {
            Some(user) if ok && user.disabled => Err(DirectoryError::Disabled),
            Some(user) if ok => Ok(Self::to_directory_user(username, user)),
            _ => Err(DirectoryError::InvalidCredentials),
        }
    }

    async fn lookup(&self, username: &str) -> Result<Option<DirectoryUser>, DirectoryError> {
        Ok(self
            .users
            .get(username)
            .filter(|u| !u.disabled)
            .map(|u| Self::to_directory_user(username, u)))
    }

    async fn check(&self) -> Result<(), DirectoryError> {
        Ok(())
    }
}

/// The embedded default's demo students: (username, password, claims).
pub fn demo_students() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "s2401001",
            "Daigaku-2401001",
            serde_json::json!({
                "name": "学生 太郎", "family_name": "学生", "given_name": "太郎",
                "family_name#ja-Kana-JP": "ガクセイ", "given_name#ja-Kana-JP": "タロウ",
                "name#en": "Taro Gakusei",
                "student_id": "S2401001", "affiliation": "student"
            }),
        ),
        (
            "s2401002",
            "Daigaku-2401002",
            serde_json::json!({
                "name": "大学 花子", "family_name": "大学", "given_name": "花子",
                "family_name#ja-Kana-JP": "ダイガク", "given_name#ja-Kana-JP": "ハナコ",
                "name#en": "Hanako Daigaku",
                "student_id": "S2401002", "affiliation": "student"
            }),
        ),
        (
            "s2401003",
            "Daigaku-2401003",
            serde_json::json!({
                "name": "Alex Smith", "family_name": "Smith", "given_name": "Alex",
                "student_id": "S2401003", "affiliation": "student"
            }),
        ),
    ]
}

/// Builds the demo directory, hashing the demo passwords with the server's parameters.
pub async fn demo_directory(hasher: Arc<PasswordHasher>) -> FileDirectory {
    let mut users = Vec::new();
    for (username, password, claims) in demo_students() {
        users.push(FileUser {
            username: username.into(),
            id: Some(format!("demo-{username}")),
            password_hash: hasher.hash(password).await,
            disabled: false,
            claims: claims.as_object().cloned().unwrap_or_default(),
        });
    }
    FileDirectory::from_users(users, hasher)
}
