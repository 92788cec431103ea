//! The store: every piece of state that matters (accounts, sessions, pending logins, codes, tokens,
//! keys, clients) lives here, so any replica can serve any request. One trait, two implementations
//! (SQLite and PostgreSQL) that share their SQL through `sql_store!`.
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::FromRow;

use crate::clock::Timestamp;

#[macro_use]
mod sql;
pub mod postgres;
pub mod sqlite;

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

#[derive(Debug, Clone, FromRow)]
pub struct Account {
    pub id: String,
    pub directory_id: String,
    pub username: String,
    pub sub: String,
    /// Claims copied from the directory at the last login (JSON object).
    pub claims: String,
    pub email: Option<String>,
    pub email_verified_at: Option<Timestamp>,
    pub previous_email: Option<String>,
    pub email_changed_at: Option<Timestamp>,
    pub second_password_hash: Option<String>,
    pub second_password_set_at: Option<Timestamp>,
    pub locked_until: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, FromRow)]
pub struct ClientRow {
    pub client_id: String,
    /// `config::ClientSettings` as JSON.
    pub settings: String,
    pub secret_digest: Option<String>,
    /// "config" or "cli".
    pub source: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, FromRow)]
pub struct SigningKeyRow {
    pub kid: String,
    pub alg: String,
    pub public_jwk: String,
    pub private_jwk_encrypted: String,
    pub created_at: Timestamp,
    /// Signing starts at this time; the key is published from creation.
    pub active_from: Timestamp,
    /// Leaves JWKS after this time (set when a newer key takes over).
    pub published_until: Option<Timestamp>,
    /// Kept until then to check expired `id_token_hint`s.
    pub delete_after: Option<Timestamp>,
}

#[derive(Debug, Clone, FromRow)]
pub struct BrowserSession {
    pub id: String,
    pub cookie_digest: String,
    pub account_id: String,
    /// Public session id given to relying parties.
    pub sid: String,
    pub created_at: Timestamp,
    pub last_seen_at: Timestamp,
    pub expires_at: Timestamp,
    /// Time of the last university-password check.
    pub password_at: Timestamp,
    /// Time of the last second-password check.
    pub second_password_at: Option<Timestamp>,
    pub university_password_hash: Option<String>,
    pub university_password_hash_until: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
}

#[derive(Debug, Clone, FromRow)]
pub struct LoginTransaction {
    pub id: String,
    /// Digest of the browser cookie the request is bound to.
    pub browser_digest: String,
    pub client_id: String,
    /// The validated authorization request (JSON).
    pub request: String,
    pub account_id: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub completed_at: Option<Timestamp>,
}

#[derive(Debug, Clone, FromRow)]
pub struct AuthorizationCode {
    pub digest: String,
    pub client_id: String,
    pub account_id: String,
    pub session_id: String,
    pub sid: String,
    pub redirect_uri: String,
    pub scope: String,
    pub claims_request: Option<String>,
    pub nonce: Option<String>,
    pub code_challenge: Option<String>,
    pub acr: String,
    pub auth_time: Timestamp,
    pub claims: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub consumed_at: Option<Timestamp>,
    pub grant_id: Option<String>,
    /// Set when someone presented the code again after it was consumed.
    pub replayed_at: Option<Timestamp>,
}

#[derive(Debug, Clone, FromRow)]
pub struct Grant {
    pub id: String,
    pub client_id: String,
    /// None for client_credentials.
    pub account_id: Option<String>,
    pub session_id: Option<String>,
    pub sid: Option<String>,
    pub scope: String,
    pub claims_request: Option<String>,
    pub acr: Option<String>,
    pub auth_time: Option<Timestamp>,
    pub claims: String,
    /// 1 when `offline_access` was granted: the grant outlives the browser session.
    pub offline: i64,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

#[derive(Debug, Clone, FromRow)]
pub struct AccessToken {
    pub digest: String,
    pub grant_id: String,
    pub scope: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// An access token as userinfo and introspection see it.
#[derive(Debug, Clone)]
pub struct TokenView {
    pub token: AccessToken,
    pub grant: Grant,
    /// The account's subject and university user ID; none for a client's own token or when the
    /// account is gone.
    pub owner: Option<TokenOwner>,
}

#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub sub: String,
    pub username: String,
}

#[derive(Debug, Clone, FromRow)]
pub struct RefreshToken {
    pub digest: String,
    pub grant_id: String,
    pub scope: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub consumed_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

#[derive(Debug, Clone, FromRow)]
pub struct ThrottleCounter {
    pub key: String,
    pub window_start: Timestamp,
    pub failures: i64,
    pub locked_until: Option<Timestamp>,
    /// How many times the key was locked since its last full success; locks grow with it.
    pub lock_count: i64,
}

#[derive(Debug, Clone, FromRow)]
pub struct OutboxJob {
    pub id: String,
    /// "mail" or "backchannel_logout".
    pub kind: String,
    /// An email address, or a client_id for back-channel logout.
    pub recipient: String,
    pub subject: String,
    pub payload: String,
    pub message_id: String,
    pub attempts: i64,
    pub next_attempt_at: Timestamp,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub sent_at: Option<Timestamp>,
    pub failed_at: Option<Timestamp>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<Timestamp>,
}

#[derive(Debug, Clone, FromRow)]
pub struct OneTimeLink {
    pub digest: String,
    /// "verify_email", "change_email" or "reset".
    pub purpose: String,
    pub account_id: String,
    pub email: Option<String>,
    pub locale: String,
    /// The pending authorization request to resume after the link, if any.
    pub login_transaction_id: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub consumed_at: Option<Timestamp>,
    pub superseded_at: Option<Timestamp>,
}

#[derive(Debug, Clone, FromRow)]
pub struct AuditEvent {
    pub id: String,
    pub replica: String,
    pub seq: i64,
    pub at: Timestamp,
    pub kind: String,
    pub account_id: Option<String>,
    pub client_id: Option<String>,
    pub address: Option<String>,
    pub outcome: String,
    pub details: String,
    pub prev_hash: String,
    pub hash: String,
}

/// How many rows the clean-up removed, by kind.
#[derive(Debug, Default, Clone)]
pub struct CleanupReport {
    pub rows: u64,
}

/// What a token response consumes, in the same transaction that stores what it issues.
#[derive(Debug, Clone, Copy)]
pub enum Consume<'a> {
    /// An authorization code of `client_id`, recording the grant it produced.
    Code {
        digest: &'a str,
        client_id: &'a str,
        grant_id: &'a str,
    },
    /// A refresh token being rotated.
    Refresh {
        digest: &'a str,
    },
    Nothing,
}

/// The outcome of redeeming a single-use value with one atomic statement.
#[derive(Debug)]
pub enum Redeemed<T> {
    /// This call consumed it.
    Fresh(T),
    /// Someone consumed it before (possibly another replica).
    AlreadyUsed(T),
    NotFound,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    async fn ping(&self) -> StoreResult<()>;

    // Accounts, keyed on the directory's immutable id.
    async fn upsert_account(
        &self,
        directory_id: &str,
        username: &str,
        claims: &str,
        new_id: &str,
        new_sub: &str,
        now: Timestamp,
    ) -> StoreResult<Account>;
    async fn get_account(&self, id: &str) -> StoreResult<Option<Account>>;
    async fn find_accounts_by_username(&self, username: &str) -> StoreResult<Vec<Account>>;
    /// Accounts whose verified email is `email` (several students may share one).
    async fn find_accounts_by_email(&self, email: &str) -> StoreResult<Vec<Account>>;
    /// Registers a verified email; a previous address is remembered with the time of the change.
    async fn set_account_email(
        &self,
        account_id: &str,
        email: &str,
        now: Timestamp,
    ) -> StoreResult<()>;
    async fn set_second_password(
        &self,
        account_id: &str,
        hash: &str,
        now: Timestamp,
    ) -> StoreResult<()>;
    /// Forgets the email and second password: the next login runs enrollment again.
    async fn reset_enrollment(&self, account_id: &str, now: Timestamp) -> StoreResult<()>;

    // Clients registered in the store (the configuration file's are synchronised at start).
    async fn put_client(&self, client: &ClientRow) -> StoreResult<()>;
    async fn get_client(&self, client_id: &str) -> StoreResult<Option<ClientRow>>;
    async fn list_clients(&self) -> StoreResult<Vec<ClientRow>>;
    async fn delete_client(&self, client_id: &str) -> StoreResult<bool>;

    // Signing keys.
    async fn insert_signing_key(&self, key: &SigningKeyRow) -> StoreResult<()>;
    async fn list_signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>>;
    /// Marks every other key of `alg` that has no end yet to leave JWKS at `published_until`.
    async fn retire_signing_keys(
        &self,
        alg: &str,
        except_kid: &str,
        published_until: Timestamp,
        delete_after: Timestamp,
    ) -> StoreResult<u64>;

    // Browser sessions.
    async fn insert_session(&self, session: &BrowserSession) -> StoreResult<()>;
    async fn find_session_by_cookie(
        &self,
        cookie_digest: &str,
    ) -> StoreResult<Option<BrowserSession>>;
    async fn get_session(&self, id: &str) -> StoreResult<Option<BrowserSession>>;
    /// Writes every mutable field of the session.
    async fn update_session(&self, session: &BrowserSession) -> StoreResult<()>;
    async fn touch_session(&self, id: &str, now: Timestamp) -> StoreResult<()>;
    async fn end_session(&self, id: &str, now: Timestamp) -> StoreResult<bool>;

    // Pending authorization requests.
    async fn insert_login_transaction(&self, tx: &LoginTransaction) -> StoreResult<()>;
    async fn get_login_transaction(&self, id: &str) -> StoreResult<Option<LoginTransaction>>;
    async fn complete_login_transaction(&self, id: &str, now: Timestamp) -> StoreResult<bool>;

    // Authorization codes.
    async fn insert_code(&self, code: &AuthorizationCode) -> StoreResult<()>;
    /// Consumes the code for `client_id`, recording the grant it will produce; another client's
    /// code is `NotFound` and stays unused.
    async fn redeem_code(
        &self,
        digest: &str,
        client_id: &str,
        grant_id: &str,
        now: Timestamp,
    ) -> StoreResult<Redeemed<AuthorizationCode>>;
    async fn mark_code_replayed(&self, digest: &str, now: Timestamp) -> StoreResult<()>;
    async fn get_code(&self, digest: &str) -> StoreResult<Option<AuthorizationCode>>;

    // Grants and tokens.
    async fn insert_grant(&self, grant: &Grant) -> StoreResult<()>;
    async fn get_grant(&self, id: &str) -> StoreResult<Option<Grant>>;
    async fn revoke_grant(&self, id: &str, now: Timestamp) -> StoreResult<()>;
    /// Revokes the session's grants; with `online_only`, those without offline access.
    async fn revoke_session_grants(
        &self,
        session_id: &str,
        online_only: bool,
        now: Timestamp,
    ) -> StoreResult<u64>;
    /// Clients that received tokens through the session (for back-channel logout).
    async fn session_clients(&self, session_id: &str) -> StoreResult<Vec<String>>;
    async fn update_grant_claims(&self, id: &str, claims: &str) -> StoreResult<()>;
    async fn insert_access_token(&self, token: &AccessToken) -> StoreResult<()>;
    async fn find_access_token(&self, digest: &str) -> StoreResult<Option<AccessToken>>;
    /// An access token with its grant and the account it was issued for, in one query
    /// (userinfo and introspection are hot paths).
    async fn find_access_token_with_grant(&self, digest: &str) -> StoreResult<Option<TokenView>>;
    async fn revoke_access_token(&self, digest: &str, now: Timestamp) -> StoreResult<()>;
    /// Records a revoked client (client_credentials) token until it would have expired.
    async fn revoke_client_token(&self, digest: &str, expires_at: Timestamp) -> StoreResult<()>;
    async fn client_token_revoked(&self, digest: &str) -> StoreResult<bool>;
    async fn insert_refresh_token(&self, token: &RefreshToken) -> StoreResult<()>;
    async fn find_refresh_token(&self, digest: &str) -> StoreResult<Option<RefreshToken>>;
    /// Consumes the refresh token of one of `client_id`'s grants; another client's is `NotFound`.
    async fn redeem_refresh_token(
        &self,
        digest: &str,
        client_id: &str,
        now: Timestamp,
    ) -> StoreResult<Redeemed<RefreshToken>>;

    // Throttling. A reservation counts an attempt before it is checked, so that parallel attempts
    // can never exceed `limit`; a success gives its reservation back.
    /// Takes one of `limit` attempts in the current window; None when locked or at the limit.
    async fn throttle_reserve(
        &self,
        key: &str,
        limit: i64,
        window: i64,
        now: Timestamp,
    ) -> StoreResult<Option<i64>>;
    async fn throttle_release(&self, key: &str) -> StoreResult<()>;
    /// Locks the key until `until` (unless already locked) and starts a new window.
    async fn throttle_lock(&self, key: &str, until: Timestamp, now: Timestamp) -> StoreResult<()>;
    async fn throttle_get(&self, key: &str) -> StoreResult<Option<ThrottleCounter>>;
    /// After a full success: failures and the lock history go (an active lock stays).
    async fn throttle_reset(&self, key: &str) -> StoreResult<()>;
    /// Removes counters entirely (operator unlock).
    async fn throttle_clear(&self, key: &str) -> StoreResult<u64>;
    async fn throttle_clear_prefix(&self, prefix: &str) -> StoreResult<u64>;

    // The outbox: a durable job queue; a lease keeps replicas from working on one job at once.
    async fn enqueue(&self, job: &OutboxJob) -> StoreResult<()>;
    /// Leases the next due job to `owner` until `lease_until`.
    async fn claim_job(
        &self,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> StoreResult<Option<OutboxJob>>;
    /// Delivered: records the reply and blanks the payload.
    async fn job_sent(&self, id: &str, owner: &str, now: Timestamp, reply: &str)
        -> StoreResult<()>;
    async fn job_retry(
        &self,
        id: &str,
        owner: &str,
        next_attempt_at: Timestamp,
        error: &str,
    ) -> StoreResult<()>;
    async fn job_failed(
        &self,
        id: &str,
        owner: &str,
        now: Timestamp,
        error: &str,
    ) -> StoreResult<()>;
    async fn list_jobs(&self, limit: i64) -> StoreResult<Vec<OutboxJob>>;
    /// Puts failed (or waiting) jobs back in the queue now; `id` None = every failed job.
    async fn retry_jobs(&self, id: Option<&str>, now: Timestamp) -> StoreResult<u64>;
    async fn pending_jobs(&self) -> StoreResult<i64>;

    // One-time links.
    /// Stores a link and its mail in one transaction, superseding older links of the same purpose.
    async fn insert_link_with_mail(&self, link: &OneTimeLink, mail: &OutboxJob) -> StoreResult<()>;
    async fn find_link(&self, digest: &str) -> StoreResult<Option<OneTimeLink>>;
    /// Consumes a live link with one statement; None when expired, used, superseded or unknown.
    async fn consume_link(&self, digest: &str, now: Timestamp) -> StoreResult<Option<OneTimeLink>>;

    // Audit trail and leases.
    async fn insert_audit(&self, event: &AuditEvent) -> StoreResult<()>;
    /// Newest first, optionally for one account.
    async fn list_audit(
        &self,
        account_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<AuditEvent>>;
    /// Every event in chain order (replica, seq), for verification.
    async fn audit_chain(&self) -> StoreResult<Vec<AuditEvent>>;
    /// Takes or renews the named lease; false while another owner holds it.
    async fn try_lease(
        &self,
        name: &str,
        owner: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> StoreResult<bool>;
    /// Removes expired codes, tokens, links, sessions, counters, delivered mail and old audit events.
    async fn cleanup(&self, now: Timestamp, audit_before: Timestamp) -> StoreResult<CleanupReport>;
    async fn account_counts(&self) -> StoreResult<(i64, i64)>;

    /// Consumes the code or refresh token and stores the grant and tokens in one transaction:
    /// either all of it happens or nothing does. False when the code or token was consumed first.
    async fn commit_tokens(
        &self,
        consume: Consume<'_>,
        grant: Option<&Grant>,
        access: &AccessToken,
        refresh: Option<&RefreshToken>,
        now: Timestamp,
    ) -> StoreResult<bool>;

    /// Records a `private_key_jwt` assertion id; false when it was seen before.
    async fn record_assertion(&self, id: &str, expires_at: Timestamp) -> StoreResult<bool>;
}

pub type DynStore = Arc<dyn Store>;

/// Connects to `database_url` (sqlite:… or postgres://…) and applies the migrations.
pub async fn connect(database_url: &str) -> anyhow::Result<DynStore> {
    if database_url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(database_url).await?))
    } else {
        Ok(Arc::new(
            postgres::PostgresStore::connect(database_url).await?,
        ))
    }
}
