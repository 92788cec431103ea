//! The LDAP / Active Directory directory: finds the student with the service account (or builds their
//! DN from `dn_template`), checks the university password with a bind as the student on a connection
//! of its own, and maps directory attributes to claims.
//!
//! Choices a deployer can see:
//! - Multi-valued attributes: the standard OpenID string claims (`name`, `family_name`, `email`, …,
//!   with or without a `#language` tag) and `student_id` take the first value the directory returns;
//!   any other claim is a string when the attribute has one value and an array of strings when it has
//!   several (`affiliation = ["student", "member"]`). Binary values are never claims.
//! - Attribute options: a claim mapped to `sn;lang-ja;phonetic` takes exactly the attribute with those
//!   options (in any order, any case); `sn` alone never takes `sn;lang-ja`. Use the schema's primary
//!   attribute names (`sn`, not `surname`): the server answers with those.
//! - Immutable id: `entryUUID` (or any text attribute) as the directory writes it; `objectGUID` as the
//!   standard lowercase GUID string (`3f2504e0-4f89-11d3-9a0c-0305e82c3301`, first three groups
//!   little-endian, as Windows shows it without braces); any other binary id as lowercase hex.
//! - Connections: searches, lookups and the readiness check share up to four idle connections bound
//!   as the service account (a stale one is replaced once, transparently); every password check binds
//!   on a fresh connection that is closed afterwards, so a student's identity never leaks into a
//!   shared connection.
//! - TLS: ldaps:// or `starttls = true` on ldap://, verified against the system's roots plus the
//!   certificates in `tls_ca_file` (PEM), host name included.
//! - Lookups (refresh grants) read as the service account; with a DN template and no service account
//!   they read anonymously, and an entry they cannot see is `Unavailable`, never "gone".
//! - Every call finishes within `timeout` (connect, TLS, binds and searches together); a directory
//!   that is down, slow or busy is `Unavailable`, never a wait.
//! - `dn_template` may be a DN (`uid={username},ou=people,…`, the user ID RFC 4514-escaped into it;
//!   the entry is then read as the student) or an Active Directory logon name (`{username}@ad.example`
//!   or `EXAMPLE\{username}`, which needs `base_dn` and `user_filter` to read the entry as the student).
//! - Active Directory bind answers: `data 532` / `data 773` (password expired / must change) are
//!   `PasswordExpired`; `data 533` (disabled), `data 775` (locked) and `data 701` (account expired) are
//!   `Disabled`. `lookup` treats an entry whose `userAccountControl` has ACCOUNTDISABLE as gone.
use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use async_trait::async_trait;
use ldap3::{
    dn_escape, ldap_escape, Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry,
    SearchOptions,
};
use rustls_ldap as rustls;
use serde_json::{Map, Value};

use super::{DirectoryError, DirectoryUser, UserDirectory};
use crate::config::{DirectoryConfig, Secret};

/// Idle service-account connections kept for reuse.
const MAX_IDLE: usize = 4;
/// Claims that are a single string in OpenID Connect Core §5.1 (plus nidan's `student_id`).
const SINGLE_VALUED: &[&str] = &[
    "name",
    "given_name",
    "family_name",
    "middle_name",
    "nickname",
    "preferred_username",
    "profile",
    "picture",
    "website",
    "email",
    "gender",
    "birthdate",
    "zoneinfo",
    "locale",
    "phone_number",
    "student_id",
];
/// Active Directory's userAccountControl ACCOUNTDISABLE bit.
const AD_ACCOUNT_DISABLE: u32 = 0x2;
const USER_ACCOUNT_CONTROL: &str = "userAccountControl";

/// An attribute description: the type and its options (`sn;lang-ja;phonetic`), compared without case.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AttributeDescription {
    name: String,
    options: BTreeSet<String>,
}

impl AttributeDescription {
    fn parse(text: &str) -> Self {
        let mut parts = text.trim().split(';');
        let name = parts.next().unwrap_or_default().to_ascii_lowercase();
        let options = parts
            .filter(|o| !o.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        Self { name, options }
    }
}

#[derive(Debug, Clone)]
struct ClaimMapping {
    claim: String,
    attribute: AttributeDescription,
    single: bool,
}

/// How the student's entry is found.
#[derive(Debug, Clone)]
enum Locator {
    /// Search under `base_dn` with `user_filter` as the service account, then bind as the entry's DN.
    Search { base_dn: String, filter: String },
    /// Bind with `dn_template` filled in; `is_dn` says whether it is a DN (read the entry at that DN)
    /// or an Active Directory logon name (search under `base_dn` with `filter` as the student).
    Template {
        template: String,
        is_dn: bool,
        base_dn: String,
        filter: String,
    },
}

/// What a search for one student found.
enum Found {
    None,
    One(Box<SearchEntry>),
    Many,
}

pub struct LdapDirectory {
    url: String,
    starttls: bool,
    /// The system roots plus `tls_ca_file`; `None` uses ldap3's default (the system roots).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The service account; `None` searches anonymously.
    service: Option<(String, Secret)>,
    locator: Locator,
    id_attribute: AttributeDescription,
    claims: Vec<ClaimMapping>,
    /// Attributes asked for in every search.
    attributes: Vec<String>,
    timeout: Duration,
    idle: Mutex<Vec<Ldap>>,
    /// Moving average of a student bind (µs), waited out when a search finds nobody, so the answer's
    /// timing does not tell whether a user ID exists.
    bind_micros: AtomicU64,
}

impl fmt::Debug for LdapDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LdapDirectory")
            .field("url", &self.url)
            .field("starttls", &self.starttls)
            .field("service", &self.service.as_ref().map(|(dn, _)| dn))
            .field("locator", &self.locator)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl LdapDirectory {
    /// Checks the configuration; connects only when first used, so nidan starts while the directory
    /// is down (and `/readyz` says so).
    pub fn new(config: &DirectoryConfig) -> anyhow::Result<Self> {
        let url = url::Url::parse(&config.url)
            .with_context(|| format!("directory.url {:?} is not a URL", config.url))?;
        match url.scheme() {
            "ldap" | "ldapi" => {}
            "ldaps" => ensure!(
                !config.starttls,
                "directory.starttls cannot be used with ldaps://"
            ),
            other => bail!("directory.url must be ldap://, ldaps:// or ldapi://, not {other}://"),
        }
        let tls = tls_config(&config.tls_ca_file)?;
        ensure!(
            !config.timeout.is_zero(),
            "directory.timeout must be more than zero"
        );
        ensure!(
            !config.id_attribute.trim().is_empty(),
            "directory.id_attribute is required"
        );
        let service = if config.bind_dn.trim().is_empty() {
            None
        } else {
            // An empty simple-bind password is an unauthenticated bind that many servers accept.
            ensure!(
                !config.bind_password.expose().is_empty(),
                "directory.bind_password_file is required with directory.bind_dn"
            );
            Some((
                config.bind_dn.trim().to_string(),
                config.bind_password.clone(),
            ))
        };
        let filter = if config.user_filter.trim().is_empty() {
            String::new()
        } else {
            let filter = config.user_filter.trim();
            ensure!(
                filter.contains("{username}"),
                "directory.user_filter must contain {{username}}"
            );
            let filter = if filter.starts_with('(') {
                filter.to_string()
            } else {
                format!("({filter})")
            };
            let filter = format!("(&(objectClass=*){filter})");
            ldap3::parse_filter(filter.replace("{username}", "x")).map_err(|_| {
                anyhow::anyhow!(
                    "directory.user_filter {:?} is not an LDAP filter",
                    config.user_filter
                )
            })?;
            filter
        };
        let base_dn = config.base_dn.trim().to_string();
        let locator = if config.dn_template.trim().is_empty() {
            ensure!(
                !base_dn.is_empty(),
                "directory.base_dn is required (or directory.dn_template)"
            );
            ensure!(
                !filter.is_empty(),
                "directory.user_filter is required (or directory.dn_template)"
            );
            Locator::Search { base_dn, filter }
        } else {
            let template = config.dn_template.trim().to_string();
            ensure!(
                template.contains("{username}"),
                "directory.dn_template must contain {{username}}"
            );
            let is_dn = template.contains('=');
            ensure!(
                is_dn || (!base_dn.is_empty() && !filter.is_empty()),
                "a directory.dn_template that is not a DN (an Active Directory logon name) needs base_dn and user_filter"
            );
            Locator::Template {
                template,
                is_dn,
                base_dn,
                filter,
            }
        };
        let claims = config
            .claims
            .iter()
            .filter(|(claim, attribute)| !claim.trim().is_empty() && !attribute.trim().is_empty())
            .map(|(claim, attribute)| ClaimMapping {
                claim: claim.clone(),
                attribute: AttributeDescription::parse(attribute),
                single: SINGLE_VALUED.contains(&claim.split('#').next().unwrap_or_default()),
            })
            .collect::<Vec<_>>();
        let mut attributes: Vec<String> = vec![
            config.id_attribute.trim().to_string(),
            USER_ACCOUNT_CONTROL.into(),
        ];
        for attribute in config.claims.values() {
            let attribute = attribute.trim();
            if !attribute.is_empty()
                && !attributes.iter().any(|a| a.eq_ignore_ascii_case(attribute))
            {
                attributes.push(attribute.to_string());
            }
        }
        Ok(Self {
            url: config.url.clone(),
            starttls: config.starttls,
            tls,
            service,
            locator,
            id_attribute: AttributeDescription::parse(&config.id_attribute),
            claims,
            attributes,
            timeout: config.timeout,
            idle: Mutex::new(Vec::new()),
            bind_micros: AtomicU64::new(0),
        })
    }

    /// Runs `work` within the configured timeout.
    async fn within_timeout<T>(
        &self,
        work: impl Future<Output = Result<T, DirectoryError>>,
    ) -> Result<T, DirectoryError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(DirectoryError::Unavailable(format!(
                "no answer from {} within {:?}",
                self.url, self.timeout
            ))),
        }
    }

    async fn connect(&self) -> Result<Ldap, DirectoryError> {
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(self.timeout)
            .set_starttls(self.starttls);
        if let Some(tls) = &self.tls {
            settings = settings.set_config(tls.clone());
        }
        let (conn, ldap) = LdapConnAsync::with_settings(settings, &self.url)
            .await
            .map_err(|e| unavailable("cannot connect", e))?;
        // The connection ends when every handle to it is dropped.
        ldap3::drive!(conn);
        Ok(ldap)
    }

    /// A connection bound as the service account: an idle one when there is one (`true`), else new.
    async fn service_connection(&self) -> Result<(Ldap, bool), DirectoryError> {
        while let Some(mut ldap) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            if !ldap.is_closed() {
                return Ok((ldap, true));
            }
        }
        let mut ldap = self.connect().await?;
        if let Some((dn, password)) = &self.service {
            let result = ldap
                .simple_bind(dn, password.expose())
                .await
                .map_err(|e| unavailable("service account bind", e))?;
            if result.rc != 0 {
                return Err(DirectoryError::Unavailable(format!(
                    "the service account's bind was refused (result {}: {})",
                    result.rc, result.text
                )));
            }
        }
        Ok((ldap, false))
    }

    fn give_back(&self, mut ldap: Ldap) {
        if ldap.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(ldap);
        }
    }

    /// Searches as the service account; a stale idle connection is replaced once.
    async fn service_search(
        &self,
        base: &str,
        scope: Scope,
        filter: &str,
        attributes: &[String],
    ) -> Result<Found, DirectoryError> {
        self.service_search_answer(base, scope, filter, attributes)
            .await?
            .map_err(SearchError::into_directory_error)
    }

    /// A search as the service account: the outer error when no connection could be had, the
    /// inner one when the server refused the search.
    async fn service_search_answer(
        &self,
        base: &str,
        scope: Scope,
        filter: &str,
        attributes: &[String],
    ) -> Result<Result<Found, SearchError>, DirectoryError> {
        loop {
            let (mut ldap, reused) = self.service_connection().await?;
            match search(&mut ldap, base, scope, filter, attributes).await {
                // The server may have closed an idle connection; the next try connects afresh.
                Err(SearchError::Transport(_)) if reused => continue,
                Err(SearchError::Transport(e)) => return Ok(Err(SearchError::Transport(e))),
                answer => {
                    self.give_back(ldap);
                    return Ok(answer);
                }
            }
        }
    }

    /// Finds the student's entry as the service account.
    async fn find(&self, username: &str) -> Result<Found, DirectoryError> {
        match &self.locator {
            Locator::Search { base_dn, filter }
            | Locator::Template {
                is_dn: false,
                base_dn,
                filter,
                ..
            } => {
                let filter = fill_filter(filter, username);
                self.service_search(base_dn, Scope::Subtree, &filter, &self.attributes)
                    .await
            }
            Locator::Template {
                template,
                is_dn: true,
                ..
            } => {
                let dn = fill_dn(template, username);
                self.service_search(&dn, Scope::Base, "(objectClass=*)", &self.attributes)
                    .await
            }
        }
    }

    /// Binds as `dn` with the student's password on a fresh connection.
    async fn bind_as_student(&self, dn: &str, password: &str) -> Result<Ldap, DirectoryError> {
        // Never send an empty password (an unauthenticated bind) or an empty name (anonymous).
        if password.is_empty() || dn.is_empty() {
            return Err(DirectoryError::InvalidCredentials);
        }
        let mut ldap = self.connect().await?;
        let result = ldap
            .simple_bind(dn, password)
            .await
            .map_err(|e| unavailable("bind", e))?;
        bind_outcome(result.rc, &result.text)?;
        Ok(ldap)
    }

    async fn authenticate_by_search(
        &self,
        username: &str,
        password: &str,
    ) -> Result<DirectoryUser, DirectoryError> {
        let entry = match self.find(username).await? {
            Found::One(entry) => entry,
            found => {
                if matches!(found, Found::Many) {
                    tracing::warn!(
                        "directory.user_filter matched more than one entry; refusing the login"
                    );
                }
                // Take about as long as a bind would have, then give the same answer.
                let micros = self.bind_micros.load(Ordering::Relaxed);
                let wait = Duration::from_micros(micros).min(self.timeout / 2);
                tokio::time::sleep(wait).await;
                return Err(DirectoryError::InvalidCredentials);
            }
        };
        let started = Instant::now();
        let outcome = self.bind_as_student(&entry.dn, password).await;
        self.record_bind_time(started.elapsed());
        let mut ldap = outcome?;
        // Closing is best effort; dropping the handle ends the connection anyway.
        let _ = ldap.unbind().await;
        self.to_user(username, &entry)
    }

    async fn authenticate_by_template(
        &self,
        username: &str,
        password: &str,
        template: &str,
        is_dn: bool,
    ) -> Result<DirectoryUser, DirectoryError> {
        let name = if is_dn {
            fill_dn(template, username)
        } else {
            match fill_logon_name(template, username) {
                Some(name) => name,
                None => return Err(DirectoryError::InvalidCredentials),
            }
        };
        let mut ldap = self.bind_as_student(&name, password).await?;
        // Read the entry as the student just bound.
        let found = match &self.locator {
            Locator::Template {
                is_dn: false,
                base_dn,
                filter,
                ..
            } => {
                search(
                    &mut ldap,
                    base_dn,
                    Scope::Subtree,
                    &fill_filter(filter, username),
                    &self.attributes,
                )
                .await
            }
            _ => {
                search(
                    &mut ldap,
                    &name,
                    Scope::Base,
                    "(objectClass=*)",
                    &self.attributes,
                )
                .await
            }
        }
        .map_err(SearchError::into_directory_error)?;
        let _ = ldap.unbind().await;
        match found {
            Found::One(entry) => self.to_user(username, &entry),
            Found::None | Found::Many => Err(DirectoryError::Unavailable(format!(
                "{username} could bind but cannot read exactly one entry of its own"
            ))),
        }
    }

    fn record_bind_time(&self, elapsed: Duration) {
        let sample = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let old = self.bind_micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.bind_micros.store(new, Ordering::Relaxed);
    }

    fn to_user(
        &self,
        username: &str,
        entry: &SearchEntry,
    ) -> Result<DirectoryUser, DirectoryError> {
        let id = entry_id(entry, &self.id_attribute).ok_or_else(|| {
            DirectoryError::Unavailable(format!(
                "the entry of {username} has no usable {} (directory.id_attribute)",
                self.id_attribute.name
            ))
        })?;
        Ok(DirectoryUser {
            id,
            username: username.to_string(),
            claims: map_claims(entry, &self.claims),
        })
    }
}

#[async_trait]
impl UserDirectory for LdapDirectory {
    async fn authenticate(
        &self,
        username: &str,
        password: &str,
    ) -> Result<DirectoryUser, DirectoryError> {
        if username.is_empty() || password.is_empty() {
            return Err(DirectoryError::InvalidCredentials);
        }
        self.within_timeout(async {
            match &self.locator {
                Locator::Search { .. } => self.authenticate_by_search(username, password).await,
                Locator::Template {
                    template, is_dn, ..
                } => {
                    self.authenticate_by_template(username, password, template, *is_dn)
                        .await
                }
            }
        })
        .await
    }

    async fn lookup(&self, username: &str) -> Result<Option<DirectoryUser>, DirectoryError> {
        if username.is_empty() {
            return Ok(None);
        }
        if let Locator::Template {
            template,
            is_dn: false,
            ..
        } = &self.locator
        {
            if fill_logon_name(template, username).is_none() {
                return Ok(None);
            }
        }
        self.within_timeout(async {
            match self.find(username).await? {
                Found::One(entry) if !ad_disabled(&entry) => {
                    self.to_user(username, &entry).map(Some)
                }
                // Without a service account a DN template reads anonymously, and an entry hidden
                // from anonymous reads is not a student who is gone: never revoke on that.
                Found::None
                    if self.service.is_none()
                        && matches!(self.locator, Locator::Template { .. }) =>
                {
                    Err(DirectoryError::Unavailable(
                        "looking students up needs a service account (directory.bind_dn)".into(),
                    ))
                }
                _ => Ok(None),
            }
        })
        .await
    }

    async fn check(&self) -> Result<(), DirectoryError> {
        // Reading the root DSE is cheap and needs no rights; a new connection also proves the bind.
        let attributes = ["supportedLDAPVersion".to_string()];
        self.within_timeout(async {
            match self
                .service_search_answer("", Scope::Base, "(objectClass=*)", &attributes)
                .await?
            {
                // insufficientAccessRights: the server answered the bound service account; some
                // directories just do not let it read the root DSE.
                Ok(_) | Err(SearchError::Refused(50, _)) => Ok(()),
                Err(e) => Err(e.into_directory_error()),
            }
        })
        .await
    }
}

enum SearchError {
    /// The connection failed (closed, reset, timed out).
    Transport(LdapError),
    /// The server answered with an error result.
    Refused(u32, String),
}

impl SearchError {
    fn into_directory_error(self) -> DirectoryError {
        match self {
            SearchError::Transport(e) => unavailable("search", e),
            SearchError::Refused(rc, text) => {
                DirectoryError::Unavailable(format!("search answered {rc}: {text}"))
            }
        }
    }
}

async fn search(
    ldap: &mut Ldap,
    base: &str,
    scope: Scope,
    filter: &str,
    attributes: &[String],
) -> Result<Found, SearchError> {
    // Two entries are enough to know the answer is ambiguous.
    let result = ldap
        .with_search_options(SearchOptions::new().sizelimit(2))
        .search(base, scope, filter, attributes)
        .await
        .map_err(SearchError::Transport)?;
    let mut entries = result
        .0
        .into_iter()
        .filter(|e| !e.is_ref() && !e.is_intermediate())
        .map(SearchEntry::construct);
    match result.1.rc {
        // sizeLimitExceeded: more than one entry matched.
        4 => Ok(Found::Many),
        0 => match (entries.next(), entries.next()) {
            (None, _) => Ok(Found::None),
            (Some(entry), None) => Ok(Found::One(Box::new(entry))),
            (Some(_), Some(_)) => Ok(Found::Many),
        },
        // noSuchObject: a template DN that does not exist, or a base DN that does not.
        32 => {
            if scope != Scope::Base {
                tracing::warn!(base, "the directory says the search base does not exist");
            }
            Ok(Found::None)
        }
        // referral: the entry is in another directory, which nidan does not follow.
        10 => Ok(Found::None),
        rc => Err(SearchError::Refused(rc, result.1.text)),
    }
}

/// The TLS settings for `tls_ca_file`: the system's roots plus the certificates in that PEM file.
fn tls_config(ca_file: &str) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    if ca_file.is_empty() {
        return Ok(None);
    }
    let pem = std::fs::read(ca_file)
        .with_context(|| format!("cannot read directory.tls_ca_file {ca_file}"))?;
    let extra = rustls_pemfile::certs(&mut pem.as_slice())
        .with_context(|| format!("directory.tls_ca_file {ca_file} is not PEM"))?;
    ensure!(
        !extra.is_empty(),
        "directory.tls_ca_file {ca_file} holds no certificate"
    );
    let mut roots = rustls::RootCertStore::empty();
    // As ldap3 does without a CA file: system roots that cannot be read or parsed are skipped.
    for cert in rustls_native_certs::load_native_certs().unwrap_or_default() {
        let _ = roots.add(&rustls::Certificate(cert.0));
    }
    for der in extra {
        roots.add(&rustls::Certificate(der)).with_context(|| {
            format!("a certificate in directory.tls_ca_file {ca_file} is not usable")
        })?;
    }
    let config = rustls::ClientConfig::builder()
        .with_safe_defaults()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// What a student's bind result means.
fn bind_outcome(rc: u32, text: &str) -> Result<(), DirectoryError> {
    match rc {
        0 => Ok(()),
        49 => Err(match ad_bind_data(text).as_deref() {
            Some("532" | "773") => DirectoryError::PasswordExpired,
            Some("533" | "775" | "701") => DirectoryError::Disabled,
            _ => DirectoryError::InvalidCredentials,
        }),
        // timeLimitExceeded, adminLimitExceeded, busy, unavailable, other: the directory's trouble.
        3 | 11 | 51 | 52 | 80 => Err(DirectoryError::Unavailable(format!(
            "bind answered {rc}: {text}"
        ))),
        // Anything else (invalid DN syntax, unwilling to perform, …) is a failed login.
        _ => Err(DirectoryError::InvalidCredentials),
    }
}

/// The code in Active Directory's "AcceptSecurityContext error, data 532, v4563" diagnostic.
fn ad_bind_data(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    lower.match_indices("data ").find_map(|(at, _)| {
        let code: String = lower[at + 5..]
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        (!code.is_empty()).then_some(code)
    })
}

fn unavailable(what: &str, e: LdapError) -> DirectoryError {
    DirectoryError::Unavailable(format!("{what}: {e}"))
}

/// `user_filter` with the user ID RFC 4515-escaped into it.
fn fill_filter(filter: &str, username: &str) -> String {
    filter.replace("{username}", &ldap_escape(username))
}

/// `dn_template` with the user ID RFC 4514-escaped into it.
fn fill_dn(template: &str, username: &str) -> String {
    template.replace("{username}", &dn_escape(username))
}

/// An Active Directory logon name from the template, or `None` for a user ID that could make it
/// name someone else (a logon name has no escaping).
fn fill_logon_name(template: &str, username: &str) -> Option<String> {
    let unsafe_char =
        |c: char| c.is_control() || c.is_whitespace() || "\\/@,;:+=\"<>#*()[]|?".contains(c);
    (!username.chars().any(unsafe_char)).then(|| template.replace("{username}", username))
}

/// The values of the attribute described by `wanted`, text and binary.
fn values<'a>(
    entry: &'a SearchEntry,
    wanted: &AttributeDescription,
) -> (Vec<&'a str>, Vec<&'a [u8]>) {
    let text = entry
        .attrs
        .iter()
        .filter(|(name, _)| AttributeDescription::parse(name) == *wanted)
        .flat_map(|(_, values)| values.iter().map(String::as_str))
        .collect();
    let binary = entry
        .bin_attrs
        .iter()
        .filter(|(name, _)| AttributeDescription::parse(name) == *wanted)
        .flat_map(|(_, values)| values.iter().map(Vec::as_slice))
        .collect();
    (text, binary)
}

fn entry_id(entry: &SearchEntry, id_attribute: &AttributeDescription) -> Option<String> {
    let (text, binary) = values(entry, id_attribute);
    if id_attribute.name == "objectguid" {
        let bytes = binary
            .first()
            .copied()
            .or_else(|| text.first().map(|t| t.as_bytes()))?;
        return format_guid(bytes);
    }
    if let Some(text) = text.first().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        return Some(text.to_string());
    }
    binary.first().filter(|b| !b.is_empty()).map(hex::encode)
}

/// Active Directory's objectGUID (16 bytes, the first three fields little-endian) as a GUID string.
fn format_guid(bytes: &[u8]) -> Option<String> {
    let b: &[u8; 16] = bytes.try_into().ok()?;
    Some(format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}-{}",
        b[3],
        b[2],
        b[1],
        b[0],
        b[5],
        b[4],
        b[7],
        b[6],
        hex::encode(&b[8..10]),
        hex::encode(&b[10..16])
    ))
}

fn map_claims(entry: &SearchEntry, mappings: &[ClaimMapping]) -> Map<String, Value> {
    let mut claims = Map::new();
    for mapping in mappings {
        let (text, _) = values(entry, &mapping.attribute);
        let value = match text.as_slice() {
            [] => continue,
            [first, ..] if mapping.single => Value::String((*first).to_string()),
            [only] => Value::String((*only).to_string()),
            many => Value::Array(
                many.iter()
                    .map(|v| Value::String((*v).to_string()))
                    .collect(),
            ),
        };
        claims.insert(mapping.claim.clone(), value);
    }
    claims
}

/// Whether Active Directory marks the account disabled (userAccountControl bit 0x2).
fn ad_disabled(entry: &SearchEntry) -> bool {
    let (text, _) = values(entry, &AttributeDescription::parse(USER_ACCOUNT_CONTROL));
    text.first()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|flags| flags & i64::from(AD_ACCOUNT_DISABLE) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn entry(attrs: &[(&str, &[&str])], bin: &[(&str, Vec<u8>)]) -> SearchEntry {
        SearchEntry {
            dn: "uid=x,dc=example".into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
            bin_attrs: bin
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.clone()]))
                .collect::<HashMap<_, _>>(),
        }
    }

    fn mapping(claim: &str, attribute: &str) -> ClaimMapping {
        ClaimMapping {
            claim: claim.into(),
            attribute: AttributeDescription::parse(attribute),
            single: SINGLE_VALUED.contains(&claim.split('#').next().unwrap()),
        }
    }

    #[test]
    fn options_match_exactly_in_any_order_and_case() {
        let e = entry(
            &[
                ("sn", &["Gakusei"]),
                ("sn;lang-ja", &["学生"]),
                ("sn;phonetic;lang-ja", &["ガクセイ"]),
            ],
            &[],
        );
        let claims = map_claims(
            &e,
            &[
                mapping("family_name", "SN"),
                mapping("family_name#ja", "sn;lang-ja"),
                mapping("family_name#ja-Kana-JP", "sn;lang-ja;phonetic"),
            ],
        );
        assert_eq!(claims["family_name"], "Gakusei");
        assert_eq!(claims["family_name#ja"], "学生");
        assert_eq!(claims["family_name#ja-Kana-JP"], "ガクセイ");
    }

    #[test]
    fn multiple_values_are_first_for_names_and_arrays_otherwise() {
        let e = entry(
            &[
                ("cn", &["A", "B"]),
                ("eduPersonAffiliation", &["student", "member"]),
                ("ou", &["x"]),
            ],
            &[],
        );
        let claims = map_claims(
            &e,
            &[
                mapping("name", "cn"),
                mapping("affiliation", "eduPersonAffiliation"),
                mapping("dept", "ou"),
            ],
        );
        assert_eq!(claims["name"], "A");
        assert_eq!(
            claims["affiliation"],
            serde_json::json!(["student", "member"])
        );
        assert_eq!(claims["dept"], "x");
    }

    #[test]
    fn object_guid_is_the_windows_guid_string() {
        let guid = vec![
            0xe0, 0x04, 0x25, 0x3f, 0x89, 0x4f, 0xd3, 0x11, 0x9a, 0x0c, 0x03, 0x05, 0xe8, 0x2c,
            0x33, 0x01,
        ];
        let e = entry(&[], &[("objectGUID", guid)]);
        assert_eq!(
            entry_id(&e, &AttributeDescription::parse("objectGUID")).as_deref(),
            Some("3f2504e0-4f89-11d3-9a0c-0305e82c3301")
        );
        let e = entry(
            &[("entryUUID", &["6a1d2c3e-1111-2222-3333-444455556666"])],
            &[],
        );
        assert_eq!(
            entry_id(&e, &AttributeDescription::parse("entryUUID")).as_deref(),
            Some("6a1d2c3e-1111-2222-3333-444455556666")
        );
    }

    #[test]
    fn active_directory_bind_answers() {
        let text = |code: &str| {
            format!("80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data {code}, v4563")
        };
        assert!(matches!(
            bind_outcome(49, &text("532")),
            Err(DirectoryError::PasswordExpired)
        ));
        assert!(matches!(
            bind_outcome(49, &text("773")),
            Err(DirectoryError::PasswordExpired)
        ));
        assert!(matches!(
            bind_outcome(49, &text("533")),
            Err(DirectoryError::Disabled)
        ));
        assert!(matches!(
            bind_outcome(49, &text("775")),
            Err(DirectoryError::Disabled)
        ));
        assert!(matches!(
            bind_outcome(49, &text("52e")),
            Err(DirectoryError::InvalidCredentials)
        ));
        assert!(matches!(
            bind_outcome(49, &text("5320")),
            Err(DirectoryError::InvalidCredentials)
        ));
        assert!(matches!(
            bind_outcome(49, ""),
            Err(DirectoryError::InvalidCredentials)
        ));
        assert!(matches!(
            bind_outcome(51, "busy"),
            Err(DirectoryError::Unavailable(_))
        ));
        assert!(matches!(
            bind_outcome(34, "invalid DN"),
            Err(DirectoryError::InvalidCredentials)
        ));
        assert!(bind_outcome(0, "").is_ok());
    }

    #[test]
    fn user_ids_are_escaped() {
        assert_eq!(
            fill_filter("(uid={username})", "*)(uid=*"),
            "(uid=\\2a\\29\\28uid=\\2a)"
        );
        assert_eq!(fill_filter("(uid={username})", "a\0b"), "(uid=a\\00b)");
        assert_eq!(
            fill_dn("uid={username},ou=people", "a,ou=x+cn=y"),
            "uid=a\\2cou\\3dx\\2bcn\\3dy,ou=people"
        );
        assert_eq!(
            fill_logon_name("{username}@ad.example", "s2401001").as_deref(),
            Some("s2401001@ad.example")
        );
        assert_eq!(fill_logon_name("{username}@ad.example", "a@evil"), None);
    }

    #[test]
    fn disabled_active_directory_accounts() {
        assert!(ad_disabled(&entry(
            &[("userAccountControl", &["514"])],
            &[]
        )));
        assert!(!ad_disabled(&entry(
            &[("userAccountControl", &["512"])],
            &[]
        )));
        assert!(!ad_disabled(&entry(&[], &[])));
    }
}
