//! Relying parties: loading them from the store and authenticating them at the token,
//! introspection and revocation endpoints.
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use josekit::jwk::JwkSet;
use serde_json::Value;

use super::params::Params;
use crate::app::AppState;
use crate::config::ClientSettings;
use crate::crypto::{b64_decode, constant_time_eq, keyed_digest};
use crate::error::OAuthError;
use crate::store::ClientRow;

/// A registered client as the endpoints use it.
#[derive(Debug, Clone)]
pub struct Client {
    pub settings: ClientSettings,
    pub secret_digest: Option<String>,
}

impl std::ops::Deref for Client {
    type Target = ClientSettings;
    fn deref(&self) -> &ClientSettings {
        &self.settings
    }
}

/// The digest stored for a client secret: HMAC-SHA256 under a key derived from the
/// key-encryption key. Secrets are 256-bit random values, so a slow hash would buy nothing.
pub fn secret_digest(state_key: &[u8], secret: &str) -> String {
    keyed_digest(state_key, secret.as_bytes())
}

/// How long a replica may answer from its copy of a client registration. `nidan client remove`
/// waits this long before it reports the client gone, so a removal holds on every replica once
/// the command returns; a new client or a new secret is seen at once (a miss or a secret that
/// does not match reads the store again).
pub const CACHE_TTL: Duration = Duration::from_secs(1);
/// Registrations are few; past this many the cache starts over rather than grow.
const CACHE_LIMIT: usize = 4096;

/// Client registrations read from the store, kept for [`CACHE_TTL`]: the token, introspection
/// and userinfo endpoints need one on every request.
#[derive(Default)]
pub struct ClientCache {
    entries: RwLock<HashMap<String, (Instant, Arc<Client>)>>,
}

impl ClientCache {
    fn get(&self, client_id: &str) -> Option<Arc<Client>> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (at, client) = entries.get(client_id)?;
        (at.elapsed() < CACHE_TTL).then(|| client.clone())
    }

    fn put(&self, client: Arc<Client>) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CACHE_LIMIT {
            entries.clear();
        }
        entries.insert(client.client_id.clone(), (Instant::now(), client));
    }

    fn forget(&self, client_id: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.remove(client_id);
    }
}

/// A registered client, from this replica's cache when it is fresh.
pub async fn find(state: &AppState, client_id: &str) -> Result<Option<Arc<Client>>, OAuthError> {
    if client_id.len() > 255 {
        return Ok(None);
    }
    if let Some(client) = state.clients.get(client_id) {
        return Ok(Some(client));
    }
    load(state, client_id).await
}

/// A registered client read from the store, refreshing the cache.
async fn load(state: &AppState, client_id: &str) -> Result<Option<Arc<Client>>, OAuthError> {
    let Some(row) = state.store.get_client(client_id).await? else {
        state.clients.forget(client_id);
        return Ok(None);
    };
    let client = Arc::new(from_row(row)?);
    state.clients.put(client.clone());
    Ok(Some(client))
}

pub fn from_row(row: ClientRow) -> anyhow::Result<Client> {
    let settings: ClientSettings = serde_json::from_str(&row.settings)?;
    Ok(Client {
        settings,
        secret_digest: row.secret_digest,
    })
}

/// Credentials presented by a client, before checking them.
struct Presented {
    client_id: String,
    method: &'static str,
    secret: Option<String>,
    assertion: Option<String>,
}

fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, OAuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().unwrap_or("");
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return Ok(None);
    };
    let bad = || OAuthError::invalid_client("malformed Basic credentials");
    let decoded = b64_decode(encoded).ok_or_else(bad)?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(bad)?;
    // RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
    let unescape = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Ok(Some((unescape(id), unescape(secret))))
}

fn presented(headers: &HeaderMap, params: &Params) -> Result<Presented, OAuthError> {
    let basic = basic_credentials(headers)?;
    let assertion_type = params.get("client_assertion_type");
    let assertion = params.get("client_assertion");
    let post_secret = params.get("client_secret");
    let methods = usize::from(basic.is_some())
        + usize::from(assertion.is_some())
        + usize::from(post_secret.is_some());
    if methods > 1 {
        return Err(OAuthError::invalid_request(
            "use exactly one client authentication method",
        ));
    }
    if let Some((id, secret)) = basic {
        if params.get("client_id").is_some_and(|c| c != id) {
            return Err(OAuthError::invalid_request(
                "client_id does not match the credentials",
            ));
        }
        return Ok(Presented {
            client_id: id,
            method: "client_secret_basic",
            secret: Some(secret),
            assertion: None,
        });
    }
    if let Some(assertion) = assertion {
        if assertion_type != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer") {
            return Err(OAuthError::invalid_request(
                "unsupported client_assertion_type",
            ));
        }
        let subject = unverified_subject(assertion).ok_or_else(|| {
            OAuthError::invalid_client("client_assertion is not a JWT with a sub")
        })?;
        if params.get("client_id").is_some_and(|c| c != subject) {
            return Err(OAuthError::invalid_client(
                "client_id does not match the assertion",
            ));
        }
        return Ok(Presented {
            client_id: subject,
            method: "private_key_jwt",
            secret: None,
            assertion: Some(assertion.to_string()),
        });
    }
    let client_id = params
        .get("client_id")
        .ok_or_else(|| OAuthError::invalid_client("client authentication is required"))?
        .to_string();
    match post_secret {
        Some(secret) => Ok(Presented {
            client_id,
            method: "client_secret_post",
            secret: Some(secret.to_string()),
            assertion: None,
        }),
        None => Ok(Presented {
            client_id,
            method: "none",
            secret: None,
            assertion: None,
        }),
    }
}

fn unverified_subject(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = crate::crypto::b64url_decode(payload)?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("sub")?.as_str().map(str::to_string)
}

/// Authenticates the client with its registered method (and only that one).
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Arc<Client>, OAuthError> {
    let presented = presented(headers, params)?;
    let mut client = find(state, &presented.client_id)
        .await?
        .ok_or_else(|| OAuthError::invalid_client("unknown client or wrong credentials"))?;
    if client.token_endpoint_auth_method != presented.method {
        return Err(OAuthError::invalid_client(format!(
            "this client must authenticate with {}",
            client.token_endpoint_auth_method
        )));
    }
    if let Err(error) = check_credentials(state, &client, &presented).await {
        // The registration may have changed since it was cached (a new secret, new keys): ask
        // the store once before refusing.
        let fresh = load(state, &presented.client_id)
            .await?
            .filter(|fresh| {
                fresh.token_endpoint_auth_method == presented.method
                    && (fresh.settings != client.settings
                        || fresh.secret_digest != client.secret_digest)
            })
            .ok_or(error)?;
        check_credentials(state, &fresh, &presented).await?;
        client = fresh;
    }
    Ok(client)
}

/// Checks the presented secret or assertion against one registration.
async fn check_credentials(
    state: &AppState,
    client: &Client,
    presented: &Presented,
) -> Result<(), OAuthError> {
    match presented.method {
        "client_secret_basic" | "client_secret_post" => {
            let secret = presented.secret.as_deref().unwrap_or_default();
            let digest = secret_digest(&state.secrets.client_secret, secret);
            let expected = client.secret_digest.as_deref().unwrap_or_default();
            if expected.is_empty() || !constant_time_eq(digest.as_bytes(), expected.as_bytes()) {
                return Err(OAuthError::invalid_client(
                    "unknown client or wrong credentials",
                ));
            }
            Ok(())
        }
        "private_key_jwt" => {
            let assertion = presented.assertion.as_deref().unwrap_or("");
            verify_assertion(state, client, assertion).await
        }
        _ => Ok(()),
    }
}

async fn client_jwks(state: &AppState, client: &Client) -> Result<JwkSet, OAuthError> {
    let document = match (&client.jwks, &client.jwks_uri) {
        (Some(jwks), _) => jwks.clone(),
        (None, Some(uri)) => state
            .http
            .get(uri)
            .timeout(std::time::Duration::from_secs(5))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|_| OAuthError::invalid_client("the client's jwks_uri could not be read"))?
            .json::<Value>()
            .await
            .map_err(|_| OAuthError::invalid_client("the client's jwks_uri is not a JWK set"))?,
        (None, None) => return Err(OAuthError::invalid_client("the client has no keys")),
    };
    let map = document.as_object().cloned().unwrap_or_default();
    JwkSet::from_map(map).map_err(|_| OAuthError::invalid_client("the client's JWK set is invalid"))
}

/// RFC 7523 client assertion: signed by a registered key, iss = sub = client_id, aud names us,
/// not expired, and its `jti` never seen before (across replicas).
async fn verify_assertion(
    state: &AppState,
    client: &Client,
    assertion: &str,
) -> Result<(), OAuthError> {
    let reject =
        |why: &str| OAuthError::invalid_client(format!("client_assertion rejected: {why}"));
    let jwks = client_jwks(state, client).await?;
    let header = assertion
        .split('.')
        .next()
        .and_then(crate::crypto::b64url_decode)
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .ok_or_else(|| reject("malformed header"))?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let kid = header.get("kid").and_then(Value::as_str);
    let verifier = jwks
        .keys()
        .into_iter()
        .filter(|k| kid.is_none_or(|kid| k.key_id() == Some(kid)))
        .filter(|k| k.algorithm().is_none_or(|a| a == alg))
        .find_map(|k| crate::keys::verifier_for_jwk(alg, k))
        .ok_or_else(|| reject("no registered key matches"))?;
    let (payload, _) = josekit::jwt::decode_with_verifier(assertion, verifier.as_ref())
        .map_err(|_| reject("bad signature"))?;
    let now = state.clock.now();
    let claims = payload.claims_set();
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("iss") != Some(client.client_id.as_str())
        || text("sub") != Some(client.client_id.as_str())
    {
        return Err(reject("iss and sub must be the client_id"));
    }
    let token_endpoint = format!("{}/token", state.config.issuer);
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => *aud == state.config.issuer || *aud == token_endpoint,
        Some(Value::Array(auds)) => auds
            .iter()
            .filter_map(Value::as_str)
            .any(|a| a == state.config.issuer || a == token_endpoint),
        _ => false,
    };
    if !audience_ok {
        return Err(reject("aud must be the issuer or the token endpoint"));
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| reject("exp is missing"))?;
    if exp + 60 < now {
        return Err(reject("expired"));
    }
    if exp > now + 3600 {
        return Err(reject("exp is too far in the future"));
    }
    let jti = text("jti").ok_or_else(|| reject("jti is missing"))?;
    let key = format!("{}\u{0}{jti}", client.client_id);
    if !state
        .store
        .record_assertion(&crate::crypto::token_digest(&key), exp + 120)
        .await?
    {
        return Err(reject("jti was already used"));
    }
    Ok(())
}
