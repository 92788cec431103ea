//! Signing keys: generated on first start, stored encrypted under the key-encryption key so every
//! replica shares them, published in JWKS, rotated with a delay so no replica signs with a key that
//! another replica does not publish yet.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use josekit::jwk::Jwk;
use josekit::jws::{
    EdDSA, JwsHeader, JwsSigner, JwsVerifier, ES256, ES384, PS256, RS256, RS384, RS512,
};
use josekit::jwt::JwtPayload;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256, Sha512};

use crate::clock::{random_bytes, Timestamp};
use crate::crypto::{b64, b64_decode, b64url, keyed_tag};
use crate::store::{DynStore, SigningKeyRow};

pub const ALGORITHMS: &[&str] = &["RS256", "ES256", "EdDSA"];
/// Keys that left JWKS are kept this long to check expired `id_token_hint`s.
const KEEP_FOR_HINTS: i64 = 90 * 86_400;

/// The key-encryption key: encrypts signing keys at rest and derives the other server secrets.
#[derive(Clone)]
pub struct Kek([u8; 32]);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek([redacted])")
    }
}

impl Kek {
    /// Reads the key (base64 or hex of 32 bytes).
    pub fn parse(text: &str) -> anyhow::Result<Kek> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            b64_decode(text)
        };
        match bytes {
            Some(bytes) if bytes.len() == 32 => {
                let mut key = [0u8; 32];
                key.copy_from_slice(&bytes);
                Ok(Kek(key))
            }
            _ => bail!("the key-encryption key must be 32 bytes in base64 (head -c 32 /dev/urandom | base64)"),
        }
    }

    /// Generates a key file; only the embedded development default may do this.
    pub fn generate_file(path: &Path) -> anyhow::Result<Kek> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let key = random_bytes::<32>();
        let text = format!("{}\n", b64(&key));
        write_private_file(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Kek(key))
    }

    /// A secret for one purpose, derived so that the key-encryption key itself is used only for keys.
    pub fn derive(&self, purpose: &str) -> Vec<u8> {
        keyed_tag(&self.0, purpose.as_bytes()).to_vec()
    }

    pub fn encrypt(&self, plaintext: &[u8]) -> anyhow::Result<String> {
        let mut header = josekit::jwe::JweHeader::new();
        header.set_content_encryption("A256GCM");
        let encrypter = josekit::jwe::Dir.encrypter_from_bytes(self.0)?;
        Ok(josekit::jwe::serialize_compact(
            plaintext, &header, &encrypter,
        )?)
    }

    pub fn decrypt(&self, ciphertext: &str) -> anyhow::Result<Vec<u8>> {
        let decrypter = josekit::jwe::Dir.decrypter_from_bytes(self.0)?;
        let (plaintext, _) = josekit::jwe::deserialize_compact(ciphertext, &decrypter)
            .map_err(|_| anyhow!("cannot decrypt: wrong key-encryption key?"))?;
        Ok(plaintext)
    }
}

#[cfg(unix)]
fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}

#[cfg(not(unix))]
fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

fn generate(alg: &str) -> anyhow::Result<(Jwk, Jwk)> {
    let (mut private, mut public) = match alg {
        "RS256" => {
            let pair = RS256.generate_key_pair(2048)?;
            (pair.to_jwk_private_key(), pair.to_jwk_public_key())
        }
        "ES256" => {
            let pair = ES256.generate_key_pair()?;
            (pair.to_jwk_private_key(), pair.to_jwk_public_key())
        }
        "EdDSA" => {
            let pair = EdDSA.generate_key_pair(josekit::jwk::alg::ed::EdCurve::Ed25519)?;
            (pair.to_jwk_private_key(), pair.to_jwk_public_key())
        }
        other => bail!("unsupported signing algorithm {other}"),
    };
    let kid = b64url(&random_bytes::<12>());
    for jwk in [&mut private, &mut public] {
        jwk.set_key_id(&kid);
        jwk.set_algorithm(alg);
        jwk.set_key_use("sig");
    }
    Ok((private, public))
}

/// Creates a key of `alg`, published now and signing from `active_from`.
pub async fn create_key(
    store: &DynStore,
    kek: &Kek,
    alg: &str,
    now: Timestamp,
    active_from: Timestamp,
) -> anyhow::Result<SigningKeyRow> {
    let alg_owned = alg.to_string();
    let (private, public) = tokio::task::spawn_blocking(move || generate(&alg_owned)).await??;
    let row = SigningKeyRow {
        kid: public.key_id().unwrap_or_default().to_string(),
        alg: alg.to_string(),
        public_jwk: public.to_string(),
        private_jwk_encrypted: kek.encrypt(private.to_string().as_bytes())?,
        created_at: now,
        active_from,
        published_until: None,
        delete_after: None,
    };
    store.insert_signing_key(&row).await?;
    Ok(row)
}

/// Makes sure a current key exists for every algorithm (first start). Replicas that start
/// together on an empty database take turns under a lease, so they agree on one key each.
pub async fn ensure_keys(store: &DynStore, kek: &Kek, now: Timestamp) -> anyhow::Result<()> {
    let owner = crate::clock::random_id();
    for _ in 0..150 {
        let keys = store.list_signing_keys().await?;
        let missing: Vec<&str> = ALGORITHMS
            .iter()
            .copied()
            .filter(|alg| {
                !keys
                    .iter()
                    .any(|k| k.alg == *alg && k.published_until.is_none())
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if store
            .try_lease("signing-keys", &owner, now + 60, now)
            .await?
        {
            // Listed again under the lease: another replica may have just finished.
            let keys = store.list_signing_keys().await?;
            for alg in missing {
                if !keys
                    .iter()
                    .any(|k| k.alg == alg && k.published_until.is_none())
                {
                    create_key(store, kek, alg, now, now).await?;
                }
            }
            store
                .try_lease("signing-keys", &owner, now - 1, now)
                .await?;
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    anyhow::bail!("another replica holds the key-creation lease and has not created the keys")
}

/// Publishes a new key now that signs after `delay`; older keys leave JWKS once every token they
/// signed has expired (`max_token_lifetime` after the new key takes over).
pub async fn rotate(
    store: &DynStore,
    kek: &Kek,
    alg: &str,
    now: Timestamp,
    delay: i64,
    max_token_lifetime: i64,
) -> anyhow::Result<SigningKeyRow> {
    let row = create_key(store, kek, alg, now, now + delay).await?;
    let published_until = row.active_from + max_token_lifetime;
    store
        .retire_signing_keys(
            alg,
            &row.kid,
            published_until,
            published_until + KEEP_FOR_HINTS,
        )
        .await?;
    Ok(row)
}

pub struct ActiveKey {
    pub kid: String,
    pub alg: String,
    signer: Box<dyn JwsSigner>,
    /// A newer key of the same algorithm exists.
    replaced: bool,
}

/// The keys as one replica sees them, loaded from the store and refreshed periodically.
pub struct KeySet {
    signers: HashMap<String, ActiveKey>,
    verifiers: HashMap<String, Box<dyn JwsVerifier>>,
    /// Pre-rendered JWKS document.
    pub jwks: bytes::Bytes,
    pub loaded_at: Timestamp,
}

impl KeySet {
    pub async fn load(store: &DynStore, kek: &Kek, now: Timestamp) -> anyhow::Result<KeySet> {
        let rows = store.list_signing_keys().await?;
        let mut signers: HashMap<String, ActiveKey> = HashMap::new();
        let mut verifiers = HashMap::new();
        let mut published = Vec::new();
        for row in rows {
            if row.delete_after.is_some_and(|t| t <= now) {
                continue;
            }
            let public = Jwk::from_bytes(row.public_jwk.as_bytes())
                .with_context(|| format!("key {} has an unreadable public JWK", row.kid))?;
            if row.published_until.is_none_or(|t| t > now) {
                published.push(serde_json::to_value(public.as_ref())?);
            }
            if let Some(verifier) = verifier_for_jwk(&row.alg, &public) {
                verifiers.insert(row.kid.clone(), verifier);
            }
            // The signer is the newest key already active; a replaced key (one with an end) never
            // wins over its replacement, even when both became active in the same second.
            let replaced = row.published_until.is_some();
            if row.active_from <= now && row.published_until.is_none_or(|t| t > now) {
                let better = signers
                    .get(&row.alg)
                    .is_none_or(|current| current.replaced || !replaced);
                if better {
                    let private = Jwk::from_bytes(kek.decrypt(&row.private_jwk_encrypted)?)?;
                    let signer = signer_for_jwk(&row.alg, &private)?;
                    signers.insert(
                        row.alg.clone(),
                        ActiveKey {
                            kid: row.kid.clone(),
                            alg: row.alg.clone(),
                            signer,
                            replaced,
                        },
                    );
                }
            }
        }
        let jwks = serde_json::to_vec(&serde_json::json!({ "keys": published }))?;
        Ok(KeySet {
            signers,
            verifiers,
            jwks: jwks.into(),
            loaded_at: now,
        })
    }

    pub fn has_signer(&self, alg: &str) -> bool {
        self.signers.contains_key(alg)
    }

    /// Signs `claims` as a JWT with the active key of `alg` (falling back to RS256).
    pub fn sign(&self, alg: &str, typ: &str, claims: Map<String, Value>) -> anyhow::Result<String> {
        let key = self
            .signers
            .get(alg)
            .or_else(|| self.signers.get("RS256"))
            .ok_or_else(|| anyhow!("no active signing key"))?;
        let mut header = JwsHeader::new();
        header.set_token_type(typ);
        header.set_key_id(&key.kid);
        let payload = JwtPayload::from_map(claims)?;
        Ok(josekit::jwt::encode_with_signer(
            &payload,
            &header,
            key.signer.as_ref(),
        )?)
    }

    /// Checks the signature of a JWT we issued (any key still kept), without checking expiry.
    pub fn verify_own(&self, token: &str) -> Option<Map<String, Value>> {
        let (payload, _) = josekit::jwt::decode_with_verifier_selector(token, |header| {
            Ok(header
                .key_id()
                .and_then(|kid| self.verifiers.get(kid))
                .filter(|v| Some(v.algorithm().name()) == header.algorithm())
                .map(|v| v.as_ref()))
        })
        .ok()?;
        Some(payload.claims_set().clone())
    }
}

pub type SharedKeys = Arc<std::sync::RwLock<Arc<KeySet>>>;

/// The hash used for `at_hash`/`c_hash` with `alg`: the left half of its digest, base64url.
pub fn half_hash(alg: &str, value: &str) -> String {
    let digest: Vec<u8> = match alg {
        "EdDSA" => Sha512::digest(value.as_bytes()).to_vec(),
        _ => Sha256::digest(value.as_bytes()).to_vec(),
    };
    b64url(&digest[..digest.len() / 2])
}

fn signer_for_jwk(alg: &str, jwk: &Jwk) -> anyhow::Result<Box<dyn JwsSigner>> {
    Ok(match alg {
        "RS256" => Box::new(RS256.signer_from_jwk(jwk)?),
        "ES256" => Box::new(ES256.signer_from_jwk(jwk)?),
        "EdDSA" => Box::new(EdDSA.signer_from_jwk(jwk)?),
        other => bail!("unsupported signing algorithm {other}"),
    })
}

/// A verifier for a public JWK (our keys or a client's `private_key_jwt` keys).
pub fn verifier_for_jwk(alg: &str, jwk: &Jwk) -> Option<Box<dyn JwsVerifier>> {
    let verifier: Box<dyn JwsVerifier> = match alg {
        "RS256" => Box::new(RS256.verifier_from_jwk(jwk).ok()?),
        "RS384" => Box::new(RS384.verifier_from_jwk(jwk).ok()?),
        "RS512" => Box::new(RS512.verifier_from_jwk(jwk).ok()?),
        "PS256" => Box::new(PS256.verifier_from_jwk(jwk).ok()?),
        "ES256" => Box::new(ES256.verifier_from_jwk(jwk).ok()?),
        "ES384" => Box::new(ES384.verifier_from_jwk(jwk).ok()?),
        "EdDSA" => Box::new(EdDSA.verifier_from_jwk(jwk).ok()?),
        _ => return None,
    };
    Some(verifier)
}
