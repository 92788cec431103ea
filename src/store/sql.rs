//! The SQL both backends share. SQLite and PostgreSQL accept the same statements here (`$n`
//! placeholders, `ON CONFLICT`, `RETURNING`), so one macro body implements `Store` for each pool
//! type; anything backend-specific lives in that backend's file.

/// Implements `Store` for a struct with a `pool` field of the given sqlx pool type.
macro_rules! sql_store {
    ($store:ty, $backend:literal, $db:ty) => {
        async fn insert_job<'e, E: sqlx::Executor<'e, Database = $db>>(executor: E, j: &OutboxJob) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO outbox (id, kind, recipient, subject, payload, message_id, attempts, \
                 next_attempt_at, last_error, created_at, sent_at, failed_at, lease_owner, lease_until) \
                 VALUES ($1, $2, $3, $4, $5, $6, 0, $7, NULL, $8, NULL, NULL, NULL, NULL)",
            )
            .bind(&j.id)
            .bind(&j.kind)
            .bind(&j.recipient)
            .bind(&j.subject)
            .bind(&j.payload)
            .bind(&j.message_id)
            .bind(j.next_attempt_at)
            .bind(j.created_at)
            .execute(executor)
            .await?;
            Ok(())
        }

        async fn insert_grant_with<'e, E: sqlx::Executor<'e, Database = $db>>(executor: E, g: &Grant) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO grants (id, client_id, account_id, session_id, sid, scope, claims_request, \
                 acr, auth_time, claims, offline, created_at, expires_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            )
            .bind(&g.id)
            .bind(&g.client_id)
            .bind(&g.account_id)
            .bind(&g.session_id)
            .bind(&g.sid)
            .bind(&g.scope)
            .bind(&g.claims_request)
            .bind(&g.acr)
            .bind(g.auth_time)
            .bind(&g.claims)
            .bind(g.offline)
            .bind(g.created_at)
            .bind(g.expires_at)
            .bind(g.revoked_at)
            .execute(executor)
            .await?;
            Ok(())
        }

        async fn insert_access_token_with<'e, E: sqlx::Executor<'e, Database = $db>>(executor: E, t: &AccessToken) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO access_tokens (digest, grant_id, scope, created_at, expires_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&t.digest)
            .bind(&t.grant_id)
            .bind(&t.scope)
            .bind(t.created_at)
            .bind(t.expires_at)
            .bind(t.revoked_at)
            .execute(executor)
            .await?;
            Ok(())
        }

        async fn insert_refresh_token_with<'e, E: sqlx::Executor<'e, Database = $db>>(executor: E, t: &RefreshToken) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO refresh_tokens (digest, grant_id, scope, created_at, expires_at, \
                 consumed_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&t.digest)
            .bind(&t.grant_id)
            .bind(&t.scope)
            .bind(t.created_at)
            .bind(t.expires_at)
            .bind(t.consumed_at)
            .bind(t.revoked_at)
            .execute(executor)
            .await?;
            Ok(())
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn upsert_account(
                &self,
                directory_id: &str,
                username: &str,
                claims: &str,
                new_id: &str,
                new_sub: &str,
                now: Timestamp,
            ) -> StoreResult<Account> {
                Ok(sqlx::query_as(
                    "INSERT INTO accounts (id, directory_id, username, sub, claims, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $6) \
                     ON CONFLICT (directory_id) DO UPDATE SET username = excluded.username, \
                     claims = excluded.claims, updated_at = excluded.updated_at RETURNING *",
                )
                .bind(new_id)
                .bind(directory_id)
                .bind(username)
                .bind(new_sub)
                .bind(claims)
                .bind(now)
                .fetch_one(&self.pool)
                .await?)
            }

            async fn get_account(&self, id: &str) -> StoreResult<Option<Account>> {
                Ok(sqlx::query_as("SELECT * FROM accounts WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn find_accounts_by_username(&self, username: &str) -> StoreResult<Vec<Account>> {
                Ok(sqlx::query_as("SELECT * FROM accounts WHERE username = $1 ORDER BY created_at")
                    .bind(username)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn find_accounts_by_email(&self, email: &str) -> StoreResult<Vec<Account>> {
                Ok(sqlx::query_as(
                    "SELECT * FROM accounts WHERE email = $1 AND email_verified_at IS NOT NULL ORDER BY created_at",
                )
                .bind(email)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn set_account_email(&self, account_id: &str, email: &str, now: Timestamp) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE accounts SET \
                     previous_email = CASE WHEN email_verified_at IS NOT NULL AND email <> $2 THEN email ELSE previous_email END, \
                     email_changed_at = CASE WHEN email_verified_at IS NOT NULL AND email <> $2 THEN $3 ELSE email_changed_at END, \
                     email = $2, email_verified_at = $3, updated_at = $3 WHERE id = $1",
                )
                .bind(account_id)
                .bind(email)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn set_second_password(&self, account_id: &str, hash: &str, now: Timestamp) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE accounts SET second_password_hash = $2, second_password_set_at = $3, updated_at = $3 WHERE id = $1",
                )
                .bind(account_id)
                .bind(hash)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn reset_enrollment(&self, account_id: &str, now: Timestamp) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE accounts SET previous_email = COALESCE(email, previous_email), email = NULL, \
                     email_verified_at = NULL, email_changed_at = $2, second_password_hash = NULL, \
                     second_password_set_at = NULL, updated_at = $2 WHERE id = $1",
                )
                .bind(account_id)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn put_client(&self, c: &ClientRow) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO clients (client_id, settings, secret_digest, source, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (client_id) DO UPDATE SET \
                     settings = excluded.settings, secret_digest = excluded.secret_digest, \
                     source = excluded.source, updated_at = excluded.updated_at",
                )
                .bind(&c.client_id)
                .bind(&c.settings)
                .bind(&c.secret_digest)
                .bind(&c.source)
                .bind(c.created_at)
                .bind(c.updated_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn get_client(&self, client_id: &str) -> StoreResult<Option<ClientRow>> {
                Ok(sqlx::query_as("SELECT * FROM clients WHERE client_id = $1")
                    .bind(client_id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn list_clients(&self) -> StoreResult<Vec<ClientRow>> {
                Ok(sqlx::query_as("SELECT * FROM clients ORDER BY client_id")
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn delete_client(&self, client_id: &str) -> StoreResult<bool> {
                let done = sqlx::query("DELETE FROM clients WHERE client_id = $1")
                    .bind(client_id)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn insert_signing_key(&self, k: &SigningKeyRow) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO signing_keys (kid, alg, public_jwk, private_jwk_encrypted, created_at, \
                     active_from, published_until, delete_after) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&k.kid)
                .bind(&k.alg)
                .bind(&k.public_jwk)
                .bind(&k.private_jwk_encrypted)
                .bind(k.created_at)
                .bind(k.active_from)
                .bind(k.published_until)
                .bind(k.delete_after)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn list_signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>> {
                Ok(sqlx::query_as("SELECT * FROM signing_keys ORDER BY active_from, created_at, kid")
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn retire_signing_keys(
                &self,
                alg: &str,
                except_kid: &str,
                published_until: Timestamp,
                delete_after: Timestamp,
            ) -> StoreResult<u64> {
                let done = sqlx::query(
                    "UPDATE signing_keys SET published_until = $3, delete_after = $4 \
                     WHERE alg = $1 AND kid <> $2 AND published_until IS NULL",
                )
                .bind(alg)
                .bind(except_kid)
                .bind(published_until)
                .bind(delete_after)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            async fn insert_session(&self, s: &BrowserSession) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO browser_sessions (id, cookie_digest, account_id, sid, created_at, \
                     last_seen_at, expires_at, password_at, second_password_at, university_password_hash, \
                     university_password_hash_until, ended_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(&s.id)
                .bind(&s.cookie_digest)
                .bind(&s.account_id)
                .bind(&s.sid)
                .bind(s.created_at)
                .bind(s.last_seen_at)
                .bind(s.expires_at)
                .bind(s.password_at)
                .bind(s.second_password_at)
                .bind(&s.university_password_hash)
                .bind(s.university_password_hash_until)
                .bind(s.ended_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn find_session_by_cookie(&self, cookie_digest: &str) -> StoreResult<Option<BrowserSession>> {
                Ok(sqlx::query_as("SELECT * FROM browser_sessions WHERE cookie_digest = $1")
                    .bind(cookie_digest)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn get_session(&self, id: &str) -> StoreResult<Option<BrowserSession>> {
                Ok(sqlx::query_as("SELECT * FROM browser_sessions WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn update_session(&self, s: &BrowserSession) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE browser_sessions SET cookie_digest = $2, account_id = $3, sid = $4, \
                     last_seen_at = $5, expires_at = $6, password_at = $7, second_password_at = $8, \
                     university_password_hash = $9, university_password_hash_until = $10, ended_at = $11 \
                     WHERE id = $1",
                )
                .bind(&s.id)
                .bind(&s.cookie_digest)
                .bind(&s.account_id)
                .bind(&s.sid)
                .bind(s.last_seen_at)
                .bind(s.expires_at)
                .bind(s.password_at)
                .bind(s.second_password_at)
                .bind(&s.university_password_hash)
                .bind(s.university_password_hash_until)
                .bind(s.ended_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn touch_session(&self, id: &str, now: Timestamp) -> StoreResult<()> {
                sqlx::query("UPDATE browser_sessions SET last_seen_at = $2 WHERE id = $1 AND last_seen_at < $2")
                    .bind(id)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn end_session(&self, id: &str, now: Timestamp) -> StoreResult<bool> {
                let done = sqlx::query(
                    "UPDATE browser_sessions SET ended_at = $2, university_password_hash = NULL, \
                     university_password_hash_until = NULL WHERE id = $1 AND ended_at IS NULL",
                )
                .bind(id)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn insert_login_transaction(&self, t: &LoginTransaction) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO login_transactions (id, browser_digest, client_id, request, account_id, \
                     created_at, expires_at, completed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&t.id)
                .bind(&t.browser_digest)
                .bind(&t.client_id)
                .bind(&t.request)
                .bind(&t.account_id)
                .bind(t.created_at)
                .bind(t.expires_at)
                .bind(t.completed_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn get_login_transaction(&self, id: &str) -> StoreResult<Option<LoginTransaction>> {
                Ok(sqlx::query_as("SELECT * FROM login_transactions WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn complete_login_transaction(&self, id: &str, now: Timestamp) -> StoreResult<bool> {
                let done = sqlx::query(
                    "UPDATE login_transactions SET completed_at = $2 WHERE id = $1 AND completed_at IS NULL",
                )
                .bind(id)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn insert_code(&self, c: &AuthorizationCode) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO authorization_codes (digest, client_id, account_id, session_id, sid, \
                     redirect_uri, scope, claims_request, nonce, code_challenge, acr, auth_time, claims, \
                     created_at, expires_at, consumed_at, grant_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
                )
                .bind(&c.digest)
                .bind(&c.client_id)
                .bind(&c.account_id)
                .bind(&c.session_id)
                .bind(&c.sid)
                .bind(&c.redirect_uri)
                .bind(&c.scope)
                .bind(&c.claims_request)
                .bind(&c.nonce)
                .bind(&c.code_challenge)
                .bind(&c.acr)
                .bind(c.auth_time)
                .bind(&c.claims)
                .bind(c.created_at)
                .bind(c.expires_at)
                .bind(c.consumed_at)
                .bind(&c.grant_id)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn redeem_code(
                &self,
                digest: &str,
                client_id: &str,
                grant_id: &str,
                now: Timestamp,
            ) -> StoreResult<Redeemed<AuthorizationCode>> {
                let fresh: Option<AuthorizationCode> = sqlx::query_as(
                    "UPDATE authorization_codes SET consumed_at = $2, grant_id = $4 \
                     WHERE digest = $1 AND client_id = $3 AND consumed_at IS NULL RETURNING *",
                )
                .bind(digest)
                .bind(now)
                .bind(client_id)
                .bind(grant_id)
                .fetch_optional(&self.pool)
                .await?;
                if let Some(code) = fresh {
                    return Ok(Redeemed::Fresh(code));
                }
                let used = self.get_code(digest).await?.filter(|c| c.client_id == client_id);
                Ok(used.map_or(Redeemed::NotFound, Redeemed::AlreadyUsed))
            }

            async fn mark_code_replayed(&self, digest: &str, now: Timestamp) -> StoreResult<()> {
                sqlx::query("UPDATE authorization_codes SET replayed_at = $2 WHERE digest = $1 AND replayed_at IS NULL")
                    .bind(digest)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn get_code(&self, digest: &str) -> StoreResult<Option<AuthorizationCode>> {
                Ok(sqlx::query_as("SELECT * FROM authorization_codes WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn insert_grant(&self, g: &Grant) -> StoreResult<()> {
                insert_grant_with(&self.pool, g).await
            }

            async fn get_grant(&self, id: &str) -> StoreResult<Option<Grant>> {
                Ok(sqlx::query_as("SELECT * FROM grants WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn revoke_grant(&self, id: &str, now: Timestamp) -> StoreResult<()> {
                sqlx::query("UPDATE grants SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                    .bind(id)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn revoke_session_grants(&self, session_id: &str, online_only: bool, now: Timestamp) -> StoreResult<u64> {
                let done = sqlx::query(
                    "UPDATE grants SET revoked_at = $2 WHERE session_id = $1 AND revoked_at IS NULL \
                     AND (offline = 0 OR $3 = 0)",
                )
                .bind(session_id)
                .bind(now)
                .bind(i64::from(online_only))
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            async fn session_clients(&self, session_id: &str) -> StoreResult<Vec<String>> {
                let rows: Vec<(String,)> = sqlx::query_as(
                    "SELECT DISTINCT client_id FROM grants WHERE session_id = $1 ORDER BY client_id",
                )
                .bind(session_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(|(c,)| c).collect())
            }

            async fn update_grant_claims(&self, id: &str, claims: &str) -> StoreResult<()> {
                sqlx::query("UPDATE grants SET claims = $2 WHERE id = $1")
                    .bind(id)
                    .bind(claims)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn insert_access_token(&self, t: &AccessToken) -> StoreResult<()> {
                insert_access_token_with(&self.pool, t).await
            }

            async fn find_access_token(&self, digest: &str) -> StoreResult<Option<AccessToken>> {
                Ok(sqlx::query_as("SELECT * FROM access_tokens WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn find_access_token_with_grant(&self, digest: &str) -> StoreResult<Option<TokenView>> {
                use sqlx::Row;
                let row = sqlx::query(
                    "SELECT t.digest AS t_digest, t.scope AS t_scope, t.created_at AS t_created_at, \
                     t.expires_at AS t_expires_at, t.revoked_at AS t_revoked_at, \
                     a.sub AS a_sub, a.username AS a_username, g.* \
                     FROM access_tokens t JOIN grants g ON g.id = t.grant_id \
                     LEFT JOIN accounts a ON a.id = g.account_id WHERE t.digest = $1",
                )
                .bind(digest)
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let grant = Grant::from_row(&row)?;
                let token = AccessToken {
                    digest: row.try_get("t_digest")?,
                    grant_id: grant.id.clone(),
                    scope: row.try_get("t_scope")?,
                    created_at: row.try_get("t_created_at")?,
                    expires_at: row.try_get("t_expires_at")?,
                    revoked_at: row.try_get("t_revoked_at")?,
                };
                let sub: Option<String> = row.try_get("a_sub")?;
                let username: Option<String> = row.try_get("a_username")?;
                let owner = sub.zip(username).map(|(sub, username)| TokenOwner { sub, username });
                Ok(Some(TokenView { token, grant, owner }))
            }

            async fn revoke_client_token(&self, digest: &str, expires_at: Timestamp) -> StoreResult<()> {
                sqlx::query("INSERT INTO revoked_client_tokens (digest, expires_at) VALUES ($1, $2) ON CONFLICT (digest) DO NOTHING")
                    .bind(digest)
                    .bind(expires_at)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn client_token_revoked(&self, digest: &str) -> StoreResult<bool> {
                let found: Option<(i64,)> = sqlx::query_as("SELECT expires_at FROM revoked_client_tokens WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(found.is_some())
            }

            async fn revoke_access_token(&self, digest: &str, now: Timestamp) -> StoreResult<()> {
                sqlx::query("UPDATE access_tokens SET revoked_at = $2 WHERE digest = $1 AND revoked_at IS NULL")
                    .bind(digest)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn insert_refresh_token(&self, t: &RefreshToken) -> StoreResult<()> {
                insert_refresh_token_with(&self.pool, t).await
            }

            async fn find_refresh_token(&self, digest: &str) -> StoreResult<Option<RefreshToken>> {
                Ok(sqlx::query_as("SELECT * FROM refresh_tokens WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn redeem_refresh_token(
                &self,
                digest: &str,
                client_id: &str,
                now: Timestamp,
            ) -> StoreResult<Redeemed<RefreshToken>> {
                let fresh: Option<RefreshToken> = sqlx::query_as(
                    "UPDATE refresh_tokens SET consumed_at = $2 WHERE digest = $1 AND consumed_at IS NULL \
                     AND revoked_at IS NULL AND grant_id IN (SELECT id FROM grants WHERE client_id = $3) \
                     RETURNING *",
                )
                .bind(digest)
                .bind(now)
                .bind(client_id)
                .fetch_optional(&self.pool)
                .await?;
                if let Some(token) = fresh {
                    return Ok(Redeemed::Fresh(token));
                }
                let Some(token) = self.find_refresh_token(digest).await? else {
                    return Ok(Redeemed::NotFound);
                };
                let owner = self.get_grant(&token.grant_id).await?.map(|g| g.client_id);
                Ok(if owner.as_deref() == Some(client_id) { Redeemed::AlreadyUsed(token) } else { Redeemed::NotFound })
            }

            async fn throttle_reserve(&self, key: &str, limit: i64, window: i64, now: Timestamp) -> StoreResult<Option<i64>> {
                sqlx::query(
                    "INSERT INTO throttle_counters (key, window_start, failures, locked_until, lock_count) \
                     VALUES ($1, $2, 0, NULL, 0) ON CONFLICT (key) DO NOTHING",
                )
                .bind(key)
                .bind(now)
                .execute(&self.pool)
                .await?;
                sqlx::query(
                    "UPDATE throttle_counters SET failures = 0, window_start = $2 WHERE key = $1 \
                     AND window_start + $3 <= $2 AND (locked_until IS NULL OR locked_until <= $2)",
                )
                .bind(key)
                .bind(now)
                .bind(window)
                .execute(&self.pool)
                .await?;
                let row: Option<(i64,)> = sqlx::query_as(
                    "UPDATE throttle_counters SET failures = failures + 1 WHERE key = $1 \
                     AND failures < $2 AND (locked_until IS NULL OR locked_until <= $3) RETURNING failures",
                )
                .bind(key)
                .bind(limit)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|(f,)| f))
            }

            async fn throttle_release(&self, key: &str) -> StoreResult<()> {
                sqlx::query("UPDATE throttle_counters SET failures = failures - 1 WHERE key = $1 AND failures > 0")
                    .bind(key)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn throttle_lock(&self, key: &str, until: Timestamp, now: Timestamp) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE throttle_counters SET locked_until = $2, lock_count = lock_count + 1, \
                     failures = 0, window_start = $3 \
                     WHERE key = $1 AND (locked_until IS NULL OR locked_until <= $3)",
                )
                .bind(key)
                .bind(until)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn throttle_get(&self, key: &str) -> StoreResult<Option<ThrottleCounter>> {
                Ok(sqlx::query_as("SELECT * FROM throttle_counters WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn throttle_reset(&self, key: &str) -> StoreResult<()> {
                sqlx::query("UPDATE throttle_counters SET failures = 0, lock_count = 0 WHERE key = $1")
                    .bind(key)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn throttle_clear(&self, key: &str) -> StoreResult<u64> {
                let done = sqlx::query("DELETE FROM throttle_counters WHERE key = $1")
                    .bind(key)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn throttle_clear_prefix(&self, prefix: &str) -> StoreResult<u64> {
                let done = sqlx::query("DELETE FROM throttle_counters WHERE substr(key, 1, length($1)) = $1")
                    .bind(prefix)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn enqueue(&self, j: &OutboxJob) -> StoreResult<()> {
                insert_job(&self.pool, j).await
            }

            async fn claim_job(&self, owner: &str, now: Timestamp, lease_until: Timestamp) -> StoreResult<Option<OutboxJob>> {
                // The outer condition is checked again on the row, so two replicas that pick the
                // same job in the subquery cannot both lease it.
                Ok(sqlx::query_as(
                    "UPDATE outbox SET lease_owner = $1, lease_until = $3, attempts = attempts + 1 \
                     WHERE id = (SELECT id FROM outbox WHERE sent_at IS NULL AND failed_at IS NULL \
                     AND next_attempt_at <= $2 AND (lease_until IS NULL OR lease_until < $2) \
                     ORDER BY next_attempt_at LIMIT 1) \
                     AND sent_at IS NULL AND (lease_until IS NULL OR lease_until < $2) RETURNING *",
                )
                .bind(owner)
                .bind(now)
                .bind(lease_until)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn job_sent(&self, id: &str, owner: &str, now: Timestamp, reply: &str) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE outbox SET sent_at = $3, payload = '', last_error = $4, lease_owner = NULL, \
                     lease_until = NULL WHERE id = $1 AND lease_owner = $2",
                )
                .bind(id)
                .bind(owner)
                .bind(now)
                .bind(reply)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn job_retry(&self, id: &str, owner: &str, next_attempt_at: Timestamp, error: &str) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE outbox SET next_attempt_at = $3, last_error = $4, lease_owner = NULL, \
                     lease_until = NULL WHERE id = $1 AND lease_owner = $2",
                )
                .bind(id)
                .bind(owner)
                .bind(next_attempt_at)
                .bind(error)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn job_failed(&self, id: &str, owner: &str, now: Timestamp, error: &str) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE outbox SET failed_at = $3, last_error = $4, lease_owner = NULL, \
                     lease_until = NULL WHERE id = $1 AND lease_owner = $2",
                )
                .bind(id)
                .bind(owner)
                .bind(now)
                .bind(error)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn list_jobs(&self, limit: i64) -> StoreResult<Vec<OutboxJob>> {
                Ok(sqlx::query_as("SELECT * FROM outbox ORDER BY created_at DESC, id LIMIT $1")
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn retry_jobs(&self, id: Option<&str>, now: Timestamp) -> StoreResult<u64> {
                let done = sqlx::query(
                    "UPDATE outbox SET failed_at = NULL, next_attempt_at = $1 WHERE sent_at IS NULL \
                     AND ($2 = '' AND failed_at IS NOT NULL OR id = $2)",
                )
                .bind(now)
                .bind(id.unwrap_or(""))
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            async fn pending_jobs(&self) -> StoreResult<i64> {
                let (n,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL AND failed_at IS NULL",
                )
                .fetch_one(&self.pool)
                .await?;
                Ok(n)
            }

            async fn insert_link_with_mail(&self, link: &OneTimeLink, mail: &OutboxJob) -> StoreResult<()> {
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "UPDATE one_time_links SET superseded_at = $3 WHERE account_id = $1 AND purpose = $2 \
                     AND consumed_at IS NULL AND superseded_at IS NULL",
                )
                .bind(&link.account_id)
                .bind(&link.purpose)
                .bind(link.created_at)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO one_time_links (digest, purpose, account_id, email, locale, login_transaction_id, \
                     created_at, expires_at, consumed_at, superseded_at) VALUES ($1, $2, $3, $4, $5, $8, $6, $7, NULL, NULL)",
                )
                .bind(&link.digest)
                .bind(&link.purpose)
                .bind(&link.account_id)
                .bind(&link.email)
                .bind(&link.locale)
                .bind(link.created_at)
                .bind(link.expires_at)
                .bind(&link.login_transaction_id)
                .execute(&mut *tx)
                .await?;
                insert_job(&mut *tx, mail).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn find_link(&self, digest: &str) -> StoreResult<Option<OneTimeLink>> {
                Ok(sqlx::query_as("SELECT * FROM one_time_links WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn consume_link(&self, digest: &str, now: Timestamp) -> StoreResult<Option<OneTimeLink>> {
                Ok(sqlx::query_as(
                    "UPDATE one_time_links SET consumed_at = $2 WHERE digest = $1 AND consumed_at IS NULL \
                     AND superseded_at IS NULL AND expires_at > $2 RETURNING *",
                )
                .bind(digest)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn insert_audit(&self, e: &AuditEvent) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO audit_events (id, replica, seq, at, kind, account_id, client_id, address, \
                     outcome, details, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(&e.id)
                .bind(&e.replica)
                .bind(e.seq)
                .bind(e.at)
                .bind(&e.kind)
                .bind(&e.account_id)
                .bind(&e.client_id)
                .bind(&e.address)
                .bind(&e.outcome)
                .bind(&e.details)
                .bind(&e.prev_hash)
                .bind(&e.hash)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn list_audit(&self, account_id: Option<&str>, limit: i64) -> StoreResult<Vec<AuditEvent>> {
                Ok(sqlx::query_as(
                    "SELECT * FROM audit_events WHERE ($1 = '' OR account_id = $1) ORDER BY at DESC, seq DESC LIMIT $2",
                )
                .bind(account_id.unwrap_or(""))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn audit_chain(&self) -> StoreResult<Vec<AuditEvent>> {
                Ok(sqlx::query_as("SELECT * FROM audit_events ORDER BY replica, seq")
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn try_lease(&self, name: &str, owner: &str, until: Timestamp, now: Timestamp) -> StoreResult<bool> {
                let done = sqlx::query(
                    "INSERT INTO leases (name, owner, until) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE \
                     SET owner = excluded.owner, until = excluded.until \
                     WHERE leases.owner = excluded.owner OR leases.until < $4",
                )
                .bind(name)
                .bind(owner)
                .bind(until)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn cleanup(&self, now: Timestamp, audit_before: Timestamp) -> StoreResult<CleanupReport> {
                // Consumed codes and rotated refresh tokens stay until they expire, for reuse detection.
                let day = 86_400;
                let statements: [(&str, Timestamp); 12] = [
                    ("DELETE FROM authorization_codes WHERE expires_at < $1", now - day),
                    ("DELETE FROM login_transactions WHERE expires_at < $1", now),
                    ("DELETE FROM access_tokens WHERE expires_at < $1", now),
                    ("DELETE FROM revoked_client_tokens WHERE expires_at < $1", now),
                    ("DELETE FROM refresh_tokens WHERE expires_at < $1", now),
                    ("DELETE FROM grants WHERE expires_at < $1", now),
                    ("DELETE FROM browser_sessions WHERE expires_at < $1 OR ended_at < $1", now - day),
                    ("DELETE FROM one_time_links WHERE expires_at < $1", now - day),
                    ("DELETE FROM throttle_counters WHERE (locked_until IS NULL OR locked_until < $1) AND window_start < $1 - 86400", now),
                    ("DELETE FROM used_assertions WHERE expires_at < $1", now),
                    ("DELETE FROM outbox WHERE (sent_at IS NOT NULL AND sent_at < $1) OR (failed_at IS NOT NULL AND failed_at < $1)", now - 30 * day),
                    ("DELETE FROM audit_events WHERE at < $1", audit_before),
                ];
                let mut report = CleanupReport::default();
                for (sql, cutoff) in statements {
                    report.rows += sqlx::query(sql).bind(cutoff).execute(&self.pool).await?.rows_affected();
                }
                report.rows += sqlx::query("DELETE FROM signing_keys WHERE delete_after IS NOT NULL AND delete_after < $1")
                    .bind(now)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                Ok(report)
            }

            async fn account_counts(&self) -> StoreResult<(i64, i64)> {
                let (all, enrolled): (i64, i64) = sqlx::query_as(
                    "SELECT COUNT(*), COUNT(second_password_hash) FROM accounts",
                )
                .fetch_one(&self.pool)
                .await?;
                Ok((all, enrolled))
            }

            async fn commit_tokens(
                &self,
                consume: Consume<'_>,
                grant: Option<&Grant>,
                access: &AccessToken,
                refresh: Option<&RefreshToken>,
                now: Timestamp,
            ) -> StoreResult<bool> {
                let mut tx = self.pool.begin().await?;
                let consumed = match consume {
                    Consume::Code { digest, client_id, grant_id } => sqlx::query(
                        "UPDATE authorization_codes SET consumed_at = $2, grant_id = $4 \
                         WHERE digest = $1 AND client_id = $3 AND consumed_at IS NULL",
                    )
                    .bind(digest)
                    .bind(now)
                    .bind(client_id)
                    .bind(grant_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected(),
                    Consume::Refresh { digest } => sqlx::query(
                        "UPDATE refresh_tokens SET consumed_at = $2 \
                         WHERE digest = $1 AND consumed_at IS NULL AND revoked_at IS NULL",
                    )
                    .bind(digest)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected(),
                    Consume::Nothing => 1,
                };
                if consumed != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                if let Some(g) = grant {
                    insert_grant_with(&mut *tx, g).await?;
                }
                insert_access_token_with(&mut *tx, access).await?;
                if let Some(r) = refresh {
                    insert_refresh_token_with(&mut *tx, r).await?;
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn record_assertion(&self, id: &str, expires_at: Timestamp) -> StoreResult<bool> {
                let done = sqlx::query(
                    "INSERT INTO used_assertions (id, expires_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                )
                .bind(id)
                .bind(expires_at)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }
        }
    };
}
