//! `Chat`: the chat listener's client for JavaScript (`whispeer serve --chat-listen`,
//! `CHAT.md`). One JSON object per WebSocket text message; requests carry a `ref` and their
//! promise settles with the reply (rejected with `code: sentence` when refused); everything else
//! goes to the `onEvent` callback, in order. Events that arrive before a callback is set are
//! kept (up to 10 000; beyond that the oldest are dropped and counted in `droppedEvents`).
//!
//! Messages are sealed end to end by default (`sealing.rs`); pass `{plain: true}` as the
//! options to talk with clients that do not seal.
//!
//! The connection acknowledges its inbox (`?ack=1`): an event is acknowledged once it was
//! handed to the `onEvent` callback (at most one acknowledgement each 50 ms, and on `close`),
//! and the device's cursor moves only so; what was not acknowledged when the page went comes
//! again on the device's next connection (with the same `id`).
//!
//! ```js
//! const chat = await Chat.connect("ws://127.0.0.1:3030/ws", "alice", "browser", null);
//! chat.onEvent((event) => { if (event.msg !== undefined) console.log(event.from, event.msg); });
//! await chat.sendTo("bob", "hi");
//! const page = await chat.history("bob", 20); // "#team" for a group
//! ```

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use js_sys::{Function, JSON, Object, Promise, Reflect};
use wasm_bindgen::prelude::*;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{CloseEvent, MessageEvent, WebSocket};

use super::error;

/// Events kept while no callback is set.
const KEPT_EVENTS: usize = 10_000;

pub(crate) struct ChatState {
    socket: WebSocket,
    next_ref: u32,
    pending: HashMap<u32, (Function, Function)>,
    on_event: Option<Function>,
    kept: VecDeque<JsValue>,
    dropped: u32,
    /// Resolves `connect` with the welcome.
    welcome: Option<(Function, Function)>,
    user: String,
    device: String,
    /// The socket's callbacks, kept alive with it.
    handlers: Option<super::Handlers>,
    /// End-to-end sealing, unless plain.
    pub(crate) e2e: Option<super::sealing::E2e>,
    /// The last inbox position acknowledged, the last one handed to the page, and when the
    /// last acknowledgement went (ms): one a batch, not one a message.
    acknowledged: f64,
    handed: f64,
    acked_at: f64,
}

/// The least time between two acknowledgements; what is handed meanwhile goes with the next
/// one (or when the connection is closed).
const ACK_EVERY_MS: f64 = 50.0;

fn get(value: &JsValue, key: &str) -> JsValue {
    Reflect::get(value, &key.into()).unwrap_or(JsValue::UNDEFINED)
}

fn text(value: &JsValue, key: &str) -> Option<String> {
    get(value, key).as_string()
}

impl ChatState {
    /// `event` was handed to the page: its inbox position is acknowledged now, or with the
    /// next acknowledgement if one went less than `ACK_EVERY_MS` ago.
    fn acknowledge(&mut self, event: &JsValue) {
        if let Some(at) = get(event, "at").as_f64() {
            self.handed = self.handed.max(at);
        }
        if js_sys::Date::now() - self.acked_at >= ACK_EVERY_MS {
            self.flush_ack();
        }
    }

    /// Acknowledges everything handed to the page so far.
    fn flush_ack(&mut self) {
        if self.handed <= self.acknowledged {
            return;
        }
        self.acknowledged = self.handed;
        self.acked_at = js_sys::Date::now();
        let at = self.handed;
        let _ = self.socket.send_with_str(&format!("{{\"type\":\"ack\",\"at\":{at}}}"));
    }

    /// One text message from the server: a reply, the welcome, or an event. What to call.
    fn receive(&mut self, data: &str) -> Option<(Function, JsValue)> {
        let value = JSON::parse(data).ok()?;
        if let Some((resolve, reject)) = self.welcome.take() {
            if text(&value, "type").as_deref() == Some("welcome") {
                self.user = text(&value, "user").unwrap_or_default();
                self.device = text(&value, "device").unwrap_or_default();
                return Some((resolve, value));
            }
            return Some((reject, refusal(&value)));
        }
        let reference = get(&value, "ref").as_f64().map(|r| r as u32);
        if let Some((resolve, reject)) = reference.and_then(|r| self.pending.remove(&r)) {
            let refused = text(&value, "type").as_deref() == Some("error");
            return Some(if refused { (reject, refusal(&value)) } else { (resolve, value) });
        }
        let value = match self.e2e.as_mut() {
            Some(e2e) => e2e.process(value),
            None => value,
        };
        match &self.on_event {
            Some(callback) => Some((callback.clone(), value)),
            None => {
                if self.kept.len() >= KEPT_EVENTS {
                    self.kept.pop_front();
                    self.dropped += 1;
                }
                self.kept.push_back(value);
                None
            }
        }
    }

    /// Everything still waiting: to reject when the connection closes.
    fn fail_all(&mut self) -> Vec<Function> {
        let mut rejects: Vec<Function> =
            self.pending.drain().map(|(_, (_, reject))| reject).collect();
        rejects.extend(self.welcome.take().map(|(_, reject)| reject));
        rejects
    }
}

fn refusal(value: &JsValue) -> JsValue {
    let code = text(value, "code").unwrap_or_else(|| "error".into());
    let message = text(value, "error").unwrap_or_default();
    error(format!("{code}: {message}"))
}

/// A chat connection from JavaScript.
#[wasm_bindgen]
pub struct Chat {
    pub(crate) state: Rc<RefCell<ChatState>>,
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat").field("user", &self.state.borrow().user).finish_non_exhaustive()
    }
}

/// `?id=…&device=…&token=…&ack=1` appended to `url`.
fn with_query(url: &str, pairs: &[(&str, Option<String>)]) -> String {
    let query: Vec<String> = pairs
        .iter()
        .filter_map(|(key, value)| {
            let value = value.as_ref()?;
            Some(format!("{key}={}", String::from(js_sys::encode_uri_component(value))))
        })
        .collect();
    if query.is_empty() {
        return url.to_string();
    }
    let joiner = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joiner}{}", query.join("&"))
}

#[wasm_bindgen]
impl Chat {
    /// Connects to a chat listener as `user` on `device` (with `token`, an API key or JWT, on
    /// a server that requires one); resolves once the server welcomed it and this device's
    /// identity is published. `options`: `{plain: true}` not to seal; `{identity: text}` (an
    /// `Identity`'s `toText()`), or `{storage}` (an object with `getItem`/`setItem`; default
    /// `localStorage` where there is one) to keep it in.
    pub async fn connect(
        url: String,
        user: Option<String>,
        device: Option<String>,
        token: Option<String>,
        options: Option<Object>,
    ) -> Result<Self, JsValue> {
        let pairs = [("id", user), ("device", device), ("token", token), ("ack", Some("1".into()))];
        let url = with_query(&url, &pairs);
        let socket = WebSocket::new(&url)?;
        let mut welcome = None;
        let welcomed = Promise::new(&mut |resolve, reject| welcome = Some((resolve, reject)));
        let state = Rc::new(RefCell::new(ChatState {
            socket: socket.clone(),
            next_ref: 1,
            pending: HashMap::new(),
            on_event: None,
            kept: VecDeque::new(),
            dropped: 0,
            welcome,
            user: String::new(),
            device: String::new(),
            handlers: None,
            e2e: None,
            acknowledged: 0.0,
            handed: 0.0,
            acked_at: 0.0,
        }));
        let receiver = Rc::clone(&state);
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
            let Some(data) = event.data().as_string() else { return };
            let call = receiver.borrow_mut().receive(&data);
            if let Some((callback, value)) = call {
                let _ = callback.call1(&JsValue::NULL, &value);
                // Replies and the welcome have no position: only events are acknowledged.
                receiver.borrow_mut().acknowledge(&value);
            }
        });
        let closer = Rc::downgrade(&state);
        let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |event: CloseEvent| {
            let Some(state) = closer.upgrade() else { return };
            let reason = format!("the chat connection closed ({})", event.code());
            let rejects = state.borrow_mut().fail_all();
            for reject in rejects {
                let _ = reject.call1(&JsValue::NULL, &error(&reason));
            }
        });
        socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        state.borrow_mut().handlers = Some((on_message, on_close));
        JsFuture::from(welcomed).await?;
        let options: JsValue = options.map_or(JsValue::UNDEFINED, Into::into);
        let e2e = {
            let state = state.borrow();
            super::sealing::E2e::open(&options, &state.user, &state.device)
        };
        let chat = Self { state };
        match e2e {
            Ok(Some(e2e)) => {
                chat.state.borrow_mut().e2e = Some(e2e);
                chat.publish_identity().await?;
            }
            Ok(None) => {}
            Err(err) => {
                chat.close();
                return Err(err);
            }
        }
        Ok(chat)
    }

    /// The user this connection is.
    #[wasm_bindgen(getter)]
    pub fn user(&self) -> String {
        self.state.borrow().user.clone()
    }

    /// This connection's device.
    #[wasm_bindgen(getter)]
    pub fn device(&self) -> String {
        self.state.borrow().device.clone()
    }

    /// Events dropped because no callback was set and 10 000 were already kept.
    #[wasm_bindgen(getter, js_name = droppedEvents)]
    pub fn dropped_events(&self) -> u32 {
        self.state.borrow().dropped
    }

    /// Calls `callback(event)` for every message, receipt, group event, presence change,
    /// typing and notice, in order — first those that came before it was set.
    #[wasm_bindgen(js_name = onEvent)]
    pub fn on_event(&self, callback: Function) {
        let kept: Vec<JsValue> = {
            let mut state = self.state.borrow_mut();
            state.on_event = Some(callback.clone());
            state.kept.drain(..).collect()
        };
        for event in kept {
            let _ = callback.call1(&JsValue::NULL, &event);
            self.state.borrow_mut().acknowledge(&event);
        }
    }

    /// Sends a request (an object as `CHAT.md` describes); resolves with its reply, rejects
    /// with `code: sentence` when refused or when the connection closes.
    pub async fn request(&self, request: JsValue) -> Result<JsValue, JsValue> {
        let object = Object::assign(&Object::new(), request.unchecked_ref());
        let mut pending = None;
        let answered = Promise::new(&mut |resolve, reject| pending = Some((resolve, reject)));
        {
            let mut state = self.state.borrow_mut();
            let reference = state.next_ref;
            state.next_ref += 1;
            Reflect::set(&object, &"ref".into(), &reference.into())?;
            let text = String::from(JSON::stringify(&object)?);
            state.socket.send_with_str(&text)?;
            if let Some(pending) = pending.take() {
                state.pending.insert(reference, pending);
            }
        }
        JsFuture::from(answered).await
    }

    /// A request from key/value pairs.
    pub(crate) async fn ask(&self, pairs: &[(&str, JsValue)]) -> Result<JsValue, JsValue> {
        let object = Object::new();
        for (key, value) in pairs {
            Reflect::set(&object, &(*key).into(), value)?;
        }
        self.request(object.into()).await
    }

    /// Creates a group; `open` lets anyone join.
    #[wasm_bindgen(js_name = createGroup)]
    pub async fn create_group(&self, group: String, open: bool) -> Result<JsValue, JsValue> {
        self.ask(&[("type", "create".into()), ("group", group.into()), ("open", open.into())]).await
    }

    /// Joins an open group, or accepts an invitation.
    pub async fn join(&self, group: String) -> Result<JsValue, JsValue> {
        self.ask(&[("type", "join".into()), ("group", group.into())]).await
    }

    /// Invites `user` to `group`.
    pub async fn invite(&self, group: String, user: String) -> Result<JsValue, JsValue> {
        self.ask(&[("type", "invite".into()), ("group", group.into()), ("user", user.into())]).await
    }

    /// Leaves `group`.
    pub async fn leave(&self, group: String) -> Result<JsValue, JsValue> {
        let reply = self.ask(&[("type", "leave".into()), ("group", group.as_str().into())]).await?;
        self.group_changed(&group);
        Ok(reply)
    }

    /// Removes `user` from `group` (owner and admins); the next sealed message to the group
    /// goes under a new key that `user`'s devices do not get.
    pub async fn remove(&self, group: String, user: String) -> Result<JsValue, JsValue> {
        let request =
            [("type", "remove".into()), ("group", group.as_str().into()), ("user", user.into())];
        let reply = self.ask(&request).await?;
        self.group_changed(&group);
        Ok(reply)
    }

    /// The latest `limit` entries of a conversation: `"bob"`, or `"#team"` for a group.
    pub async fn history(&self, with: String, limit: u32) -> Result<JsValue, JsValue> {
        let key = conversation(&with);
        let reply = self.ask(&[("type", "history".into()), key, ("limit", limit.into())]).await?;
        self.open_history(&reply);
        Ok(reply)
    }

    /// Marks a conversation (`"bob"` or `"#team"`) read up to `seq`.
    pub async fn read(&self, with: String, seq: f64) -> Result<JsValue, JsValue> {
        self.ask(&[("type", "read".into()), conversation(&with), ("seq", seq.into())]).await
    }

    /// Unread messages per conversation.
    pub async fn unread(&self) -> Result<JsValue, JsValue> {
        self.ask(&[("type", "unread".into())]).await
    }

    /// The presence of this user's contacts and group members.
    pub async fn who(&self) -> Result<JsValue, JsValue> {
        self.ask(&[("type", "who".into())]).await
    }

    /// Tells a conversation (`"bob"` or `"#team"`) this user is typing; nothing is stored.
    pub fn typing(&self, to: String) -> Result<(), JsValue> {
        let (key, value) = conversation(&to);
        let key = if key == "with" { "to" } else { key };
        let object = Object::new();
        Reflect::set(&object, &"type".into(), &"typing".into())?;
        Reflect::set(&object, &key.into(), &value)?;
        let text = String::from(JSON::stringify(&object)?);
        self.state.borrow().socket.send_with_str(&text)
    }

    /// Closes the connection, acknowledging first what was handed to the page.
    pub fn close(&self) {
        let mut state = self.state.borrow_mut();
        state.flush_ack();
        let _ = state.socket.close();
    }
}

/// `"#team"` is the group `team`; anything else a user.
fn conversation(name: &str) -> (&'static str, JsValue) {
    match name.strip_prefix('#') {
        Some(group) => ("group", group.into()),
        None => ("with", name.into()),
    }
}
