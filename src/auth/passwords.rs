//! Password hashing with argon2id, off the async runtime and behind a semaphore sized to the cores,
//! so a burst of logins queues instead of starving every other request.
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::Semaphore;

use crate::clock::random_bytes;

/// OWASP's argon2id recommendation: 19 MiB, two passes, one lane.
pub fn production_params() -> Params {
    Params::new(19_456, 2, 1, None).expect("valid argon2 parameters")
}

/// Cheap parameters for tests only.
pub fn test_params() -> Params {
    Params::new(256, 1, 1, None).expect("valid argon2 parameters")
}

pub fn hash_with(params: &Params, password: &str) -> String {
    let salt = SaltString::encode_b64(&random_bytes::<16>()).expect("16-byte salt encodes");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing with valid parameters")
        .to_string()
}

/// `hash_with` into a reusable block buffer; the same PHC string.
fn hash_with_memory(params: &Params, password: &str, memory: &mut Vec<Block>) -> String {
    let salt = SaltString::encode_b64(&random_bytes::<16>()).expect("16-byte salt encodes");
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt
        .as_salt()
        .decode_b64(&mut salt_buf)
        .expect("a salt we encoded decodes");
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut out = vec![0u8; params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN)];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(
            password.as_bytes(),
            salt_bytes,
            &mut out,
            &mut memory[..blocks],
        )
        .expect("argon2 hashing with valid parameters");
    let output = argon2::password_hash::Output::new(&out).expect("argon2 output length is valid");
    format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        salt.as_str(),
        output
    )
}

#[cfg(test)]
fn verify_blocking(hash: &str, password: &str) -> bool {
    verify_with_memory(hash, password, &mut Vec::new())
}

/// Verifies with a reusable block buffer: a fresh 19 MiB allocation per check would leave every
/// malloc arena of the blocking threads holding one, and the process would only grow.
fn verify_with_memory(hash: &str, password: &str, memory: &mut Vec<Block>) -> bool {
    // The parameters come from the PHC string, so old hashes keep verifying after a change.
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(expected), Some(salt)) = (parsed.hash, parsed.salt) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::V0x13,
        Some(Ok(version)) => version,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..blocks])
        .is_ok()
        && crate::crypto::constant_time_eq(&out, expected.as_bytes())
}

pub struct PasswordHasher {
    permits: Semaphore,
    params: Params,
    /// Verified against when there is no real hash, so timing does not reveal who exists.
    dummy_hash: String,
    waiting: std::sync::atomic::AtomicI64,
    /// One block buffer per permit, reused by every verification.
    buffers: Arc<std::sync::Mutex<Vec<Vec<Block>>>>,
}

impl PasswordHasher {
    pub fn new(params: Params) -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let dummy_hash = hash_with(&params, "nidan-dummy-password");
        Arc::new(Self {
            permits: Semaphore::new(cores),
            params,
            dummy_hash,
            waiting: Default::default(),
            buffers: Default::default(),
        })
    }

    /// Requests waiting for or running an argon2 computation.
    pub fn queue_depth(&self) -> i64 {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        use std::sync::atomic::Ordering;
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("semaphore never closed");
        let result = tokio::task::spawn_blocking(work)
            .await
            .expect("argon2 task panicked");
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// Verifies `password` against `hash`; with no hash, pays for one dummy verification and fails.
    pub async fn verify(&self, hash: Option<&str>, password: &str) -> bool {
        let real = hash.is_some();
        let hash = hash.unwrap_or(&self.dummy_hash).to_string();
        let password = password.to_string();
        let ok = self
            .with_buffer(move |memory| verify_with_memory(&hash, &password, memory))
            .await;
        ok && real
    }

    /// Runs `work` off the runtime with one of the pooled block buffers.
    async fn with_buffer<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> T {
        let buffers = self.buffers.clone();
        self.run(move || {
            let mut memory = buffers
                .lock()
                .map(|mut b| b.pop())
                .ok()
                .flatten()
                .unwrap_or_default();
            let result = work(&mut memory);
            if let Ok(mut b) = buffers.lock() {
                b.push(memory);
            }
            result
        })
        .await
    }

    /// A hash that lives at most 15 minutes on a session (the "differs from the university
    /// password" rule): lighter parameters, since it is deleted on use.
    pub async fn hash_short_lived(&self, password: &str) -> String {
        let params = Params::new(4096, 1, 1, None).expect("valid argon2 parameters");
        let params = if params.m_cost() < self.params.m_cost() {
            params
        } else {
            self.params.clone()
        };
        let password = password.to_string();
        self.with_buffer(move |memory| hash_with_memory(&params, &password, memory))
            .await
    }

    pub async fn hash(&self, password: &str) -> String {
        let params = self.params.clone();
        let password = password.to_string();
        self.with_buffer(move |memory| hash_with_memory(&params, &password, memory))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_hashes_are_standard_phc_strings() {
        let params = Params::new(4096, 1, 1, None).unwrap();
        let mut memory = Vec::new();
        let first = hash_with_memory(&params, "Secret123", &mut memory);
        let second = hash_with_memory(&params, "Secret123", &mut memory);
        assert_ne!(first, second, "fresh salt each time");
        assert!(
            first.starts_with("$argon2id$v=19$m=4096,t=1,p=1$"),
            "{first}"
        );
        // The argon2 crate's own verifier accepts it, and so does nidan's.
        let parsed = PasswordHash::new(&first).unwrap();
        use argon2::PasswordVerifier as _;
        assert!(Argon2::default()
            .verify_password(b"Secret123", &parsed)
            .is_ok());
        assert!(verify_blocking(&first, "Secret123"));
        assert!(!verify_blocking(&first, "Secret124"));
    }

    #[tokio::test]
    async fn verifies_and_refuses() {
        let hasher = PasswordHasher::new(test_params());
        let hash = hasher.hash("Secret123").await;
        assert!(hash.starts_with("$argon2id$"));
        assert!(hasher.verify(Some(&hash), "Secret123").await);
        assert!(!hasher.verify(Some(&hash), "secret123").await);
        assert!(!hasher.verify(None, "nidan-dummy-password").await);
        assert!(!hasher.verify(Some("not a hash"), "x").await);
    }

    #[test]
    fn production_parameters_are_the_documented_ones() {
        let hash = hash_with(&production_params(), "Secret123");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify_blocking(&hash, "Secret123"));
    }
}
