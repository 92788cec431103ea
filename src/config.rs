//! Configuration: TOML file → `NIDAN_*` environment overrides → `*_file` secrets → validation.
//! Every problem is explained in one line, so `nidan check-config` can list them all at once.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use url::Url;

pub const ACR_PASSWORD: &str = "urn:nidan:acr:password";
pub const ACR_SECOND_PASSWORD: &str = "urn:nidan:acr:second-password";
pub const SCOPES: &[&str] = &["openid", "profile", "email", "student", "offline_access"];
pub const GRANT_TYPES: &[&str] = &["authorization_code", "refresh_token", "client_credentials"];
pub const AUTH_METHODS: &[&str] = &[
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "none",
];
pub const SIGNING_ALGS: &[&str] = &["RS256", "ES256", "EdDSA"];

/// A secret read from configuration or a `*_file`; never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub issuer: String,
    pub listen: String,
    pub database_url: String,
    pub university_name: String,
    pub default_locale: String,
    pub trusted_proxies: Vec<IpNet>,
    pub key_encryption_key_file: PathBuf,
    #[serde(skip)]
    pub key_encryption_key: Option<Secret>,
    pub enrollment: String,
    pub password_change_url: String,
    pub metrics_listen: String,
    /// CIDRs allowed to read `/metrics` (empty = anyone who can reach it).
    pub metrics_allow: Vec<IpNet>,
    /// A bearer token `/metrics` requires, read from this file (empty = none).
    pub metrics_token_file: Option<PathBuf>,
    #[serde(skip)]
    pub metrics_token: Option<Secret>,
    pub log_format: String,
    pub accent_color: String,
    pub logo_url: String,
    #[serde(deserialize_with = "de_duration")]
    pub audit_retention: Duration,
    pub manual_url: String,
    pub support_contact: String,
    pub session: SessionConfig,
    pub lifetimes: Lifetimes,
    pub throttle: ThrottleConfig,
    pub directory: DirectoryConfig,
    pub mail: MailConfig,
    pub clients: Vec<ClientSettings>,
    /// The development instance `nidan serve` runs without a configuration file.
    #[serde(skip)]
    pub embedded: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            listen: "127.0.0.1:8080".into(),
            database_url: "sqlite://nidan-data/nidan.db".into(),
            university_name: "The University".into(),
            default_locale: "ja".into(),
            trusted_proxies: vec![],
            key_encryption_key_file: PathBuf::from("keys/kek"),
            key_encryption_key: None,
            enrollment: "always".into(),
            password_change_url: String::new(),
            metrics_listen: String::new(),
            metrics_allow: vec![],
            metrics_token_file: None,
            metrics_token: None,
            log_format: "text".into(),
            accent_color: "#1f4e8c".into(),
            logo_url: String::new(),
            audit_retention: days(400),
            manual_url: "/manual".into(),
            support_contact: "学生支援課 06-0000-0000 (平日 9:00-17:00)".into(),
            session: SessionConfig::default(),
            lifetimes: Lifetimes::default(),
            throttle: ThrottleConfig::default(),
            directory: DirectoryConfig::default(),
            mail: MailConfig::default(),
            clients: vec![],
            embedded: false,
        }
    }
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}
fn minutes(n: u64) -> Duration {
    Duration::from_secs(n * 60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SessionConfig {
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub absolute_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub step_up_lifetime: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub menu_reauth: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout: minutes(15),
            absolute_timeout: minutes(8 * 60),
            step_up_lifetime: minutes(8 * 60),
            menu_reauth: minutes(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Lifetimes {
    #[serde(deserialize_with = "de_duration")]
    pub authorization_code: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub access_token: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub id_token: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub refresh_token: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub refresh_grace: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub one_time_link: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            authorization_code: Duration::from_secs(60),
            access_token: minutes(10),
            id_token: minutes(10),
            refresh_token: days(30),
            refresh_grace: Duration::ZERO,
            one_time_link: minutes(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ThrottleConfig {
    pub password_failures: u32,
    pub second_password_failures: u32,
    #[serde(deserialize_with = "de_duration")]
    pub window: Duration,
    pub address_failures: u32,
    pub address_allowlist: Vec<IpNet>,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            password_failures: 10,
            second_password_failures: 10,
            window: minutes(15),
            address_failures: 100,
            address_allowlist: vec![],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DirectoryConfig {
    pub kind: String,
    pub url: String,
    pub starttls: bool,
    pub bind_dn: String,
    pub bind_password_file: Option<PathBuf>,
    #[serde(skip)]
    pub bind_password: Secret,
    pub base_dn: String,
    pub user_filter: String,
    pub dn_template: String,
    pub id_attribute: String,
    pub tls_ca_file: String,
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    pub claims: BTreeMap<String, String>,
    pub path: Option<PathBuf>,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            kind: String::new(),
            url: String::new(),
            starttls: false,
            bind_dn: String::new(),
            bind_password_file: None,
            bind_password: Secret::default(),
            base_dn: String::new(),
            user_filter: "(uid={username})".into(),
            dn_template: String::new(),
            id_attribute: "entryUUID".into(),
            tls_ca_file: String::new(),
            timeout: Duration::from_secs(5),
            claims: BTreeMap::new(),
            path: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MailConfig {
    pub transport: String,
    pub from: String,
    pub host: String,
    pub port: u16,
    pub tls: String,
    pub allow_domains: Vec<String>,
    pub deny_domains: Vec<String>,
    pub username: String,
    pub password_file: Option<PathBuf>,
    #[serde(skip)]
    pub password: Secret,
    pub path: PathBuf,
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            transport: String::new(),
            from: String::new(),
            host: "127.0.0.1".into(),
            port: 25,
            tls: "none".into(),
            allow_domains: vec![],
            deny_domains: vec![],
            username: String::new(),
            password_file: None,
            password: Secret::default(),
            path: PathBuf::from("nidan-data/mail"),
        }
    }
}

/// A relying party's registration, from `[[clients]]` or `nidan client add`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ClientSettings {
    pub client_id: String,
    pub client_name: String,
    #[serde(skip_serializing)]
    pub client_secret_file: Option<PathBuf>,
    /// Keyed SHA-256 digest of the secret, as `nidan client add` prints it.
    pub client_secret_hash: Option<String>,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    pub token_endpoint_auth_method: String,
    pub grant_types: Vec<String>,
    pub scopes: Vec<String>,
    pub min_acr: String,
    pub backchannel_logout_uri: Option<String>,
    pub backchannel_logout_session_required: bool,
    pub id_token_signed_response_alg: String,
    pub jwks_uri: Option<String>,
    pub jwks: Option<serde_json::Value>,
    pub sso: bool,
    pub offline_access_allowed: Option<bool>,
    pub subject_type: String,
    pub sector_identifier: String,
    /// Secret read from `client_secret_file` at load time; only its digest is kept after that.
    #[serde(skip)]
    pub client_secret: Option<Secret>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            client_id: String::new(),
            client_name: String::new(),
            client_secret_file: None,
            client_secret_hash: None,
            redirect_uris: vec![],
            post_logout_redirect_uris: vec![],
            token_endpoint_auth_method: String::new(),
            grant_types: vec!["authorization_code".into()],
            scopes: vec!["openid".into()],
            min_acr: ACR_PASSWORD.into(),
            backchannel_logout_uri: None,
            backchannel_logout_session_required: true,
            id_token_signed_response_alg: "RS256".into(),
            jwks_uri: None,
            jwks: None,
            sso: true,
            offline_access_allowed: None,
            subject_type: "public".into(),
            sector_identifier: String::new(),
            client_secret: None,
        }
    }
}

impl ClientSettings {
    pub fn is_public(&self) -> bool {
        self.token_endpoint_auth_method == "none"
    }
    /// Clients that demand the second password get no offline access unless configured.
    pub fn may_use_offline_access(&self) -> bool {
        self.scopes.iter().any(|s| s == "offline_access")
            && self
                .offline_access_allowed
                .unwrap_or(self.min_acr != ACR_SECOND_PASSWORD)
    }
    pub fn allows_grant(&self, grant: &str) -> bool {
        self.grant_types.iter().any(|g| g == grant)
    }

    /// Fills in defaults that depend on other fields and reports every problem with the client.
    pub fn normalize(&mut self, problems: &mut Vec<String>, issuer_is_loopback: bool) {
        let who = format!("client {:?}", self.client_id);
        if self.client_id.is_empty() {
            problems.push("a [[clients]] entry has no client_id".into());
        }
        if self.token_endpoint_auth_method.is_empty() {
            self.token_endpoint_auth_method = if self.client_secret_file.is_some()
                || self.client_secret_hash.is_some()
                || self.client_secret.is_some()
            {
                "client_secret_basic".into()
            } else if self.jwks.is_some() || self.jwks_uri.is_some() {
                "private_key_jwt".into()
            } else {
                "none".into()
            };
        }
        let method = self.token_endpoint_auth_method.as_str();
        if !AUTH_METHODS.contains(&method) {
            problems.push(format!(
                "{who}: token_endpoint_auth_method {method:?} is not one of {AUTH_METHODS:?}"
            ));
        }
        let has_secret = self.client_secret.is_some() || self.client_secret_hash.is_some();
        if method.starts_with("client_secret") && !has_secret {
            problems.push(format!(
                "{who}: {method} needs client_secret_file or client_secret_hash"
            ));
        }
        if method == "none" && has_secret {
            problems.push(format!(
                "{who}: a public client (token_endpoint_auth_method = \"none\") must not have a secret"
            ));
        }
        if method == "private_key_jwt" && self.jwks.is_none() && self.jwks_uri.is_none() {
            problems.push(format!("{who}: private_key_jwt needs jwks or jwks_uri"));
        }
        if let Some(jwks) = &self.jwks {
            if !jwks.get("keys").is_some_and(|k| k.is_array()) {
                problems.push(format!(
                    "{who}: jwks must be a JSON Web Key Set with a keys array"
                ));
            }
        }
        for grant in &self.grant_types {
            if !GRANT_TYPES.contains(&grant.as_str()) {
                problems.push(format!(
                    "{who}: grant type {grant:?} is not one of {GRANT_TYPES:?}"
                ));
            }
        }
        if method == "none" && self.allows_grant("client_credentials") {
            problems.push(format!(
                "{who}: a public client cannot use client_credentials"
            ));
        }
        for scope in &self.scopes {
            if !SCOPES.contains(&scope.as_str()) {
                problems.push(format!("{who}: scope {scope:?} is not one of {SCOPES:?}"));
            }
        }
        if self.min_acr.is_empty() {
            self.min_acr = ACR_PASSWORD.into();
        }
        if self.min_acr != ACR_PASSWORD && self.min_acr != ACR_SECOND_PASSWORD {
            problems.push(format!(
                "{who}: min_acr {:?} is neither {ACR_PASSWORD} nor {ACR_SECOND_PASSWORD}",
                self.min_acr
            ));
        }
        if !SIGNING_ALGS.contains(&self.id_token_signed_response_alg.as_str()) {
            problems.push(format!(
                "{who}: id_token_signed_response_alg {:?} is not one of {SIGNING_ALGS:?}",
                self.id_token_signed_response_alg
            ));
        }
        if self.subject_type != "public" && self.subject_type != "pairwise" {
            problems.push(format!(
                "{who}: subject_type {:?} is neither \"public\" nor \"pairwise\"",
                self.subject_type
            ));
        }
        if self.allows_grant("authorization_code") && self.redirect_uris.is_empty() {
            problems.push(format!(
                "{who}: the authorization_code grant needs redirect_uris"
            ));
        }
        let uris = self
            .redirect_uris
            .iter()
            .chain(&self.post_logout_redirect_uris)
            .chain(self.backchannel_logout_uri.iter())
            .chain(self.jwks_uri.iter());
        for uri in uris {
            match Url::parse(uri) {
                Err(e) => problems.push(format!("{who}: {uri:?} is not an absolute URL ({e})")),
                Ok(url) if url.fragment().is_some() => {
                    problems.push(format!("{who}: {uri:?} must not contain a fragment"))
                }
                Ok(url)
                    if url.scheme() == "http" && !is_loopback_url(&url) && !issuer_is_loopback =>
                {
                    problems.push(format!("{who}: {uri:?} must use https"))
                }
                Ok(_) => {}
            }
        }
    }
}

/// Parses "90s", "15m", "8h", "30d", "1h30m", "500ms"; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("invalid duration {text:?} (use e.g. 60s, 15m, 8h, 30d)");
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number * 60),
            "h" => Duration::from_secs(number * 3600),
            "d" => Duration::from_secs(number * 86_400),
            _ => return Err(bad()),
        };
        total += unit;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Seconds(u64),
    }
    match Raw::deserialize(d)? {
        Raw::Text(text) => parse_duration(&text).map_err(serde::de::Error::custom),
        Raw::Seconds(secs) => Ok(Duration::from_secs(secs)),
    }
}

pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub fn is_loopback_url(url: &Url) -> bool {
    url.host_str().is_some_and(is_loopback_host)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Duration,
    Integer,
    Boolean,
    List,
}

use Kind::{Boolean, Duration as Dur, Integer, List, Text};

const TOP_KEYS: &[(&str, Kind)] = &[
    ("issuer", Text),
    ("listen", Text),
    ("database_url", Text),
    ("university_name", Text),
    ("default_locale", Text),
    ("trusted_proxies", List),
    ("key_encryption_key_file", Text),
    ("enrollment", Text),
    ("password_change_url", Text),
    ("metrics_listen", Text),
    ("metrics_allow", List),
    ("metrics_token_file", Text),
    ("log_format", Text),
    ("accent_color", Text),
    ("logo_url", Text),
    ("audit_retention", Dur),
    ("manual_url", Text),
    ("support_contact", Text),
];

const TABLE_KEYS: &[(&str, &[(&str, Kind)])] = &[
    (
        "session",
        &[
            ("idle_timeout", Dur),
            ("absolute_timeout", Dur),
            ("step_up_lifetime", Dur),
            ("menu_reauth", Dur),
        ],
    ),
    (
        "lifetimes",
        &[
            ("authorization_code", Dur),
            ("access_token", Dur),
            ("id_token", Dur),
            ("refresh_token", Dur),
            ("refresh_grace", Dur),
            ("one_time_link", Dur),
        ],
    ),
    (
        "throttle",
        &[
            ("password_failures", Integer),
            ("second_password_failures", Integer),
            ("window", Dur),
            ("address_failures", Integer),
            ("address_allowlist", List),
        ],
    ),
    (
        "directory",
        &[
            ("kind", Text),
            ("url", Text),
            ("starttls", Boolean),
            ("bind_dn", Text),
            ("bind_password_file", Text),
            ("base_dn", Text),
            ("user_filter", Text),
            ("dn_template", Text),
            ("id_attribute", Text),
            ("tls_ca_file", Text),
            ("timeout", Dur),
            ("path", Text),
        ],
    ),
    (
        "mail",
        &[
            ("transport", Text),
            ("from", Text),
            ("host", Text),
            ("port", Integer),
            ("tls", Text),
            ("allow_domains", List),
            ("deny_domains", List),
            ("username", Text),
            ("password_file", Text),
            ("path", Text),
        ],
    ),
];

const CLIENT_KEYS: &[&str] = &[
    "client_id",
    "client_name",
    "client_secret_file",
    "client_secret_hash",
    "redirect_uris",
    "post_logout_redirect_uris",
    "token_endpoint_auth_method",
    "grant_types",
    "scopes",
    "min_acr",
    "backchannel_logout_uri",
    "backchannel_logout_session_required",
    "id_token_signed_response_alg",
    "jwks_uri",
    "jwks",
    "sso",
    "offline_access_allowed",
    "subject_type",
    "sector_identifier",
];

/// Every problem found while loading, one line each.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.0 {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Loads the file (or the embedded default when `path` is `None`), applies `env`, reads secret
    /// files and validates.
    pub fn load(
        path: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigErrors> {
        let (text, embedded) = match path {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => (text, false),
                Err(e) => {
                    return Err(ConfigErrors(vec![format!(
                        "cannot read configuration file {}: {e}",
                        path.display()
                    )]))
                }
            },
            None => (String::new(), true),
        };
        Self::from_toml(&text, env, embedded)
    }

    pub fn from_toml(
        text: &str,
        env: &HashMap<String, String>,
        embedded: bool,
    ) -> Result<Config, ConfigErrors> {
        let mut problems = Vec::new();
        let mut table: toml::Table = match text.parse() {
            Ok(table) => table,
            Err(e) => return Err(ConfigErrors(vec![one_line_toml_error(&e, text)])),
        };
        let mut origins = file_lines(text);
        apply_env(&mut table, env, &mut problems, &mut origins);
        check_unknown_keys(&table, &mut problems);
        check_value_types(&mut table, &origins, &mut problems);
        let merged = toml::to_string(&table).unwrap_or_default();
        let mut config: Config = match toml::from_str(&merged) {
            Ok(config) => config,
            Err(e) => {
                problems.push(one_line_toml_error(&e, &merged));
                return Err(ConfigErrors(problems));
            }
        };
        config.embedded = embedded;
        if embedded {
            config.apply_embedded_defaults();
        }
        config.validate(&mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(problems))
        }
    }

    fn apply_embedded_defaults(&mut self) {
        if self.issuer.is_empty() {
            self.issuer = "http://localhost:8080".into();
        }
        if self.directory.kind.is_empty() {
            self.directory.kind = "demo".into();
        }
        if self.mail.transport.is_empty() {
            self.mail.transport = "file".into();
        }
        if self.mail.from.is_empty() {
            self.mail.from = "noreply@localhost".into();
        }
    }

    pub fn issuer_url(&self) -> Url {
        Url::parse(&self.issuer).expect("issuer validated at load")
    }

    pub fn issuer_is_loopback(&self) -> bool {
        Url::parse(&self.issuer).is_ok_and(|u| is_loopback_url(&u))
    }

    pub fn is_https(&self) -> bool {
        self.issuer.starts_with("https://")
    }

    /// `/dev/mail` and `/demo` exist only on a loopback issuer with mail going to files.
    pub fn development_pages(&self) -> bool {
        self.issuer_is_loopback() && self.mail.transport == "file"
    }

    fn validate(&mut self, problems: &mut Vec<String>) {
        self.issuer = self.issuer.trim_end_matches('/').to_string();
        match Url::parse(&self.issuer) {
            _ if self.issuer.is_empty() => problems.push("issuer is required".into()),
            Err(e) => problems.push(format!("issuer {:?} is not a URL: {e}", self.issuer)),
            Ok(url) => {
                if url.query().is_some() || url.fragment().is_some() {
                    problems.push("issuer must not have a query or fragment".into());
                }
                match url.scheme() {
                    "https" => {}
                    "http" if is_loopback_url(&url) => {}
                    "http" => problems.push(format!(
                        "issuer {:?} must use https (plain http is only for loopback addresses)",
                        self.issuer
                    )),
                    other => problems.push(format!("issuer scheme {other:?} is not https")),
                }
            }
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "listen {:?} is not an address:port such as 127.0.0.1:8080",
                self.listen
            ));
        }
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(format!(
                "metrics_listen {:?} is not an address:port",
                self.metrics_listen
            ));
        }
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            problems.push(format!(
                "database_url {:?} must start with sqlite:// or postgres://",
                self.database_url
            ));
        }
        if !matches!(self.default_locale.as_str(), "ja" | "en") {
            problems.push(format!(
                "default_locale {:?} is neither \"ja\" nor \"en\"",
                self.default_locale
            ));
        }
        if !matches!(self.enrollment.as_str(), "always" | "on-demand") {
            problems.push(format!(
                "enrollment {:?} is neither \"always\" nor \"on-demand\"",
                self.enrollment
            ));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            problems.push(format!(
                "log_format {:?} is neither \"text\" nor \"json\"",
                self.log_format
            ));
        }
        let color = self.accent_color.trim_start_matches('#');
        if !(self.accent_color.starts_with('#')
            && matches!(color.len(), 3 | 6)
            && color.chars().all(|c| c.is_ascii_hexdigit()))
        {
            problems.push(format!(
                "accent_color {:?} is not a colour like #1f4e8c",
                self.accent_color
            ));
        }
        for (name, value) in [
            ("password_change_url", &self.password_change_url),
            ("logo_url", &self.logo_url),
        ] {
            if !value.is_empty() && Url::parse(value).is_err() && !value.starts_with('/') {
                problems.push(format!("{name} {value:?} is not a URL"));
            }
        }
        if !self.manual_url.starts_with('/') && Url::parse(&self.manual_url).is_err() {
            problems.push(format!(
                "manual_url {:?} is not a URL or a path",
                self.manual_url
            ));
        }
        for (name, value) in [
            (
                "lifetimes.authorization_code",
                self.lifetimes.authorization_code,
            ),
            ("lifetimes.access_token", self.lifetimes.access_token),
            ("lifetimes.id_token", self.lifetimes.id_token),
            ("lifetimes.refresh_token", self.lifetimes.refresh_token),
            ("lifetimes.one_time_link", self.lifetimes.one_time_link),
            ("session.idle_timeout", self.session.idle_timeout),
            ("session.absolute_timeout", self.session.absolute_timeout),
            ("throttle.window", self.throttle.window),
        ] {
            if value.is_zero() {
                problems.push(format!("{name} must be longer than zero"));
            }
        }
        self.read_secrets(problems);
        self.validate_directory(problems);
        self.validate_mail(problems);
        let loopback = self.issuer_is_loopback();
        let mut seen = std::collections::HashSet::new();
        for client in &mut self.clients {
            client.normalize(problems, loopback);
            if !seen.insert(client.client_id.clone()) {
                problems.push(format!("client {:?} is registered twice", client.client_id));
            }
        }
    }

    fn read_secrets(&mut self, problems: &mut Vec<String>) {
        if let Some(path) = self.directory.bind_password_file.clone() {
            if let Some(secret) = read_secret_file("directory.bind_password_file", &path, problems)
            {
                self.directory.bind_password = secret;
            }
        }
        if let Some(path) = self.metrics_token_file.clone() {
            self.metrics_token = read_secret_file("metrics_token_file", &path, problems);
        }
        if let Some(path) = self.mail.password_file.clone() {
            if let Some(secret) = read_secret_file("mail.password_file", &path, problems) {
                self.mail.password = secret;
            }
        }
        for client in &mut self.clients {
            if let Some(path) = client.client_secret_file.clone() {
                let what = format!("client {:?} client_secret_file", client.client_id);
                client.client_secret = read_secret_file(&what, &path, problems);
            }
        }
        // The key-encryption key may be generated later, but only for the embedded default.
        match std::fs::read_to_string(&self.key_encryption_key_file) {
            Ok(text) => self.key_encryption_key = Some(Secret::new(strip_newline(text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.embedded => {}
            Err(e) => problems.push(format!(
                "key_encryption_key_file {}: {e} (create one with: head -c 32 /dev/urandom | base64 > {})",
                self.key_encryption_key_file.display(),
                self.key_encryption_key_file.display()
            )),
        }
    }

    fn validate_directory(&mut self, problems: &mut Vec<String>) {
        let d = &self.directory;
        match d.kind.as_str() {
            "demo" if self.embedded => {}
            "file" => match &d.path {
                None => problems.push("directory.path is required for kind = \"file\"".into()),
                Some(path) if !path.exists() => {
                    problems.push(format!("directory.path {} does not exist", path.display()))
                }
                Some(_) => {}
            },
            "ldap" => {
                match Url::parse(&d.url) {
                    Ok(url) if matches!(url.scheme(), "ldap" | "ldaps") => {}
                    _ => problems.push(format!(
                        "directory.url {:?} must be an ldap:// or ldaps:// URL",
                        d.url
                    )),
                }
                if d.dn_template.is_empty() {
                    if d.base_dn.is_empty() {
                        problems
                            .push("directory.base_dn is required unless dn_template is set".into());
                    }
                    if !d.user_filter.contains("{username}") {
                        problems.push("directory.user_filter must contain {username}".into());
                    }
                } else if !d.dn_template.contains("{username}") {
                    problems.push("directory.dn_template must contain {username}".into());
                }
                if !d.bind_dn.is_empty() && d.bind_password_file.is_none() {
                    problems.push(
                        "directory.bind_dn is set but directory.bind_password_file is missing"
                            .into(),
                    );
                }
                if !d.tls_ca_file.is_empty() && !Path::new(&d.tls_ca_file).exists() {
                    problems.push(format!(
                        "directory.tls_ca_file {} does not exist",
                        d.tls_ca_file
                    ));
                }
            }
            "" => problems.push("[directory] is required (kind = \"ldap\" or \"file\")".into()),
            other => problems.push(format!(
                "directory.kind {other:?} is neither \"ldap\" nor \"file\""
            )),
        }
    }

    fn validate_mail(&mut self, problems: &mut Vec<String>) {
        let m = &self.mail;
        match m.transport.as_str() {
            "smtp" => {
                if m.host.is_empty() {
                    problems.push("mail.host is required for transport = \"smtp\"".into());
                }
                if !matches!(m.tls.as_str(), "none" | "starttls" | "tls") {
                    problems.push(format!("mail.tls {:?} is not none, starttls or tls", m.tls));
                }
                if !m.username.is_empty() && m.password_file.is_none() {
                    problems.push("mail.username is set but mail.password_file is missing".into());
                }
            }
            "file" => {}
            "" => problems.push("[mail] is required (transport = \"smtp\" or \"file\")".into()),
            other => problems.push(format!(
                "mail.transport {other:?} is neither \"smtp\" nor \"file\""
            )),
        }
        if m.from.is_empty() && !m.transport.is_empty() {
            problems.push("mail.from is required".into());
        } else if !m.from.is_empty() && !m.from.contains('@') {
            problems.push(format!("mail.from {:?} is not an email address", m.from));
        }
    }
}

fn strip_newline(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

fn read_secret_file(what: &str, path: &Path, problems: &mut Vec<String>) -> Option<Secret> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(Secret::new(strip_newline(text))),
        Err(e) => {
            problems.push(format!("{what} {}: {e}", path.display()));
            None
        }
    }
}

fn one_line_toml_error(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            format!("line {line_no} `{line}`: {message}")
        }
        None => message,
    }
}

fn env_value(kind: Kind, raw: &str) -> Result<toml::Value, String> {
    match kind {
        Text | Dur => Ok(toml::Value::String(raw.to_string())),
        Integer => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("{raw:?} is not a whole number")),
        Boolean => match raw.trim() {
            "true" | "1" | "yes" => Ok(toml::Value::Boolean(true)),
            "false" | "0" | "no" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("{raw:?} is not true or false")),
        },
        List => {
            let raw = raw.trim();
            if raw.starts_with('[') {
                let parsed: toml::Table = format!("v = {raw}")
                    .parse()
                    .map_err(|_| format!("{raw:?} is not a list"))?;
                return Ok(parsed["v"].clone());
            }
            Ok(toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ))
        }
    }
}

/// `NIDAN_<KEY>` for top-level keys, `NIDAN_<TABLE>_<KEY>` for keys of a table.
fn apply_env(
    table: &mut toml::Table,
    env: &HashMap<String, String>,
    problems: &mut Vec<String>,
    origins: &mut HashMap<String, String>,
) {
    let mut names: Vec<&String> = env.keys().filter(|k| k.starts_with("NIDAN_")).collect();
    names.sort();
    for name in names {
        let key = name["NIDAN_".len()..].to_ascii_lowercase();
        if key == "config" || key.starts_with("test_") {
            continue;
        }
        let raw = &env[name];
        if let Some((_, kind)) = TOP_KEYS.iter().find(|(k, _)| *k == key) {
            match env_value(*kind, raw) {
                Ok(value) => {
                    origins.insert(key.clone(), name.clone());
                    table.insert(key, value);
                }
                Err(e) => problems.push(format!("{name}: {e}")),
            }
            continue;
        }
        let found = TABLE_KEYS.iter().find_map(|(section, keys)| {
            let rest = key.strip_prefix(section)?.strip_prefix('_')?;
            keys.iter()
                .find(|(k, _)| *k == rest)
                .map(|(k, kind)| (*section, *k, *kind))
        });
        match found {
            Some((section, sub, kind)) => match env_value(kind, raw) {
                Ok(value) => {
                    origins.insert(format!("{section}.{sub}"), name.clone());
                    let entry = table
                        .entry(section.to_string())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    if let toml::Value::Table(t) = entry {
                        t.insert(sub.to_string(), value);
                    }
                }
                Err(e) => problems.push(format!("{name}: {e}")),
            },
            None => problems.push(format!(
                "{name}: no configuration key matches this environment variable"
            )),
        }
    }
}

/// Where each `key` / `table.key` of the file is written ("line N").
fn file_lines(text: &str) -> HashMap<String, String> {
    let mut origins = HashMap::new();
    let mut section = String::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
            continue;
        }
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim().trim_matches('"');
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            let path = if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            };
            origins
                .entry(path)
                .or_insert_with(|| format!("line {}", number + 1));
        }
    }
    origins
}

/// Checks every known key's value type (durations parsed); a bad value is reported with where it
/// came from and dropped, so that every other problem can still be found.
fn check_value_types(
    table: &mut toml::Table,
    origins: &HashMap<String, String>,
    problems: &mut Vec<String>,
) {
    fn problem(kind: Kind, value: &toml::Value) -> Option<String> {
        match (kind, value) {
            (Text, toml::Value::String(_)) => None,
            (Dur, toml::Value::String(text)) => parse_duration(text).err(),
            (Dur, toml::Value::Integer(n)) if *n >= 0 => None,
            (Integer, toml::Value::Integer(n)) if *n >= 0 => None,
            (Boolean, toml::Value::Boolean(_)) => None,
            (List, toml::Value::Array(_)) => None,
            (Text, _) => Some("must be a string".into()),
            (Dur, _) => Some("must be a duration such as \"15m\"".into()),
            (Integer, _) => Some("must be a whole number".into()),
            (Boolean, _) => Some("must be true or false".into()),
            (List, _) => Some("must be a list".into()),
        }
    }
    let mut check = |path: String, kind: Kind, value: &toml::Value| -> bool {
        match problem(kind, value) {
            Some(why) => {
                let origin = origins
                    .get(&path)
                    .cloned()
                    .unwrap_or_else(|| "configuration".into());
                problems.push(format!("{origin}: {path} {why}"));
                false
            }
            None => true,
        }
    };
    table.retain(
        |key, value| match TOP_KEYS.iter().find(|(k, _)| *k == key) {
            Some((_, kind)) => check(key.to_string(), *kind, value),
            None => true,
        },
    );
    for (section, keys) in TABLE_KEYS {
        if let Some(toml::Value::Table(sub)) = table.get_mut(*section) {
            sub.retain(|key, value| match keys.iter().find(|(k, _)| *k == key) {
                Some((_, kind)) => check(format!("{section}.{key}"), *kind, value),
                None => true,
            });
        }
    }
}

fn check_unknown_keys(table: &toml::Table, problems: &mut Vec<String>) {
    for (key, value) in table {
        if TOP_KEYS.iter().any(|(k, _)| k == key) {
            continue;
        }
        if let Some((_, keys)) = TABLE_KEYS.iter().find(|(t, _)| t == key) {
            let Some(sub) = value.as_table() else {
                problems.push(format!("[{key}] must be a table"));
                continue;
            };
            for (sub_key, sub_value) in sub {
                if key == "directory" && sub_key == "claims" {
                    if !sub_value.is_table() {
                        problems
                            .push("[directory.claims] must be a table of claim = attribute".into());
                    }
                    continue;
                }
                if !keys.iter().any(|(k, _)| k == sub_key) {
                    problems.push(format!("unknown key {key}.{sub_key}"));
                }
            }
            continue;
        }
        if key == "clients" {
            let Some(clients) = value.as_array() else {
                problems.push("clients must be written as [[clients]] tables".into());
                continue;
            };
            for (i, client) in clients.iter().enumerate() {
                let Some(client) = client.as_table() else {
                    continue;
                };
                for sub_key in client.keys() {
                    if !CLIENT_KEYS.contains(&sub_key.as_str()) {
                        problems.push(format!(
                            "unknown key {sub_key} in [[clients]] entry {}",
                            i + 1
                        ));
                    }
                }
            }
            continue;
        }
        problems.push(format!("unknown key {key}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("400d").unwrap(),
            Duration::from_secs(400 * 86_400)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("15x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn embedded_default_with_env_overrides() {
        let config = Config::from_toml(
            "",
            &env(&[
                ("NIDAN_LISTEN", "127.0.0.1:9999"),
                ("NIDAN_SESSION_IDLE_TIMEOUT", "3s"),
                ("NIDAN_THROTTLE_PASSWORD_FAILURES", "4"),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:9999");
        assert_eq!(config.session.idle_timeout, Duration::from_secs(3));
        assert_eq!(config.throttle.password_failures, 4);
        assert_eq!(config.issuer, "http://localhost:8080");
    }

    #[test]
    fn every_problem_is_one_line() {
        let text = r#"
issuer = "http://idp.example.ac.jp"
colour = "red"
[session]
idle = "5m"
[directory]
kind = "file"
path = "/nonexistent/users.toml"
[mail]
transport = "smtp"
from = "noreply@example.ac.jp"
[[clients]]
client_id = "x"
client_secret_file = "/nonexistent/secret"
redirect_uris = ["not a url"]
"#;
        let errors = Config::from_toml(text, &env(&[("NIDAN_BOGUS", "1")]), false)
            .unwrap_err()
            .0;
        let all = errors.join("\n");
        assert!(all.contains("unknown key colour"), "{all}");
        assert!(all.contains("unknown key session.idle"), "{all}");
        assert!(all.contains("NIDAN_BOGUS"), "{all}");
        assert!(all.contains("must use https"), "{all}");
        assert!(all.contains("/nonexistent/users.toml"), "{all}");
        assert!(all.contains("/nonexistent/secret"), "{all}");
        assert!(all.contains("not an absolute URL"), "{all}");
        assert!(errors.iter().all(|e| !e.contains('\n')));
    }

    #[test]
    fn bad_value_names_its_line() {
        let errors =
            Config::from_toml("[session]\nidle_timeout = \"5 minutes\"\n", &env(&[]), true)
                .unwrap_err()
                .0;
        assert!(errors[0].contains("idle_timeout"), "{errors:?}");
        assert!(errors[0].contains("invalid duration"), "{errors:?}");
    }
}
