-- The durable job queue (mail and back-channel logout deliveries) and one-time links.
CREATE TABLE outbox (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    recipient TEXT NOT NULL,
    subject TEXT NOT NULL DEFAULT '',
    -- Mail bodies are encrypted under the key-encryption key and blanked after delivery.
    payload TEXT NOT NULL,
    message_id TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    sent_at BIGINT,
    failed_at BIGINT,
    lease_owner TEXT,
    lease_until BIGINT
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE sent_at IS NULL AND failed_at IS NULL;

CREATE TABLE one_time_links (
    digest TEXT PRIMARY KEY,
    purpose TEXT NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    email TEXT,
    locale TEXT NOT NULL,
    login_transaction_id TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    consumed_at BIGINT,
    superseded_at BIGINT
);
CREATE INDEX one_time_links_account ON one_time_links (account_id, purpose);
