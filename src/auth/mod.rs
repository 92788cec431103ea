//! Student sign-in: the login page, sessions, authentication levels and password hashing.
pub mod csrf;
pub mod levels;
pub mod login;
pub mod passwords;
pub mod second_password;
pub mod session;
pub mod throttle;

use unicode_normalization::UnicodeNormalization;

/// User IDs are compared as NFKC, trimmed, lowercase (full-width ｓ２４０ → s240); never passwords.
pub fn normalize_username(raw: &str) -> String {
    raw.nfkc().collect::<String>().trim().to_lowercase()
}

#[cfg(test)]
mod tests {
    #[test]
    fn usernames_are_normalized() {
        assert_eq!(super::normalize_username("  Ｓ２４０１００１ "), "s2401001");
        assert_eq!(super::normalize_username("S2401001"), "s2401001");
    }
}
