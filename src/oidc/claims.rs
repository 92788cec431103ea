//! Which claims a relying party receives: by scope, by name through the `claims` parameter, and
//! the subject identifier (public or pairwise).
use serde_json::{Map, Value};
use url::Url;

use crate::app::AppState;
use crate::config::ClientSettings;
use crate::crypto::{b64url, keyed_tag};
use crate::store::Account;

const PROFILE: &[&str] = &[
    "name",
    "family_name",
    "given_name",
    "middle_name",
    "nickname",
    "preferred_username",
];
const EMAIL: &[&str] = &["email", "email_verified"];
/// Claims the protocol itself sets; never copied from the directory.
const PROTOCOL: &[&str] = &[
    "iss",
    "sub",
    "aud",
    "exp",
    "iat",
    "auth_time",
    "nonce",
    "acr",
    "amr",
    "azp",
    "at_hash",
    "sid",
    "jti",
    "nbf",
];

/// Everything nidan knows about the student at login: directory claims, the university user ID
/// and the registered email. Stored with the code and grant; userinfo never asks the directory.
pub fn snapshot(account: &Account) -> Value {
    let mut claims: Map<String, Value> = serde_json::from_str(&account.claims).unwrap_or_default();
    claims.retain(|k, _| !PROTOCOL.contains(&k.as_str()));
    claims.insert(
        "preferred_username".into(),
        Value::String(account.username.clone()),
    );
    if let (Some(email), Some(_)) = (&account.email, account.email_verified_at) {
        claims.insert("email".into(), Value::String(email.clone()));
        claims.insert("email_verified".into(), Value::Bool(true));
    }
    Value::Object(claims)
}

/// The scope that releases a claim (`family_name#ja-Kana-JP` counts as `family_name`).
fn scope_of(claim: &str) -> &'static str {
    let base = claim.split('#').next().unwrap_or(claim);
    if PROFILE.contains(&base) {
        "profile"
    } else if EMAIL.contains(&base) {
        "email"
    } else {
        "student"
    }
}

/// The claims released for `scopes`, plus those asked for by name in `requested` (one member of
/// the `claims` parameter: `userinfo` or `id_token`) whose scope the client may use.
pub fn release(
    snapshot: &Value,
    scopes: &[&str],
    client: &ClientSettings,
    requested: Option<&Value>,
) -> Map<String, Value> {
    let mut out = Map::new();
    let Some(all) = snapshot.as_object() else {
        return out;
    };
    for (name, value) in all {
        let scope = scope_of(name);
        let by_scope = scopes.contains(&scope);
        let by_name = requested.and_then(|r| r.get(name)).is_some()
            && client.scopes.iter().any(|s| s == scope);
        if by_scope || by_name {
            out.insert(name.clone(), value.clone());
        }
    }
    out
}

/// The `sub` a client sees: the account's opaque id, or a pairwise value per client sector.
pub fn subject(state: &AppState, client: &ClientSettings, account_sub: &str) -> String {
    if client.subject_type != "pairwise" {
        return account_sub.to_string();
    }
    let sector = if client.sector_identifier.is_empty() {
        client
            .redirect_uris
            .first()
            .and_then(|u| Url::parse(u).ok())
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| client.client_id.clone())
    } else {
        client.sector_identifier.clone()
    };
    let tag = keyed_tag(
        &state.secrets.pairwise,
        format!("{sector}\u{0}{account_sub}").as_bytes(),
    );
    b64url(&tag[..20])
}

/// The `claims` parameter member for `target` ("userinfo" or "id_token").
pub fn requested<'a>(claims_request: Option<&'a Value>, target: &str) -> Option<&'a Value> {
    claims_request?.get(target).filter(|v| v.is_object())
}
