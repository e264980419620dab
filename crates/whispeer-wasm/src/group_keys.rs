//! Sealed group messages for JavaScript, the same as the Rust SDK's: `GroupKeys` holds a group's
//! keys by epoch; `chat.rotateGroupKey(me, keys, "team")` seals a new epoch's key to the members'
//! devices; `keys.learn(me, event, senderKeys)` takes one that arrives; `sendSealedGroup` and
//! `openGroup` use them.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use js_sys::{Array, JSON, Reflect};
use wasm_bindgen::JsValue;
use wasm_bindgen::prelude::*;
use whispeer_engines::{
    GroupKey, PublicIdentity, group_sealed_by, open_group, open_sealed, seal_for, seal_group,
    sealed_sender,
};

use super::chat::Chat;
use super::error;
use super::sealing::{Identity, public_identities};

fn key_context(group: &str, from: &str) -> Vec<u8> {
    format!("whispeer-chat group-key\0{group}\0{from}").into_bytes()
}

fn message_context(group: &str, from: &str) -> Vec<u8> {
    format!("whispeer-chat group\0{group}\0{from}").into_bytes()
}

fn text(value: &JsValue, key: &str) -> Option<String> {
    Reflect::get(value, &key.into()).ok()?.as_string()
}

/// The sealed field `field` of an event's `msg`, decoded, with the event's group and sender.
fn sealed_field(event: &JsValue, field: &str) -> Result<(String, String, Vec<u8>), JsValue> {
    let group = text(event, "group").ok_or_else(|| error("not a group message"))?;
    let from = text(event, "from").ok_or_else(|| error("not a message"))?;
    let msg = Reflect::get(event, &"msg".into())?;
    let encoded = text(&msg, field).ok_or_else(|| error(format!("no {field} in the message")))?;
    let sealed = B64.decode(encoded).map_err(|_| error("not base64url"))?;
    Ok((group, from, sealed))
}

fn signed_by_sender(signer: &[u8; 32], keys: &[PublicIdentity], from: &str) -> Result<(), JsValue> {
    if keys.iter().any(|key| key.ed25519 == *signer) {
        Ok(())
    } else {
        Err(error(format!("signed by a key that is not {from}'s")))
    }
}

/// A device's group keys, by group and epoch.
#[wasm_bindgen]
#[derive(Debug, Default)]
pub struct GroupKeys {
    keys: HashMap<String, BTreeMap<u32, GroupKey>>,
}

#[wasm_bindgen]
impl GroupKeys {
    /// No keys yet.
    #[wasm_bindgen(constructor)]
    pub fn new() -> Self {
        Self::default()
    }

    /// The newest epoch known for `group`, if any.
    pub fn epoch(&self, group: &str) -> Option<u32> {
        self.keys.get(group)?.keys().next_back().copied()
    }

    /// Learns the key a `{group_key}` message event carries, sealed to `me` and signed by one
    /// of `sender_keys` (from `chat.keys(event.from)`); gives its epoch.
    pub fn learn(
        &mut self,
        me: &Identity,
        event: JsValue,
        sender_keys: JsValue,
    ) -> Result<u32, JsValue> {
        let (group, from, sealed) = sealed_field(&event, "group_key")?;
        let keys = public_identities(&sender_keys)?;
        let signer = sealed_sender(&sealed).map_err(|e| error(e.to_string()))?;
        signed_by_sender(&signer, &keys, &from)?;
        let bytes = open_sealed(me.keys(), &sealed, &key_context(&group, &from), Some(&signer))
            .map_err(|e| error(e.to_string()))?;
        let key = GroupKey::from_bytes(&bytes).map_err(|e| error(e.to_string()))?;
        let epoch = key.epoch;
        self.keys.entry(group).or_default().insert(epoch, key);
        Ok(epoch)
    }
}

#[wasm_bindgen]
impl Chat {
    /// Makes `group`'s next key, seals it to its members' devices and sends it to the group.
    #[wasm_bindgen(js_name = rotateGroupKey)]
    pub async fn rotate_group_key(
        &self,
        me: &Identity,
        keys: &mut GroupKeys,
        group: String,
    ) -> Result<u32, JsValue> {
        let epoch = keys.epoch(&group).map_or(1, |epoch| epoch + 1);
        let reply =
            self.ask(&[("type", "members".into()), ("group", group.clone().into())]).await?;
        let mut devices = Vec::new();
        for member in Array::from(&Reflect::get(&reply, &"members".into())?).iter() {
            if text(&member, "role").as_deref() == Some("invited") {
                continue;
            }
            let user = text(&member, "user").ok_or_else(|| error("a member without a name"))?;
            let found = public_identities(&self.keys(user.clone()).await?)?;
            if found.is_empty() {
                return Err(error(format!("{user} has published no keys")));
            }
            devices.extend(found);
        }
        let key = GroupKey::generate(epoch).map_err(|e| error(e.to_string()))?;
        let sealed =
            seal_for(me.keys(), &devices, &key_context(&group, &self.user()), &key.to_bytes())
                .map_err(|e| error(e.to_string()))?;
        let body = js_sys::Object::new();
        Reflect::set(&body, &"group_key".into(), &B64.encode(sealed).into())?;
        self.send_group(group.clone(), body.into()).await?;
        keys.keys.entry(group).or_default().insert(epoch, key);
        Ok(epoch)
    }

    /// Sends `msg` to `group` sealed with its newest key, signed by `me`.
    #[wasm_bindgen(js_name = sendSealedGroup)]
    pub async fn send_sealed_group(
        &self,
        me: &Identity,
        keys: &GroupKeys,
        group: String,
        msg: JsValue,
    ) -> Result<JsValue, JsValue> {
        let key = keys
            .keys
            .get(&group)
            .and_then(|epochs| epochs.values().next_back())
            .ok_or_else(|| error(format!("no key for {group}: rotateGroupKey first")))?;
        let plain = String::from(JSON::stringify(&msg)?);
        let sealed =
            seal_group(me.keys(), key, &message_context(&group, &self.user()), plain.as_bytes())
                .map_err(|e| error(e.to_string()))?;
        let body = js_sys::Object::new();
        Reflect::set(&body, &"sealed_group".into(), &B64.encode(sealed).into())?;
        self.send_group(group, body.into()).await
    }

    /// Opens a sealed group message event with the key of its epoch; it must be signed by one
    /// of the sender's devices (fetched now).
    #[wasm_bindgen(js_name = openGroup)]
    pub async fn open_group(&self, keys: &GroupKeys, event: JsValue) -> Result<JsValue, JsValue> {
        let (group, from, sealed) = sealed_field(&event, "sealed_group")?;
        let (epoch, signer) = group_sealed_by(&sealed).map_err(|e| error(e.to_string()))?;
        signed_by_sender(&signer, &public_identities(&self.keys(from.clone()).await?)?, &from)?;
        let key = keys
            .keys
            .get(&group)
            .and_then(|epochs| epochs.get(&epoch))
            .ok_or_else(|| error(format!("no key of epoch {epoch} for {group}")))?;
        let plain = open_group(key, &sealed, &message_context(&group, &from), Some(&signer))
            .map_err(|e| error(e.to_string()))?;
        JSON::parse(&String::from_utf8(plain).map_err(|_| error("not text"))?)
    }
}
