//! nidan: an OpenID Connect identity provider for universities — the university password from
//! the directory plus a second password that nidan keeps, with two authentication levels.
pub mod app;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod demo;
pub mod directory;
pub mod enroll;
pub mod error;
pub mod keys;
pub mod mail;
pub mod metrics;
pub mod oidc;
pub mod store;
pub mod ui;
