//! `/api/retained`: list the retained messages, clear one topic's.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::json;
use whispeer_core::{Filter, Topic};

use super::{AdminServer, ApiResult, error};

#[derive(Deserialize)]
pub(super) struct ListQuery {
    filter: Option<String>,
}

/// The retained messages (those `filter` matches), oldest first: topic, id, time, payload
/// size and the envelope as kept (sealed), in base64.
pub(super) async fn list(
    State(admin): State<AdminServer>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> ApiResult {
    admin.authorized(&headers)?;
    let bad = |why: String| error(StatusCode::BAD_REQUEST, why);
    let filter = query.filter.as_deref().map(Filter::parse).transpose();
    let filter = filter.map_err(|err| bad(err.to_string()))?;
    let mut messages = Vec::new();
    for envelope in admin.retained.list(filter.as_ref()) {
        let mut encoded = BytesMut::new();
        envelope.encode(&mut encoded).map_err(|err| bad(err.to_string()))?;
        messages.push(json!({
            "topic": envelope.topic.as_str(), "id": envelope.id.to_string(),
            "timestamp_ms": envelope.timestamp_ms, "bytes": envelope.payload.len(),
            "envelope": BASE64.encode(&encoded),
        }));
    }
    let (topics, bytes) = admin.retained.size();
    Ok(Json(json!({ "topics": topics, "bytes": bytes, "messages": messages })))
}

#[derive(Deserialize)]
pub(super) struct ClearQuery {
    topic: String,
}

/// Clears one topic's retained message, on disk too for a durable topic.
pub(super) async fn clear(
    State(admin): State<AdminServer>,
    headers: HeaderMap,
    Query(query): Query<ClearQuery>,
) -> ApiResult {
    admin.authorized(&headers)?;
    let topic = Topic::parse(&query.topic).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    let retained = std::sync::Arc::clone(&admin.retained);
    let cleared = tokio::task::spawn_blocking(move || retained.clear(&topic))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    if !cleared {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("{} has no retained message", query.topic),
        ));
    }
    Ok(Json(json!({ "topic": query.topic, "cleared": true })))
}
