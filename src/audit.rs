//! The audit trail of security events. Each replica keeps its own hash chain (every record holds
//! the hash of the replica's previous record), so audit writes never serialise the replicas and
//! `nidan audit verify` can tell when a record was changed or removed.
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::clock::{random_id, Timestamp};
use crate::store::{AuditEvent, DynStore, StoreResult};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// This replica's chain: a fresh replica id per process, so restarts start new chains.
pub struct AuditLog {
    pub replica: String,
    head: Mutex<(i64, String)>,
}

impl Default for AuditLog {
    fn default() -> Self {
        Self::new()
    }
}

impl AuditLog {
    pub fn new() -> Self {
        Self {
            replica: random_id(),
            head: Mutex::new((0, GENESIS.to_string())),
        }
    }
}

/// What happened, to whom, from where.
#[derive(Debug, Default, Clone)]
pub struct Event<'a> {
    pub kind: &'a str,
    pub account_id: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub address: Option<String>,
    pub outcome: &'a str,
    pub details: String,
}

pub fn event_hash(e: &AuditEvent) -> String {
    let mut hasher = Sha256::new();
    for part in [
        e.prev_hash.as_str(),
        &e.replica,
        &e.seq.to_string(),
        &e.at.to_string(),
        &e.kind,
        e.account_id.as_deref().unwrap_or(""),
        e.client_id.as_deref().unwrap_or(""),
        e.address.as_deref().unwrap_or(""),
        &e.outcome,
        &e.details,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(hasher.finalize())
}

impl AuditLog {
    pub async fn record(
        &self,
        store: &DynStore,
        now: Timestamp,
        event: Event<'_>,
    ) -> StoreResult<()> {
        let mut head = self.head.lock().await;
        let mut row = AuditEvent {
            id: random_id(),
            replica: self.replica.clone(),
            seq: head.0 + 1,
            at: now,
            kind: event.kind.into(),
            account_id: event.account_id.map(str::to_string),
            client_id: event.client_id.map(str::to_string),
            address: event.address,
            outcome: event.outcome.into(),
            details: event.details,
            prev_hash: head.1.clone(),
            hash: String::new(),
        };
        row.hash = event_hash(&row);
        store.insert_audit(&row).await?;
        *head = (row.seq, row.hash);
        Ok(())
    }
}

/// Checks every replica's chain; returns one line per problem. A chain may start after records
/// that the retention period removed, so the first kept record of a chain is taken as given.
pub fn verify(events: &[AuditEvent]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut previous: Option<&AuditEvent> = None;
    for event in events {
        if event_hash(event) != event.hash {
            problems.push(format!(
                "record {} (replica {}, #{}) was altered",
                event.id, event.replica, event.seq
            ));
        }
        match previous.filter(|p| p.replica == event.replica) {
            Some(p) if event.seq != p.seq + 1 || event.prev_hash != p.hash => {
                problems.push(format!(
                    "replica {}: records missing or reordered between #{} and #{}",
                    event.replica, p.seq, event.seq
                ));
            }
            None if event.seq == 1 && event.prev_hash != GENESIS => {
                problems.push(format!(
                    "replica {}: the first record does not start the chain",
                    event.replica
                ));
            }
            _ => {}
        }
        previous = Some(event);
    }
    problems
}
