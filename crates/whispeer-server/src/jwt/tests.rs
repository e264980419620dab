//! Tokens signed here with test-only keys (the PEM files beside this file; never use them
//! elsewhere): accepted when right, refused when expired, early, mis-signed, of another
//! algorithm, or unsigned.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use whispeer_proto::Topic;

use super::*;

const RSA: &[u8] = include_bytes!("test-rsa.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("test-rsa.pub.pem");
const OTHER_RSA_PUBLIC: &[u8] = include_bytes!("test-other-rsa.pub.pem");
const ED25519: &[u8] = include_bytes!("test-ed25519.pem");
const ED25519_PUBLIC: &[u8] = include_bytes!("test-ed25519.pub.pem");
const SECRET: &[u8] = b"a shared secret of at least 32 bytes!!";

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn claims(exp_in: i64) -> Value {
    json!({
        "sub": "ada",
        "exp": now() + exp_in,
        "whispeer": { "publish": ["chat/+"], "subscribe": ["chat/#"], "groups": ["jobs-*"] },
    })
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(algorithm), claims, key).unwrap()
}

fn verifier() -> JwtVerifier {
    JwtVerifier::new()
        .hs256(SECRET)
        .rs256_pem(RSA_PUBLIC)
        .unwrap()
        .eddsa_pem(ED25519_PUBLIC)
        .unwrap()
}

#[test]
fn tokens_of_every_algorithm_become_principals_with_their_claims() {
    let keys = [
        (Algorithm::HS256, EncodingKey::from_secret(SECRET)),
        (Algorithm::RS256, EncodingKey::from_rsa_pem(RSA).unwrap()),
        (Algorithm::EdDSA, EncodingKey::from_ed_pem(ED25519).unwrap()),
    ];
    for (algorithm, key) in keys {
        let principal = verifier().verify(&sign(algorithm, &key, &claims(300))).unwrap();
        assert_eq!(principal.name, "ada", "{algorithm:?}");
        let perms = &principal.permissions;
        assert!(perms.may_publish(&Topic::parse("chat/x").unwrap()));
        assert!(!perms.may_publish(&Topic::parse("news").unwrap()));
        assert!(perms.may_join("ada", "jobs-eu") && !perms.may_join("ada", "billing"));
    }
}

#[test]
fn expired_early_missigned_and_unsigned_tokens_are_refused() {
    let hs = EncodingKey::from_secret(SECRET);
    let verifier = verifier();
    let expired = sign(Algorithm::HS256, &hs, &claims(-3600));
    assert!(matches!(verifier.verify(&expired), Err(JwtError::Invalid(_))), "expired");
    let mut early = claims(3600);
    early["nbf"] = json!(now() + 600);
    let early = sign(Algorithm::HS256, &hs, &early);
    assert!(matches!(verifier.verify(&early), Err(JwtError::Invalid(_))), "not yet valid");
    let wrong_secret =
        sign(Algorithm::HS256, &EncodingKey::from_secret(b"another secret"), &claims(300));
    assert!(matches!(verifier.verify(&wrong_secret), Err(JwtError::Invalid(_))), "wrong key");
    // Algorithm confusion: an HS256 token "signed" with the RSA public key's bytes.
    let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(RSA_PUBLIC), &claims(300));
    let rsa_only = JwtVerifier::new().rs256_pem(RSA_PUBLIC).unwrap();
    assert!(matches!(rsa_only.verify(&confused), Err(JwtError::NoKey)), "wrong algorithm");
    // Signed by another RSA key.
    let other = JwtVerifier::new().rs256_pem(OTHER_RSA_PUBLIC).unwrap();
    let rs = sign(Algorithm::RS256, &EncodingKey::from_rsa_pem(RSA).unwrap(), &claims(300));
    assert!(matches!(other.verify(&rs), Err(JwtError::Invalid(_))), "another RSA key");
    // `alg: none`, no signature.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let unsigned = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims(300).to_string())
    );
    assert!(verifier.verify(&unsigned).is_err(), "alg none");
    assert!(looks_like_jwt(unsigned.as_bytes()));
    assert!(!looks_like_jwt(b"plain api key"));
}

#[test]
fn claims_must_name_valid_filters_and_a_subject() {
    let hs = EncodingKey::from_secret(SECRET);
    let mut bad = claims(300);
    bad["whispeer"]["subscribe"] = json!(["a/#/b"]);
    let bad = sign(Algorithm::HS256, &hs, &bad);
    assert!(matches!(verifier().verify(&bad), Err(JwtError::BadFilter { field: "subscribe", .. })));
    let anonymous = sign(Algorithm::HS256, &hs, &json!({ "exp": now() + 300 }));
    assert!(verifier().verify(&anonymous).is_err(), "no sub");
    let bare = sign(Algorithm::HS256, &hs, &json!({ "sub": "bob", "exp": now() + 300 }));
    let bob = verifier().verify(&bare).unwrap();
    assert_eq!(bob.permissions, Permissions::none(), "no claim, only the inbox");
}

#[test]
fn a_jwks_document_selects_keys_by_kid() {
    use base64::Engine as _;
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
    let jwks = json!({ "keys": [{ "kty": "oct", "k": k, "alg": "HS256", "kid": "k1" }] });
    let verifier = JwtVerifier::new().jwks(&jwks.to_string()).unwrap();
    let hs = EncodingKey::from_secret(SECRET);
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let token = encode(&header, &claims(300), &hs).unwrap();
    assert_eq!(verifier.verify(&token).unwrap().name, "ada");
    header.kid = Some("k2".into());
    let unknown = encode(&header, &claims(300), &hs).unwrap();
    assert!(matches!(verifier.verify(&unknown), Err(JwtError::NoKey)));
}
