//! Login throttling, checked before the directory is asked. Failures only count:
//! - (account, client address): a hard lock after `password_failures` within `window`;
//! - the account alone: a short, growing delay, so a stranger who knows a student number slows
//!   attempts down but cannot lock the student out;
//! - the client address: `address_failures` per window (campus NAT can be allow-listed);
//! - the second password: `second_password_failures` lock only the second-password level.
//!
//! Each attempt is reserved before it is checked and given back on success, so parallel attempts
//! (on any replica) never exceed a limit.
use std::net::IpAddr;

use crate::app::AppState;
use crate::clock::Timestamp;
use crate::store::StoreResult;

/// Longest lock a repeat offender gets.
const MAX_LOCK: i64 = 24 * 3600;
/// The account-wide delay starts here and doubles, up to `MAX_DELAY`.
const FIRST_DELAY: i64 = 30;
const MAX_DELAY: i64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    AccountAddress,
    Account,
    Address,
    SecondPassword,
}

#[derive(Debug, Clone)]
struct Key {
    kind: Kind,
    key: String,
    limit: i64,
}

/// Attempts reserved for one login; give them back or record the failure.
#[derive(Debug)]
pub struct Reservation {
    keys: Vec<Key>,
}

fn window(state: &AppState) -> i64 {
    state.config.throttle.window.as_secs() as i64
}

fn lock_length(state: &AppState, kind: Kind, lock_count: i64) -> i64 {
    let doubling = 1i64 << lock_count.clamp(0, 10);
    match kind {
        Kind::Account => (FIRST_DELAY * doubling).min(MAX_DELAY),
        Kind::Address => window(state),
        _ => (window(state) * doubling).min(MAX_LOCK),
    }
}

fn university_keys(state: &AppState, username: &str, ip: IpAddr) -> Vec<Key> {
    let t = &state.config.throttle;
    let mut keys = vec![
        Key {
            kind: Kind::AccountAddress,
            key: format!("pw:{username}|{ip}"),
            limit: i64::from(t.password_failures),
        },
        Key {
            kind: Kind::Account,
            key: format!("pwacct:{username}"),
            limit: i64::from(t.password_failures),
        },
    ];
    if !t.address_allowlist.iter().any(|net| net.contains(&ip)) {
        keys.push(Key {
            kind: Kind::Address,
            key: format!("addr:{ip}"),
            limit: i64::from(t.address_failures),
        });
    }
    keys
}

fn second_password_key(state: &AppState, account_id: &str) -> Key {
    Key {
        kind: Kind::SecondPassword,
        key: format!("second:{account_id}"),
        limit: i64::from(state.config.throttle.second_password_failures),
    }
}

async fn reserve(state: &AppState, keys: Vec<Key>) -> StoreResult<Option<Reservation>> {
    let now = state.clock.now();
    let mut taken = Vec::new();
    for key in keys {
        match state
            .store
            .throttle_reserve(&key.key, key.limit, window(state), now)
            .await?
        {
            Some(_) => taken.push(key),
            None => {
                for k in &taken {
                    state.store.throttle_release(&k.key).await?;
                }
                return Ok(None);
            }
        }
    }
    Ok(Some(Reservation { keys: taken }))
}

/// Reserves a university-password attempt; None when any limit applies (show the generic failure).
pub async fn reserve_university(
    state: &AppState,
    username: &str,
    ip: IpAddr,
) -> StoreResult<Option<Reservation>> {
    reserve(state, university_keys(state, username, ip)).await
}

/// Reserves a second-password attempt; None while the second-password level is locked.
pub async fn reserve_second_password(
    state: &AppState,
    account_id: &str,
) -> StoreResult<Option<Reservation>> {
    reserve(state, vec![second_password_key(state, account_id)]).await
}

/// When the second-password level of the account is locked, until when.
pub async fn second_password_locked_until(
    state: &AppState,
    account_id: &str,
) -> StoreResult<Option<Timestamp>> {
    let now = state.clock.now();
    let key = second_password_key(state, account_id);
    Ok(state
        .store
        .throttle_get(&key.key)
        .await?
        .and_then(|c| c.locked_until)
        .filter(|t| *t > now))
}

impl Reservation {
    /// The attempt succeeded: it does not count.
    pub async fn succeeded(self, state: &AppState) -> StoreResult<()> {
        for key in &self.keys {
            state.store.throttle_release(&key.key).await?;
        }
        Ok(())
    }

    /// A full success also forgets the earlier failures (an active lock stays).
    pub async fn succeeded_fully(self, state: &AppState) -> StoreResult<()> {
        for key in &self.keys {
            state.store.throttle_release(&key.key).await?;
            if key.kind != Kind::Address {
                state.store.throttle_reset(&key.key).await?;
            }
        }
        Ok(())
    }

    /// The attempt failed: it stays counted, and a key that reached its limit locks.
    /// Returns true when this failure locked the second-password level.
    pub async fn failed(self, state: &AppState) -> StoreResult<bool> {
        let now = state.clock.now();
        let mut second_locked = false;
        for key in &self.keys {
            let Some(counter) = state.store.throttle_get(&key.key).await? else {
                continue;
            };
            if counter.failures >= key.limit {
                let until = now + lock_length(state, key.kind, counter.lock_count);
                state.store.throttle_lock(&key.key, until, now).await?;
                tracing::warn!(kind = ?key.kind, "throttle lock");
                crate::metrics::lockout(match key.kind {
                    Kind::AccountAddress => "account_address",
                    Kind::Account => "account_delay",
                    Kind::Address => "address",
                    Kind::SecondPassword => "second_password",
                });
                second_locked |= key.kind == Kind::SecondPassword;
            }
        }
        Ok(second_locked)
    }
}

/// Operator unlock: every counter of the user ID and of the account.
pub async fn unlock(
    state_store: &crate::store::DynStore,
    username: &str,
    account_id: Option<&str>,
) -> StoreResult<u64> {
    let mut removed = state_store
        .throttle_clear_prefix(&format!("pw:{username}|"))
        .await?;
    removed += state_store
        .throttle_clear(&format!("pwacct:{username}"))
        .await?;
    if let Some(id) = account_id {
        removed += state_store.throttle_clear(&format!("second:{id}")).await?;
    }
    Ok(removed)
}
