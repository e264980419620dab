//! `[mqtt]`: the MQTT listener (off unless `listen` is set, or `--mqtt-listen` is given).

use serde::{Deserialize, Serialize};

/// `[mqtt]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Mqtt {
    /// Address of the MQTT listener (3.1.1 and 5; `mqtts://` with `[tls]`); off while unset.
    pub(crate) listen: Option<String>,
}
