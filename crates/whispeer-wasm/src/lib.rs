//! whispeer-wasm — the whispeer client for browsers and Node, through wasm-bindgen.
//!
//! It speaks the binary protocol over the platform's `WebSocket` (in Node, install the `ws`
//! package and set `globalThis.WebSocket` to it) and seals and opens payloads with the same
//! engines as the Rust SDK, so a message sealed by one opens in the other with the same key.
//!
//! Several URLs, separated by commas, are nodes of one cluster: `connect` uses the first that
//! answers, and when the connection drops the client connects again — the same node first, then
//! each next one in turn, waiting longer after each round — and subscribes again there. A
//! subscription to an exact topic resumes after the last offset it received on the same node,
//! and on another node too after `setSharedOffsets(true)` (durable topics a cluster keeps have
//! the same offsets on every node).
//!
//! Without a shared key, `KeyPolicy` seals pub/sub messages so that only a policy's members'
//! devices open them, as the Rust SDK's `KeyPolicy` does (`policy.rs`).
//!
//! ```js
//! const client = await Client.connect("ws://127.0.0.1:7451/ws", keyText /* or null */, apiKey /* or null */);
//! const sub = client.subscribe("chat/#", (topic, data, id) => console.log(topic, new TextDecoder().decode(data)));
//! client.ack(sub, messageId);
//! client.publishText("chat/web", "hello from the browser");
//! client.close();
//! ```

mod chat;
mod policy;
mod sealing;

pub use chat::Chat;
pub use policy::KeyPolicy;
pub use sealing::Identity;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use js_sys::{Function, Promise, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};
use whispeer_engines::{Encryption, Engines, Keyring, Sealing};
use whispeer_proto::{
    Body, ContentType, Envelope, Filter, Flags, Frame, Headers, Limits, MessageId,
    PROTOCOL_VERSION, Qos, StartAt, Topic,
};

/// What a subscription asked for, to ask again after a reconnect.
struct SubSpec {
    filter: Filter,
    qos: Qos,
    group: Option<String>,
    callback: Function,
    /// The last offset received (exact topics), to resume after.
    last_offset: Option<u64>,
}

/// A socket's `message` and `close` callbacks.
type Handlers = (Closure<dyn FnMut(MessageEvent)>, Closure<dyn FnMut(CloseEvent)>);

/// First and longest wait between reconnection attempts, in milliseconds.
const BACKOFF_MS: (u32, u32) = (100, 5_000);

/// Connection state shared with the socket's callbacks.
struct State {
    /// The current socket (none before the first one opened).
    socket: Option<WebSocket>,
    /// The nodes, and which one the socket is connected to.
    urls: Vec<String>,
    current: usize,
    api_key: Option<String>,
    /// Counts the sockets opened: a socket's close matters only while it is the current one.
    generation: u64,
    /// Set by `close`: no reconnecting after it.
    closing: bool,
    /// Whether the nodes share offsets (`setSharedOffsets`).
    shared_offsets: bool,
    /// The current socket's callbacks, kept alive with it.
    handlers: Option<Handlers>,
    inbound: BytesMut,
    limits: Limits,
    engines: Engines,
    subscriptions: HashMap<u32, SubSpec>,
    next_sub: u32,
    next_correlation: u32,
    id_prefix: u64,
    next_id: u64,
    /// Resolves `connect` once the server's WELCOME (and the AUTH reply) arrive.
    ready: Option<(Function, Function)>,
    auth_pending: bool,
    welcomed: bool,
    max_frame_bytes: usize,
    /// Round trips waiting for the server's `Pong`, by the ping's correlation: resolve and
    /// reject.
    flushes: HashMap<u32, (Function, Function)>,
    /// Publishes whose refusal fails a round trip: the publish's correlation, the ping's.
    watched: HashMap<u32, u32>,
}

fn error(message: impl AsRef<str>) -> JsValue {
    JsError::new(message.as_ref()).into()
}

impl State {
    fn send(&mut self, frame: &Frame) -> Result<(), JsValue> {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf, self.max_frame_bytes).map_err(|e| error(e.to_string()))?;
        // A closed socket would drop the frame without a word: say so instead.
        let socket = self.socket.as_ref().filter(|s| s.ready_state() == WebSocket::OPEN);
        let socket = socket.ok_or_else(|| error("not connected (reconnecting)"))?;
        socket.send_with_u8_array(&buf)
    }

    fn correlation(&mut self) -> u32 {
        self.next_correlation = self.next_correlation.wrapping_add(1).max(100);
        self.next_correlation
    }

    fn settle_ready(&mut self, outcome: Result<(), JsValue>) {
        if let Some((resolve, reject)) = self.ready.take() {
            let _ = match outcome {
                Ok(()) => resolve.call0(&JsValue::NULL),
                Err(err) => reject.call1(&JsValue::NULL, &err),
            };
        }
    }

    /// Handles every complete frame in the inbound buffer; returns the subscriber callbacks to
    /// call, which the caller calls once it no longer holds the state (a callback may call
    /// back into the client, to `ack` for instance).
    fn receive(&mut self, bytes: &[u8]) -> Vec<(Function, js_sys::Array)> {
        self.inbound.extend_from_slice(bytes);
        let mut calls = Vec::new();
        loop {
            let frame = match Frame::decode(&mut self.inbound, &self.limits) {
                Ok(Some(frame)) => frame,
                Ok(None) => return calls,
                Err(err) => {
                    web_sys::console::error_1(
                        &format!("whispeer: bad frame from the server: {err}").into(),
                    );
                    if let Some(socket) = &self.socket {
                        let _ = socket.close();
                    }
                    return calls;
                }
            };
            calls.extend(self.dispatch(frame));
        }
    }

    fn dispatch(&mut self, frame: Frame) -> Option<(Function, js_sys::Array)> {
        match frame.body {
            Body::Welcome { max_frame_bytes, .. } => {
                self.max_frame_bytes = max_frame_bytes as usize;
                self.welcomed = true;
                if !self.auth_pending {
                    self.settle_ready(Ok(()));
                }
            }
            Body::Ok if frame.correlation == 2 && self.auth_pending => {
                self.auth_pending = false;
                if self.welcomed {
                    self.settle_ready(Ok(()));
                }
            }
            Body::Ping => {
                let _ = self.send(&Frame::new(frame.correlation, Body::Pong));
            }
            Body::Deliver { sub, attempt, envelope, offset } => {
                let spec = self.subscriptions.get_mut(&sub)?;
                if offset > 0 && spec.filter.is_exact() {
                    spec.last_offset = Some(offset);
                }
                let callback = &spec.callback;
                match self.engines.open(&envelope) {
                    Ok(plaintext) => {
                        let args = js_sys::Array::of4(
                            &JsValue::from_str(envelope.topic.as_str()),
                            &Uint8Array::from(&plaintext[..]),
                            &JsValue::from_str(&envelope.id.to_string()),
                            &JsValue::from(attempt),
                        );
                        return Some((callback.clone(), args));
                    }
                    Err(err) => web_sys::console::warn_1(
                        &format!(
                            "whispeer: message {} on {} skipped: {err}",
                            envelope.id, envelope.topic
                        )
                        .into(),
                    ),
                }
            }
            Body::Pong => {
                if let Some((resolve, _)) = self.flushes.remove(&frame.correlation) {
                    let _ = resolve.call0(&JsValue::NULL);
                }
            }
            Body::Error { code, message } => {
                let text = format!("whispeer: server error {code}: {message}");
                let failed = self.watched.remove(&frame.correlation);
                if let Some((_, reject)) = failed.and_then(|ping| self.flushes.remove(&ping)) {
                    let _ = reject.call1(&JsValue::NULL, &error(&text));
                } else if self.ready.is_some() {
                    self.settle_ready(Err(error(&text)));
                } else {
                    web_sys::console::error_1(&text.into());
                }
            }
            _ => {}
        }
        None
    }
}

/// A connection to a whispeer server from JavaScript.
#[wasm_bindgen]
pub struct Client {
    state: Rc<RefCell<State>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.borrow();
        f.debug_struct("Client")
            .field("subscriptions", &state.subscriptions.len())
            .finish_non_exhaustive()
    }
}

/// Waits `ms` milliseconds (the platform's `setTimeout`, in browsers and in Node).
pub(crate) async fn sleep(ms: u32) {
    let wait = Promise::new(&mut |resolve, _| {
        let set_timeout = js_sys::Reflect::get(&js_sys::global(), &"setTimeout".into())
            .ok()
            .and_then(|f| f.dyn_into::<Function>().ok());
        if let Some(set_timeout) = set_timeout {
            let _ = set_timeout.call2(&JsValue::NULL, &resolve, &JsValue::from(ms));
        }
    });
    let _ = JsFuture::from(wait).await;
}

/// Opens node `index`: the socket, its callbacks, `Hello` (and `Auth`); resolves once the
/// server welcomed it, and makes it the client's socket.
async fn open(state: &Rc<RefCell<State>>, index: usize) -> Result<(), JsValue> {
    let url = state.borrow().urls.get(index).cloned().ok_or_else(|| error("no such node"))?;
    let socket = WebSocket::new(&url)?;
    socket.set_binary_type(BinaryType::Arraybuffer);
    let opened = Promise::new(&mut |resolve, reject| {
        socket.set_onopen(Some(&resolve));
        socket.set_onerror(Some(&reject));
    });
    JsFuture::from(opened).await.map_err(|_| error(format!("cannot connect to {url}")))?;
    let generation = {
        let mut state = state.borrow_mut();
        state.generation += 1;
        state.socket = Some(socket.clone());
        state.current = index;
        state.inbound.clear();
        state.welcomed = false;
        state.auth_pending = state.api_key.is_some();
        state.max_frame_bytes = Limits::default().max_frame_bytes;
        state.generation
    };
    let receiver = Rc::clone(state);
    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
        if let Ok(buffer) = event.data().dyn_into::<js_sys::ArrayBuffer>() {
            let bytes = Uint8Array::new(&buffer).to_vec();
            let calls = receiver.borrow_mut().receive(&bytes);
            for (callback, args) in calls {
                let _ = callback.apply(&JsValue::NULL, &args);
            }
        }
    });
    socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    let closer = Rc::downgrade(state);
    let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |_: CloseEvent| {
        if let Some(state) = closer.upgrade() {
            let current = {
                let mut state = state.borrow_mut();
                state.settle_ready(Err(error("the connection closed")));
                state.watched.clear();
                for (_, (_, reject)) in state.flushes.drain() {
                    let _ = reject.call1(&JsValue::NULL, &error("the connection closed"));
                }
                state.generation == generation && !state.closing
            };
            if current {
                wasm_bindgen_futures::spawn_local(reconnect(state));
            }
        }
    });
    socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    let welcomed = Promise::new(&mut |resolve, reject| {
        state.borrow_mut().ready = Some((resolve, reject));
    });
    {
        let mut state = state.borrow_mut();
        state.handlers = Some((on_message, on_close));
        let hello = Body::Hello {
            version: PROTOCOL_VERSION,
            capabilities: 0,
            name: "whispeer-wasm".into(),
        };
        state.send(&Frame::new(1, hello))?;
        if let Some(key) = state.api_key.clone() {
            state.send(&Frame::new(2, Body::Auth { key: Bytes::from(key.into_bytes()) }))?;
        }
    }
    JsFuture::from(welcomed).await?;
    Ok(())
}

/// Connects again after the socket closed: the same node, then each next one in turn, the
/// wait doubling after each round; then subscribes again to everything, under the same ids.
async fn reconnect(state: Rc<RefCell<State>>) {
    let (start, nodes) = {
        let state = state.borrow();
        (state.current, state.urls.len().max(1))
    };
    let mut delay = BACKOFF_MS.0;
    for attempt in 0.. {
        sleep(delay).await;
        if state.borrow().closing {
            return;
        }
        let index = (start + attempt) % nodes;
        if open(&state, index).await.is_ok() {
            let mut state = state.borrow_mut();
            // Offsets mean the same on the same node, or on nodes that share them.
            let resume = index == start || state.shared_offsets;
            let subs: Vec<(u32, Filter, Qos, Option<String>, StartAt)> = state
                .subscriptions
                .iter()
                .map(|(id, spec)| {
                    let at = match spec.last_offset {
                        Some(last) if resume => StartAt::Offset(last + 1),
                        _ => StartAt::Latest,
                    };
                    (*id, spec.filter.clone(), spec.qos, spec.group.clone(), at)
                })
                .collect();
            for (sub, filter, qos, group, start) in subs {
                let correlation = state.correlation();
                let body = Body::Subscribe { sub, qos, filter, prefetch: 0, group, start };
                let _ = state.send(&Frame::new(correlation, body));
            }
            return;
        }
        if (attempt + 1) % nodes == 0 {
            delay = (delay * 2).min(BACKOFF_MS.1);
        }
    }
}

/// Publishes `payload` with `headers` at QoS 0, sealed with the client's engines; gives the
/// publish's correlation (a refusal names it).
pub(crate) fn publish(
    state: &RefCell<State>,
    topic: &str,
    content: ContentType,
    payload: Bytes,
    headers: Headers,
) -> Result<u32, JsValue> {
    let topic = Topic::parse(topic).map_err(|e| error(format!("invalid topic: {e}")))?;
    let mut state = state.borrow_mut();
    let id = MessageId(u128::from(state.id_prefix) << 64 | u128::from(state.next_id));
    state.next_id += 1;
    let timestamp_ms = js_sys::Date::now() as u64;
    let meta = Sealing { topic: topic.as_str(), id, timestamp_ms, headers: &headers };
    let (flags, payload) = state
        .engines
        .seal(&meta, Flags::with_content(content), payload)
        .map_err(|e| error(e.to_string()))?;
    let mut envelope = Envelope::new(id, topic, timestamp_ms, flags, payload);
    envelope.headers = headers;
    let correlation = state.correlation();
    state.send(&Frame::new(correlation, Body::Publish { qos: Qos::AtMostOnce, envelope }))?;
    Ok(correlation)
}

/// A round trip to the server: resolves once it has handled everything sent before; fails
/// with the server's refusal of the publish `watch` names, if it refused it, or when the
/// connection closes.
pub(crate) async fn round_trip(state: &RefCell<State>, watch: Option<u32>) -> Result<(), JsValue> {
    let answered = {
        let mut state = state.borrow_mut();
        let ping = state.correlation();
        let answered = Promise::new(&mut |resolve, reject| {
            state.flushes.insert(ping, (resolve, reject));
        });
        if let Some(publish) = watch {
            state.watched.insert(publish, ping);
        }
        if let Err(err) = state.send(&Frame::new(ping, Body::Ping)) {
            state.flushes.remove(&ping);
            watch.map(|publish| state.watched.remove(&publish));
            return Err(err);
        }
        answered
    };
    let outcome = JsFuture::from(answered).await.map(drop);
    if let Some(publish) = watch {
        state.borrow_mut().watched.remove(&publish);
    }
    outcome
}

/// Subscribes `callback(topic, data, messageId, attempt)` to `filter`; gives the
/// subscription's id.
pub(crate) fn subscribe(
    state: &RefCell<State>,
    filter: Filter,
    callback: Function,
    qos: Qos,
    group: Option<String>,
) -> Result<u32, JsValue> {
    let mut state = state.borrow_mut();
    let sub = state.next_sub;
    state.next_sub += 1;
    let spec =
        SubSpec { filter: filter.clone(), qos, group: group.clone(), callback, last_offset: None };
    let correlation = state.correlation();
    state.send(&Frame::new(
        correlation,
        Body::Subscribe { sub, qos, filter, prefetch: 0, group, start: StartAt::Latest },
    ))?;
    // Kept (and made again after a reconnect) only once it was sent.
    state.subscriptions.insert(sub, spec);
    Ok(sub)
}

/// Ends subscription `id`.
pub(crate) fn unsubscribe(state: &RefCell<State>, id: u32) -> Result<(), JsValue> {
    let mut state = state.borrow_mut();
    if state.subscriptions.remove(&id).is_some() {
        let correlation = state.correlation();
        state.send(&Frame::new(correlation, Body::Unsubscribe { sub: id }))?;
    }
    Ok(())
}

#[wasm_bindgen]
impl Client {
    /// Connects to `url` (`ws://…/ws` or `wss://…/ws`; several, separated by commas, are nodes
    /// of one cluster, tried in order), says hello, authenticates with `api_key` if given, and
    /// seals with the keys in `key_text` (the `whispeer keygen` format) if given. Resolves once
    /// a server has welcomed the client; rejects with the last node's error if none did.
    pub async fn connect(
        url: String,
        key_text: Option<String>,
        api_key: Option<String>,
    ) -> Result<Self, JsValue> {
        let mut engines = Engines::new();
        if let Some(text) = key_text {
            let keyring = Keyring::parse(&text).map_err(|e| error(format!("key: {e}")))?;
            engines = engines.with_encryption(Encryption::with_keyring(keyring));
        }
        let urls: Vec<String> =
            url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
        let mut prefix = [0u8; 8];
        getrandom::fill(&mut prefix).map_err(|e| error(e.to_string()))?;
        let nodes = urls.len();
        let state = Rc::new(RefCell::new(State {
            socket: None,
            urls,
            current: 0,
            api_key,
            generation: 0,
            closing: false,
            shared_offsets: false,
            handlers: None,
            inbound: BytesMut::new(),
            limits: Limits::default(),
            engines,
            subscriptions: HashMap::new(),
            next_sub: 1,
            next_correlation: 100,
            id_prefix: u64::from_le_bytes(prefix),
            next_id: 1,
            ready: None,
            auth_pending: false,
            welcomed: false,
            max_frame_bytes: Limits::default().max_frame_bytes,
            flushes: HashMap::new(),
            watched: HashMap::new(),
        }));
        let mut failed = error("no server URL");
        for index in 0..nodes {
            match open(&state, index).await {
                Ok(()) => return Ok(Self { state }),
                Err(err) => failed = err,
            }
        }
        Err(failed)
    }

    fn publish_payload(
        &self,
        topic: &str,
        content: ContentType,
        payload: Bytes,
    ) -> Result<(), JsValue> {
        publish(&self.state, topic, content, payload, Headers::new()).map(drop)
    }

    /// Publishes bytes to `topic`.
    pub fn publish(&self, topic: &str, data: &[u8]) -> Result<(), JsValue> {
        self.publish_payload(topic, ContentType::Raw, Bytes::copy_from_slice(data))
    }

    /// Publishes a string (as UTF-8 bytes) to `topic`.
    #[wasm_bindgen(js_name = publishText)]
    pub fn publish_text(&self, topic: &str, text: &str) -> Result<(), JsValue> {
        self.publish_payload(topic, ContentType::Raw, Bytes::copy_from_slice(text.as_bytes()))
    }

    /// Calls `callback(topic, data: Uint8Array, messageId: string, attempt: number)` for every
    /// message matching `filter`, opened with this client's keys (QoS 0). Returns the
    /// subscription id.
    pub fn subscribe(&self, filter: &str, callback: Function) -> Result<u32, JsValue> {
        self.subscribe_with(filter, callback, 0, None)
    }

    /// Like `subscribe`, with QoS (0 or 1) and an optional queue group. Under QoS 1 call
    /// `ack(id, messageId)` once a message is processed; unacknowledged, it is delivered again
    /// (`attempt` > 1) after the server's ack timeout.
    #[wasm_bindgen(js_name = subscribeWith)]
    pub fn subscribe_with(
        &self,
        filter: &str,
        callback: Function,
        qos: u8,
        group: Option<String>,
    ) -> Result<u32, JsValue> {
        let filter = Filter::parse(filter).map_err(|e| error(format!("invalid filter: {e}")))?;
        let qos = match qos {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            _ => return Err(error("qos must be 0 or 1")),
        };
        subscribe(&self.state, filter, callback, qos, group)
    }

    /// Ends subscription `id`.
    pub fn unsubscribe(&self, id: u32) -> Result<(), JsValue> {
        unsubscribe(&self.state, id)
    }

    /// Acknowledges message `message_id` (the 32-hex-digit id given to the callback) of the
    /// QoS 1 subscription `subscription`: it will not be delivered again.
    pub fn ack(&self, subscription: u32, message_id: &str) -> Result<(), JsValue> {
        let id = u128::from_str_radix(message_id, 16)
            .map_err(|_| error("message id must be 32 hex digits"))?;
        self.state
            .borrow_mut()
            .send(&Frame::new(0, Body::Ack { sub: subscription, id: MessageId(id) }))
    }

    /// Says whether the nodes share offsets (durable topics a cluster keeps): then a
    /// subscription to an exact topic that moves to another node resumes after the last offset
    /// it received, as it does on the same node. Default: no.
    #[wasm_bindgen(js_name = setSharedOffsets)]
    pub fn set_shared_offsets(&self, shared: bool) {
        self.state.borrow_mut().shared_offsets = shared;
    }

    /// Resolves once the server has handled everything sent before (a round trip).
    pub async fn flush(&self) -> Result<(), JsValue> {
        round_trip(&self.state, None).await
    }

    /// Closes the connection (for good: no reconnecting).
    pub fn close(&self) {
        let mut state = self.state.borrow_mut();
        state.closing = true;
        if let Some(socket) = &state.socket {
            let _ = socket.close();
        }
    }
}
