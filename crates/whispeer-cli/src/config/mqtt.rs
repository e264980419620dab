//! `[mqtt]`: the MQTT listener (off unless `listen` is set, or `--mqtt-listen` is given).

use serde::{Deserialize, Serialize};

/// `[mqtt]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Mqtt {
    /// Address of the MQTT listener (3.1.1 and 5; `mqtts://` with `[tls]`); off while unset.
    pub(crate) listen: Option<String>,
    /// The longest a persistent session outlives its connection, in seconds: a longer
    /// session expiry is cut to it, and a 3.1.1 session without clean session gets it.
    pub(crate) max_session_expiry_secs: u64,
}

impl Default for Mqtt {
    fn default() -> Self {
        Self { listen: None, max_session_expiry_secs: 86_400 }
    }
}
