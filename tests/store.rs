//! The `Store` trait on both backends: accounts keyed on the directory id, single-use values
//! redeemed exactly once under concurrency, sessions, grants and signing keys.
use std::sync::Arc;

use nidan::clock::{random_id, random_token, Clock, SystemClock};
use nidan::store::{
    AccessToken, AuthorizationCode, BrowserSession, ClientRow, DynStore, Grant, LoginTransaction,
    Redeemed, RefreshToken, SigningKeyRow,
};

use crate::common::*;
use crate::on_both_backends;

on_both_backends!(
    accounts_are_keyed_on_the_directory_id,
    code_is_redeemed_exactly_once_under_concurrency,
    refresh_token_is_redeemed_exactly_once_under_concurrency,
    assertion_ids_are_single_use,
    sessions_update_and_end,
    login_transactions_complete_once,
    grants_revoke_by_session_and_offline_grants_survive,
    signing_keys_retire,
    clients_round_trip,
);

const CONCURRENT: usize = 16;

fn now() -> i64 {
    SystemClock.now()
}

async fn account(store: &DynStore, directory_id: &str) -> nidan::store::Account {
    store
        .upsert_account(
            directory_id,
            directory_id,
            "{}",
            &random_id(),
            &random_token(),
            now(),
        )
        .await
        .unwrap()
}

fn session_row(account_id: &str, t: i64) -> BrowserSession {
    BrowserSession {
        id: random_id(),
        cookie_digest: random_token(),
        account_id: account_id.into(),
        sid: random_id(),
        created_at: t,
        last_seen_at: t,
        expires_at: t + 8 * 3600,
        password_at: t,
        second_password_at: None,
        university_password_hash: None,
        university_password_hash_until: None,
        ended_at: None,
    }
}

fn grant_row(account_id: &str, session_id: &str, offline: bool, t: i64) -> Grant {
    Grant {
        id: random_id(),
        client_id: "rp".into(),
        account_id: Some(account_id.into()),
        session_id: Some(session_id.into()),
        sid: Some("sid".into()),
        scope: "openid".into(),
        claims_request: None,
        acr: Some(ACR_PASSWORD.into()),
        auth_time: Some(t),
        claims: "{}".into(),
        offline: i64::from(offline),
        created_at: t,
        expires_at: t + 3600,
        revoked_at: None,
    }
}

async fn accounts_are_keyed_on_the_directory_id(backend: Backend) {
    let (store, _guard) = bare_store(backend).await;
    let t = now();
    let first = store
        .upsert_account("uuid-1", "s2401001", r#"{"name":"A"}"#, "id-1", "sub-1", t)
        .await
        .unwrap();
    assert_eq!((first.id.as_str(), first.sub.as_str()), ("id-1", "sub-1"));

    // Renamed in the directory: same account, same sub, new user ID and claims.
    let renamed = store
        .upsert_account(
            "uuid-1",
            "s2401999",
            r#"{"name":"B"}"#,
            "id-x",
            "sub-x",
            t + 10,
        )
        .await
        .unwrap();
    assert_eq!(renamed.id, "id-1");
    assert_eq!(renamed.sub, "sub-1");
    assert_eq!(renamed.username, "s2401999");
    assert_eq!(renamed.claims, r#"{"name":"B"}"#);
    assert_eq!(renamed.created_at, t);
    assert_eq!(renamed.updated_at, t + 10);

    // A recycled user ID with another directory id is another student.
    let recycled = store
        .upsert_account("uuid-2", "s2401999", "{}", "id-2", "sub-2", t + 20)
        .await
        .unwrap();
    assert_eq!(recycled.id, "id-2");
    assert_eq!(recycled.sub, "sub-2");
    assert!(recycled.second_password_hash.is_none() && recycled.email.is_none());

    let by_name = store.find_accounts_by_username("s2401999").await.unwrap();
    let ids: Vec<&str> = by_name.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["id-1", "id-2"]);
    assert!(store.get_account("id-1").await.unwrap().is_some());
    assert!(store.get_account("nope").await.unwrap().is_none());
}

async fn code_is_redeemed_exactly_once_under_concurrency(backend: Backend) {
    let (store, _guard) = bare_store(backend).await;
    let t = now();
    let account = account(&store, "uuid-code").await;
    let session = session_row(&account.id, t);
    store.insert_session(&session).await.unwrap();
    let digest = random_token();
    store
        .insert_code(&AuthorizationCode {
            digest: digest.clone(),
            client_id: "rp".into(),
            account_id: account.id.clone(),
            session_id: session.id.clone(),
            sid: session.sid.clone(),
            redirect_uri: REDIRECT_URI.into(),
            scope: "openid".into(),
            claims_request: None,
            nonce: Some("n".into()),
            code_challenge: None,
            acr: ACR_PASSWORD.into(),
            auth_time: t,
            claims: "{}".into(),
            created_at: t,
            expires_at: t + 60,
            consumed_at: None,
            grant_id: None,
            replayed_at: None,
        })
        .await
        .unwrap();

    let barrier = Arc::new(tokio::sync::Barrier::new(CONCURRENT));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT {
        let (store, digest, barrier) = (store.clone(), digest.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            store.redeem_code(&digest, "rp", "grant-1", t + 1).await
        });
    }
    let (mut fresh, mut used) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result
            .unwrap()
            .expect("no database error under concurrency")
        {
            Redeemed::Fresh(code) => {
                fresh += 1;
                assert_eq!(code.consumed_at, Some(t + 1));
                assert_eq!(code.nonce.as_deref(), Some("n"));
            }
            Redeemed::AlreadyUsed(code) => {
                used += 1;
                assert!(code.consumed_at.is_some());
            }
            Redeemed::NotFound => panic!("the code exists"),
        }
    }
    assert_eq!((fresh, used), (1, CONCURRENT - 1));

    match store
        .redeem_code(&digest, "rp", "grant-2", t + 2)
        .await
        .unwrap()
    {
        Redeemed::AlreadyUsed(code) => assert_eq!(code.grant_id.as_deref(), Some("grant-1")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store
            .redeem_code("unknown", "rp", "grant-3", t)
            .await
            .unwrap(),
        Redeemed::NotFound
    ));
}

async fn refresh_token_is_redeemed_exactly_once_under_concurrency(backend: Backend) {
    let (store, _guard) = bare_store(backend).await;
    let t = now();
    let account = account(&store, "uuid-refresh").await;
    let grant = grant_row(&account.id, "s", false, t);
    store.insert_grant(&grant).await.unwrap();
    let digest = random_token();
    store
        .insert_refresh_token(&RefreshToken {
            digest: digest.clone(),
            grant_id: grant.id.clone(),
            scope: "openid".into(),
            created_at: t,
            expires_at: t + 3600,
            consumed_at: None,
            revoked_at: None,
        })
        .await
        .unwrap();

    let barrier = Arc::new(tokio::sync::Barrier::new(CONCURRENT));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT {
        let (store, digest, barrier) = (store.clone(), digest.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            store.redeem_refresh_token(&digest, "rp", t + 1).await
        });
    }
    let (mut fresh, mut used) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result
            .unwrap()
            .expect("no database error under concurrency")
        {
            Redeemed::Fresh(token) => {
                fresh += 1;
                assert_eq!(token.grant_id, grant.id);
            }
            Redeemed::AlreadyUsed(_) => used += 1,
            Redeemed::NotFound => panic!("the token exists"),
        }
    }
    assert_eq!((fresh, used), (1, CONCURRENT - 1));
    let stored = store.find_refresh_token(&digest).await.unwrap().unwrap();
    assert_eq!(stored.consumed_at, Some(t + 1));
    assert!(matches!(
        store
            .redeem_refresh_token("unknown", "rp", t)
            .await
            .unwrap(),
        Redeemed::NotFound
    ));
}

async fn assertion_ids_are_single_use(backend: Backend) {
    let (store, _guard) = bare_store(backend).await;
    let t = now();
    assert!(store.record_assertion("jti-1", t + 120).await.unwrap());
    assert!(!store.record_assertion("jti-1", t + 120).await.unwrap());
    assert!(store.record_assertion("jti-2", t + 120).await.unwrap());

    let barrier = Arc::new(tokio::sync::Barrier::new(CONCURRENT));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            store.record_assertion("jti-race", t + 120).await
        });
    }
    let mut firsts = 0;
    while let Some(result) = tasks.join_next().await {
        if result
            .unwrap()
            .expect("no database error under concurrency")
        {
            firsts += 1;
        }
    }
    assert_eq!(firsts, 1);
}

async fn sessions_update_and_end(backend: Backend) {
    let (store, _guard) = bare_store(backend).await;
    let t = now();
    let account = account(&store, "uuid-session").await;
    let mut session = session_row(&account.id, t);
    store.insert_session(&session).await.unwrap();
    let found = store
        .find_session_by_cookie(&session.cookie_digest)
        .await
        .unwrap()
        .expect("found by cookie digest");
    assert_eq!(found.id, session.id);

    // A step-up: new cookie, second password time.
    let old_cookie = session.cookie_digest.clone();
    session.cookie_digest = random_token();
    session.second_password_at = Some(t + 5);
    session.last_seen_at = t + 5;
    session.university_password_hash = Some("$argon2id$x".into());
    session.university_password_hash_until = Some(t + 900);
    store.update_session(&session).await.unwrap();
    assert!(store
        .find_session_by_cookie(&old_cookie)
        .await
        .unwrap()
        .is_none());
    let updated = store.get_session(&session.id).await.unwrap().unwrap();
    assert_eq!(updated.cookie_digest, session.cookie_digest);
    assert_eq!(updated.second_password_at, Some(t + 5));
    assert_eq!(
        updated.university_password_hash.as_deref(),
        Some("$argon2id$x")
    );
    assert_eq!(updated.sid, session.sid, "sid stays");

    // touch_session only moves forward.
    store.touch_session(&session.id, t + 60).await.unwrap();
    store.touch_session(&session.id, t + 30).await.unwrap();
    let touched = store.get_session(&session.id).await.unwrap().unwrap();
    assert_eq!(touched.last_seen_at, t + 60);

    assert!(store.end_session(&session.id, t + 100).await.unwrap());
    assert!(
        !store.end_session(&session.id, t + 200).await.unwrap(),
        "ends once"
    );
    let ended = store.get_session(&session.id).await.unwrap().unwrap();
    assert_eq!(ended.ended_at, Some(t + 100));
    assert!(
        ended.university_password_hash.is_none() && ended.university_password_hash_until.is_none(),
        "the university password hash is deleted at logout"
    );
}

async fn login_transactions_complete_once(backend: Backend) {
    let (store, _guard) = bare_store(backend).await;
    let t = now();
    let tx = LoginTransaction {
        id: random_id(),
        browser_digest: random_token(),
        client_id: "rp".into(),
        request: "{}".into(),
        account_id: None,
        created_at: t,
        expires_at: t + 3600,
        completed_at: None,
    };
    store.insert_login_transaction(&tx).await.unwrap();
    let loaded = store.get_login_transaction(&tx.id).await.unwrap().unwrap();
    assert_eq!(loaded.browser_digest, tx.browser_digest);
    assert!(store
        .complete_login_transaction(&tx.id, t + 1)
        .await
        .unwrap());
    assert!(!store
        .complete_login_transaction(&tx.id, t + 2)
        .await
        .unwrap());
    let done = store.get_login_transaction(&tx.id).await.unwrap().unwrap();
    assert_eq!(done.completed_at, Some(t + 1));
}

async fn grants_revoke_by_session_and_offline_grants_survive(backend: Backend) {
    let (store, _guard) = bare_store(backend).await;
    let t = now();
    let account = account(&store, "uuid-grants").await;
    let online = grant_row(&account.id, "session-1", false, t);
    let offline = grant_row(&account.id, "session-1", true, t);
    let elsewhere = grant_row(&account.id, "session-2", false, t);
    for grant in [&online, &offline, &elsewhere] {
        store.insert_grant(grant).await.unwrap();
    }
    let access = AccessToken {
        digest: random_token(),
        grant_id: online.id.clone(),
        scope: "openid".into(),
        created_at: t,
        expires_at: t + 600,
        revoked_at: None,
    };
    store.insert_access_token(&access).await.unwrap();
    assert_eq!(store.session_clients("session-1").await.unwrap(), ["rp"]);

    assert_eq!(
        store
            .revoke_session_grants("session-1", true, t + 1)
            .await
            .unwrap(),
        1
    );
    assert!(store
        .get_grant(&online.id)
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_some());
    assert!(store
        .get_grant(&offline.id)
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_none());
    assert!(store
        .get_grant(&elsewhere.id)
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_none());
    assert_eq!(
        store
            .revoke_session_grants("session-1", false, t + 2)
            .await
            .unwrap(),
        1
    );
    assert!(store
        .get_grant(&offline.id)
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_some());

    store
        .revoke_access_token(&access.digest, t + 3)
        .await
        .unwrap();
    let revoked = store
        .find_access_token(&access.digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(t + 3));
    store.revoke_grant(&elsewhere.id, t + 4).await.unwrap();
    store.revoke_grant(&elsewhere.id, t + 5).await.unwrap();
    let grant = store.get_grant(&elsewhere.id).await.unwrap().unwrap();
    assert_eq!(
        grant.revoked_at,
        Some(t + 4),
        "the first revocation time stays"
    );
    store
        .update_grant_claims(&grant.id, r#"{"name":"C"}"#)
        .await
        .unwrap();
    assert_eq!(
        store.get_grant(&grant.id).await.unwrap().unwrap().claims,
        r#"{"name":"C"}"#
    );
}

fn key_row(kid: &str, alg: &str, t: i64) -> SigningKeyRow {
    SigningKeyRow {
        kid: kid.into(),
        alg: alg.into(),
        public_jwk: "{}".into(),
        private_jwk_encrypted: "x".into(),
        created_at: t,
        active_from: t,
        published_until: None,
        delete_after: None,
    }
}

async fn signing_keys_retire(backend: Backend) {
    let (store, _guard) = bare_store(backend).await;
    let t = now();
    store
        .insert_signing_key(&key_row("rs-old", "RS256", t))
        .await
        .unwrap();
    store
        .insert_signing_key(&key_row("es-1", "ES256", t))
        .await
        .unwrap();
    let mut new = key_row("rs-new", "RS256", t + 10);
    new.active_from = t + 86_400;
    store.insert_signing_key(&new).await.unwrap();

    let retired = store
        .retire_signing_keys("RS256", "rs-new", t + 90_000, t + 200_000)
        .await
        .unwrap();
    assert_eq!(retired, 1);
    let keys = store.list_signing_keys().await.unwrap();
    let get = |kid: &str| keys.iter().find(|k| k.kid == kid).unwrap().clone();
    assert_eq!(get("rs-old").published_until, Some(t + 90_000));
    assert_eq!(get("rs-old").delete_after, Some(t + 200_000));
    assert_eq!(get("rs-new").published_until, None);
    assert_eq!(
        get("es-1").published_until,
        None,
        "other algorithms untouched"
    );
    // Already retired keys keep their dates.
    let again = store
        .retire_signing_keys("RS256", "rs-new", t + 1, t + 2)
        .await
        .unwrap();
    assert_eq!(again, 0);
    let order: Vec<String> = store
        .list_signing_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(
        order.last().map(String::as_str),
        Some("rs-new"),
        "ordered by active_from"
    );
}

async fn clients_round_trip(backend: Backend) {
    let (store, _guard) = bare_store(backend).await;
    let t = now();
    let mut row = ClientRow {
        client_id: "rp-x".into(),
        settings: r#"{"client_id":"rp-x"}"#.into(),
        secret_digest: Some("digest".into()),
        source: "cli".into(),
        created_at: t,
        updated_at: t,
    };
    store.put_client(&row).await.unwrap();
    row.settings = r#"{"client_id":"rp-x","client_name":"X"}"#.into();
    row.updated_at = t + 1;
    store.put_client(&row).await.unwrap();
    let stored = store.get_client("rp-x").await.unwrap().unwrap();
    assert_eq!(stored.settings, row.settings);
    assert_eq!(stored.updated_at, t + 1);
    assert_eq!(store.list_clients().await.unwrap().len(), 1);
    assert!(store.delete_client("rp-x").await.unwrap());
    assert!(!store.delete_client("rp-x").await.unwrap());
    assert!(store.get_client("rp-x").await.unwrap().is_none());
}

#[tokio::test]
async fn both_backends_report_their_name() {
    let (store, _guard) = bare_store(Backend::Sqlite).await;
    assert_eq!(store.backend(), "sqlite");
    store.ping().await.unwrap();
    let (store, _guard) = bare_store(Backend::Postgres).await;
    assert_eq!(store.backend(), "postgres");
    store.ping().await.unwrap();
}
