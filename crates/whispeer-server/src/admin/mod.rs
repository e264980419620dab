//! The admin port (`whispeer serve --admin-listen`, or `.with(Admin::new(addr))` in an embedding
//! program): health, readiness, metrics and the admin API.
//!
//! - `GET /healthz`: 200 while the process answers;
//! - `GET /readyz`: 200 once the store is recovered and the listeners accept; 503 once shutdown
//!   has begun, or once the store's writer has failed (`whispeer_store_healthy` 0);
//! - `GET /metrics`: the broker's and the server's counters in the Prometheus text format,
//!   through the `metrics` facade and its Prometheus exporter (counters end in `_total`):
//!   messages and bytes in and out per topic class, deliveries, acks, redeliveries, drops by
//!   reason, queue depths, store write and fsync latency histograms, auth failures.
//!
//! - `GET /api/topics`, `/api/subscriptions`, `/api/durable`: JSON snapshots of the broker, for
//!   `whispeer inspect`: topics retained or seen by the server (subscribers, messages and bytes
//!   in and out, rates over the last 5 s, retained history); subscriptions with their counters,
//!   groups counted once; durable subscriptions with their lag. They need
//!   `Authorization: Bearer <admin_token>`; without an `admin_token` configured they answer 403.
//!
//! - `GET /api/connections`: the live connections (peer, principal, subscriptions and their
//!   filters, messages published and delivered, since);
//!   `POST /api/connections/{id}/disconnect` disconnects one (it is told why).
//!
//! - `GET /api/history?topic=T&from=WHERE&max=N`: a page of a topic's retained history (from
//!   the store beyond memory, for a durable topic): sealed envelopes in base64, with
//!   `next_from` to page on (null at the end); a page ends early past 8 MiB of payloads. `whispeer replay --admin` reads it.
//! - `GET /api/retained?filter=F`: the retained messages (all, or those `filter` matches),
//!   each with its topic, id, time, size and sealed envelope in base64;
//!   `DELETE /api/retained?topic=T` clears one topic's, on disk too (404 if it had none).
//! - `POST /api/durable/rewind` `{"filter", "group", "from"}`: moves a durable subscription
//!   without members to another position, so it delivers again from there (409 while it has
//!   members). `whispeer replay --group` triggers it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use whispeer_core::{Broker, Filter, HistoryError, STORE_BATCH_RECORDS, StartAt, Topic};

use crate::{AccessCounters, Connections, FlowStats, Retained, ServerConfig, Traffic};

mod extension;
mod retained;
pub use extension::{Admin, parse_start};

/// The admin port's routes and what they read; [`Admin`] starts one with the broker.
#[derive(Clone)]
pub struct AdminServer {
    broker: Broker,
    /// SHA-256 digest of the admin token; `None`: the API is closed.
    token: Option<[u8; 32]>,
    access: Arc<AccessCounters>,
    connections: Arc<Connections>,
    traffic: Arc<Traffic>,
    rates: Arc<Mutex<Rates>>,
    ready: Arc<AtomicBool>,
    prometheus: PrometheusHandle,
    hooks: Arc<std::sync::RwLock<Hooks>>,
    retained: Arc<Retained>,
}

/// What other parts of the server (the cluster link) add to readiness and to each scrape.
#[derive(Default)]
struct Hooks {
    ready: Vec<Box<dyn Fn() -> Result<(), String> + Send + Sync>>,
    record: Vec<Box<dyn Fn() + Send + Sync>>,
    cluster: Option<Box<dyn Fn() -> Value + Send + Sync>>,
    presence: Option<Box<dyn Fn() -> Value + Send + Sync>>,
}

/// How often topic rates are sampled: a rate is the average over the last window.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Per-topic message rates (in, out per second) over the last sampling window.
#[derive(Default)]
struct Rates {
    last: HashMap<Topic, FlowStats>,
    per_sec: HashMap<Topic, (f64, f64)>,
}

impl Rates {
    /// Takes a new sample, `elapsed` after the last one.
    fn sample(&mut self, now: Vec<(Topic, FlowStats)>, elapsed: Duration) {
        let secs = elapsed.as_secs_f64().max(f64::EPSILON);
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / secs;
        self.per_sec = now
            .iter()
            .map(|(topic, flow)| {
                let before = self.last.get(topic).copied().unwrap_or_default();
                let rates = (
                    rate(flow.messages_in, before.messages_in),
                    rate(flow.messages_out, before.messages_out),
                );
                (topic.clone(), rates)
            })
            .collect();
        self.last = now.into_iter().collect();
    }
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("api_open", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

impl AdminServer {
    /// The admin port of `broker`, reading the counters of the listeners configured with
    /// `server`; its API needs `token` (closed without one). Installs the Prometheus recorder
    /// of this process.
    ///
    /// # Errors
    /// When the recorder cannot be installed (one per process).
    pub fn new(
        broker: Broker,
        server: &ServerConfig,
        token: Option<&str>,
    ) -> std::io::Result<Self> {
        // Explicit buckets, so the store's latencies are histograms (not summaries).
        let seconds = [
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0,
        ];
        let records = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
        let prometheus = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(STORE_BATCH_RECORDS.into()), &records)
            })
            .and_then(PrometheusBuilder::install_recorder)
            .map_err(|e| std::io::Error::other(format!("metrics recorder: {e}")))?;
        let ready = Arc::new(AtomicBool::new(false));
        let token = token.map(|t| Sha256::digest(t.as_bytes()).into());
        let (access, connections) = (Arc::clone(&server.access), Arc::clone(&server.connections));
        let (traffic, rates) = (Arc::clone(&server.traffic), Arc::default());
        let (hooks, retained) = (Arc::default(), Arc::clone(&server.retained));
        let admin = Self {
            broker,
            token,
            access,
            connections,
            traffic,
            rates,
            ready,
            prometheus,
            hooks,
            retained,
        };
        #[cfg(feature = "relay")]
        if let Some(relay) = &server.relay {
            let relay = Arc::clone(relay);
            admin.on_scrape(move || crate::relay::record(&relay.stats));
        }
        Ok(admin)
    }

    /// Adds a readiness condition: `/readyz` answers 503 with its reason while it fails.
    pub fn ready_when(&self, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        let mut hooks = self.hooks.write().unwrap_or_else(PoisonError::into_inner);
        hooks.ready.push(Box::new(check));
    }

    /// Adds `record` to every scrape of `/metrics` (it records through the `metrics` facade).
    pub fn on_scrape(&self, record: impl Fn() + Send + Sync + 'static) {
        let mut hooks = self.hooks.write().unwrap_or_else(PoisonError::into_inner);
        hooks.record.push(Box::new(record));
    }

    /// Serves `/api/cluster` with what `view` returns (the cluster link's view of its nodes).
    pub fn cluster_view(&self, view: impl Fn() -> Value + Send + Sync + 'static) {
        let mut hooks = self.hooks.write().unwrap_or_else(PoisonError::into_inner);
        hooks.cluster = Some(Box::new(view));
    }

    /// Serves `/api/presence` with what `view` returns (the cluster's principals); without it,
    /// this node's principals.
    pub fn presence_view(&self, view: impl Fn() -> Value + Send + Sync + 'static) {
        let mut hooks = self.hooks.write().unwrap_or_else(PoisonError::into_inner);
        hooks.presence = Some(Box::new(view));
    }

    /// Whether the request carries the admin token (compared by digest).
    fn authorized(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.token else {
            return Err(error(StatusCode::FORBIDDEN, "the admin API is closed: set admin_token"));
        };
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() });
        match given {
            Some(digest) if digest == *expected => Ok(()),
            _ => Err(error(StatusCode::UNAUTHORIZED, "missing or wrong admin token")),
        }
    }

    /// Marks the server ready (or not): `/readyz` answers 200 only while ready.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Serves the admin routes on `listener` until the process ends.
    ///
    /// # Errors
    /// The listener's I/O error.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        let (traffic, rates) = (Arc::clone(&self.traffic), Arc::clone(&self.rates));
        // Sampled while the routes are served, and not after.
        let sampler = async move {
            let mut tick = tokio::time::interval(RATE_WINDOW);
            let mut last = Instant::now();
            loop {
                tick.tick().await;
                let sample = traffic.topics();
                lock(&rates).sample(sample, last.elapsed());
                last = Instant::now();
            }
        };
        let routes = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/api/topics", get(topics))
            .route("/api/subscriptions", get(subscriptions))
            .route("/api/durable", get(durable))
            .route("/api/durable/rewind", post(rewind))
            .route("/api/history", get(history))
            .route("/api/retained", get(retained::list).delete(retained::clear))
            .route("/api/connections", get(connections))
            .route("/api/cluster", get(cluster))
            .route("/api/presence", get(presence))
            .route("/api/connections/{id}/disconnect", post(disconnect))
            .with_state(self);
        tokio::select! {
            served = axum::serve(listener, routes) => served,
            () = sampler => Ok(()),
        }
    }

    /// Copies the counters into the metrics recorder.
    fn record(&self) {
        let stats = self.broker.stats();
        let counters = [
            ("whispeer_messages_published_total", stats.published),
            ("whispeer_deliveries_total", stats.deliveries),
            ("whispeer_messages_unrouted_total", stats.unrouted),
            ("whispeer_acks_total", stats.acked),
            ("whispeer_nacks_total", stats.nacked),
            ("whispeer_redeliveries_total", stats.redelivered),
            ("whispeer_dead_letters_total", stats.dead_lettered),
            ("whispeer_messages_expired_total", stats.expired),
            ("whispeer_duplicates_total", stats.duplicates),
            ("whispeer_history_evicted_total", stats.history_evicted),
            ("whispeer_publishers_held_back_total", stats.held_back),
            ("whispeer_decode_errors_total", stats.decode_errors),
            ("whispeer_open_errors_total", stats.open_errors),
            ("whispeer_auth_failures_total", self.access.auth_failures()),
            ("whispeer_denied_publishes_total", self.access.denied_publish()),
            ("whispeer_denied_subscriptions_total", self.access.denied_subscribe()),
            ("whispeer_rate_limited_publishes_total", self.access.rate_limited()),
            ("whispeer_auth_timeouts_total", self.access.auth_timeouts()),
        ];
        for (name, value) in counters {
            metrics::counter!(name).absolute(value);
        }
        let drops = [
            ("drop_oldest", stats.dropped_oldest),
            ("drop_newest", stats.dropped_newest),
            ("queue_full", stats.rejected_full),
            ("disconnect", stats.disconnected),
            ("closed", stats.discarded),
        ];
        for (reason, value) in drops {
            metrics::counter!("whispeer_drops_total", "reason" => reason).absolute(value);
        }
        for (class, flow) in self.traffic.classes() {
            let flows = [
                ("whispeer_messages_in_total", flow.messages_in),
                ("whispeer_bytes_in_total", flow.bytes_in),
                ("whispeer_messages_out_total", flow.messages_out),
                ("whispeer_bytes_out_total", flow.bytes_out),
            ];
            for (name, value) in flows {
                metrics::counter!(name, "class" => class.clone()).absolute(value);
            }
        }
        let subscriptions = self.broker.subscriptions();
        let queued = subscriptions.iter().map(|s| s.stats.queued).sum::<usize>();
        let deepest = subscriptions.iter().map(|s| s.stats.queued).max().unwrap_or(0);
        let unacked = subscriptions.iter().map(|s| s.stats.unacked).sum::<usize>();
        metrics::gauge!("whispeer_queued_messages").set(queued as f64);
        metrics::gauge!("whispeer_queue_depth_max").set(deepest as f64);
        metrics::gauge!("whispeer_unacked_messages").set(unacked as f64);
        metrics::gauge!("whispeer_subscriptions").set(stats.subscriptions as f64);
        metrics::gauge!("whispeer_history_bytes").set(stats.history_bytes as f64);
        metrics::gauge!("whispeer_store_healthy").set(if self.broker.store_healthy() {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("whispeer_connections").set(self.connections.list().len() as f64);
    }
}

async fn readyz(State(admin): State<AdminServer>) -> (StatusCode, String) {
    let unavailable = |why: &str| (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    if !admin.broker.store_healthy() {
        return unavailable("store failed: durable publishes are refused");
    }
    let hooks = admin.hooks.read().unwrap_or_else(PoisonError::into_inner);
    if let Some(Err(why)) = hooks.ready.iter().map(|check| check()).find(Result::is_err) {
        return unavailable(&why);
    }
    if admin.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n".into())
    } else {
        unavailable("not ready")
    }
}

async fn metrics(State(admin): State<AdminServer>) -> String {
    admin.record();
    for record in &admin.hooks.read().unwrap_or_else(PoisonError::into_inner).record {
        record();
    }
    admin.prometheus.render()
}

/// A refusal: its status, and why in a line of text.
type ApiError = (StatusCode, String);
type ApiResult = Result<Json<Value>, ApiError>;

fn error(status: StatusCode, why: impl std::fmt::Display) -> ApiError {
    (status, format!("{why}\n"))
}

async fn cluster(State(admin): State<AdminServer>, headers: HeaderMap) -> ApiResult {
    admin.authorized(&headers)?;
    let hooks = admin.hooks.read().unwrap_or_else(PoisonError::into_inner);
    match &hooks.cluster {
        Some(view) => Ok(Json(view())),
        None => Err(error(StatusCode::NOT_FOUND, "this node is not part of a cluster")),
    }
}

async fn presence(State(admin): State<AdminServer>, headers: HeaderMap) -> ApiResult {
    admin.authorized(&headers)?;
    let hooks = admin.hooks.read().unwrap_or_else(PoisonError::into_inner);
    if let Some(view) = &hooks.presence {
        return Ok(Json(view()));
    }
    let principals: Vec<Value> = admin
        .connections
        .principals()
        .into_iter()
        .map(|(principal, connections)| {
            json!({"principal": principal, "nodes": ["this"], "connections": connections})
        })
        .collect();
    Ok(Json(json!({"principals": principals, "cut": []})))
}

async fn topics(State(admin): State<AdminServer>, headers: HeaderMap) -> ApiResult {
    admin.authorized(&headers)?;
    // Topics retained, or seen by the server: history, traffic, rates, subscribers.
    let mut rows: BTreeMap<Topic, Value> = BTreeMap::new();
    for t in admin.broker.topics() {
        let row = json!({
            "first_offset": t.first_offset, "next_offset": t.next_offset,
            "messages": t.messages, "bytes": t.bytes, "durable": t.durable,
        });
        rows.insert(t.topic, row);
    }
    let rates = lock(&admin.rates).per_sec.clone();
    for (topic, flow) in admin.traffic.topics() {
        let (rate_in, rate_out) = rates.get(&topic).copied().unwrap_or_default();
        let row = rows.entry(topic).or_insert_with(|| json!({}));
        row["messages_in"] = json!(flow.messages_in);
        row["bytes_in"] = json!(flow.bytes_in);
        row["messages_out"] = json!(flow.messages_out);
        row["bytes_out"] = json!(flow.bytes_out);
        row["rate_in"] = json!((rate_in * 10.0).round() / 10.0);
        row["rate_out"] = json!((rate_out * 10.0).round() / 10.0);
    }
    let topics = rows
        .into_iter()
        .map(|(topic, mut row)| {
            row["subscribers"] = json!(admin.broker.subscribers(&topic));
            row["topic"] = json!(topic.as_str());
            row
        })
        .collect();
    Ok(Json(Value::Array(topics)))
}

fn lock(rates: &Mutex<Rates>) -> MutexGuard<'_, Rates> {
    rates.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn subscriptions(State(admin): State<AdminServer>, headers: HeaderMap) -> ApiResult {
    admin.authorized(&headers)?;
    let subscriptions: Vec<Value> = admin
        .broker
        .subscriptions()
        .into_iter()
        .map(|s| {
            let (group, members) =
                s.group.map_or((None, 1), |(name, members)| (Some(name), members));
            json!({
                "filter": s.filter.as_str(), "group": group, "members": members,
                "queued": s.stats.queued, "received": s.stats.received,
                "unacked": s.stats.unacked,
                "dropped": s.stats.dropped_oldest + s.stats.dropped_newest + s.stats.rejected_full,
                "redelivered": s.stats.redelivered, "dead_lettered": s.stats.dead_lettered,
            })
        })
        .collect();
    Ok(Json(Value::Array(subscriptions)))
}

async fn connections(State(admin): State<AdminServer>, headers: HeaderMap) -> ApiResult {
    admin.authorized(&headers)?;
    let connections: Vec<Value> = admin
        .connections
        .list()
        .into_iter()
        .map(|c| {
            let since = c.since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            json!({
                "id": c.id, "peer": c.peer.to_string(), "principal": c.principal,
                "subscriptions": c.subscriptions, "filters": c.filters,
                "published": c.published, "delivered": c.delivered, "since": since,
            })
        })
        .collect();
    Ok(Json(Value::Array(connections)))
}

async fn disconnect(
    State(admin): State<AdminServer>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Result<&'static str, ApiError> {
    admin.authorized(&headers)?;
    if admin.connections.disconnect(id) {
        Ok("disconnected\n")
    } else {
        Err(error(StatusCode::NOT_FOUND, "no such connection"))
    }
}

async fn durable(State(admin): State<AdminServer>, headers: HeaderMap) -> ApiResult {
    admin.authorized(&headers)?;
    let durable: Vec<Value> = admin
        .broker
        .durable_subscriptions()
        .into_iter()
        .map(|d| {
            json!({
                "filter": d.filter, "group": d.group, "topic": d.topic.as_str(),
                "committed": d.committed, "lag": d.lag,
            })
        })
        .collect();
    Ok(Json(Value::Array(durable)))
}

/// Most messages one history page carries (it also ends past `HISTORY_PAGE_BYTES`).
const MAX_PAGE: usize = 10_000;

#[derive(Deserialize)]
struct HistoryQuery {
    topic: String,
    from: Option<String>,
    max: Option<usize>,
}

/// A page of one topic's history: envelopes as stored (sealed), in base64, for a client that
/// holds the key to open.
async fn history(
    State(admin): State<AdminServer>,
    headers: HeaderMap,
    Query(query): Query<HistoryQuery>,
) -> ApiResult {
    admin.authorized(&headers)?;
    let bad = |why: String| error(StatusCode::BAD_REQUEST, why);
    let topic = Topic::parse(&query.topic).map_err(|err| bad(err.to_string()))?;
    let start = query.from.as_deref().map(parse_start).transpose().map_err(bad)?;
    let max = query.max.unwrap_or(1000).clamp(1, MAX_PAGE);
    let page = admin
        .broker
        .history(&topic, start.unwrap_or(StartAt::Earliest), max)
        .map_err(history_error)?;
    let mut messages = Vec::with_capacity(page.messages.len());
    for message in &page.messages {
        let mut encoded = BytesMut::new();
        message.envelope().encode(&mut encoded).map_err(|err| bad(err.to_string()))?;
        messages.push(json!({
            "offset": message.offset(), "id": message.id().to_string(),
            "envelope": BASE64.encode(&encoded),
        }));
    }
    Ok(Json(json!({
        "topic": topic.as_str(), "first_offset": page.first_offset,
        "next_offset": page.next_offset, "next_from": page.next_from(), "messages": messages,
    })))
}

#[derive(Deserialize)]
struct RewindRequest {
    filter: String,
    group: String,
    from: String,
}

/// Moves a durable subscription (a QoS 1 group on retained topics) to another position: it
/// delivers again from there once a member joins.
async fn rewind(
    State(admin): State<AdminServer>,
    headers: HeaderMap,
    Json(request): Json<RewindRequest>,
) -> ApiResult {
    admin.authorized(&headers)?;
    let bad = |why: String| error(StatusCode::BAD_REQUEST, why);
    let filter = Filter::parse(&request.filter).map_err(|err| bad(err.to_string()))?;
    let start = parse_start(&request.from).map_err(bad)?;
    let moved = admin.broker.rewind(&filter, &request.group, start).map_err(history_error)?;
    let topics: Vec<Value> = moved
        .into_iter()
        .map(|(topic, from)| json!({"topic": topic.as_str(), "from": from}))
        .collect();
    Ok(Json(json!({ "filter": filter.as_str(), "group": request.group, "topics": topics })))
}

fn history_error(err: HistoryError) -> ApiError {
    let status = match &err {
        HistoryError::NotRetained(_) | HistoryError::NoSuchGroup { .. } => StatusCode::NOT_FOUND,
        HistoryError::Active { .. } => StatusCode::CONFLICT,
        HistoryError::OffsetEvicted { .. } => StatusCode::GONE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_the_increase_over_the_window() {
        let topic = Topic::parse("a/b").unwrap();
        let flow = |messages_in, messages_out| {
            let mut flow = FlowStats::default();
            (flow.messages_in, flow.messages_out) = (messages_in, messages_out);
            flow
        };
        let mut rates = Rates::default();
        rates.sample(vec![(topic.clone(), flow(100, 300))], Duration::from_secs(5));
        assert_eq!(rates.per_sec[&topic], (20.0, 60.0), "a new topic: everything counted so far");
        rates.sample(vec![(topic.clone(), flow(150, 300))], Duration::from_secs(5));
        assert_eq!(rates.per_sec[&topic], (10.0, 0.0));
    }
}
