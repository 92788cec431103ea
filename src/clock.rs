//! Time and randomness. Every timestamp and every random value in nidan comes from here, so tests
//! can move a clock instead of sleeping.
use std::sync::atomic::{AtomicI64, Ordering};

use rand::RngCore;

/// Seconds since the Unix epoch; all stored times use this unit.
pub type Timestamp = i64;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> Timestamp {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

/// A clock that tests move by hand.
#[derive(Debug)]
pub struct TestClock(AtomicI64);

impl TestClock {
    pub fn new(start: Timestamp) -> Self {
        Self(AtomicI64::new(start))
    }
    /// Starts at the current wall-clock time, so tokens look plausible to relying-party libraries.
    pub fn starting_now() -> Self {
        Self::new(SystemClock.now())
    }
    pub fn advance(&self, seconds: i64) {
        self.0.fetch_add(seconds, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        self.0.load(Ordering::SeqCst)
    }
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// A 256-bit random token, base64url without padding (43 characters).
pub fn random_token() -> String {
    crate::crypto::b64url(&random_bytes::<32>())
}

/// A 128-bit random identifier in lowercase hex, for row ids that are not secrets.
pub fn random_id() -> String {
    hex::encode(random_bytes::<16>())
}
