//! Signing key rotation without downtime: a rotated key is published at once and signs only after
//! its delay (`--now`: at once); the old key stays in JWKS until its tokens have expired and is
//! kept afterwards to check expired `id_token_hint`s.
use std::collections::HashSet;
use std::sync::Arc;

use nidan::keys::KeySet;
use reqwest::StatusCode;
use serde_json::{json, Map, Value};

use crate::common::*;

fn kids(jwks: &[u8]) -> HashSet<String> {
    let jwks: Value = serde_json::from_slice(jwks).unwrap();
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

fn sample_claims(app: &TestApp) -> Map<String, Value> {
    json!({ "iss": app.issuer, "sub": "x", "aud": "rp-basic", "iat": app.now() })
        .as_object()
        .unwrap()
        .clone()
}

fn signing_kid(keys: &KeySet, app: &TestApp, alg: &str) -> String {
    let jwt = keys.sign(alg, "JWT", sample_claims(app)).unwrap();
    let header = jwt_header(&jwt);
    assert_eq!(header["alg"], alg);
    header["kid"].as_str().unwrap().to_string()
}

/// Loads the keys at the app's clock and makes the running server use them (as its 30-second
/// refresh would).
async fn reload(app: &TestApp) -> Arc<KeySet> {
    let state = &app.server.state;
    let keys = Arc::new(
        KeySet::load(&state.store, &state.kek, app.now())
            .await
            .unwrap(),
    );
    *state.keys.write().unwrap() = keys.clone();
    keys
}

#[tokio::test]
async fn rotation_publishes_the_new_key_first_and_signs_with_it_after_the_delay() {
    let app = TestApp::sqlite().await;
    let state = &app.server.state;
    let before = reload(&app).await;
    let old_kid = signing_kid(&before, &app, "RS256");

    let delay = 24 * 3600;
    let lifetime = 15 * 60;
    let new = nidan::keys::rotate(
        &state.store,
        &state.kek,
        "RS256",
        app.now(),
        delay,
        lifetime,
    )
    .await
    .unwrap();
    assert_ne!(new.kid, old_kid);

    let keys = reload(&app).await;
    let published = kids(&keys.jwks);
    assert!(
        published.contains(&old_kid) && published.contains(&new.kid),
        "{published:?}"
    );
    assert_eq!(
        signing_kid(&keys, &app, "RS256"),
        old_kid,
        "still the old key"
    );

    // Relying parties see both keys, and tokens still verify.
    let jwks = app.get("/jwks").await;
    assert_eq!(jwks.status, StatusCode::OK);
    assert!(kids(jwks.body.as_bytes()).contains(&new.kid));
    let rp = app.rp("rp-basic").await;
    let started = rp.start(&[], &[]);
    let reply = app
        .browser()
        .sign_in(&started.url, &TARO, Level::Password)
        .await;
    let tokens = rp.exchange(&reply.code(), started.verifier).await;
    rp.verify(&tokens, &started.nonce, "RS256");
    use openidconnect::TokenResponse;
    let id_token = tokens.id_token().unwrap().to_string();
    assert_eq!(jwt_header(&id_token)["kid"], old_kid.as_str());

    // After the delay the new key signs; the old one is still published for its tokens.
    app.advance(delay + 1);
    let keys = reload(&app).await;
    assert_eq!(signing_kid(&keys, &app, "RS256"), new.kid);
    assert!(kids(&keys.jwks).contains(&old_kid));

    // Once every token it signed has expired, the old key leaves JWKS but still checks hints.
    app.advance(lifetime + 1);
    let keys = reload(&app).await;
    assert!(!kids(&keys.jwks).contains(&old_kid));
    assert!(kids(&keys.jwks).contains(&new.kid));
    assert!(
        keys.verify_own(&id_token).is_some(),
        "expired id_token_hints still verify"
    );
    // Other algorithms were not touched.
    assert_eq!(
        signing_kid(&keys, &app, "ES256"),
        signing_kid(&before, &app, "ES256")
    );
}

#[tokio::test]
async fn rotation_now_signs_with_the_new_key_at_once() {
    let app = TestApp::sqlite().await;
    let state = &app.server.state;
    let before = reload(&app).await;
    let old_kid = signing_kid(&before, &app, "EdDSA");
    // A second later than the first key (keys of the same second tie on active_from).
    app.advance(1);
    let new = nidan::keys::rotate(&state.store, &state.kek, "EdDSA", app.now(), 0, 900)
        .await
        .unwrap();
    let keys = reload(&app).await;
    assert_eq!(signing_kid(&keys, &app, "EdDSA"), new.kid);
    assert!(
        kids(&keys.jwks).contains(&old_kid),
        "the old key stays for its tokens"
    );

    // An EdDSA client now gets ID tokens from the new key that verify against JWKS.
    let rp = app.rp("rp-eddsa").await;
    let started = rp.start(&[], &[]);
    let reply = app
        .browser()
        .sign_in(&started.url, &TARO, Level::Password)
        .await;
    let tokens = rp.exchange(&reply.code(), started.verifier).await;
    rp.verify(&tokens, &started.nonce, "EdDSA");
    use openidconnect::TokenResponse;
    let id_token = tokens.id_token().unwrap().to_string();
    assert_eq!(jwt_header(&id_token)["kid"], new.kid.as_str());
}

#[tokio::test]
async fn a_restarted_server_keeps_its_keys() {
    let app = TestApp::sqlite().await;
    let first = reload(&app).await;
    let rows = app.store().list_signing_keys().await.unwrap();
    assert_eq!(rows.len(), 3, "one key per algorithm at first start");
    nidan::keys::ensure_keys(app.store(), &app.server.state.kek, app.now())
        .await
        .unwrap();
    assert_eq!(app.store().list_signing_keys().await.unwrap().len(), 3);
    for row in &rows {
        assert!(
            !row.private_jwk_encrypted.contains("\"d\""),
            "private keys are encrypted at rest"
        );
    }
    let again = reload(&app).await;
    assert_eq!(kids(&first.jwks), kids(&again.jwks));
}

#[tokio::test]
async fn rotation_now_always_signs_with_the_newest_key() {
    let app = TestApp::sqlite().await;
    let state = &app.server.state;
    for round in 0..6 {
        let new = nidan::keys::rotate(&state.store, &state.kek, "RS256", app.now(), 0, 900)
            .await
            .unwrap();
        let keys = reload(&app).await;
        assert_eq!(
            signing_kid(&keys, &app, "RS256"),
            new.kid,
            "round {round}: the key rotated in with --now signs"
        );
    }
}
