//! Times argon2id the way nidan runs it (src/auth/passwords.rs): hashes with
//! `Argon2::new(Argon2id, V0x13, params)` and verifies with `Argon2::default().verify_password`
//! (parameters read from the PHC string). Prints one JSON line.
//!
//!   nidan-bench-argon2 [ITERATIONS]
//!
//! - `verify_ms`: one verification at the production parameters (m=19456 KiB, t=2, p=1), run
//!   alone (median, min, p90 of ITERATIONS sequential runs, after 2 warm-up runs);
//! - `parallel`: one thread per core verifying at once, as a saturated login queue does
//!   (aggregate verifications per second and the median time of one verification then);
//! - `short_lived_hash_ms`: the extra hash nidan stores on the session at each full login
//!   (`hash_short_lived`: m=4096 KiB, t=1, p=1);
//! - `reused_buffer_verify_ms`: the same verification through
//!   `Argon2::hash_password_into_with_memory` with one 19 MiB block buffer allocated once and
//!   reused (what a fixed pool of argon2 buffers would cost; compare with `verify_ms`).
//!
//! Run it with `MALLOC_MMAP_THRESHOLD_=1048576` to see the cost of a fresh mmap per verification.
use std::time::Instant;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

fn hash_with(params: &Params, password: &str) -> String {
    let salt = SaltString::encode_b64(b"nidan-bench-salt").expect("salt encodes");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password(password.as_bytes(), &salt)
        .expect("hash")
        .to_string()
}

fn verify(hash: &str, password: &str) -> bool {
    let parsed = PasswordHash::new(hash).expect("PHC string");
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// Verification with caller-provided memory blocks (no allocation per call).
fn verify_with_memory(hash: &str, password: &str, blocks: &mut [Block]) -> bool {
    let parsed = PasswordHash::new(hash).expect("PHC string");
    let params = Params::try_from(&parsed).expect("parameters");
    let expected = parsed.hash.expect("hash part");
    let mut salt = [0u8; 64];
    let salt = parsed.salt.expect("salt").decode_b64(&mut salt).expect("salt decodes");
    let mut out = vec![0u8; expected.len()];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut *blocks)
        .expect("hash");
    out == expected.as_bytes()
}

fn stats(mut ms: Vec<f64>) -> (f64, f64, f64, f64) {
    ms.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let pick = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    (pick(0.0), pick(0.5), pick(0.9), mean)
}

fn time_ms(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
        .max(3);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let production = Params::new(19_456, 2, 1, None).expect("params");
    let password = "Second2401001Pw";
    let hash = hash_with(&production, password);
    assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");

    for _ in 0..2 {
        assert!(verify(&hash, password));
    }
    let alone: Vec<f64> = (0..iterations)
        .map(|_| time_ms(|| assert!(verify(&hash, password))))
        .collect();
    let (min, median, p90, mean) = stats(alone);

    // One thread per core, all verifying at once.
    let per_thread = iterations.div_ceil(cores).max(3);
    let started = Instant::now();
    let handles: Vec<_> = (0..cores)
        .map(|_| {
            let hash = hash.clone();
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|_| time_ms(|| assert!(verify(&hash, password))))
                    .collect::<Vec<f64>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().expect("thread"));
    }
    let wall = started.elapsed().as_secs_f64();
    let parallel_per_s = all.len() as f64 / wall;
    let (_, parallel_median, _, _) = stats(all);

    let light = Params::new(4096, 1, 1, None).expect("params");
    let short: Vec<f64> = (0..iterations)
        .map(|_| time_ms(|| drop(hash_with(&light, password))))
        .collect();
    let (_, short_median, _, _) = stats(short);

    let mut blocks = vec![Block::default(); production.block_count()];
    assert!(verify_with_memory(&hash, password, &mut blocks));
    assert!(!verify_with_memory(&hash, "wrong", &mut blocks));
    let reused: Vec<f64> = (0..iterations)
        .map(|_| time_ms(|| assert!(verify_with_memory(&hash, password, &mut blocks))))
        .collect();
    let (reused_min, reused_median, _, _) = stats(reused);

    println!(
        "{{\"params\":\"argon2id m=19456 KiB, t=2, p=1\",\"crate\":\"argon2 0.5.3\",\"iterations\":{iterations},\"cores\":{cores},\"verify_ms\":{{\"min\":{min:.2},\"median\":{median:.2},\"p90\":{p90:.2},\"mean\":{mean:.2}}},\"parallel\":{{\"threads\":{cores},\"verifications_per_s\":{parallel_per_s:.2},\"median_ms\":{parallel_median:.2}}},\"short_lived_hash_ms\":{short_median:.2},\"reused_buffer_verify_ms\":{{\"min\":{reused_min:.2},\"median\":{reused_median:.2}}}}}"
    );
}
