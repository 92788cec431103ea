-- Failure counters for login throttling; changed only by single conditional statements so that
-- parallel requests and replicas can never exceed a limit.
CREATE TABLE throttle_counters (
    key TEXT PRIMARY KEY,
    window_start INTEGER NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    locked_until INTEGER,
    lock_count INTEGER NOT NULL DEFAULT 0
);
