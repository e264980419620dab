//! End-to-end keys for JavaScript, on by default as in the Rust SDK (the same
//! `whispeer_engines::ChatKeys`, so each opens what the other seals): a `Chat` has a device
//! identity — given (`{identity: text}`), or kept in the browser's `localStorage` (or any
//! `{getItem, setItem}` passed as `storage`) under `whispeer.chat.<user>.<device>.identity`,
//! made on first use; without storage (Node) made for the connection — publishes it, seals
//! `sendTo` and `sendGroup`, and opens what arrives before `onEvent` sees it.
//!
//! ```js
//! const chat = await Chat.connect(url, "alice", "browser", null);            // sealed
//! const raw = await Chat.connect(url, "alice", "cli", null, { plain: true }); // not sealed
//! chat.onEvent((event) => {
//!   if (event.type === "key_changed") warn(event.user, event.was, event.now);
//!   else if (event.msg !== undefined) show(event.from, event.msg, event.sealed, event.unreadable);
//! });
//! ```

use std::collections::HashMap;

use js_sys::{Array, Function, JSON, Object, Reflect};
use serde_json::Value;
use wasm_bindgen::JsValue;
use wasm_bindgen::prelude::*;
use whispeer_engines::{
    ChatKeys, ChatKeysError, Identity as Keys, KeyChange, Opened, PublicIdentity, is_sealed,
};

use super::chat::{Chat, ChatState};
use super::error;

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

    /// A copy of the keys, for a handle that outlives this object.
    pub(crate) fn owned(&self) -> Result<Keys, JsValue> {
        Keys::from_text(&self.keys.to_text()).map_err(|e| error(e.to_string()))
    }
}

#[wasm_bindgen]
impl Identity {
    /// A new identity.
    pub fn generate() -> Result<Self, JsValue> {
        Ok(Self { keys: Keys::generate().map_err(|e| error(e.to_string()))? })
    }

    /// The identity kept under `whispeer.identity.<name>` in `options.storage`
    /// (`{getItem, setItem}`; default: `localStorage`), made and kept there on first use; made
    /// for this call only where there is no storage (Node without one).
    pub fn stored(name: &str, options: JsValue) -> Result<Self, JsValue> {
        let item = JsValue::from(format!("whispeer.identity.{name}"));
        let storage = storage_of(&options);
        if let Some(storage) = &storage
            && let Some(text) = call(storage, "getItem", std::slice::from_ref(&item))?.as_string()
        {
            return Self::from_text(&text);
        }
        let made = Self::generate()?;
        if let Some(storage) = &storage {
            call(storage, "setItem", &[item, made.keys.to_text().as_str().into()])?;
        }
        Ok(made)
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

/// A device's sealing state and where it is kept.
pub(crate) struct E2e {
    pub(crate) keys: ChatKeys,
    storage: Option<JsValue>,
    prefix: String,
    /// Users' device keys as the directory gave them lately (milliseconds since the epoch when
    /// fetched): dropped when the server says their devices changed, and after `DEVICES_FOR_MS`
    /// in any case; at most `DEVICES_KEPT` users (emptied when full).
    devices: HashMap<String, (f64, Vec<PublicIdentity>)>,
}

/// How long fetched device keys are used without asking the directory again.
const DEVICES_FOR_MS: f64 = 60_000.0;
/// Most users whose device keys a connection keeps.
const DEVICES_KEPT: usize = 4096;

fn get(value: &JsValue, key: &str) -> JsValue {
    Reflect::get(value, &key.into()).unwrap_or(JsValue::UNDEFINED)
}

pub(crate) fn call(storage: &JsValue, method: &str, args: &[JsValue]) -> Result<JsValue, JsValue> {
    let function: Function = get(storage, method).dyn_into().map_err(|_| error("not a storage"))?;
    let list: Array = args.iter().collect();
    function.apply(storage, &list)
}

/// The `storage` in `options` (`{getItem, setItem}`), else the platform's `localStorage` if
/// there is one.
pub(crate) fn storage_of(options: &JsValue) -> Option<JsValue> {
    let given = get(options, "storage");
    if given.is_object() {
        return Some(given);
    }
    let global = get(&js_sys::global(), "localStorage");
    global.is_object().then_some(global)
}

impl E2e {
    /// The state for `user`'s `device` from `options` (`plain`, `identity`, `storage`); `None`
    /// when plain.
    pub(crate) fn open(
        options: &JsValue,
        user: &str,
        device: &str,
    ) -> Result<Option<Self>, JsValue> {
        if get(options, "plain").is_truthy() {
            return Ok(None);
        }
        let storage = storage_of(options);
        let prefix = format!("whispeer.chat.{user}.{device}");
        let stored = |suffix: &str| -> Option<String> {
            let storage = storage.as_ref()?;
            call(storage, "getItem", &[format!("{prefix}.{suffix}").into()]).ok()?.as_string()
        };
        let identity = match get(options, "identity").as_string().or_else(|| stored("identity")) {
            Some(text) => Keys::from_text(&text).map_err(|e| error(e.to_string()))?,
            None => {
                let identity = Keys::generate().map_err(|e| error(e.to_string()))?;
                if let Some(storage) = &storage {
                    let key = format!("{prefix}.identity");
                    call(storage, "setItem", &[key.into(), identity.to_text().as_str().into()])?;
                }
                identity
            }
        };
        let saved = stored("keys");
        let keys = ChatKeys::new(identity, user, device, saved.as_deref())
            .map_err(|e| error(format!("the saved keys: {e}")))?;
        Ok(Some(Self { keys, storage, prefix, devices: HashMap::new() }))
    }

    /// Saves the state if it changed.
    pub(crate) fn save(&mut self) {
        if self.keys.take_changed()
            && let Some(storage) = &self.storage
        {
            let key = format!("{}.keys", self.prefix);
            let _ = call(storage, "setItem", &[key.into(), self.keys.to_text().as_str().into()]);
        }
    }

    /// An event from the server, opened: a sealed message's `msg` replaced by what it opened
    /// to (with `sealed: true`, or `unreadable`), a group key learned (`{type:"group_key"}`), a
    /// changed key reported (`{type:"key_changed"}`); a membership change marks the group's
    /// key for renewal.
    pub(crate) fn process(&mut self, event: JsValue) -> JsValue {
        let text = |key: &str| get(&event, key).as_string();
        let kind = text("type");
        let about_keys = kind.as_deref() == Some("keys")
            || (kind.as_deref() == Some("group") && text("event").as_deref() == Some("keys"));
        if about_keys && let Some(user) = text("user") {
            self.devices.remove(&user);
        }
        if kind.as_deref() == Some("group")
            && let (Some(group), Some(change)) = (text("group"), text("event"))
            && matches!(change.as_str(), "joined" | "left" | "removed" | "keys")
        {
            self.keys.group_changed(&group);
            self.save();
            return event;
        }
        let msg = get(&event, "msg");
        let Some(value) = to_value(&msg) else { return event };
        if kind.is_some() || !is_sealed(&value) {
            return event;
        }
        let from = text("from").unwrap_or_default();
        let opened = self.keys.open(&from, text("to").as_deref(), text("group").as_deref(), &value);
        self.save();
        let set = |key: &str, value: JsValue| drop(Reflect::set(&event, &key.into(), &value));
        match opened {
            Opened::Message(value) => {
                set("msg", to_js(&value));
                set("sealed", true.into());
            }
            Opened::GroupKey { group, epoch } => {
                return object(&[
                    ("type", "group_key".into()),
                    ("group", group.into()),
                    ("epoch", epoch.into()),
                    ("from", from.into()),
                ]);
            }
            Opened::KeyChanged(change) => {
                let reported = change_object(&change);
                let _ = Reflect::set(&reported, &"message".into(), &event);
                return reported;
            }
            Opened::Unreadable(reason) => {
                set("sealed", true.into());
                set("unreadable", reason.into());
            }
            _ => {}
        }
        event
    }
}

fn to_value(value: &JsValue) -> Option<Value> {
    if value.is_undefined() {
        return None;
    }
    serde_json::from_str(&String::from(JSON::stringify(value).ok()?)).ok()
}

fn to_js(value: &Value) -> JsValue {
    JSON::parse(&value.to_string()).unwrap_or(JsValue::NULL)
}

pub(crate) fn object(pairs: &[(&str, JsValue)]) -> JsValue {
    let object = Object::new();
    for (key, value) in pairs {
        let _ = Reflect::set(&object, &(*key).into(), value);
    }
    object.into()
}

pub(crate) fn change_object(change: &KeyChange) -> JsValue {
    object(&[
        ("type", "key_changed".into()),
        ("user", change.user.as_str().into()),
        ("device", change.device.as_str().into()),
        ("was", change.was.as_str().into()),
        ("now", change.now.as_str().into()),
    ])
}

fn refusal(err: ChatKeysError) -> JsValue {
    match err {
        ChatKeysError::KeyChanged(changes) => {
            let first = &changes[0];
            error(format!(
                "key_changed: {}'s key for {} changed (was {}, now {}): compare fingerprints, then trust(\"{}\")",
                first.user, first.device, first.was, first.now, first.user
            ))
        }
        ChatKeysError::NoKeys(user) => error(format!(
            "no_keys: {user} has published no keys (a client that does not seal: sendPlainTo reaches it)"
        )),
        other => error(other.to_string()),
    }
}

fn public_identities(list: &JsValue) -> Result<Vec<PublicIdentity>, JsValue> {
    Array::from(list)
        .iter()
        .map(|entry| {
            let text = entry.as_string().ok_or_else(|| error("a key is text"))?;
            PublicIdentity::from_text(&text)
                .map_err(|e| error(format!("a key does not verify: {e}")))
        })
        .collect()
}

/// Runs `f` on the connection's sealing state, saving it after.
fn with_keys<T>(
    state: &std::cell::RefCell<ChatState>,
    f: impl FnOnce(&mut ChatKeys) -> T,
) -> Result<T, JsValue> {
    let mut state = state.borrow_mut();
    let e2e = state.e2e.as_mut().ok_or_else(|| error("this connection does not seal (plain)"))?;
    let result = f(&mut e2e.keys);
    e2e.save();
    Ok(result)
}

#[wasm_bindgen]
impl Chat {
    /// `user`'s devices' public identities (text), each checked.
    pub async fn keys(&self, user: String) -> Result<JsValue, JsValue> {
        let reply = self.ask(&[("type", "keys".into()), ("user", user.into())]).await?;
        let devices = Reflect::get(&reply, &"devices".into())?;
        public_identities(&devices)?;
        Ok(devices)
    }

    async fn identities(&self, user: &str) -> Result<Vec<PublicIdentity>, JsValue> {
        public_identities(&self.keys(user.to_string()).await?)
    }

    /// `user`'s device keys: those fetched lately, else from the directory.
    async fn devices(&self, user: &str) -> Result<Vec<PublicIdentity>, JsValue> {
        let now = js_sys::Date::now();
        let known = self.state.borrow().e2e.as_ref().and_then(|e2e| {
            let (fetched, keys) = e2e.devices.get(user)?;
            (now - fetched < DEVICES_FOR_MS).then(|| keys.clone())
        });
        if let Some(keys) = known {
            return Ok(keys);
        }
        let keys = self.identities(user).await?;
        if let Some(e2e) = self.state.borrow_mut().e2e.as_mut() {
            if e2e.devices.len() >= DEVICES_KEPT {
                e2e.devices.clear();
            }
            e2e.devices.insert(user.to_string(), (now, keys.clone()));
        }
        Ok(keys)
    }

    pub(crate) async fn publish_identity(&self) -> Result<(), JsValue> {
        let public = with_keys(&self.state, |keys| keys.public().to_text())?;
        self.ask(&[("type", "keys".into()), ("publish", public.into())]).await.map(drop)
    }

    /// Sends `msg` (any JSON value) to `user`, sealed for `user`'s devices and this user's
    /// other devices (plain on a `{plain: true}` connection); resolves with `{type: "sent",
    /// id, time, seq}`. Rejects with `key_changed: …` while a change of `user`'s keys is not
    /// trusted, `no_keys: …` when `user` has published none.
    #[wasm_bindgen(js_name = sendTo)]
    pub async fn send_to(&self, user: String, msg: JsValue) -> Result<JsValue, JsValue> {
        if self.state.borrow().e2e.is_none() {
            return self.send_plain_to(user, msg).await;
        }
        let theirs = self.devices(&user).await?;
        let ours = self.devices(&self.user()).await?;
        let value = to_value(&msg).ok_or_else(|| error("msg must be JSON"))?;
        let sealed =
            with_keys(&self.state, |keys| keys.seal_direct(&user, &theirs, &ours, &value))?
                .map_err(refusal)?;
        self.ask(&[("to", user.into()), ("msg", to_js(&sealed))]).await
    }

    /// Sends `msg` to `group`, sealed with the group's key — made first, and sealed to the
    /// members' devices, when there is none here or the membership changed.
    #[wasm_bindgen(js_name = sendGroup)]
    pub async fn send_group(&self, group: String, msg: JsValue) -> Result<JsValue, JsValue> {
        if self.state.borrow().e2e.is_none() {
            return self.send_plain_group(group, msg).await;
        }
        if with_keys(&self.state, |keys| keys.needs_group_key(&group))? {
            self.rotate_group_key(group.clone()).await?;
        }
        let value = to_value(&msg).ok_or_else(|| error("msg must be JSON"))?;
        let sealed =
            with_keys(&self.state, |keys| keys.seal_group(&group, &value))?.map_err(refusal)?;
        self.ask(&[("group", group.into()), ("msg", to_js(&sealed))]).await
    }

    /// Makes `group`'s next key now and sends it sealed to its members' devices; resolves
    /// with its epoch.
    #[wasm_bindgen(js_name = rotateGroupKey)]
    pub async fn rotate_group_key(&self, group: String) -> Result<u32, JsValue> {
        let reply =
            self.ask(&[("type", "members".into()), ("group", group.as_str().into())]).await?;
        let mut members = Vec::new();
        for member in Array::from(&get(&reply, "members")).iter() {
            if get(&member, "role").as_string().as_deref() == Some("invited") {
                continue;
            }
            let user = get(&member, "user").as_string().unwrap_or_default();
            let devices = self.devices(&user).await?;
            members.push((user, devices));
        }
        let (message, epoch) = with_keys(&self.state, |keys| keys.new_group_key(&group, &members))?
            .map_err(refusal)?;
        self.ask(&[("group", group.into()), ("msg", to_js(&message))]).await?;
        Ok(epoch)
    }

    /// Sends `msg` to `user` unsealed: the server and its store see it.
    #[wasm_bindgen(js_name = sendPlainTo)]
    pub async fn send_plain_to(&self, user: String, msg: JsValue) -> Result<JsValue, JsValue> {
        self.ask(&[("to", user.into()), ("msg", msg)]).await
    }

    /// Sends `msg` to `group` unsealed.
    #[wasm_bindgen(js_name = sendPlainGroup)]
    pub async fn send_plain_group(&self, group: String, msg: JsValue) -> Result<JsValue, JsValue> {
        self.ask(&[("group", group.into()), ("msg", msg)]).await
    }

    /// This device's fingerprint (60 digits); `undefined` on a plain connection.
    #[wasm_bindgen(getter)]
    pub fn fingerprint(&self) -> Option<String> {
        with_keys(&self.state, |keys| keys.public().fingerprint()).ok()
    }

    /// `user`'s devices checked against the keys seen: `{devices: [{device, fingerprint}],
    /// changes: [{user, device, was, now}]}`.
    #[wasm_bindgen(js_name = checkKeys)]
    pub async fn check_keys(&self, user: String) -> Result<JsValue, JsValue> {
        let devices = self.identities(&user).await?;
        let changes = with_keys(&self.state, |keys| keys.check(&user, &devices))?;
        let list: Array = devices
            .iter()
            .map(|d| {
                object(&[
                    ("device", d.device.as_str().into()),
                    ("fingerprint", d.fingerprint().into()),
                ])
            })
            .collect();
        let changed: Array = changes.iter().map(change_object).collect();
        Ok(object(&[("devices", list.into()), ("changes", changed.into())]))
    }

    /// Accepts `user`'s changed keys (after comparing fingerprints); resolves with how many.
    pub fn trust(&self, user: String) -> Result<u32, JsValue> {
        with_keys(&self.state, |keys| keys.trust(&user) as u32)
    }

    /// A message event got some other way, as `onEvent` would have seen it (opened).
    pub fn open(&self, event: JsValue) -> JsValue {
        let copy = Object::assign(&Object::new(), event.unchecked_ref()).into();
        match self.state.borrow_mut().e2e.as_mut() {
            Some(e2e) => e2e.process(copy),
            None => copy,
        }
    }

    /// Removes one of this user's devices from the directory; its groups get new keys.
    #[wasm_bindgen(js_name = revokeDevice)]
    pub async fn revoke_device(&self, device: String) -> Result<JsValue, JsValue> {
        self.ask(&[("type", "keys".into()), ("revoke", device.into())]).await
    }

    /// Opens the sealed messages in a `history` reply; group keys among them are learned and
    /// left out.
    pub(crate) fn open_history(&self, reply: &JsValue) {
        let messages = Array::from(&get(reply, "messages"));
        let kept = Array::new();
        for entry in messages.iter() {
            let opened = self.open(entry);
            if get(&opened, "type").as_string().as_deref() != Some("group_key") {
                kept.push(&opened);
            }
        }
        let _ = Reflect::set(reply, &"messages".into(), &kept);
    }

    /// Marks `group`'s key for renewal here.
    pub(crate) fn group_changed(&self, group: &str) {
        let _ = with_keys(&self.state, |keys| keys.group_changed(group));
    }
}
