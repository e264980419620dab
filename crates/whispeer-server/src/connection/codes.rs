//! The error codes a connection answers with, and the names of frames it refuses.

use whispeer_core::{PublishError, SubscribeError};
use whispeer_proto::{Body, ErrorCode};

pub(super) fn publish_code(err: &PublishError) -> ErrorCode {
    match err {
        PublishError::InvalidTopic(_) | PublishError::ReservedTopic(_) => ErrorCode::INVALID_TOPIC,
        PublishError::TooLarge { .. } => ErrorCode::TOO_LARGE,
        PublishError::Rejected { .. } => ErrorCode::REJECTED,
        PublishError::QueueFull { .. } => ErrorCode::QUEUE_FULL,
        _ => ErrorCode::INTERNAL,
    }
}

pub(super) fn subscribe_code(err: &SubscribeError) -> ErrorCode {
    match err {
        SubscribeError::InvalidFilter(_) => ErrorCode::INVALID_TOPIC,
        SubscribeError::Rejected { .. } => ErrorCode::REJECTED,
        SubscribeError::InvalidCapacity { .. } | SubscribeError::InvalidPrefetch { .. } => {
            ErrorCode::LIMIT_REACHED
        }
        SubscribeError::InvalidGroup { .. }
        | SubscribeError::GroupMismatch { .. }
        | SubscribeError::InvalidStart { .. } => ErrorCode::REJECTED,
        SubscribeError::OffsetEvicted { .. } => ErrorCode::OFFSET_EVICTED,
        _ => ErrorCode::INTERNAL,
    }
}

pub(super) fn frame_name(body: &Body) -> &'static str {
    match body {
        Body::Welcome { .. } => "WELCOME",
        Body::Ok => "OK",
        Body::PubAck => "PUBACK",
        Body::Deliver { .. } => "DELIVER",
        _ => "this frame",
    }
}
