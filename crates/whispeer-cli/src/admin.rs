//! The admin port of `whispeer serve` (`--admin-listen` / `admin_listen`): health and metrics.
//!
//! - `GET /healthz`: 200 while the process answers;
//! - `GET /readyz`: 200 once the store is recovered and the listeners accept, 503 once shutdown
//!   has begun;
//! - `GET /metrics`: the broker's and the server's counters in the Prometheus text format,
//!   through the `metrics` facade and its Prometheus exporter (counters end in `_total`).
//!
//! Not yet: the authenticated JSON admin API and per-topic figures (see the README).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use whispeer::Broker;
use whispeer::server::AccessCounters;

/// What the admin handlers read.
#[derive(Clone)]
pub(crate) struct Admin {
    broker: Broker,
    access: Arc<AccessCounters>,
    ready: Arc<AtomicBool>,
    prometheus: PrometheusHandle,
}

impl Admin {
    /// Installs the Prometheus recorder for this process.
    pub(crate) fn new(broker: Broker, access: Arc<AccessCounters>) -> anyhow::Result<Self> {
        let prometheus = PrometheusBuilder::new().install_recorder()?;
        let ready = Arc::new(AtomicBool::new(false));
        Ok(Self { broker, access, ready, prometheus })
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
