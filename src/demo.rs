//! The demo relying party of the embedded default (`/demo`): it starts a login at either level
//! and shows the ID token claims and userinfo it received, using the `openidconnect` crate exactly
//! as a real relying party would, over HTTP to this same server.
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use minijinja::context;
use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreProviderMetadata, CoreUserInfoClaims,
};
use openidconnect::{
    AuthenticationContextClass, AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl,
    LanguageTag, Nonce, OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl,
    Scope, TokenResponse,
};
use serde::{Deserialize, Serialize};

use crate::app::{see_other, AppState, Secrets};
use crate::auth::csrf::Browser;
use crate::auth::session::{read_cookie, set_cookie};
use crate::clock::{random_token, Timestamp};
use crate::config::{ClientSettings, Config, ACR_PASSWORD, ACR_SECOND_PASSWORD};
use crate::crypto::{b64url, b64url_decode};
use crate::error::PageError;
use crate::store::DynStore;

pub const DEMO_CLIENT_ID: &str = "demo";
const DEMO_COOKIE: &str = "nidan_demo";

pub struct DemoClient {
    pub client_id: String,
    pub secret: String,
    pub redirect_uri: String,
}

/// Registers the demo client with a fresh secret (kept in memory; development only).
pub async fn register(
    store: &DynStore,
    config: &Config,
    secrets: &Secrets,
    now: Timestamp,
) -> anyhow::Result<DemoClient> {
    let secret = random_token();
    let redirect_uri = format!("{}/demo/callback", config.issuer);
    let settings = ClientSettings {
        client_id: DEMO_CLIENT_ID.into(),
        client_name: "nidan demo relying party".into(),
        redirect_uris: vec![redirect_uri.clone()],
        post_logout_redirect_uris: vec![format!("{}/demo", config.issuer)],
        token_endpoint_auth_method: "client_secret_basic".into(),
        grant_types: vec!["authorization_code".into(), "refresh_token".into()],
        scopes: vec![
            "openid".into(),
            "profile".into(),
            "email".into(),
            "student".into(),
        ],
        ..ClientSettings::default()
    };
    let digest = crate::oidc::clients::secret_digest(&secrets.client_secret, &secret);
    store
        .put_client(&crate::app::client_row(
            &settings,
            Some(digest),
            "demo",
            now,
        )?)
        .await?;
    Ok(DemoClient {
        client_id: DEMO_CLIENT_ID.into(),
        secret,
        redirect_uri,
    })
}

pub fn print_banner(state: &AppState) {
    let issuer = &state.config.issuer;
    println!();
    println!("  nidan development instance: {issuer}");
    println!("  demo relying party:        {issuer}/demo");
    println!("  local mailbox:             {issuer}/dev/mail");
    println!("  demo students (user ID / university password):");
    for (username, password, _) in crate::directory::file::demo_students() {
        println!("    {username} / {password}");
    }
    println!();
}

#[derive(Serialize, Deserialize)]
struct Pending {
    state: String,
    nonce: String,
    verifier: String,
    /// The demo page's language, asked of the login pages (`ui_locales`) and kept for the result.
    #[serde(default)]
    lang: Option<String>,
}

async fn oidc_client(
    state: &AppState,
) -> anyhow::Result<(
    CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    >,
    reqwest::Client,
)> {
    let demo = state
        .demo
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("demo disabled"))?;
    let http = state.http.clone();
    let metadata =
        CoreProviderMetadata::discover_async(IssuerUrl::new(state.config.issuer.clone())?, &http)
            .await?;
    let client = CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(demo.client_id.clone()),
        Some(ClientSecret::new(demo.secret.clone())),
    )
    .set_redirect_uri(RedirectUrl::new(demo.redirect_uri.clone())?);
    Ok((client, http))
}

#[derive(Deserialize)]
pub struct StartQuery {
    level: Option<String>,
    lang: Option<String>,
}

#[derive(Deserialize)]
pub struct PageQuery {
    lang: Option<String>,
}

pub async fn demo_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Result<Response, PageError> {
    render(&state, &headers, query.lang.as_deref(), None, None)
}

fn render(
    state: &AppState,
    headers: &HeaderMap,
    lang: Option<&str>,
    result: Option<minijinja::Value>,
    error: Option<String>,
) -> Result<Response, PageError> {
    let browser = Browser::from_headers(state, headers);
    let locale = state.locale_for(headers, lang, None);
    let lang = locale.as_str();
    let ctx = context! {
        start_password_url => format!("/demo/start?level=password&lang={lang}"),
        start_second_password_url => format!("/demo/start?level=second-password&lang={lang}"),
        result => result,
        error => error,
    };
    state.page(locale, "demo.html", ctx, &browser, headers)
}

pub async fn demo_start(
    State(state): State<AppState>,
    Query(query): Query<StartQuery>,
) -> Result<Response, PageError> {
    let (client, _) = oidc_client(&state).await?;
    let acr = if query.level.as_deref() == Some("second-password") {
        ACR_SECOND_PASSWORD
    } else {
        ACR_PASSWORD
    };
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let url = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scope(Scope::new("profile".into()))
        .add_scope(Scope::new("email".into()))
        .add_scope(Scope::new("student".into()))
        .add_auth_context_value(AuthenticationContextClass::new(acr.into()))
        .set_pkce_challenge(challenge);
    let lang = query
        .lang
        .as_deref()
        .and_then(crate::ui::Locale::parse)
        .map(|l| l.as_str().to_string());
    let (url, csrf, nonce) = match &lang {
        Some(lang) => url.add_ui_locale(LanguageTag::new(lang.clone())).url(),
        None => url.url(),
    };
    let pending = Pending {
        state: csrf.secret().clone(),
        nonce: nonce.secret().clone(),
        verifier: verifier.secret().clone(),
        lang,
    };
    let cookie = b64url(&serde_json::to_vec(&pending).map_err(anyhow::Error::from)?);
    let mut response = see_other(url.as_str());
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, DEMO_COOKIE, &cookie, Some(3600)),
    );
    Ok(response)
}

#[derive(Deserialize)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

pub async fn demo_callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(callback): Query<Callback>,
) -> Result<Response, PageError> {
    if let Some(error) = callback.error {
        let text = format!(
            "{error}: {}",
            callback.error_description.unwrap_or_default()
        );
        return render(&state, &headers, None, None, Some(text));
    }
    let pending: Option<Pending> = read_cookie(
        &headers,
        &crate::auth::session::cookie_name(&state, DEMO_COOKIE),
    )
    .and_then(|c| b64url_decode(&c))
    .and_then(|b| serde_json::from_slice(&b).ok());
    let Some(pending) = pending.filter(|p| Some(&p.state) == callback.state.as_ref()) else {
        return render(
            &state,
            &headers,
            None,
            None,
            Some("state mismatch: start again".into()),
        );
    };
    let lang = pending.lang.clone();
    let lang = lang.as_deref();
    match exchange(&state, pending, callback.code.unwrap_or_default()).await {
        Ok(result) => render(&state, &headers, lang, Some(result), None),
        Err(e) => render(&state, &headers, lang, None, Some(format!("{e:#}"))),
    }
}

async fn exchange(
    state: &AppState,
    pending: Pending,
    code: String,
) -> anyhow::Result<minijinja::Value> {
    let (client, http) = oidc_client(state).await?;
    let tokens = client
        .exchange_code(AuthorizationCode::new(code))?
        .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier))
        .request_async(&http)
        .await?;
    let id_token = tokens
        .id_token()
        .ok_or_else(|| anyhow::anyhow!("no ID token"))?;
    let claims = id_token.claims(&client.id_token_verifier(), &Nonce::new(pending.nonce))?;
    let acr = claims
        .auth_context_ref()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // Show every claim as sent (the typed claims drop nidan's own, such as student_id).
    let raw_claims: serde_json::Value = id_token
        .to_string()
        .split('.')
        .nth(1)
        .and_then(b64url_decode)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let claims_json = serde_json::to_string_pretty(&raw_claims)?;
    // The typed request checks the response; the raw one shows everything in it.
    let _: CoreUserInfoClaims = client
        .user_info(tokens.access_token().clone(), None)?
        .request_async(&http)
        .await?;
    let userinfo: serde_json::Value = http
        .get(format!("{}/userinfo", state.config.issuer))
        .bearer_auth(tokens.access_token().secret())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(context! {
        acr => acr,
        id_token_claims => claims_json,
        userinfo => serde_json::to_string_pretty(&userinfo)?,
    })
}
