//! Request parameters as OAuth reads them: form-urlencoded, each at most once, empty = absent.
use std::collections::HashMap;

use axum::http::{header, HeaderMap};

#[derive(Debug, Default, Clone)]
pub struct Params(HashMap<String, String>);

#[derive(Debug)]
pub enum ParamError {
    Duplicate(String),
    TooLong(String),
}

impl ParamError {
    pub fn describe(&self) -> String {
        match self {
            ParamError::Duplicate(name) => format!("parameter {name} is repeated"),
            ParamError::TooLong(name) => format!("parameter {name} is too long"),
        }
    }
}

const MAX_VALUE: usize = 8 * 1024;

impl Params {
    pub fn parse(input: &[u8]) -> Result<Params, ParamError> {
        let mut map = HashMap::new();
        for (key, value) in url::form_urlencoded::parse(input) {
            if value.len() > MAX_VALUE {
                return Err(ParamError::TooLong(key.into_owned()));
            }
            if value.is_empty() {
                continue;
            }
            if map.insert(key.to_string(), value.into_owned()).is_some() {
                return Err(ParamError::Duplicate(key.into_owned()));
            }
        }
        Ok(Params(map))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn take(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }

    pub fn merge_missing(&mut self, other: Params) {
        for (k, v) in other.0 {
            self.0.entry(k).or_insert(v);
        }
    }
}

/// True when the request body is declared as a form.
pub fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_and_empty_values_ignored() {
        assert!(matches!(
            Params::parse(b"a=1&a=2"),
            Err(ParamError::Duplicate(_))
        ));
        let p = Params::parse(b"a=1&b=&c=%20x").unwrap();
        assert_eq!(p.get("a"), Some("1"));
        assert_eq!(p.get("b"), None);
        assert_eq!(p.get("c"), Some(" x"));
    }
}
