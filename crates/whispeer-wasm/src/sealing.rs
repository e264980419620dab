//! End-to-end keys for JavaScript: `Identity` (keep its `toText()` in the browser's storage, or
//! a file in Node, like a password) and, on `Chat`, sealed direct messages — the same boxes as
//! the Rust SDK (`whispeer_engines::seal_for`), so each opens what the other seals.
//!
//! ```js
//! const me = Identity.fromText(localStorage.getItem("identity") ?? Identity.generate().toText());
//! await chat.publishIdentity(me);
//! await chat.sendSealedTo(me, "bob", "for bob only");
//! chat.onEvent(async (event) => {
//!   if (event.msg?.sealed) console.log(await chat.openSealed(me, event));
//! });
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use js_sys::{Array, JSON, Reflect};
use wasm_bindgen::JsValue;
use wasm_bindgen::prelude::*;
use whispeer_engines::{Identity as Keys, PublicIdentity, open_sealed, seal_for, sealed_sender};

use super::chat::Chat;
use super::error;

fn encode(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn decode(text: &str) -> Result<Vec<u8>, JsValue> {
    B64.decode(text).map_err(|_| error("not base64url"))
}

fn context(from: &str, to: &str) -> Vec<u8> {
    format!("whispeer-chat direct\0{from}\0{to}").into_bytes()
}

/// A device's secret keys.
#[wasm_bindgen]
pub struct Identity {
    keys: Keys,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.keys.fmt(f)
    }
}

impl Identity {
    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }
}

#[wasm_bindgen]
impl Identity {
    /// A new identity.
    pub fn generate() -> Result<Self, JsValue> {
        Ok(Self { keys: Keys::generate().map_err(|e| error(e.to_string()))? })
    }

    /// Reads `toText()`'s form.
    #[wasm_bindgen(js_name = fromText)]
    pub fn from_text(text: &str) -> Result<Self, JsValue> {
        Ok(Self { keys: Keys::from_text(text).map_err(|e| error(e.to_string()))? })
    }

    /// The secret text form: keep it like a password.
    #[wasm_bindgen(js_name = toText)]
    pub fn to_text(&self) -> String {
        self.keys.to_text().to_string()
    }

    /// The fingerprint people compare (60 digits).
    pub fn fingerprint(&self) -> String {
        self.keys.public("").fingerprint()
    }
}

pub(crate) fn public_identities(list: &JsValue) -> Result<Vec<PublicIdentity>, JsValue> {
    Array::from(list)
        .iter()
        .map(|entry| {
            let text = entry.as_string().ok_or_else(|| error("a key is text"))?;
            PublicIdentity::from_text(&text)
                .map_err(|e| error(format!("a key does not verify: {e}")))
        })
        .collect()
}

#[wasm_bindgen]
impl Chat {
    /// Publishes this device's public identity to the server's directory.
    #[wasm_bindgen(js_name = publishIdentity)]
    pub async fn publish_identity(&self, identity: &Identity) -> Result<JsValue, JsValue> {
        let public = identity.keys.public(&self.device()).to_text();
        self.ask(&[("type", "keys".into()), ("publish", public.into())]).await
    }

    /// `user`'s devices' public identities (text), each checked.
    pub async fn keys(&self, user: String) -> Result<JsValue, JsValue> {
        let reply = self.ask(&[("type", "keys".into()), ("user", user.into())]).await?;
        let devices = Reflect::get(&reply, &"devices".into())?;
        public_identities(&devices)?;
        Ok(devices)
    }

    /// Sends `msg` to `user` sealed for `user`'s devices and this user's own.
    #[wasm_bindgen(js_name = sendSealedTo)]
    pub async fn send_sealed_to(
        &self,
        identity: &Identity,
        user: String,
        msg: JsValue,
    ) -> Result<JsValue, JsValue> {
        let mut recipients = public_identities(&self.keys(user.clone()).await?)?;
        if recipients.is_empty() {
            return Err(error(format!("{user} has published no keys")));
        }
        let me = self.user();
        if user != me {
            recipients.extend(public_identities(&self.keys(me.clone()).await?)?);
        }
        let plain = String::from(JSON::stringify(&msg)?);
        let sealed = seal_for(&identity.keys, &recipients, &context(&me, &user), plain.as_bytes())
            .map_err(|e| error(e.to_string()))?;
        let body = js_sys::Object::new();
        Reflect::set(&body, &"sealed".into(), &encode(&sealed).into())?;
        self.send_to(user, body.into()).await
    }

    /// Opens a sealed direct message event with this device's identity; it must be signed by
    /// one of the sender's devices (fetched now from the directory).
    #[wasm_bindgen(js_name = openSealed)]
    pub async fn open_sealed(
        &self,
        identity: &Identity,
        event: JsValue,
    ) -> Result<JsValue, JsValue> {
        let text = |key: &str| Reflect::get(&event, &key.into()).ok().and_then(|v| v.as_string());
        let from = text("from").ok_or_else(|| error("not a message"))?;
        let to = text("to").ok_or_else(|| error("not a direct message"))?;
        let msg = Reflect::get(&event, &"msg".into())?;
        let encoded =
            Reflect::get(&msg, &"sealed".into())?.as_string().ok_or_else(|| error("not sealed"))?;
        let sealed = decode(&encoded)?;
        let signer = sealed_sender(&sealed).map_err(|e| error(e.to_string()))?;
        let keys = public_identities(&self.keys(from.clone()).await?)?;
        if !keys.iter().any(|key| key.ed25519 == signer) {
            return Err(error(format!("signed by a key that is not {from}'s")));
        }
        let plain = open_sealed(&identity.keys, &sealed, &context(&from, &to), Some(&signer))
            .map_err(|e| error(e.to_string()))?;
        let plain = String::from_utf8(plain).map_err(|_| error("not text"))?;
        JSON::parse(&plain)
    }
}
