//! Topics bound to one message type.
//!
//! [`Broker::topic`] records the binding in the broker, so the rule holds for every handle,
//! not only for this one: publishing another type to the topic, or subscribing to it exactly
//! with another type, is refused.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;
use whispeer_proto::Topic;

use crate::{Broker, PublishError, PublishReceipt, SubscribeError, Subscriber, Subscription};

/// A topic that carries only `T`. Cheap to clone.
pub struct TypedTopic<T> {
    broker: Broker,
    topic: Topic,
    _type: PhantomData<fn(T) -> T>,
}

impl<T> Clone for TypedTopic<T> {
    fn clone(&self) -> Self {
        Self { broker: self.broker.clone(), topic: self.topic.clone(), _type: PhantomData }
    }
}

impl<T> fmt::Debug for TypedTopic<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedTopic")
            .field("topic", &self.topic)
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> TypedTopic<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(broker: Broker, topic: Topic) -> Self {
        Self { broker, topic, _type: PhantomData }
    }

    /// The bound topic.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Publishes a value; see [`Broker::publish`].
    ///
    /// # Errors
    /// See [`PublishError`].
    pub fn publish(&self, value: &T) -> Result<PublishReceipt, PublishError> {
        self.broker.publish(self.topic.as_str(), value)
    }

    /// Subscribes a callback; see [`Broker::subscribe`].
    ///
    /// # Errors
    /// See [`SubscribeError`].
    pub fn subscribe(
        &self,
        callback: impl FnMut(T) + Send + 'static,
    ) -> Result<Subscriber, SubscribeError> {
        self.broker.subscribe(self.topic.as_str(), callback)
    }

    /// Subscribes an async callback; see [`Broker::subscribe_async`].
    ///
    /// # Errors
    /// See [`SubscribeError`].
    pub fn subscribe_async<Fut>(
        &self,
        callback: impl FnMut(T) -> Fut + Send + 'static,
    ) -> Result<Subscriber, SubscribeError>
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.broker.subscribe_async(self.topic.as_str(), callback)
    }

    /// A pull subscription; see [`Broker::subscription`].
    ///
    /// # Errors
    /// See [`SubscribeError`].
    pub fn subscription(&self) -> Result<Subscription<T>, SubscribeError> {
        self.broker.subscription(self.topic.as_str())
    }
}
