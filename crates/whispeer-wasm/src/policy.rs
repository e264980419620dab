//! End-to-end keys for pub/sub from JavaScript, as in the Rust SDK (the same
//! `whispeer_engines::PolicyKeys`, so each opens what the other seals): the directory of device
//! identities (`client.publishIdentity`, `client.identities`) and key policies whose messages
//! only their members' devices open (`KeyPolicy`). The epochs' keys a device opened, and the
//! owner's device keys it trusts, are kept in the browser's `localStorage` (or the `storage`
//! given, `{getItem, setItem}`) under `whispeer.policy.<owner>.<name>.<device key>`; in Node
//! without storage, for the connection only.
//!
//! ```js
//! const me = Identity.stored("bob.browser");  // kept in localStorage, made on first use
//! await client.publishIdentity("bob", "browser", me);
//! const policy = await KeyPolicy.follow(client, me, "alice", "telemetry");
//! policy.subscribe("sensors/#", (topic, data, id, attempt, error) => show(topic, data, error));
//! await policy.publishText("sensors/browser", "21.5");
//! if (policy.changes.length) warn(policy.changes); // the owner's key changed: compare, then
//! policy.trustOwner();
//! ```

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use js_sys::{Array, Function, Promise, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::future_to_promise;
use whispeer_engines::{
    BundleRead, Identity as Keys, PolicyError, PolicyKeys, PublicIdentity, directory_filter,
    directory_topic, policy_topic,
};
use whispeer_proto::{ContentType, Filter, Headers, Qos, header};

use super::sealing::{Identity, change_object, object, storage_of};
use super::{Client, State, error, publish, round_trip, sleep, subscribe, unsubscribe};

/// The header naming the policy (`<owner>/<name>`) a message is sealed under, as the Rust SDK.
const POLICY_HEADER: &str = "e2e-policy";
/// How long a read of retained messages waits for more once the server has answered.
const SETTLE_MS: u32 = 100;

fn refusal(err: PolicyError) -> JsValue {
    match err {
        PolicyError::OwnerKeyChanged(changes) => {
            let first = &changes[0];
            error(format!(
                "owner_key_changed: {}'s key for device {} changed (was {}, now {}): compare fingerprints, then trustOwner()",
                first.user, first.device, first.was, first.now
            ))
        }
        other => error(other.to_string()),
    }
}

/// Subscribes a Rust callback, given each delivery's topic and payload.
fn subscribe_fn(
    state: &RefCell<State>,
    filter: &str,
    mut f: impl FnMut(String, Vec<u8>) + 'static,
) -> Result<u32, JsValue> {
    let filter = Filter::parse(filter).map_err(|e| error(format!("invalid filter: {e}")))?;
    let callback = Closure::<dyn FnMut(JsValue, JsValue)>::new(move |topic: JsValue, data| {
        let data = Uint8Array::new(&data).to_vec();
        f(topic.as_string().unwrap_or_default(), data);
    });
    let callback: Function = callback.into_js_value().unchecked_into();
    subscribe(state, filter, callback, Qos::AtMostOnce, None)
}

/// The retained messages `filter` matches now: topic and payload.
async fn retained(state: &RefCell<State>, filter: &str) -> Result<Vec<(String, Vec<u8>)>, JsValue> {
    let got = Rc::new(RefCell::new(Vec::new()));
    let into = Rc::clone(&got);
    let sub =
        subscribe_fn(state, filter, move |topic, data| into.borrow_mut().push((topic, data)))?;
    // Retained messages follow the subscription's acceptance; the round trip's answer follows
    // them.
    let answered = round_trip(state, None).await;
    sleep(SETTLE_MS).await;
    let _ = unsubscribe(state, sub);
    answered?;
    Ok(got.take())
}

/// Publishes `payload` retained on `topic` and waits for the server to have taken it.
async fn publish_retained(
    state: &RefCell<State>,
    topic: &str,
    payload: Bytes,
) -> Result<(), JsValue> {
    let mut headers = Headers::new();
    headers.insert(header::RETAIN, Bytes::from_static(b"1"));
    let publish = publish(state, topic, ContentType::Raw, payload, headers)?;
    round_trip(state, Some(publish)).await
}

/// `principal`'s devices in the directory, each one's signature checked.
async fn identities_of(
    state: &RefCell<State>,
    principal: &str,
) -> Result<Vec<PublicIdentity>, JsValue> {
    let entries = retained(state, &directory_filter(principal)).await?;
    Ok(entries
        .iter()
        .filter_map(|(_, data)| PublicIdentity::from_text(&String::from_utf8_lossy(data)).ok())
        .collect())
}

#[wasm_bindgen]
impl Client {
    /// Publishes `identity`'s public half to the server's directory as `principal`'s `device`
    /// (retained at `@keys/<principal>/<device>`; the server accepts only the principal's own).
    /// Resolves once the server took it; rejects with its refusal.
    #[wasm_bindgen(js_name = publishIdentity)]
    pub fn publish_identity(&self, principal: &str, device: &str, identity: &Identity) -> Promise {
        let state = Rc::clone(&self.state);
        let (topic, text) = (directory_topic(principal, device), identity.keys().public(device));
        future_to_promise(async move {
            let payload = Bytes::from(text.to_text());
            publish_retained(&state, &topic, payload).await.map(|()| JsValue::UNDEFINED)
        })
    }

    /// `principal`'s devices in the directory, each checked: `[{device, fingerprint, text}]`.
    pub fn identities(&self, principal: String) -> Promise {
        let state = Rc::clone(&self.state);
        future_to_promise(async move {
            let found = identities_of(&state, &principal).await?;
            let list: Array = found
                .iter()
                .map(|public| {
                    object(&[
                        ("device", public.device.as_str().into()),
                        ("fingerprint", public.fingerprint().into()),
                        ("text", public.to_text().into()),
                    ])
                })
                .collect();
            Ok(list.into())
        })
    }
}

/// What a policy handle shares with its bundle subscription.
struct Shared {
    client: Rc<RefCell<State>>,
    me: Keys,
    keys: RefCell<PolicyKeys>,
    /// Where the keys are kept, and under which name.
    storage: Option<(JsValue, String)>,
}

impl Shared {
    fn save(&self) {
        let mut keys = self.keys.borrow_mut();
        if keys.take_changed()
            && let Some((storage, name)) = &self.storage
        {
            let kept = keys.to_kept();
            let _ = super::sealing::call(storage, "setItem", &[name.into(), kept.as_str().into()]);
        }
    }

    /// Reads a bundle; one signed by a key the owner's trusted devices lack sends this device
    /// to the directory again (a new device of the owner is trusted, a changed key reported).
    async fn read(self: Rc<Self>, payload: Vec<u8>) {
        let read = self.keys.borrow_mut().read_bundle(&self.me, &payload);
        match read {
            Ok(BundleRead::UnknownSigner(_)) => {
                let owner = self.keys.borrow().owner().to_string();
                match identities_of(&self.client, &owner).await {
                    Ok(devices) => {
                        let changes = self.keys.borrow_mut().check_owner(&self.me, &devices);
                        for change in changes {
                            web_sys::console::warn_1(&change_object(&change));
                        }
                    }
                    Err(err) => web_sys::console::warn_1(&err),
                }
            }
            Err(err) => {
                let text = format!("whispeer: policy bundle not read: {err}");
                web_sys::console::warn_1(&text.into());
            }
            Ok(_) => {}
        }
        self.save();
    }

    /// Waits (up to 2 s) while `epoch`'s key (the newest seen when `None`) may still come.
    async fn settle(&self, epoch: Option<u32>) {
        for _ in 0..100 {
            if !self.keys.borrow().awaits_key(epoch) {
                return;
            }
            sleep(20).await;
        }
    }
}

/// A key policy as one device uses it: its owner's to change, every member's to publish and
/// read under.
#[wasm_bindgen]
pub struct KeyPolicy {
    shared: Rc<Shared>,
    bundles: u32,
}

impl std::fmt::Debug for KeyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.keys.borrow().fmt(f)
    }
}

impl KeyPolicy {
    async fn start(
        client: Rc<RefCell<State>>,
        me: Keys,
        owner: String,
        name: String,
        options: JsValue,
    ) -> Result<Self, JsValue> {
        let mut keys = PolicyKeys::new(&owner, &name);
        let device_key: String = me.public("").fingerprint().split(' ').take(3).collect();
        let storage = storage_of(&options)
            .map(|storage| (storage, format!("whispeer.policy.{owner}.{name}.{device_key}")));
        if let Some((storage, item)) = &storage {
            let kept = super::sealing::call(storage, "getItem", &[item.into()])?;
            if let Some(kept) = kept.as_string() {
                keys.read_kept(&kept).map_err(refusal)?;
            }
        }
        let directory = identities_of(&client, &owner).await?;
        for change in keys.check_owner(&me, &directory) {
            web_sys::console::warn_1(&change_object(&change));
        }
        if !keys.knows_owner() {
            return Err(refusal(PolicyError::NoDevices(owner)));
        }
        let shared = Rc::new(Shared { client, me, keys: RefCell::new(keys), storage });
        let later = Rc::downgrade(&shared);
        let bundles =
            subscribe_fn(&shared.client, &policy_topic(&owner, &name), move |_, data| {
                if let Some(shared) = later.upgrade() {
                    wasm_bindgen_futures::spawn_local(shared.read(data));
                }
            })?;
        // The current bundle, if any, arrives before the round trip's answer.
        round_trip(&shared.client, None).await?;
        shared.settle(None).await;
        shared.save();
        Ok(Self { shared, bundles })
    }

    async fn publish_epoch(
        &self,
        filter: &Filter,
        mut members: Vec<String>,
    ) -> Result<(), JsValue> {
        let shared = &self.shared;
        let (owner, name) = {
            let keys = shared.keys.borrow();
            (keys.owner().to_string(), keys.name().to_string())
        };
        members.push(owner.clone());
        members.sort();
        members.dedup();
        let mut devices = Vec::new();
        for member in &members {
            let found = identities_of(&shared.client, member).await?;
            if found.is_empty() {
                return Err(refusal(PolicyError::NoDevices(member.clone())));
            }
            devices.extend(found);
        }
        let bundle = shared
            .keys
            .borrow_mut()
            .make_bundle(&shared.me, filter, members, &devices)
            .map_err(refusal)?;
        shared.save();
        publish_retained(&shared.client, &policy_topic(&owner, &name), Bytes::from(bundle)).await
    }

    fn seal_and_publish(shared: Rc<Shared>, topic: String, plain: Vec<u8>) -> Promise {
        future_to_promise(async move {
            shared.settle(None).await;
            let sealed = shared.keys.borrow().seal(&shared.me, &topic, &plain).map_err(refusal)?;
            let mut headers = Headers::new();
            let label = shared.keys.borrow().label();
            headers.insert(POLICY_HEADER, Bytes::from(label.into_bytes()));
            let payload = Bytes::from(sealed);
            let publish = publish(&shared.client, &topic, ContentType::Raw, payload, headers)?;
            round_trip(&shared.client, Some(publish)).await.map(|()| JsValue::UNDEFINED)
        })
    }
}

#[wasm_bindgen]
impl KeyPolicy {
    /// Follows policy `name` of `owner` with this device's `identity`: the bundles its owner
    /// publishes (the current one first) are opened and their keys kept. `options`:
    /// `{storage}` (default: `localStorage` where there is one). Resolves to the `KeyPolicy`
    /// once the current bundle was read; rejects when the owner has no device in the
    /// directory.
    pub fn follow(
        client: &Client,
        identity: &Identity,
        owner: String,
        name: String,
        options: JsValue,
    ) -> Result<Promise, JsValue> {
        let (state, me) = (Rc::clone(&client.state), identity.owned()?);
        Ok(future_to_promise(async move {
            Ok(Self::start(state, me, owner, name, options).await?.into())
        }))
    }

    /// Makes (or replaces) policy `name` of `owner` — this device's principal — for `filter`
    /// with `members` (the owner always belongs): a new epoch's key sealed to all their
    /// devices in the directory, published. Resolves to the `KeyPolicy`.
    pub fn create(
        client: &Client,
        identity: &Identity,
        owner: String,
        name: String,
        filter: String,
        members: Vec<String>,
        options: JsValue,
    ) -> Result<Promise, JsValue> {
        let filter = Filter::parse(&filter).map_err(|e| error(format!("invalid filter: {e}")))?;
        let (state, me) = (Rc::clone(&client.state), identity.owned()?);
        Ok(future_to_promise(async move {
            let policy = Self::start(state, me, owner, name, options).await?;
            policy.publish_epoch(&filter, members).await?;
            Ok(policy.into())
        }))
    }

    /// Owner: the members become `members` (the owner always belongs): a new epoch sealed to
    /// their devices only, so a removed member cannot open what is sent afterwards.
    #[wasm_bindgen(js_name = setMembers)]
    pub async fn set_members(&self, members: Vec<String>) -> Result<(), JsValue> {
        let filter = self.shared.keys.borrow().filter().cloned();
        let filter = filter.ok_or_else(|| error("not a member of this policy (yet)"))?;
        self.publish_epoch(&filter, members).await
    }

    /// Publishes `data` on `topic` (inside the filter) sealed with the newest epoch's key;
    /// resolves once the server took it.
    pub fn publish(&self, topic: String, data: Vec<u8>) -> Promise {
        Self::seal_and_publish(Rc::clone(&self.shared), topic, data)
    }

    /// Publishes a string (UTF-8) like `publish`.
    #[wasm_bindgen(js_name = publishText)]
    pub fn publish_text(&self, topic: String, text: String) -> Promise {
        Self::seal_and_publish(Rc::clone(&self.shared), topic, text.into_bytes())
    }

    /// Opens a message sealed under the policy and received on `topic`; waits (up to 2 s) for
    /// its epoch's key when it may still come. Rejects when it does not open here.
    pub async fn open(&self, topic: String, data: Vec<u8>) -> Result<Uint8Array, JsValue> {
        let epoch = PolicyKeys::epoch_of(&data).map_err(refusal)?;
        self.shared.settle(Some(epoch)).await;
        let (plain, _) = self.shared.keys.borrow().open(&topic, &data).map_err(refusal)?;
        Ok(Uint8Array::from(&plain[..]))
    }

    /// Calls `callback(topic, data, messageId, attempt, error)` for every message on `filter`,
    /// opened (`data` null and `error` a sentence when it does not open here). Returns the
    /// client's subscription id (`client.unsubscribe(id)` ends it).
    pub fn subscribe(&self, filter: &str, callback: Function) -> Result<u32, JsValue> {
        let shared = Rc::clone(&self.shared);
        let opener = Closure::<dyn FnMut(JsValue, JsValue, JsValue, JsValue)>::new(
            move |topic: JsValue, data: JsValue, id: JsValue, attempt: JsValue| {
                let (shared, callback) = (Rc::clone(&shared), callback.clone());
                let data = Uint8Array::new(&data).to_vec();
                wasm_bindgen_futures::spawn_local(async move {
                    let topic_text = topic.as_string().unwrap_or_default();
                    let epoch = PolicyKeys::epoch_of(&data).ok();
                    shared.settle(epoch).await;
                    let opened = shared.keys.borrow().open(&topic_text, &data);
                    let (data, failure) = match opened {
                        Ok((plain, _)) => (Uint8Array::from(&plain[..]).into(), JsValue::NULL),
                        Err(err) => (JsValue::NULL, refusal(err)),
                    };
                    let args = Array::of5(&topic, &data, &id, &attempt, &failure);
                    let _ = callback.apply(&JsValue::NULL, &args);
                });
            },
        );
        let filter = Filter::parse(filter).map_err(|e| error(format!("invalid filter: {e}")))?;
        let opener: Function = opener.into_js_value().unchecked_into();
        subscribe(&self.shared.client, filter, opener, Qos::AtMostOnce, None)
    }

    /// `{filter, members, epoch}` as this device read them, or null before it could open one.
    #[wasm_bindgen(getter)]
    pub fn state(&self) -> JsValue {
        match self.shared.keys.borrow().state() {
            Some((filter, members, epoch)) => object(&[
                ("filter", filter.into()),
                (
                    "members",
                    members.iter().map(|m| JsValue::from(m.as_str())).collect::<Array>().into(),
                ),
                ("epoch", epoch.into()),
            ]),
            None => JsValue::NULL,
        }
    }

    /// The owner's device key changes seen and not trusted yet:
    /// `[{type: "key_changed", user, device, was, now}]`.
    #[wasm_bindgen(getter)]
    pub fn changes(&self) -> Array {
        self.shared.keys.borrow().changes().iter().map(change_object).collect()
    }

    /// Trusts the owner's changed device keys (after comparing fingerprints) and opens the
    /// bundle that waited for them. Returns how many were accepted.
    #[wasm_bindgen(js_name = trustOwner)]
    pub fn trust_owner(&self) -> u32 {
        let accepted = self.shared.keys.borrow_mut().trust_owner(&self.shared.me);
        self.shared.save();
        u32::try_from(accepted).unwrap_or(u32::MAX)
    }

    /// Stops following the policy's bundles.
    pub fn close(&self) {
        let _ = unsubscribe(&self.shared.client, self.bundles);
    }
}
