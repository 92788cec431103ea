-- The audit trail: one hash chain per replica, so audit writes never serialise the replicas.
CREATE TABLE audit_events (
    id TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    account_id TEXT,
    client_id TEXT,
    address TEXT,
    outcome TEXT NOT NULL,
    details TEXT NOT NULL DEFAULT '',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    UNIQUE (replica, seq)
);
CREATE INDEX audit_events_at ON audit_events (at);
CREATE INDEX audit_events_account ON audit_events (account_id);

-- Leases for work that one replica at a time should do (the clean-up).
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until BIGINT NOT NULL
);
