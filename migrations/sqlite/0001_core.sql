-- Core OpenID Connect provider state. Times are Unix seconds; secrets are stored as SHA-256 digests.
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    directory_id TEXT NOT NULL UNIQUE,
    username TEXT NOT NULL,
    sub TEXT NOT NULL UNIQUE,
    claims TEXT NOT NULL DEFAULT '{}',
    email TEXT,
    email_verified_at INTEGER,
    previous_email TEXT,
    email_changed_at INTEGER,
    second_password_hash TEXT,
    second_password_set_at INTEGER,
    locked_until INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX accounts_username ON accounts (username);
CREATE INDEX accounts_email ON accounts (email);

CREATE TABLE clients (
    client_id TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    secret_digest TEXT,
    source TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    alg TEXT NOT NULL,
    public_jwk TEXT NOT NULL,
    private_jwk_encrypted TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    active_from INTEGER NOT NULL,
    published_until INTEGER,
    delete_after INTEGER
);

CREATE TABLE browser_sessions (
    id TEXT PRIMARY KEY,
    cookie_digest TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    sid TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    password_at INTEGER NOT NULL,
    second_password_at INTEGER,
    university_password_hash TEXT,
    university_password_hash_until INTEGER,
    ended_at INTEGER
);
CREATE INDEX browser_sessions_account ON browser_sessions (account_id);
CREATE INDEX browser_sessions_sid ON browser_sessions (sid);

CREATE TABLE login_transactions (
    id TEXT PRIMARY KEY,
    browser_digest TEXT NOT NULL,
    client_id TEXT NOT NULL,
    request TEXT NOT NULL,
    account_id TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    completed_at INTEGER
);

CREATE TABLE grants (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    account_id TEXT REFERENCES accounts (id) ON DELETE CASCADE,
    session_id TEXT,
    sid TEXT,
    scope TEXT NOT NULL,
    claims_request TEXT,
    acr TEXT,
    auth_time INTEGER,
    claims TEXT NOT NULL DEFAULT '{}',
    offline INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX grants_session ON grants (session_id);
CREATE INDEX grants_account ON grants (account_id);

CREATE TABLE authorization_codes (
    digest TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    session_id TEXT NOT NULL,
    sid TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    scope TEXT NOT NULL,
    claims_request TEXT,
    nonce TEXT,
    code_challenge TEXT,
    acr TEXT NOT NULL,
    auth_time INTEGER NOT NULL,
    claims TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    consumed_at INTEGER,
    grant_id TEXT
);

CREATE TABLE access_tokens (
    digest TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    scope TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX access_tokens_grant ON access_tokens (grant_id);

CREATE TABLE refresh_tokens (
    digest TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    scope TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    consumed_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX refresh_tokens_grant ON refresh_tokens (grant_id);

-- private_key_jwt assertion ids, single use across replicas.
CREATE TABLE used_assertions (
    id TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
