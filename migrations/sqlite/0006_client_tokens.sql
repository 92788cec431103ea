-- Clients' own (client_credentials) access tokens are self-contained and not stored; a revoked
-- one is remembered here until it would have expired.
CREATE TABLE revoked_client_tokens (
    digest TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE INDEX revoked_client_tokens_expiry ON revoked_client_tokens (expires_at);
