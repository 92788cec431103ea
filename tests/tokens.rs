//! The token, introspection, revocation and userinfo endpoints as relying parties and resource
//! servers use them: codes, PKCE, client authentication, refresh rotation, bearer errors.
use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;
use crate::on_both_backends;

on_both_backends!(
    code_reuse_is_refused_and_revokes_what_the_code_issued,
    code_expires_after_its_lifetime,
    refresh_rotates_and_reuse_revokes_the_whole_grant,
    private_key_jwt_assertions_are_single_use,
    revoked_access_token_fails_at_userinfo_at_once,
    client_credentials_tokens_are_checked_revoked_and_expire,
);

/// A code (and the request that produced it) for `client_id`, with TARO signed in.
async fn code_for(app: &TestApp, authz: &Authz) -> String {
    app.browser()
        .sign_in(&authz.url(&app.issuer), &TARO, Level::Password)
        .await
        .code()
}

fn assert_no_store(reply: &Reply) {
    assert_eq!(reply.header("cache-control"), Some("no-store"), "{reply:?}");
}

fn assert_invalid_client(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");
    assert_eq!(reply.error(), "invalid_client", "{reply:?}");
    assert!(
        reply.header("www-authenticate").is_some(),
        "401 needs WWW-Authenticate: {reply:?}"
    );
}

async fn code_reuse_is_refused_and_revokes_what_the_code_issued(backend: Backend) {
    let app = TestApp::start(backend).await;
    let authz = Authz::new("rp-basic");
    let code = code_for(&app, &authz).await;
    let first = app.exchange(&authz, &code).await;
    assert_eq!(app.introspect(&first.access_token).await["active"], true);

    let again = app.redeem(&authz, &code).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST, "{again:?}");
    assert_eq!(again.error(), "invalid_grant");
    assert_no_store(&again);

    assert_eq!(
        app.introspect(&first.access_token).await["active"],
        false,
        "a replayed code revokes the tokens it issued"
    );
    assert_eq!(
        app.userinfo(&first.access_token).await.status,
        StatusCode::UNAUTHORIZED
    );
    let refresh = app.refresh("rp-basic", first.refresh()).await;
    assert_eq!(refresh.error(), "invalid_grant", "{refresh:?}");
}

async fn code_expires_after_its_lifetime(backend: Backend) {
    let app = TestApp::start(backend).await;
    let authz = Authz::new("rp-basic");
    let code = code_for(&app, &authz).await;
    app.advance(61);
    let reply = app.redeem(&authz, &code).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.error(), "invalid_grant");

    // Within the lifetime it works.
    let authz = Authz::new("rp-basic");
    let code = code_for(&app, &authz).await;
    app.advance(50);
    app.exchange(&authz, &code).await;
}

async fn refresh_rotates_and_reuse_revokes_the_whole_grant(backend: Backend) {
    let app = TestApp::start(backend).await;
    let first = app.tokens_for("rp-basic", &TARO, Level::Password).await;

    let reply = app.refresh("rp-basic", first.refresh()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_no_store(&reply);
    let second = Tokens::from(reply.json());
    assert_ne!(second.refresh(), first.refresh(), "refresh tokens rotate");
    assert_ne!(second.access_token, first.access_token);
    let (a, b) = (first.id_claims(), second.id_claims());
    assert_eq!(a["sub"], b["sub"]);
    assert_eq!(a["sid"], b["sid"]);
    assert_eq!(a["acr"], b["acr"]);
    assert_eq!(
        a["auth_time"], b["auth_time"],
        "a refresh is not a new authentication"
    );
    assert!(b.get("nonce").is_none() || b["nonce"] == a["nonce"], "{b}");

    // The old refresh token is rejected…
    let reuse = app.refresh("rp-basic", first.refresh()).await;
    assert_eq!(reuse.status, StatusCode::BAD_REQUEST, "{reuse:?}");
    assert_eq!(reuse.error(), "invalid_grant");
    // …and its reuse revokes the grant: the newest tokens die too.
    assert_eq!(app.introspect(&second.access_token).await["active"], false);
    assert_eq!(
        app.userinfo(&second.access_token).await.status,
        StatusCode::UNAUTHORIZED
    );
    let newest = app.refresh("rp-basic", second.refresh()).await;
    assert_eq!(newest.error(), "invalid_grant", "{newest:?}");
}

async fn private_key_jwt_assertions_are_single_use(backend: Backend) {
    let app = TestApp::start(backend).await;
    let assertion = app.client_assertion("jti-once");
    let auth = Auth::Assertion("rp-jwt".into(), assertion);
    let first = app
        .token(&auth, &[("grant_type", "client_credentials")])
        .await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let replay = app
        .token(&auth, &[("grant_type", "client_credentials")])
        .await;
    assert_invalid_client(&replay);
}

async fn revoked_access_token_fails_at_userinfo_at_once(backend: Backend) {
    let app = TestApp::start(backend).await;
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    assert_eq!(
        app.userinfo(&tokens.access_token).await.status,
        StatusCode::OK
    );
    let reply = app
        .revoke(&app.auth("rp-basic"), &tokens.access_token)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let userinfo = app.userinfo(&tokens.access_token).await;
    assert_eq!(userinfo.status, StatusCode::UNAUTHORIZED, "{userinfo:?}");
    assert_eq!(app.introspect(&tokens.access_token).await["active"], false);
}

#[tokio::test]
async fn token_responses_are_not_cached_and_say_bearer() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic");
    let code = code_for(&app, &authz).await;
    let reply = app.redeem(&authz, &code).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_no_store(&reply);
    assert!(reply
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    let body = reply.json();
    assert!(body["token_type"]
        .as_str()
        .is_some_and(|t| t.eq_ignore_ascii_case("bearer")));
    assert!(body["expires_in"].as_i64().is_some_and(|e| e > 0));
    assert!(body["id_token"].is_string() && body["refresh_token"].is_string());
    let error = app
        .token(
            &app.auth("rp-basic"),
            &[("grant_type", "authorization_code"), ("code", "nope")],
        )
        .await;
    assert_eq!(error.error(), "invalid_grant");
    assert_no_store(&error);
}

#[tokio::test]
async fn pkce_verifier_must_match() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic");
    let code = code_for(&app, &authz).await;
    let mut wrong = authz.clone();
    wrong.verifier = Some(format!("{}x", authz.verifier.clone().unwrap()));
    let reply = app.redeem(&wrong, &code).await;
    assert_eq!(reply.error(), "invalid_grant", "{reply:?}");
}

#[tokio::test]
async fn pkce_verifier_is_required_when_a_challenge_was_sent() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic");
    let code = code_for(&app, &authz).await;
    let mut missing = authz.clone();
    missing.verifier = None;
    let reply = app.redeem(&missing, &code).await;
    assert_eq!(reply.error(), "invalid_grant", "{reply:?}");
}

#[tokio::test]
async fn pkce_verifier_without_a_challenge_is_refused() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").without_pkce();
    let code = code_for(&app, &authz).await;
    let mut with_verifier = authz.clone();
    with_verifier.verifier = Some(format!("{}{}", "v".repeat(20), "w".repeat(30)));
    let reply = app.redeem(&with_verifier, &code).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.error(), "invalid_grant");
}

#[tokio::test]
async fn confidential_client_without_pkce_still_works() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").without_pkce();
    let code = code_for(&app, &authz).await;
    app.exchange(&authz, &code).await;
}

#[tokio::test]
async fn code_is_bound_to_its_client_and_redirect_uri() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic");
    let code = code_for(&app, &authz).await;
    let stolen = authz.clone().set("client_id", "rp-other");
    let reply = app.redeem(&stolen, &code).await;
    assert_eq!(reply.error(), "invalid_grant", "{reply:?}");

    let authz = Authz::new("rp-basic");
    let code = code_for(&app, &authz).await;
    let reply = app
        .token(
            &app.auth("rp-basic"),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", "http://127.0.0.1:9999/other"),
                ("code_verifier", authz.verifier.as_deref().unwrap()),
            ],
        )
        .await;
    assert_eq!(reply.error(), "invalid_grant", "{reply:?}");
}

#[tokio::test]
async fn client_secret_basic_is_form_urlencoded() {
    let app = TestApp::sqlite().await;
    // Auth::Basic form-urlencodes id and secret before base64, as RFC 6749 §2.3.1 says.
    let auth = Auth::Basic("rp-symbols".into(), SYMBOL_SECRET.into());
    let reply = app
        .token(&auth, &[("grant_type", "client_credentials")])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    // The code flow with the same client.
    let tokens = app.tokens_for("rp-symbols", &TARO, Level::Password).await;
    assert!(tokens.id_token.is_some());
}

#[tokio::test]
async fn client_secret_post_client() {
    let app = TestApp::sqlite().await;
    let tokens = app.tokens_for("rp-post", &TARO, Level::Password).await;
    let reply = app.refresh("rp-post", tokens.refresh()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
}

#[tokio::test]
async fn private_key_jwt_client() {
    let app = TestApp::sqlite().await;
    let tokens = app.tokens_for("rp-jwt", &TARO, Level::Password).await;
    assert_eq!(
        app.introspect(&tokens.access_token).await["client_id"],
        "rp-jwt"
    );
    let reply = app.refresh("rp-jwt", tokens.refresh()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
}

#[tokio::test]
async fn private_key_jwt_with_a_foreign_key_or_audience_is_refused() {
    let app = TestApp::sqlite().await;
    // Signed by a key the client did not register.
    let other = josekit::jws::ES256.generate_key_pair().unwrap();
    let mut jwk = other.to_jwk_private_key();
    jwk.set_key_id("rp-jwt-key-1");
    let assertion = {
        // Same claims as a good assertion, signed with the foreign key.
        let payload = jwt_payload(&app.client_assertion("jti-foreign"));
        let mut header = josekit::jws::JwsHeader::new();
        header.set_token_type("JWT");
        header.set_key_id("rp-jwt-key-1");
        let payload =
            josekit::jwt::JwtPayload::from_map(payload.as_object().unwrap().clone()).unwrap();
        let signer = josekit::jws::ES256.signer_from_jwk(&jwk).unwrap();
        josekit::jwt::encode_with_signer(&payload, &header, &signer).unwrap()
    };
    let reply = app
        .token(
            &Auth::Assertion("rp-jwt".into(), assertion),
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_invalid_client(&reply);

    // Signed by the right key for another audience.
    let mut payload = josekit::jwt::JwtPayload::new();
    payload.set_issuer("rp-jwt");
    payload.set_subject("rp-jwt");
    payload.set_audience(vec!["https://elsewhere.example/token"]);
    payload.set_jwt_id("jti-audience");
    payload
        .set_claim("exp", Some(json!(app.now() + 60)))
        .unwrap();
    let mut header = josekit::jws::JwsHeader::new();
    header.set_key_id("rp-jwt-key-1");
    let signer = josekit::jws::ES256
        .signer_from_jwk(&app.jwt_private)
        .unwrap();
    let assertion = josekit::jwt::encode_with_signer(&payload, &header, &signer).unwrap();
    let reply = app
        .token(
            &Auth::Assertion("rp-jwt".into(), assertion),
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_invalid_client(&reply);
}

#[tokio::test]
async fn public_client_uses_none_with_pkce() {
    let app = TestApp::sqlite().await;
    let tokens = app.tokens_for("rp-public", &TARO, Level::Password).await;
    assert!(tokens.id_token.is_some());
    let reply = app.refresh("rp-public", tokens.refresh()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
}

#[tokio::test]
async fn each_client_uses_only_its_registered_method() {
    let app = TestApp::sqlite().await;
    let cc = [("grant_type", "client_credentials")];
    // client_secret_basic client presenting its secret in the body.
    let secret = app.secret("rp-basic");
    let reply = app
        .token(&Auth::Post("rp-basic".into(), secret.into()), &cc)
        .await;
    assert_invalid_client(&reply);
    // …or no authentication at all, like a public client.
    let reply = app.token(&Auth::None("rp-basic".into()), &cc).await;
    assert_invalid_client(&reply);
    // client_secret_post client using Basic.
    let secret = app.secret("rp-post");
    let reply = app
        .token(
            &Auth::Basic("rp-post".into(), secret.into()),
            &[("grant_type", "refresh_token"), ("refresh_token", "x")],
        )
        .await;
    assert_invalid_client(&reply);
    // A public client cannot pretend to have a secret.
    let reply = app
        .token(
            &Auth::Basic("rp-public".into(), "anything".into()),
            &[("grant_type", "refresh_token"), ("refresh_token", "x")],
        )
        .await;
    assert_invalid_client(&reply);
    // private_key_jwt client with no assertion.
    let reply = app.token(&Auth::None("rp-jwt".into()), &cc).await;
    assert_invalid_client(&reply);
}

#[tokio::test]
async fn wrong_secret_and_unknown_client_are_invalid_client() {
    let app = TestApp::sqlite().await;
    let cc = [("grant_type", "client_credentials")];
    let reply = app
        .token(&Auth::Basic("rp-basic".into(), "wrong-secret".into()), &cc)
        .await;
    assert_invalid_client(&reply);
    assert_no_store(&reply);
    let reply = app
        .token(&Auth::Basic("rp-nobody".into(), "secret".into()), &cc)
        .await;
    assert_invalid_client(&reply);
    let reply = app.token(&Auth::Nothing, &cc).await;
    assert_invalid_client(&reply);
}

#[tokio::test]
async fn two_authentication_methods_at_once_are_refused() {
    let app = TestApp::sqlite().await;
    let secret = app.secret("rp-basic");
    let reply = app
        .token(
            &Auth::Basic("rp-basic".into(), secret.into()),
            &[
                ("grant_type", "client_credentials"),
                ("client_secret", secret),
            ],
        )
        .await;
    assert!(
        matches!(
            reply.status,
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED
        ),
        "{reply:?}"
    );
    assert!(matches!(
        reply.error().as_str(),
        "invalid_request" | "invalid_client"
    ));
}

#[tokio::test]
async fn client_credentials_without_scope_gives_an_access_token_only() {
    let app = TestApp::sqlite().await;
    let reply = app
        .token(
            &app.auth("rp-basic"),
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_no_store(&reply);
    let body = reply.json();
    assert!(body["access_token"].is_string());
    assert!(body["token_type"]
        .as_str()
        .is_some_and(|t| t.eq_ignore_ascii_case("bearer")));
    assert!(body.get("id_token").is_none(), "{body}");
    assert!(body.get("refresh_token").is_none(), "{body}");
    let introspection = app.introspect(body["access_token"].as_str().unwrap()).await;
    assert_eq!(introspection["active"], true);
    assert_eq!(introspection["client_id"], "rp-basic");
    assert!(introspection.get("sub").is_none() || introspection["sub"] == "rp-basic");
}

/// A client's own token is self-contained: checked by its tag, revocable by its client only,
/// ended by its expiry or by removing the client, never valid at userinfo.
async fn client_credentials_tokens_are_checked_revoked_and_expire(backend: Backend) {
    let app = TestApp::start(backend).await;
    let issue = || async {
        let reply = app
            .token(
                &app.auth("rp-basic"),
                &[("grant_type", "client_credentials"), ("scope", "profile")],
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        reply.json()["access_token"].as_str().unwrap().to_string()
    };
    let (first, second) = (issue().await, issue().await);
    assert_ne!(first, second, "every token is unique");
    let introspection = app.introspect(&first).await;
    assert_eq!(introspection["active"], true, "{introspection}");
    assert_eq!(introspection["scope"], "profile");
    assert_eq!(introspection["token_type"], "Bearer");
    assert!(introspection["exp"].as_i64() > introspection["iat"].as_i64());

    // Altered tokens are unknown tokens.
    let (payload, tag) = first.rsplit_once('.').unwrap();
    let mut forged_payload = payload.to_string();
    let last = forged_payload.pop().unwrap();
    forged_payload.push(if last == 'A' { 'B' } else { 'A' });
    for forged in [
        format!("{forged_payload}.{tag}"),
        format!("{payload}.x{tag}"),
    ] {
        assert_eq!(app.introspect(&forged).await["active"], false, "{forged}");
    }

    // Not a user's token: userinfo refuses it.
    let userinfo = app.userinfo(&first).await;
    assert!(
        matches!(userinfo.status.as_u16(), 401 | 403),
        "{userinfo:?}"
    );

    // Another client's revocation is ignored; the owner's takes effect, for that token only.
    let reply = app.revoke(&app.auth("rp-post"), &first).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(app.introspect(&first).await["active"], true);
    let reply = app.revoke(&app.auth("rp-basic"), &first).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(app.introspect(&first).await["active"], false);
    assert_eq!(app.introspect(&second).await["active"], true);

    // Expiry.
    app.advance(3600 + 1);
    assert_eq!(app.introspect(&second).await["active"], false);
}

#[tokio::test]
async fn client_credentials_scopes() {
    let app = TestApp::sqlite().await;
    let reply = app
        .token(
            &app.auth("rp-basic"),
            &[("grant_type", "client_credentials"), ("scope", "profile")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["scope"], "profile");
    let reply = app
        .token(
            &app.auth("rp-basic"),
            &[("grant_type", "client_credentials"), ("scope", "openid")],
        )
        .await;
    assert_eq!(reply.error(), "invalid_scope", "{reply:?}");
    // A client without the grant.
    let reply = app
        .token(
            &app.auth("rp-post"),
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(reply.error(), "unauthorized_client", "{reply:?}");
}

#[tokio::test]
async fn unknown_and_missing_grant_types() {
    let app = TestApp::sqlite().await;
    let reply = app
        .token(
            &app.auth("rp-basic"),
            &[
                ("grant_type", "password"),
                ("username", "a"),
                ("password", "b"),
            ],
        )
        .await;
    assert_eq!(reply.error(), "unsupported_grant_type", "{reply:?}");
    let reply = app.token(&app.auth("rp-basic"), &[]).await;
    assert_eq!(reply.error(), "invalid_request", "{reply:?}");
}

#[tokio::test]
async fn token_endpoint_refuses_json_bodies() {
    let app = TestApp::sqlite().await;
    let reply = app
        .http
        .post(app.url("/token"))
        .basic_auth("rp-basic", Some(app.secret("rp-basic")))
        .header("content-type", "application/json")
        .body(json!({ "grant_type": "client_credentials" }).to_string())
        .send()
        .await
        .unwrap();
    let reply = Reply::from(reply, None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.error(), "invalid_request");
}

#[tokio::test]
async fn token_endpoint_refuses_duplicate_parameters() {
    let app = TestApp::sqlite().await;
    let reply = app
        .token(
            &app.auth("rp-basic"),
            &[
                ("grant_type", "client_credentials"),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.error(), "invalid_request");
}

#[tokio::test]
async fn get_on_the_token_endpoint_is_not_a_server_error() {
    let app = TestApp::sqlite().await;
    let reply = app.get("/token").await;
    assert!(reply.status.is_client_error(), "{reply:?}");
}

#[tokio::test]
async fn refresh_scope_can_narrow_but_not_widen() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").set("scope", "openid profile");
    let tokens = app
        .tokens_with(&app.browser(), authz, &TARO, Level::Password)
        .await;
    let reply = app
        .token(
            &app.auth("rp-basic"),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", tokens.refresh()),
                ("scope", "openid profile email"),
            ],
        )
        .await;
    assert_eq!(reply.error(), "invalid_scope", "{reply:?}");

    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let reply = app
        .token(
            &app.auth("rp-basic"),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", tokens.refresh()),
                ("scope", "openid"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let narrowed = Tokens::from(reply.json());
    let userinfo = app.userinfo(&narrowed.access_token).await.json();
    assert!(userinfo.get("name").is_none(), "{userinfo}");
}

#[tokio::test]
async fn refresh_token_is_bound_to_its_client() {
    let app = TestApp::sqlite().await;
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let reply = app.refresh("rp-other", tokens.refresh()).await;
    assert_eq!(reply.error(), "invalid_grant", "{reply:?}");
}

#[tokio::test]
async fn offline_access_is_granted_to_clients_that_may_use_it() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").set("scope", "openid offline_access");
    let tokens = app
        .tokens_with(&app.browser(), authz, &TARO, Level::Password)
        .await;
    let scope = tokens.body["scope"].as_str().unwrap_or_default();
    assert!(scope.split(' ').any(|s| s == "offline_access"), "{scope}");

    // rp-step requires the second password and is not configured for offline access.
    let authz = Authz::new("rp-step").set("scope", "openid offline_access");
    let tokens = app
        .tokens_with(&app.browser(), authz, &TARO, Level::SecondPassword)
        .await;
    let scope = tokens.body["scope"].as_str().unwrap_or_default();
    assert!(!scope.split(' ').any(|s| s == "offline_access"), "{scope}");
}

#[tokio::test]
async fn introspection_reports_the_active_fields() {
    let app = TestApp::sqlite().await;
    let login_time = app.now();
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let sub = tokens.id_claims()["sub"].clone();
    let reply = app
        .introspect_as(&app.auth("rp-basic"), &tokens.access_token)
        .await;
    assert_no_store(&reply);
    let body = reply.json();
    assert_eq!(body["active"], true);
    assert_eq!(body["client_id"], "rp-basic");
    assert_eq!(body["sub"], sub);
    assert_eq!(body["scope"], "openid profile email student");
    assert!(body["exp"].as_i64().is_some_and(|e| e > app.now()));
    assert_eq!(body["acr"], ACR_PASSWORD);
    assert_eq!(body["auth_time"], json!(login_time));

    // Any authenticated confidential client may introspect.
    let other = app
        .introspect_as(&app.auth("rp-other"), &tokens.access_token)
        .await;
    assert_eq!(other.json()["active"], true);

    // Refresh tokens too.
    let reply = app
        .introspect_as(&app.auth("rp-basic"), tokens.refresh())
        .await;
    assert_eq!(reply.json()["active"], true);

    // Unknown and expired tokens are just inactive.
    assert_eq!(
        app.introspect("no-such-token").await,
        json!({ "active": false })
    );
    app.advance(11 * 60);
    assert_eq!(app.introspect(&tokens.access_token).await["active"], false);
}

#[tokio::test]
async fn public_clients_may_not_introspect() {
    let app = TestApp::sqlite().await;
    let tokens = app.tokens_for("rp-public", &TARO, Level::Password).await;
    let reply = app
        .introspect_as(&Auth::None("rp-public".into()), &tokens.access_token)
        .await;
    assert_invalid_client(&reply);
    let reply = app
        .introspect_as(&Auth::Nothing, &tokens.access_token)
        .await;
    assert_invalid_client(&reply);
}

#[tokio::test]
async fn revocation_of_unknown_and_foreign_tokens_is_a_quiet_200() {
    let app = TestApp::sqlite().await;
    let reply = app.revoke(&app.auth("rp-basic"), "no-such-token").await;
    assert_eq!(reply.status, StatusCode::OK, "RFC 7009 §2.2: {reply:?}");
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let reply = app
        .revoke(&app.auth("rp-other"), &tokens.access_token)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        app.introspect(&tokens.access_token).await["active"],
        true,
        "another client cannot revoke it"
    );
    let reply = app.revoke(&Auth::Nothing, &tokens.access_token).await;
    assert_invalid_client(&reply);
}

#[tokio::test]
async fn revoking_a_refresh_token_ends_its_grant() {
    let app = TestApp::sqlite().await;
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let reply = app.revoke(&app.auth("rp-basic"), tokens.refresh()).await;
    assert_eq!(reply.status, StatusCode::OK);
    let refresh = app.refresh("rp-basic", tokens.refresh()).await;
    assert_eq!(refresh.error(), "invalid_grant", "{refresh:?}");
    assert_eq!(app.introspect(&tokens.access_token).await["active"], false);
}

#[tokio::test]
async fn userinfo_accepts_the_header_and_the_form_body() {
    let app = TestApp::sqlite().await;
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let sub = tokens.id_claims()["sub"].clone();

    let get = app.userinfo(&tokens.access_token).await;
    assert_eq!(get.status, StatusCode::OK, "{get:?}");
    assert_eq!(get.json()["sub"], sub);

    let post_header = app
        .http
        .post(app.url("/userinfo"))
        .bearer_auth(&tokens.access_token)
        .send()
        .await
        .unwrap();
    let post_header = Reply::from(post_header, None).await;
    assert_eq!(post_header.status, StatusCode::OK, "{post_header:?}");
    assert_eq!(post_header.json()["sub"], sub);

    let post_form = app
        .http
        .post(app.url("/userinfo"))
        .form(&[("access_token", tokens.access_token.as_str())])
        .send()
        .await
        .unwrap();
    let post_form = Reply::from(post_form, None).await;
    assert_eq!(post_form.status, StatusCode::OK, "{post_form:?}");
    assert_eq!(post_form.json()["sub"], sub);
}

#[tokio::test]
async fn userinfo_without_or_with_a_bad_token_is_401_bearer() {
    let app = TestApp::sqlite().await;
    let missing = app.get("/userinfo").await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED, "{missing:?}");
    assert!(
        missing
            .header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer")),
        "{missing:?}"
    );
    let invalid = app.userinfo("not-a-token").await;
    assert_eq!(invalid.status, StatusCode::UNAUTHORIZED, "{invalid:?}");
    let challenge = invalid.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");

    // An expired token.
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    app.advance(11 * 60);
    let expired = app.userinfo(&tokens.access_token).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED, "{expired:?}");

    // A client_credentials token has no user behind it.
    let cc = app
        .token(
            &app.auth("rp-basic"),
            &[("grant_type", "client_credentials")],
        )
        .await
        .json();
    let reply = app.userinfo(cc["access_token"].as_str().unwrap()).await;
    assert!(
        matches!(
            reply.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ),
        "{reply:?}"
    );
    assert!(reply
        .header("www-authenticate")
        .is_some_and(|h| h.starts_with("Bearer")));
}

#[tokio::test]
async fn userinfo_refuses_a_token_sent_twice() {
    let app = TestApp::sqlite().await;
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let reply = app
        .http
        .post(app.url("/userinfo"))
        .bearer_auth(&tokens.access_token)
        .form(&[("access_token", tokens.access_token.as_str())])
        .send()
        .await
        .unwrap();
    let reply = Reply::from(reply, None).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "RFC 6750 §2: one method only: {reply:?}"
    );
}

#[tokio::test]
async fn form_content_type_with_a_charset_is_a_form() {
    let app = TestApp::sqlite().await;
    let reply = app
        .http
        .post(app.url("/token"))
        .basic_auth("rp-basic", Some(app.secret("rp-basic")))
        .header(
            "content-type",
            "application/x-www-form-urlencoded; charset=UTF-8",
        )
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    let reply = Reply::from(reply, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
}

#[tokio::test]
async fn rotated_refresh_token_is_inactive_at_introspection() {
    let app = TestApp::sqlite().await;
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let reply = app.refresh("rp-basic", tokens.refresh()).await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = app
        .introspect_as(&app.auth("rp-basic"), tokens.refresh())
        .await;
    assert_eq!(reply.json()["active"], false);
}

on_both_backends!(
    concurrent_code_exchanges_give_one_token_set,
    concurrent_code_replay_revokes_what_the_code_issued,
);

/// Redeems one fresh code with `n` concurrent requests; the winners' tokens and the losers' errors.
async fn race_one_code(app: &std::sync::Arc<TestApp>, n: usize) -> (Vec<Tokens>, Vec<String>) {
    let authz = Authz::new("rp-basic");
    let code = code_for(app, &authz).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (app, authz, code, barrier) =
            (app.clone(), authz.clone(), code.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            app.redeem(&authz, &code).await
        });
    }
    let (mut winners, mut errors) = (Vec::new(), Vec::new());
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.unwrap();
        match reply.status {
            StatusCode::OK => winners.push(Tokens::from(reply.json())),
            _ => errors.push(reply.error()),
        }
    }
    (winners, errors)
}

async fn concurrent_code_exchanges_give_one_token_set(backend: Backend) {
    let app = std::sync::Arc::new(TestApp::start(backend).await);
    let (winners, errors) = race_one_code(&app, 8).await;
    assert_eq!(
        winners.len(),
        1,
        "exactly one exchange succeeds: {errors:?}"
    );
    assert!(errors.iter().all(|e| e == "invalid_grant"), "{errors:?}");
}

async fn concurrent_code_replay_revokes_what_the_code_issued(backend: Backend) {
    let app = std::sync::Arc::new(TestApp::start(backend).await);
    for round in 0..10 {
        let (winners, _) = race_one_code(&app, 8).await;
        assert_eq!(winners.len(), 1);
        // Seven replays of a used code: what the code issued must be revoked.
        assert_eq!(
            app.introspect(&winners[0].access_token).await["active"],
            false,
            "round {round}: a replay that raced the first exchange left its tokens active"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_count_as_reuse() {
    let app = std::sync::Arc::new(TestApp::sqlite().await);
    let tokens = app.tokens_for("rp-basic", &TARO, Level::Password).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (app, refresh) = (app.clone(), tokens.refresh().to_string());
        tasks.spawn(async move { app.refresh("rp-basic", &refresh).await });
    }
    let mut winners = Vec::new();
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.unwrap();
        if reply.status == StatusCode::OK {
            winners.push(Tokens::from(reply.json()));
        } else {
            assert_eq!(reply.error(), "invalid_grant", "{reply:?}");
        }
    }
    assert_eq!(winners.len(), 1, "one refresh wins");
    let winner = &winners[0];
    assert_eq!(app.introspect(&winner.access_token).await["active"], false);
    assert_eq!(
        app.refresh("rp-basic", winner.refresh()).await.error(),
        "invalid_grant"
    );
}

#[tokio::test]
async fn offline_grants_last_the_refresh_token_lifetime() {
    let app = TestApp::sqlite().await;
    let authz = Authz::new("rp-basic").set("scope", "openid offline_access");
    let tokens = app
        .tokens_with(&app.browser(), authz, &TARO, Level::Password)
        .await;
    app.advance(29 * 86_400);
    let reply = app.refresh("rp-basic", tokens.refresh()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let rotated = Tokens::from(reply.json());
    assert_eq!(
        app.userinfo(&rotated.access_token).await.status,
        StatusCode::OK
    );
    app.advance(2 * 86_400);
    let reply = app.refresh("rp-basic", rotated.refresh()).await;
    assert_eq!(
        reply.error(),
        "invalid_grant",
        "30 days after the login: {reply:?}"
    );
}
