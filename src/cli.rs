//! The `nidan` command line: serve, check-config, migrate, client, keys, hash-password.
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::app::{client_row, derive_secrets, load_kek};
use crate::clock::{random_token, Clock, SystemClock};
use crate::config::{parse_duration, ClientSettings, Config};

#[derive(Debug, Parser)]
#[command(
    name = "nidan",
    version,
    about = "OpenID Connect identity provider for universities"
)]
pub struct Cli {
    /// Configuration file (TOML). Without one, `serve` runs the embedded development default.
    #[arg(long, global = true, env = "NIDAN_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start; boxing the larger variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (applies migrations first).
    Serve,
    /// Validate the configuration and explain every problem, one per line.
    CheckConfig,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage relying parties.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Manage signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Read a password from standard input and print its argon2id PHC string.
    HashPassword,
    /// Look at and help students.
    #[command(subcommand)]
    User(UserCommand),
    /// The mail and back-channel logout queue.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// The audit trail of security events.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Queued, sent and failed deliveries with their SMTP reply and Message-ID (never bodies).
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Queue a failed delivery again (all failed ones without ID).
    Retry { id: Option<String> },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest events, optionally of one student.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// University user ID.
        #[arg(long)]
        user: Option<String>,
    },
    /// Check every replica's hash chain.
    Verify,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Show a student's account, enrollment and lock state.
    Show { username: String },
    /// Lift every login lock and delay of a student.
    Unlock { username: String },
    /// Block the second-password level of a student (e.g. a reported compromise) for a duration.
    Lock {
        username: String,
        #[arg(long, default_value = "24h")]
        duration: String,
    },
    /// Forget a student's email and second password: the next login runs enrollment again.
    ResetEnrollment { username: String },
    /// Import students (JSON Lines: username, email, second_password or second_password_hash);
    /// FILE is a path or - for standard input.
    Import {
        file: String,
        /// Check every line and report, without importing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Register a client; a confidential client's secret is printed once.
    Add(ClientAdd),
    /// List registered clients.
    List,
    /// Show one client's settings.
    Show { client_id: String },
    /// Remove a client registered with `client add`.
    Remove { client_id: String },
}

#[derive(Debug, Args)]
pub struct ClientAdd {
    pub client_id: String,
    #[arg(long = "redirect-uri", required = true)]
    pub redirect_uris: Vec<String>,
    #[arg(long = "post-logout-redirect-uri")]
    pub post_logout_redirect_uris: Vec<String>,
    /// client_secret_basic, client_secret_post, private_key_jwt or none (public client).
    #[arg(long, default_value = "client_secret_basic")]
    pub auth_method: String,
    #[arg(long = "grant-type", default_values_t = vec!["authorization_code".to_string(), "refresh_token".to_string()])]
    pub grant_types: Vec<String>,
    #[arg(long = "scope", default_values_t = vec!["openid".to_string(), "profile".to_string(), "email".to_string()])]
    pub scopes: Vec<String>,
    #[arg(long, default_value = crate::config::ACR_PASSWORD)]
    pub min_acr: String,
    #[arg(long)]
    pub backchannel_logout_uri: Option<String>,
    #[arg(long)]
    pub jwks_uri: Option<String>,
    #[arg(long, default_value = "RS256")]
    pub id_token_alg: String,
    #[arg(long, default_value = "")]
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List signing keys and their state.
    List,
    /// Publish a new key now and sign with it after a delay.
    Rotate {
        /// RS256, ES256 or EdDSA.
        #[arg(long, default_value = "RS256")]
        alg: String,
        /// How long the new key is published before it signs (replicas refresh within 60 s).
        #[arg(long, default_value = "24h")]
        delay: String,
        /// Sign with the new key at once (a compromised key).
        #[arg(long)]
        now: bool,
    },
}

pub fn load_config(path: Option<&std::path::Path>) -> Result<Config, crate::config::ConfigErrors> {
    let env: HashMap<String, String> = std::env::vars().collect();
    Config::load(path, &env)
}

pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config_path = cli.config.as_deref();
    match cli.command {
        Command::HashPassword => {
            let mut password = String::new();
            std::io::stdin().read_to_string(&mut password)?;
            let password = password.strip_suffix('\n').unwrap_or(&password);
            let password = password.strip_suffix('\r').unwrap_or(password);
            if password.is_empty() {
                bail!("no password on standard input");
            }
            println!(
                "{}",
                crate::auth::passwords::hash_with(
                    &crate::auth::passwords::production_params(),
                    password
                )
            );
            Ok(())
        }
        Command::CheckConfig => match load_config(config_path) {
            Ok(config) => {
                println!("configuration OK (issuer {})", config.issuer);
                for warning in config_warnings(&config) {
                    println!("warning: {warning}");
                }
                Ok(())
            }
            Err(errors) => {
                eprint!("{errors}");
                std::process::exit(1);
            }
        },
        command => {
            let config = match load_config(config_path) {
                Ok(config) => config,
                Err(errors) => {
                    eprint!("{errors}");
                    std::process::exit(1);
                }
            };
            init_logging(config.log_format == "json");
            match command {
                Command::Serve => crate::app::serve(config).await,
                Command::Migrate => {
                    let store = crate::store::connect(&config.database_url).await?;
                    println!("migrations applied ({})", store.backend());
                    Ok(())
                }
                Command::Client(command) => client_command(config, command).await,
                Command::Keys(command) => keys_command(config, command).await,
                Command::User(command) => user_command(config, command).await,
                Command::Outbox(command) => outbox_command(config, command).await,
                Command::Audit(command) => audit_command(config, command).await,
                Command::HashPassword | Command::CheckConfig => unreachable!(),
            }
        }
    }
}

fn config_warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    if config.embedded {
        warnings.push("no configuration file: this is the embedded development default".into());
    }
    if config.throttle.password_failures >= 10 && config.directory.kind == "ldap" {
        warnings.push(
            "throttle.password_failures should stay below the directory's own lockout threshold"
                .into(),
        );
    }
    warnings
}

async fn client_command(config: Config, command: ClientCommand) -> anyhow::Result<()> {
    let store = crate::store::connect(&config.database_url).await?;
    let now = SystemClock.now();
    match command {
        ClientCommand::Add(add) => {
            let kek = load_kek(&config)?;
            let secrets = derive_secrets(&kek);
            if store.get_client(&add.client_id).await?.is_some() {
                bail!("client {} already exists", add.client_id);
            }
            let mut settings = ClientSettings {
                client_id: add.client_id.clone(),
                client_name: add.name,
                redirect_uris: add.redirect_uris,
                post_logout_redirect_uris: add.post_logout_redirect_uris,
                token_endpoint_auth_method: add.auth_method,
                grant_types: add.grant_types,
                scopes: add.scopes,
                min_acr: add.min_acr,
                backchannel_logout_uri: add.backchannel_logout_uri,
                jwks_uri: add.jwks_uri,
                id_token_signed_response_alg: add.id_token_alg,
                ..ClientSettings::default()
            };
            let secret = settings
                .token_endpoint_auth_method
                .starts_with("client_secret")
                .then(random_token);
            settings.client_secret = secret.clone().map(crate::config::Secret::new);
            let mut problems = Vec::new();
            settings.normalize(&mut problems, config.issuer_is_loopback());
            if !problems.is_empty() {
                bail!(problems.join("\n"));
            }
            let digest = secret
                .as_deref()
                .map(|s| crate::oidc::clients::secret_digest(&secrets.client_secret, s));
            store
                .put_client(&client_row(&settings, digest.clone(), "cli", now)?)
                .await?;
            cli_audit(
                &store,
                "client_added",
                None,
                &format!("client {}", settings.client_id),
            )
            .await?;
            println!("client {} registered", settings.client_id);
            if let (Some(secret), Some(digest)) = (secret, digest) {
                println!("client_secret: {secret}");
                println!(
                    "(shown once; for a configuration file use client_secret_hash = \"{digest}\")"
                );
            }
            Ok(())
        }
        ClientCommand::List => {
            let clients = store.list_clients().await?;
            if clients.is_empty() {
                println!("no clients");
            }
            for row in clients {
                let client = crate::oidc::clients::from_row(row.clone())?;
                println!(
                    "{}\t{}\t{}\t{}",
                    client.client_id, client.token_endpoint_auth_method, client.min_acr, row.source
                );
            }
            Ok(())
        }
        ClientCommand::Show { client_id } => {
            let row = store
                .get_client(&client_id)
                .await?
                .with_context(|| format!("no client {client_id}"))?;
            let client = crate::oidc::clients::from_row(row.clone())?;
            println!("{}", serde_json::to_string_pretty(&client.settings)?);
            println!(
                "source: {}; secret: {}",
                row.source,
                if row.secret_digest.is_some() {
                    "set (digest stored)"
                } else {
                    "none"
                }
            );
            Ok(())
        }
        ClientCommand::Remove { client_id } => {
            let row = store
                .get_client(&client_id)
                .await?
                .with_context(|| format!("no client {client_id}"))?;
            if row.source == "config" {
                bail!("client {client_id} comes from the configuration file; remove it there");
            }
            store.delete_client(&client_id).await?;
            cli_audit(
                &store,
                "client_removed",
                None,
                &format!("client {client_id}"),
            )
            .await?;
            // Running replicas may answer from their copy for this long; once it has passed,
            // every one of them refuses the client.
            tokio::time::sleep(crate::oidc::clients::CACHE_TTL + Duration::from_millis(100)).await;
            println!("client {client_id} removed");
            Ok(())
        }
    }
}

async fn keys_command(config: Config, command: KeysCommand) -> anyhow::Result<()> {
    let store = crate::store::connect(&config.database_url).await?;
    let kek = load_kek(&config)?;
    let now = SystemClock.now();
    match command {
        KeysCommand::List => {
            let keys = store.list_signing_keys().await?;
            if keys.is_empty() {
                println!("no keys yet (they are generated on first start)");
            }
            println!("kid\talg\tstate\tactive_from\tpublished_until");
            for key in keys {
                let state = if key.published_until.is_some_and(|t| t <= now) {
                    "retired"
                } else if key.active_from > now {
                    "published, not signing yet"
                } else if key.published_until.is_some() {
                    "published, replaced"
                } else {
                    "signing"
                };
                println!(
                    "{}\t{}\t{state}\t{}\t{}",
                    key.kid,
                    key.alg,
                    format_time(key.active_from),
                    key.published_until
                        .map(format_time)
                        .unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        }
        KeysCommand::Rotate {
            alg,
            delay,
            now: at_once,
        } => {
            if !crate::keys::ALGORITHMS.contains(&alg.as_str()) {
                bail!("--alg must be one of {:?}", crate::keys::ALGORITHMS);
            }
            let delay = if at_once {
                0
            } else {
                parse_duration(&delay)
                    .map_err(anyhow::Error::msg)?
                    .as_secs() as i64
            };
            let lifetimes = &config.lifetimes;
            let longest = lifetimes.id_token.max(lifetimes.access_token).as_secs() as i64 + 300;
            let key = crate::keys::rotate(&store, &kek, &alg, now, delay, longest).await?;
            cli_audit(
                &store,
                "key_rotated",
                None,
                &format!(
                    "{alg} key {} signs from {}",
                    key.kid,
                    format_time(key.active_from)
                ),
            )
            .await?;
            println!(
                "new {alg} key {} published now; it signs from {}",
                key.kid,
                format_time(key.active_from)
            );
            Ok(())
        }
    }
}

async fn user_command(config: Config, command: UserCommand) -> anyhow::Result<()> {
    let store = crate::store::connect(&config.database_url).await?;
    let now = SystemClock.now();
    match command {
        UserCommand::Show { username } => {
            let username = crate::auth::normalize_username(&username);
            let accounts = store.find_accounts_by_username(&username).await?;
            if accounts.is_empty() {
                println!("no account for {username} (students get one at their first login)");
            }
            for account in accounts {
                println!("user ID:          {}", account.username);
                println!("account id:       {}", account.id);
                println!("directory id:     {}", account.directory_id);
                println!("created:          {}", format_time(account.created_at));
                println!(
                    "email:            {}",
                    match (&account.email, account.email_verified_at) {
                        (Some(email), Some(at)) =>
                            format!("{email} (verified {})", format_time(at)),
                        (Some(email), None) => format!("{email} (not verified)"),
                        _ => "not registered".into(),
                    }
                );
                println!(
                    "second password:  {}",
                    account
                        .second_password_set_at
                        .map_or("not set".into(), |t| format!("set {}", format_time(t)))
                );
                let second = store
                    .throttle_get(&format!("second:{}", account.id))
                    .await?;
                let pw = store
                    .throttle_get(&format!("pwacct:{}", account.username))
                    .await?;
                for (what, counter) in [("university password", pw), ("second password", second)] {
                    if let Some(c) = counter {
                        let lock = c.locked_until.filter(|t| *t > now).map(format_time);
                        println!(
                            "{what:<17} {} recent failures{}",
                            c.failures,
                            lock.map(|t| format!(", locked until {t}"))
                                .unwrap_or_default()
                        );
                    }
                }
            }
            Ok(())
        }
        UserCommand::Import { file, dry_run } => {
            let input = if file == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text)?;
                text
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?
            };
            let hasher = crate::auth::passwords::PasswordHasher::new(
                crate::auth::passwords::production_params(),
            );
            let directory = crate::directory::build(&config.directory, hasher.clone()).await?;
            let report =
                crate::enroll::import::import(&store, &directory, &hasher, &input, dry_run, now)
                    .await?;
            for error in &report.errors {
                eprintln!("{error}");
            }
            if !report.errors.is_empty() {
                bail!("{} bad lines; nothing was imported", report.errors.len());
            }
            if dry_run {
                println!("dry run: every line is valid; nothing was imported");
            } else {
                println!(
                    "{} students imported, {} already up to date",
                    report.imported, report.unchanged
                );
            }
            Ok(())
        }
        UserCommand::Lock { username, duration } => {
            let username = crate::auth::normalize_username(&username);
            let seconds = parse_duration(&duration)
                .map_err(anyhow::Error::msg)?
                .as_secs() as i64;
            let accounts = store.find_accounts_by_username(&username).await?;
            if accounts.is_empty() {
                bail!("no account for {username}");
            }
            for account in &accounts {
                let key = format!("second:{}", account.id);
                store.throttle_reserve(&key, i64::MAX, 1, now).await?;
                store.throttle_lock(&key, now + seconds, now).await?;
                cli_audit(
                    &store,
                    "lock",
                    Some(&account.id),
                    &format!("second-password level locked for {duration} by an operator"),
                )
                .await?;
            }
            println!(
                "{username}: second-password level locked until {}",
                format_time(now + seconds)
            );
            Ok(())
        }
        UserCommand::ResetEnrollment { username } => {
            let username = crate::auth::normalize_username(&username);
            let accounts = store.find_accounts_by_username(&username).await?;
            if accounts.is_empty() {
                bail!("no account for {username}");
            }
            for account in &accounts {
                store.reset_enrollment(&account.id, now).await?;
                cli_audit(
                    &store,
                    "enrollment_reset",
                    Some(&account.id),
                    "by an operator",
                )
                .await?;
            }
            println!("{username}: enrollment reset; the next login asks for the email address and a new second password");
            Ok(())
        }
        UserCommand::Unlock { username } => {
            let username = crate::auth::normalize_username(&username);
            let accounts = store.find_accounts_by_username(&username).await?;
            let mut removed = crate::auth::throttle::unlock(&store, &username, None).await?;
            for account in &accounts {
                removed +=
                    crate::auth::throttle::unlock(&store, &username, Some(&account.id)).await?;
            }
            for account in &accounts {
                cli_audit(&store, "unlock", Some(&account.id), "by an operator").await?;
            }
            println!("{username}: {removed} lock counters cleared");
            Ok(())
        }
    }
}

/// Operator actions join the audit trail as a replica of their own.
async fn cli_audit(
    store: &crate::store::DynStore,
    kind: &str,
    account_id: Option<&str>,
    details: &str,
) -> anyhow::Result<()> {
    let log = crate::audit::AuditLog::new();
    let event = crate::audit::Event {
        kind,
        account_id,
        outcome: "done",
        details: format!("nidan CLI: {details}"),
        ..Default::default()
    };
    log.record(store, SystemClock.now(), event).await?;
    Ok(())
}

async fn outbox_command(config: Config, command: OutboxCommand) -> anyhow::Result<()> {
    let store = crate::store::connect(&config.database_url).await?;
    match command {
        OutboxCommand::List { limit } => {
            let jobs = store.list_jobs(limit).await?;
            if jobs.is_empty() {
                println!("the outbox is empty");
            }
            println!("id\tkind\trecipient\tstate\tattempts\tcreated\tmessage-id\tlast reply");
            for job in jobs {
                let state = match (job.sent_at, job.failed_at) {
                    (Some(t), _) => format!("sent {}", format_time(t)),
                    (None, Some(t)) => format!("failed {}", format_time(t)),
                    _ => format!("waiting (next try {})", format_time(job.next_attempt_at)),
                };
                println!(
                    "{}\t{}\t{}\t{state}\t{}\t{}\t{}\t{}",
                    job.id,
                    job.kind,
                    job.recipient,
                    job.attempts,
                    format_time(job.created_at),
                    job.message_id,
                    job.last_error.unwrap_or_default()
                );
            }
            Ok(())
        }
        OutboxCommand::Retry { id } => {
            let n = store.retry_jobs(id.as_deref(), SystemClock.now()).await?;
            println!("{n} deliveries queued again");
            Ok(())
        }
    }
}

async fn audit_command(config: Config, command: AuditCommand) -> anyhow::Result<()> {
    let store = crate::store::connect(&config.database_url).await?;
    match command {
        AuditCommand::List { limit, user } => {
            let account_id = match user {
                Some(user) => {
                    let accounts = store
                        .find_accounts_by_username(&crate::auth::normalize_username(&user))
                        .await?;
                    Some(
                        accounts
                            .first()
                            .map(|a| a.id.clone())
                            .with_context(|| format!("no account for {user}"))?,
                    )
                }
                None => None,
            };
            for e in store.list_audit(account_id.as_deref(), limit).await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    format_time(e.at),
                    e.kind,
                    e.outcome,
                    e.account_id.unwrap_or_else(|| "-".into()),
                    e.client_id.unwrap_or_else(|| "-".into()),
                    e.address.unwrap_or_else(|| "-".into()),
                    e.details
                );
            }
            Ok(())
        }
        AuditCommand::Verify => {
            let events = store.audit_chain().await?;
            let problems = crate::audit::verify(&events);
            if problems.is_empty() {
                println!("audit trail intact: {} records", events.len());
                Ok(())
            } else {
                for p in &problems {
                    eprintln!("{p}");
                }
                bail!(
                    "the audit trail was tampered with ({} problems)",
                    problems.len()
                )
            }
        }
    }
}

fn format_time(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}
