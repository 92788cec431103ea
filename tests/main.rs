//! nidan's black-box tests: each test starts its own server (port 0, temp dir, SQLite file or a
//! PostgreSQL database of its own, test clock) and speaks HTTP to it as a relying party or a
//! browser would.
mod common;

mod cli;
mod enroll;
mod errors;
mod faults;
mod flow;
mod keys;
mod ldap;
mod logout;
mod ops;
mod outbox;
mod pages;
mod replicas;
mod store;
mod throttle;
mod tokens;
