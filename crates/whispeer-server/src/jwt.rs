//! JWT authentication: a token in AUTH, verified with the configured keys, becomes a principal.
//!
//! Keys: an HS256 secret, RS256 or EdDSA public keys (PEM), or a JWKS document; a token whose
//! header names a `kid` is checked with that key only. The algorithm must be the key's own (no
//! `alg: none`, no HS256 token checked with an RSA key's bytes), `exp` must be in the future and
//! `nbf`, if present, in the past (with a leeway for clock skew).
//!
//! Claims: `sub` names the principal; the optional `whispeer` claim holds its permissions as
//! filter lists — `{"publish": [...], "subscribe": [...], "deny_publish": [...],
//! "deny_subscribe": [...], "groups": [...]}` (groups: queue group names or `prefix*`). Without
//! it the principal may use only its own inbox and its own groups.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use whispeer_proto::Filter;

use super::acl::{Permissions, Principal};

/// Why a token was refused, or a key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The token does not verify: bad signature, wrong algorithm, expired, not yet valid,
    /// malformed.
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// No configured key fits the token (unknown `kid`, or no key for its algorithm).
    #[error("no key for this token")]
    NoKey,
    /// A permission in the claims is not a valid filter.
    #[error("claim whispeer.{field}: {filter:?} is not a valid filter")]
    BadFilter {
        /// The claim field.
        field: &'static str,
        /// The value.
        filter: String,
    },
    /// A key could not be read.
    #[error("JWT key: {0}")]
    Key(String),
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    whispeer: Grants,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Grants {
    publish: Vec<String>,
    subscribe: Vec<String>,
    deny_publish: Vec<String>,
    deny_subscribe: Vec<String>,
    groups: Vec<String>,
}

fn filters(list: Vec<String>, field: &'static str) -> Result<Vec<Filter>, JwtError> {
    list.into_iter()
        .map(|f| Filter::parse(&f).map_err(|_| JwtError::BadFilter { field, filter: f }))
        .collect()
}

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The keys tokens are checked with.
#[derive(Default)]
pub struct JwtVerifier {
    keys: Vec<Key>,
    leeway_secs: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algorithms: Vec<Algorithm> = self.keys.iter().map(|k| k.algorithm).collect();
        f.debug_struct("JwtVerifier").field("algorithms", &algorithms).finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// No keys yet; a leeway of 30 s for `exp` and `nbf`.
    pub fn new() -> Self {
        Self { keys: Vec::new(), leeway_secs: 30 }
    }

    /// Adds an HS256 shared secret.
    pub fn hs256(mut self, secret: &[u8]) -> Self {
        let key = DecodingKey::from_secret(secret);
        self.keys.push(Key { kid: None, algorithm: Algorithm::HS256, key });
        self
    }

    /// Adds an RS256 public key (PEM).
    ///
    /// # Errors
    /// [`JwtError::Key`] for PEM that is not an RSA public key.
    pub fn rs256_pem(mut self, pem: &[u8]) -> Result<Self, JwtError> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(|e| JwtError::Key(e.to_string()))?;
        self.keys.push(Key { kid: None, algorithm: Algorithm::RS256, key });
        Ok(self)
    }

    /// Adds an EdDSA (Ed25519) public key (PEM).
    ///
    /// # Errors
    /// [`JwtError::Key`] for PEM that is not an Ed25519 public key.
    pub fn eddsa_pem(mut self, pem: &[u8]) -> Result<Self, JwtError> {
        let key = DecodingKey::from_ed_pem(pem).map_err(|e| JwtError::Key(e.to_string()))?;
        self.keys.push(Key { kid: None, algorithm: Algorithm::EdDSA, key });
        Ok(self)
    }

    /// Adds every key of a JWKS document (JSON) that names its algorithm.
    ///
    /// # Errors
    /// [`JwtError::Key`] for a document that is not a JWKS, or a key that does not load.
    pub fn jwks(mut self, json: &str) -> Result<Self, JwtError> {
        let set: JwkSet = serde_json::from_str(json).map_err(|e| JwtError::Key(e.to_string()))?;
        for jwk in &set.keys {
            let Some(algorithm) = jwk.common.key_algorithm.and_then(|a| a.to_string().parse().ok())
            else {
                continue;
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| JwtError::Key(e.to_string()))?;
            self.keys.push(Key { kid: jwk.common.key_id.clone(), algorithm, key });
        }
        Ok(self)
    }

    /// Whether any key is configured.
    pub fn is_configured(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Verifies `token` and returns its principal.
    ///
    /// # Errors
    /// See [`JwtError`].
    pub fn verify(&self, token: &str) -> Result<Principal, JwtError> {
        let header = decode_header(token)?;
        let candidates = self
            .keys
            .iter()
            .filter(|k| k.algorithm == header.alg && (header.kid.is_none() || header.kid == k.kid));
        let mut last = None;
        for key in candidates {
            let mut validation = Validation::new(key.algorithm);
            validation.validate_nbf = true;
            validation.leeway = self.leeway_secs;
            validation.required_spec_claims =
                ["exp", "sub"].iter().map(|s| (*s).to_string()).collect();
            match decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return principal(data.claims),
                Err(err) => last = Some(err),
            }
        }
        Err(last.map_or(JwtError::NoKey, JwtError::Invalid))
    }
}

fn principal(claims: Claims) -> Result<Principal, JwtError> {
    let grants = claims.whispeer;
    let mut permissions = Permissions::none();
    permissions.publish = filters(grants.publish, "publish")?;
    permissions.subscribe = filters(grants.subscribe, "subscribe")?;
    permissions.deny_publish = filters(grants.deny_publish, "deny_publish")?;
    permissions.deny_subscribe = filters(grants.deny_subscribe, "deny_subscribe")?;
    permissions.groups = grants.groups;
    Ok(Principal::new(claims.sub, permissions))
}

/// Whether AUTH's bytes look like a JWT (three base64url parts) rather than an API key.
pub(crate) fn looks_like_jwt(bytes: &[u8]) -> bool {
    bytes.iter().filter(|&&b| b == b'.').count() == 2
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

#[cfg(test)]
mod tests;
