//! The figures `whispeer bench` derives: latency percentiles and processes' CPU time.

use super::raw::MqttBroker;
use super::{BenchArgs, Target};

/// p50, p99 and p99.9 of nanosecond samples, in microseconds.
pub(super) fn percentiles(mut samples: Vec<u64>) -> [f64; 3] {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
        samples.get(i).map_or(f64::NAN, |&ns| ns as f64 / 1000.0)
    };
    [at(0.50), at(0.99), at(0.999)]
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat` (this
/// process without a pid), at the usual 100 ticks a second; `None` where that cannot be read.
pub(super) fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or_else(|| "/proc/self/stat".to_string(), |pid| format!("/proc/{pid}/stat"));
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces): state is the 3rd field, utime
    // and stime the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// The pid of the process behind `target`, as given on the command line.
pub(super) fn pid_of(target: &Target, args: &BenchArgs) -> Option<u32> {
    match target {
        Target::Whispeer { .. } => args.server_pid,
        Target::Cluster { .. } => None,
        #[cfg(feature = "nats")]
        Target::Nats { .. } => args.nats_pid,
        Target::NatsRaw { .. } => args.nats_pid,
        Target::RedisRaw { .. } => args.redis_pid,
        Target::Forwarder { .. } => args.forwarder_pid,
        Target::Mqtt { broker: MqttBroker::Whispeer, .. } => args.server_pid,
        Target::Mqtt { broker: MqttBroker::Mosquitto, .. } => args.mosquitto_pid,
        Target::Mqtt { broker: MqttBroker::Rumqttd, .. } => args.rumqttd_pid,
    }
}
