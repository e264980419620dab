//! `[[users]]` and `[jwt]`: who may connect, and what each principal may do.

use serde::{Deserialize, Serialize};
use whispeer::Filter;
use whispeer::server::{JwtVerifier, Permissions};

/// `[jwt]`: files holding the keys tokens are verified with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Jwt {
    /// A file whose contents (trimmed) are the HS256 shared secret.
    pub(crate) hs256_secret_file: Option<std::path::PathBuf>,
    /// An RS256 public key (PEM).
    pub(crate) rs256_public_key: Option<std::path::PathBuf>,
    /// An EdDSA (Ed25519) public key (PEM).
    pub(crate) eddsa_public_key: Option<std::path::PathBuf>,
    /// A JWKS document (JSON).
    pub(crate) jwks: Option<std::path::PathBuf>,
}

impl Jwt {
    pub(crate) fn verifier(&self) -> anyhow::Result<Option<JwtVerifier>> {
        let read = |path: &std::path::PathBuf| {
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("jwt: cannot read {}: {e}", path.display()))
        };
        let mut verifier = JwtVerifier::new();
        if let Some(path) = &self.hs256_secret_file {
            let secret = read(path)?;
            verifier = verifier.hs256(secret.trim_ascii());
        }
        if let Some(path) = &self.rs256_public_key {
            verifier = verifier.rs256_pem(&read(path)?)?;
        }
        if let Some(path) = &self.eddsa_public_key {
            verifier = verifier.eddsa_pem(&read(path)?)?;
        }
        if let Some(path) = &self.jwks {
            let text = String::from_utf8(read(path)?)?;
            verifier = verifier.jwks(&text)?;
        }
        Ok(verifier.is_configured().then_some(verifier))
    }
}

/// `[[users]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct User {
    pub(crate) name: String,
    pub(crate) api_key: String,
    #[serde(default)]
    pub(crate) publish: Vec<String>,
    #[serde(default)]
    pub(crate) subscribe: Vec<String>,
    #[serde(default)]
    pub(crate) deny_publish: Vec<String>,
    #[serde(default)]
    pub(crate) deny_subscribe: Vec<String>,
    /// Queue groups it may join besides its own (its name, `<name>-…`): names or `prefix*`.
    #[serde(default)]
    pub(crate) groups: Vec<String>,
}

impl User {
    pub(crate) fn permissions(&self) -> anyhow::Result<Permissions> {
        let parse = |list: &[String], field: &str| -> anyhow::Result<Vec<Filter>> {
            list.iter()
                .map(|f| {
                    Filter::parse(f).map_err(|e| {
                        anyhow::anyhow!("users[{}].{field}: filter {f:?}: {e}", self.name)
                    })
                })
                .collect()
        };
        let mut permissions = Permissions::none();
        permissions.publish = parse(&self.publish, "publish")?;
        permissions.subscribe = parse(&self.subscribe, "subscribe")?;
        permissions.deny_publish = parse(&self.deny_publish, "deny_publish")?;
        permissions.deny_subscribe = parse(&self.deny_subscribe, "deny_subscribe")?;
        permissions.groups.clone_from(&self.groups);
        Ok(permissions)
    }
}
