//! A connection's publish budget (`max_publish_rate`, `max_publish_bytes_per_sec`).

use std::time::Instant;

use super::ServerConfig;

/// A connection's publish budget: token buckets refilled continuously, holding at most one
/// second's worth, so a client may burst that much and then publish at the configured rate.
pub(super) struct RateLimit {
    messages: Option<(f64, f64)>,
    bytes: Option<(f64, f64)>,
    last: Instant,
}

impl RateLimit {
    pub(super) fn new(config: &ServerConfig) -> Option<Self> {
        let messages = config.max_publish_rate.map(|rate| (f64::from(rate), f64::from(rate)));
        let bytes = config.max_publish_bytes_rate.map(|rate| (rate as f64, rate as f64));
        (messages.is_some() || bytes.is_some()).then(|| Self {
            messages,
            bytes,
            last: Instant::now(),
        })
    }

    /// What a publisher over its budget is told.
    pub(super) fn refusal(config: &ServerConfig) -> String {
        let per_sec =
            |limit: Option<u64>, what: &str| limit.map(|n| format!("{n} {what} per second"));
        let limits: Vec<String> = [
            per_sec(config.max_publish_rate.map(u64::from), "publishes"),
            per_sec(config.max_publish_bytes_rate, "bytes"),
        ]
        .into_iter()
        .flatten()
        .collect();
        format!("publish refused: at most {}", limits.join(" and "))
    }

    /// Takes one publish of `len` bytes from the budget; `false` if it does not fit.
    pub(super) fn admit(&mut self, len: usize) -> bool {
        let elapsed = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        let mut fits = true;
        for (bucket, cost) in [(&mut self.messages, 1.0), (&mut self.bytes, len as f64)] {
            if let Some((tokens, rate)) = bucket {
                *tokens = (*tokens + *rate * elapsed).min(*rate);
                fits &= *tokens >= cost;
            }
        }
        if fits {
            for (bucket, cost) in [(&mut self.messages, 1.0), (&mut self.bytes, len as f64)] {
                if let Some((tokens, _)) = bucket {
                    *tokens -= cost;
                }
            }
        }
        fits
    }
}
