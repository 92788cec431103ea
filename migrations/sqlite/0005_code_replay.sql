-- A replayed authorization code is marked, so the exchange that won the race revokes its grant
-- even when the replay arrived before that grant was stored.
ALTER TABLE authorization_codes ADD COLUMN replayed_at INTEGER;
