//! The second password's rules, from the seed manual: at least 8 characters, at least one A–Z,
//! one a–z and one 0–9, half-width letters and digits only, and not the university password.
//! Long ones are allowed (up to 64).

pub const MIN_LENGTH: usize = 8;
pub const MAX_LENGTH: usize = 64;

/// A broken rule, named by its message key in the catalogs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    TooShort,
    TooLong,
    NoUppercase,
    NoLowercase,
    NoDigit,
    NotHalfWidthAlphanumeric,
    ConfirmationMismatch,
    SameAsUniversityPassword,
}

impl Violation {
    pub fn message_key(self) -> &'static str {
        match self {
            Violation::TooShort => "rule_too_short",
            Violation::TooLong => "rule_too_long",
            Violation::NoUppercase => "rule_no_uppercase",
            Violation::NoLowercase => "rule_no_lowercase",
            Violation::NoDigit => "rule_no_digit",
            Violation::NotHalfWidthAlphanumeric => "rule_half_width",
            Violation::ConfirmationMismatch => "rule_confirmation_mismatch",
            Violation::SameAsUniversityPassword => "rule_same_as_university_password",
        }
    }
}

/// Every rule `new` breaks (each gets its own message line). The university-password rule is
/// checked by the caller against a short-lived hash and passed in as `same_as_university`.
pub fn check(new: &str, confirmation: &str, same_as_university: bool) -> Vec<Violation> {
    let mut broken = Vec::new();
    let length = new.chars().count();
    if length < MIN_LENGTH {
        broken.push(Violation::TooShort);
    }
    if length > MAX_LENGTH {
        broken.push(Violation::TooLong);
    }
    if !new.chars().any(|c| c.is_ascii_uppercase()) {
        broken.push(Violation::NoUppercase);
    }
    if !new.chars().any(|c| c.is_ascii_lowercase()) {
        broken.push(Violation::NoLowercase);
    }
    if !new.chars().any(|c| c.is_ascii_digit()) {
        broken.push(Violation::NoDigit);
    }
    if !new.chars().all(|c| c.is_ascii_alphanumeric()) {
        broken.push(Violation::NotHalfWidthAlphanumeric);
    }
    if new != confirmation {
        broken.push(Violation::ConfirmationMismatch);
    }
    if same_as_university {
        broken.push(Violation::SameAsUniversityPassword);
    }
    broken
}

#[cfg(test)]
mod tests {
    use super::Violation::*;
    use super::*;

    #[test]
    fn the_seed_rules() {
        assert!(check("Abcdefg1", "Abcdefg1", false).is_empty());
        assert_eq!(check("Abcdef1", "Abcdef1", false), vec![TooShort]);
        assert_eq!(check("abcdefg1", "abcdefg1", false), vec![NoUppercase]);
        assert_eq!(check("ABCDEFG1", "ABCDEFG1", false), vec![NoLowercase]);
        assert_eq!(check("Abcdefgh", "Abcdefgh", false), vec![NoDigit]);
        // Full-width letters and digits are not half-width alphanumerics.
        assert_eq!(
            check("Abcdefg1Ａ", "Abcdefg1Ａ", false),
            vec![NotHalfWidthAlphanumeric]
        );
        assert_eq!(
            check("Ａbcdefg1", "Ａbcdefg1", false),
            vec![NoUppercase, NotHalfWidthAlphanumeric]
        );
        assert_eq!(
            check("Abcdefg1!", "Abcdefg1!", false),
            vec![NotHalfWidthAlphanumeric]
        );
        assert_eq!(
            check("Abcdefg1", "Abcdefg2", false),
            vec![ConfirmationMismatch]
        );
        assert_eq!(
            check("Abcdefg1", "Abcdefg1", true),
            vec![SameAsUniversityPassword]
        );
        let long = format!("Aa1{}", "x".repeat(61));
        assert!(check(&long, &long, false).is_empty());
        let too_long = format!("{long}x");
        assert_eq!(check(&too_long, &too_long, false), vec![TooLong]);
        assert_eq!(
            check("", "", false),
            vec![TooShort, NoUppercase, NoLowercase, NoDigit]
        );
    }
}
