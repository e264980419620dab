//! The systems `whispeer bench` measures with the same workloads: how each connects,
//! subscribes, publishes and receives.

use anyhow::Context;
use bytes::Bytes;
use whispeer_client::{Client, ClientOptions, ClientSubscription, Delivery, SubscribeOptions};

use super::BenchArgs;
use super::raw;

/// One system under test: how to connect.
#[derive(Clone, Debug)]
pub(super) enum Target {
    Whispeer {
        addr: String,
        api_key: Option<String>,
    },
    /// whispeer nodes of one cluster: the publisher on the first, subscribers on the others.
    Cluster {
        addrs: Vec<String>,
        api_key: Option<String>,
    },
    #[cfg(feature = "nats")]
    Nats {
        addr: String,
    },
    /// nats-server through its text protocol, parsed here.
    NatsRaw {
        addr: String,
    },
    /// redis-server through RESP, parsed here.
    RedisRaw {
        addr: String,
    },
    /// An MQTT broker through MQTT 3.1.1 at QoS 0, parsed here: whispeer's listener or
    /// Mosquitto.
    Mqtt {
        addr: String,
        broker: raw::MqttBroker,
    },
    /// The byte-copying forwarder: the machine's limit.
    Forwarder {
        addr: String,
    },
}

pub(super) enum Conn {
    Whispeer(Client),
    #[cfg(feature = "nats")]
    Nats(async_nats::Client),
    Raw(raw::RawConn),
}

pub(super) enum Sub {
    Whispeer(ClientSubscription<Delivery>),
    #[cfg(feature = "nats")]
    Nats(async_nats::Subscriber),
    Raw(raw::RawSub),
}

impl Target {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::Whispeer { .. } => "whispeer",
            Self::Cluster { .. } => "whispeer cluster",
            #[cfg(feature = "nats")]
            Self::Nats { .. } => "nats (async-nats)",
            Self::NatsRaw { .. } => "nats (raw protocol)",
            Self::RedisRaw { .. } => "redis (raw protocol)",
            Self::Mqtt { broker, .. } => broker.name(),
            Self::Forwarder { .. } => "forwarder (limit)",
        }
    }

    /// The same topic in each system's syntax.
    pub(super) fn subject(&self, name: &str) -> String {
        match self {
            Self::Whispeer { .. } | Self::Cluster { .. } | Self::Mqtt { .. } => {
                format!("bench/{name}")
            }
            #[cfg(feature = "nats")]
            Self::Nats { .. } => format!("bench.{name}"),
            Self::NatsRaw { .. } | Self::RedisRaw { .. } | Self::Forwarder { .. } => {
                format!("bench.{name}")
            }
        }
    }

    /// What a throughput run named `name` publishes to, in turn, and the one filter each of
    /// its subscribers subscribes to: the run's subject alone for one topic; for more, that
    /// many subjects under it and a wildcard over them. The forwarder, which has no topics,
    /// gets its one subject for every publish.
    pub(super) fn subjects(&self, name: &str, topics: u64) -> (String, Vec<String>) {
        let subject = self.subject(name);
        if topics <= 1 || matches!(self, Self::Forwarder { .. }) {
            return (subject.clone(), vec![subject]);
        }
        let (separator, wildcard) = match self {
            Self::Whispeer { .. } | Self::Cluster { .. } | Self::Mqtt { .. } => ('/', '+'),
            _ => ('.', '*'),
        };
        let filter = format!("{subject}{separator}{wildcard}");
        (filter, (0..topics).map(|k| format!("{subject}{separator}{k}")).collect())
    }

    /// A connection for `role`: 0 the publisher, `i` the `i`-th subscriber (only a cluster
    /// tells them apart: they go to different nodes).
    pub(super) async fn connect(&self, role: usize) -> anyhow::Result<Conn> {
        let whispeer = |addr: &str, api_key: &Option<String>| {
            // The SDK's defaults, as a user gets them.
            let mut options = ClientOptions::new(addr);
            if let Some(key) = api_key {
                options = options.api_key(key.clone());
            }
            Client::connect_with(options)
        };
        Ok(match self {
            Self::Whispeer { addr, api_key } => Conn::Whispeer(whispeer(addr, api_key).await?),
            Self::Cluster { addrs, api_key } => {
                let node = if addrs.len() < 2 { 0 } else { role % addrs.len() };
                let addr = addrs.get(node).context("--cluster names no node")?;
                Conn::Whispeer(whispeer(addr, api_key).await?)
            }
            #[cfg(feature = "nats")]
            // At its best: a subscription buffer that holds the burst (the default, 65,536
            // messages, is exactly the 8 MiB window of 128-byte messages, and drops past it).
            Self::Nats { addr } => Conn::Nats(
                async_nats::ConnectOptions::new()
                    .subscription_capacity(1 << 17)
                    .connect(addr.as_str())
                    .await?,
            ),
            Self::NatsRaw { addr } => {
                Conn::Raw(raw::RawConn::connect(raw::Kind::Nats, addr).await?)
            }
            Self::RedisRaw { addr } => {
                Conn::Raw(raw::RawConn::connect(raw::Kind::Redis, addr).await?)
            }
            Self::Forwarder { addr } => {
                Conn::Raw(raw::RawConn::connect(raw::Kind::Forwarder, addr).await?)
            }
            Self::Mqtt { addr, .. } => {
                Conn::Raw(raw::RawConn::connect(raw::Kind::Mqtt, addr).await?)
            }
        })
    }
}

impl Conn {
    pub(super) async fn subscribe(&self, subject: &str) -> anyhow::Result<Sub> {
        Ok(match self {
            Self::Whispeer(client) => Sub::Whispeer(client.messages(subject).await?),
            #[cfg(feature = "nats")]
            Self::Nats(client) => {
                let sub = client.subscribe(subject.to_string()).await?;
                // NATS subscriptions are confirmed by a round trip.
                client.flush().await?;
                Sub::Nats(sub)
            }
            Self::Raw(conn) => Sub::Raw(conn.subscribe(subject).await?),
        })
    }

    /// Joins queue group `group` on `subject`: each message goes to one member. Only the
    /// systems that have queue groups (whispeer, NATS).
    pub(super) async fn subscribe_group(&self, subject: &str, group: &str) -> anyhow::Result<Sub> {
        Ok(match self {
            Self::Whispeer(client) => {
                Sub::Whispeer(client.messages(SubscribeOptions::new(subject).group(group)).await?)
            }
            #[cfg(feature = "nats")]
            Self::Nats(client) => {
                let sub = client.queue_subscribe(subject.to_string(), group.to_string()).await?;
                client.flush().await?;
                Sub::Nats(sub)
            }
            Self::Raw(conn) => {
                Sub::Raw(conn.subscribe_nats(&[subject.to_string()], Some(group)).await?)
            }
        })
    }

    pub(super) async fn publish(&self, subject: &str, payload: Bytes) -> anyhow::Result<()> {
        match self {
            Self::Whispeer(client) => {
                client.publish_bytes(subject, payload).await?;
            }
            #[cfg(feature = "nats")]
            Self::Nats(client) => client.publish(subject.to_string(), payload).await?,
            Self::Raw(conn) => conn.publish(subject, &payload).await?,
        }
        Ok(())
    }

    /// Writes what the client buffers (async-nats's and the raw clients' `flush`). The SDK
    /// writes each publish as soon as its connection task runs: nothing to do. (Its own
    /// `flush` is more, a round trip to the server, which no other client here pays.)
    pub(super) async fn flush(&self) -> anyhow::Result<()> {
        match self {
            Self::Whispeer(_) => {}
            #[cfg(feature = "nats")]
            Self::Nats(client) => client.flush().await?,
            Self::Raw(conn) => conn.flush().await?,
        }
        Ok(())
    }
}

impl Sub {
    pub(super) async fn next(&mut self) -> Option<Bytes> {
        match self {
            Self::Whispeer(sub) => sub.recv().await.map(Delivery::into_payload),
            #[cfg(feature = "nats")]
            Self::Nats(sub) => {
                use futures_util::StreamExt;
                sub.next().await.map(|m| m.payload)
            }
            Self::Raw(sub) => sub.next().await,
        }
    }
}

/// The nats-server to compare with, if `--nats` was given.
pub(super) fn nats_target(args: &BenchArgs) -> anyhow::Result<Option<Target>> {
    match &args.nats {
        None => Ok(None),
        #[cfg(feature = "nats")]
        Some(addr) => Ok(Some(Target::Nats { addr: addr.clone() })),
        #[cfg(not(feature = "nats"))]
        Some(addr) => {
            anyhow::bail!("--nats {addr}: this whispeer was built without the `nats` feature")
        }
    }
}
