//! A relying party built on the `openidconnect` crate, as real RPs use nidan: discovery, PKCE,
//! nonce, code exchange and ID token verification against the published JWKS.
use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreJwsSigningAlgorithm, CoreProviderMetadata,
    CoreTokenResponse, CoreUserInfoClaims,
};
use openidconnect::{
    AccessTokenHash, AuthType, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl, Nonce, OAuth2TokenResponse,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use serde_json::Value;

use super::{jwt_header, jwt_payload, no_redirect_client, TestApp, REDIRECT_URI};

pub type OidcClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

pub struct Rp {
    pub client: OidcClient,
    pub http: reqwest::Client,
    pub client_id: String,
    pub metadata: CoreProviderMetadata,
}

/// What the RP keeps between the authorization request and the callback.
pub struct Started {
    pub url: String,
    pub state: CsrfToken,
    pub nonce: Nonce,
    pub verifier: PkceCodeVerifier,
}

impl TestApp {
    /// The relying party `client_id`, configured from discovery.
    pub async fn rp(&self, client_id: &str) -> Rp {
        let http = no_redirect_client();
        let metadata = CoreProviderMetadata::discover_async(
            IssuerUrl::new(self.issuer.clone()).unwrap(),
            &http,
        )
        .await
        .expect("discovery as openidconnect reads it");
        let secret = self
            .clients
            .iter()
            .find(|c| c.client_id == client_id)
            .and_then(|c| c.secret)
            .map(|s| ClientSecret::new(s.to_string()));
        let mut client = CoreClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(client_id.to_string()),
            secret,
        )
        .set_redirect_uri(RedirectUrl::new(REDIRECT_URI.to_string()).unwrap());
        if client_id == "rp-post" {
            client = client.set_auth_type(AuthType::RequestBody);
        }
        Rp {
            client,
            http,
            client_id: client_id.to_string(),
            metadata,
        }
    }
}

impl Rp {
    /// An authorization URL with PKCE S256, state, nonce, the given scopes (besides `openid`) and
    /// extra parameters.
    pub fn start(&self, scopes: &[&str], extra: &[(&str, &str)]) -> Started {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = self
            .client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for scope in scopes {
            request = request.add_scope(Scope::new(scope.to_string()));
        }
        for (name, value) in extra {
            request = request.add_extra_param(*name, *value);
        }
        let (url, state, nonce) = request.url();
        Started {
            url: url.to_string(),
            state,
            nonce,
            verifier,
        }
    }

    pub async fn exchange(&self, code: &str, verifier: PkceCodeVerifier) -> CoreTokenResponse {
        self.client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .expect("discovery names a token endpoint")
            .set_pkce_verifier(verifier)
            .request_async(&self.http)
            .await
            .unwrap_or_else(|e| panic!("code exchange: {e:?}"))
    }

    /// Verifies the ID token as an RP does (signature from JWKS, iss, aud, exp, nonce, the
    /// expected algorithm, at_hash) and returns every claim as sent.
    pub fn verify(&self, tokens: &CoreTokenResponse, nonce: &Nonce, alg: &str) -> Value {
        let id_token = tokens.id_token().expect("an ID token");
        let expected = match alg {
            "ES256" => CoreJwsSigningAlgorithm::EcdsaP256Sha256,
            "EdDSA" => CoreJwsSigningAlgorithm::EdDsa,
            _ => CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
        };
        let verifier = self
            .client
            .id_token_verifier()
            .set_allowed_algs(vec![expected]);
        let claims = id_token
            .claims(&verifier, nonce)
            .unwrap_or_else(|e| panic!("ID token verification: {e:?}"));
        let at_hash = AccessTokenHash::from_token(
            tokens.access_token(),
            id_token.signing_alg().unwrap(),
            id_token.signing_key(&verifier).unwrap(),
        )
        .unwrap();
        assert_eq!(
            claims.access_token_hash(),
            Some(&at_hash),
            "at_hash matches the access token"
        );
        let raw = id_token.to_string();
        assert_eq!(jwt_header(&raw)["alg"], alg);
        jwt_payload(&raw)
    }

    /// Userinfo through the crate (checks `sub` against the ID token) and as raw JSON.
    pub async fn userinfo(&self, tokens: &CoreTokenResponse, expected_sub: &str) -> Value {
        let subject = openidconnect::SubjectIdentifier::new(expected_sub.to_string());
        let _: CoreUserInfoClaims = self
            .client
            .user_info(tokens.access_token().clone(), Some(subject))
            .expect("discovery names a userinfo endpoint")
            .request_async(&self.http)
            .await
            .unwrap_or_else(|e| panic!("userinfo: {e:?}"));
        let url = self
            .metadata
            .userinfo_endpoint()
            .expect("userinfo endpoint")
            .url()
            .clone();
        self.http
            .get(url)
            .bearer_auth(tokens.access_token().secret())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}
