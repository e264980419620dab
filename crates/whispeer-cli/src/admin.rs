//! The admin port of `whispeer serve` (`--admin-listen` / `admin_listen`): health and metrics.
//!
//! - `GET /healthz`: 200 while the process answers;
//! - `GET /readyz`: 200 once the store is recovered and the listeners accept, 503 once shutdown
//!   has begun;
//! - `GET /metrics`: the broker's and the server's counters in the Prometheus text format,
//!   through the `metrics` facade and its Prometheus exporter (counters end in `_total`).
//!
//! - `GET /api/topics`, `/api/subscriptions`, `/api/durable`: JSON snapshots of the broker
//!   (retained topics; subscriptions with their counters, groups counted once; durable
//!   subscriptions with their lag), for `whispeer inspect`. They need
//!   `Authorization: Bearer <admin_token>`; without an `admin_token` configured they answer 403.
//!
//! - `GET /api/connections`: the live connections (peer, principal, subscriptions, since);
//!   `POST /api/connections/{id}/disconnect` disconnects one (it is told why).
//!
//! Not yet: triggering a replay through the API.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::UNIX_EPOCH;

use axum::extract::{Path, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use whispeer::Broker;
use whispeer::server::{AccessCounters, Connections, ServerConfig};

/// What the admin handlers read.
#[derive(Clone)]
pub(crate) struct Admin {
    broker: Broker,
    /// SHA-256 digest of the admin token; `None`: the API is closed.
    token: Option<[u8; 32]>,
    access: Arc<AccessCounters>,
    connections: Arc<Connections>,
    ready: Arc<AtomicBool>,
    prometheus: PrometheusHandle,
}

impl Admin {
    /// Installs the Prometheus recorder for this process.
    pub(crate) fn new(
        broker: Broker,
        server: &ServerConfig,
        token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let prometheus = PrometheusBuilder::new().install_recorder()?;
        let ready = Arc::new(AtomicBool::new(false));
        let token = token.map(|t| Sha256::digest(t.as_bytes()).into());
        let (access, connections) = (Arc::clone(&server.access), Arc::clone(&server.connections));
        Ok(Self { broker, token, access, connections, ready, prometheus })
    }

    /// Whether the request carries the admin token (compared by digest).
    fn authorized(&self, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
        let Some(expected) = &self.token else {
            return Err((StatusCode::FORBIDDEN, "the admin API is closed: set admin_token\n"));
        };
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() });
        match given {
            Some(digest) if digest == *expected => Ok(()),
            _ => Err((StatusCode::UNAUTHORIZED, "missing or wrong admin token\n")),
        }
    }

    /// Marks the server ready (or not).
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Serves the admin routes on `listener` until the process ends.
    pub(crate) async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        let routes = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/api/topics", get(topics))
            .route("/api/subscriptions", get(subscriptions))
            .route("/api/durable", get(durable))
            .route("/api/connections", get(connections))
            .route("/api/connections/{id}/disconnect", post(disconnect))
            .with_state(self);
        axum::serve(listener, routes).await
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
            ("whispeer_decode_errors_total", stats.decode_errors),
            ("whispeer_open_errors_total", stats.open_errors),
            ("whispeer_auth_failures_total", self.access.auth_failures()),
            ("whispeer_denied_publishes_total", self.access.denied_publish()),
            ("whispeer_denied_subscriptions_total", self.access.denied_subscribe()),
            ("whispeer_rate_limited_publishes_total", self.access.rate_limited()),
        ];
        for (name, value) in counters {
            metrics::counter!(name).absolute(value);
        }
        let drops = [
            ("drop_oldest", stats.dropped_oldest),
            ("drop_newest", stats.dropped_newest),
            ("queue_full", stats.rejected_full),
            ("disconnect", stats.disconnected),
        ];
        for (reason, value) in drops {
            metrics::counter!("whispeer_drops_total", "reason" => reason).absolute(value);
        }
        metrics::gauge!("whispeer_subscriptions").set(stats.subscriptions as f64);
        metrics::gauge!("whispeer_connections").set(self.connections.list().len() as f64);
    }
}

async fn readyz(State(admin): State<Admin>) -> (StatusCode, &'static str) {
    if admin.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(admin): State<Admin>) -> String {
    admin.record();
    admin.prometheus.render()
}

type ApiResult = Result<Json<Value>, (StatusCode, &'static str)>;

async fn topics(State(admin): State<Admin>, headers: HeaderMap) -> ApiResult {
    admin.authorized(&headers)?;
    let topics: Vec<Value> = admin
        .broker
        .topics()
        .into_iter()
        .map(|t| {
            json!({
                "topic": t.topic.as_str(), "first_offset": t.first_offset,
                "next_offset": t.next_offset, "messages": t.messages, "bytes": t.bytes,
                "durable": t.durable,
            })
        })
        .collect();
    Ok(Json(Value::Array(topics)))
}

async fn subscriptions(State(admin): State<Admin>, headers: HeaderMap) -> ApiResult {
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

async fn connections(State(admin): State<Admin>, headers: HeaderMap) -> ApiResult {
    admin.authorized(&headers)?;
    let connections: Vec<Value> = admin
        .connections
        .list()
        .into_iter()
        .map(|c| {
            let since = c.since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            json!({
                "id": c.id, "peer": c.peer.to_string(), "principal": c.principal,
                "subscriptions": c.subscriptions, "since": since,
            })
        })
        .collect();
    Ok(Json(Value::Array(connections)))
}

async fn disconnect(
    State(admin): State<Admin>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Result<&'static str, (StatusCode, &'static str)> {
    admin.authorized(&headers)?;
    if admin.connections.disconnect(id) {
        Ok("disconnected\n")
    } else {
        Err((StatusCode::NOT_FOUND, "no such connection\n"))
    }
}

async fn durable(State(admin): State<Admin>, headers: HeaderMap) -> ApiResult {
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
