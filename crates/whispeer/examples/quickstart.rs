//! The README's quickstart: typed publish/subscribe with callbacks, async callbacks and a stream.

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use whispeer::{Broker, BrokerOptions};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MyData {
    name: String,
    id: i32,
}

#[tokio::main]
async fn main() -> Result<(), whispeer::Error> {
    let broker = Broker::builder(BrokerOptions::default()).build();
    let (stored, mut store) = mpsc::channel::<MyData>(16);

    // A sync callback, its type taken from the closure's argument.
    let _a = broker.subscribe("some-event", |d: MyData| println!("some-event: {d:?}"))?;
    // The same with the type given by turbofish; `+` matches one segment.
    let _b = broker.subscribe::<MyData>("sensor/+/temperature", |d| println!("sensor: {d:?}"))?;
    // An async callback; `#` matches any number of trailing segments.
    let _c = broker.subscribe_async("chat/#", move |d: MyData| {
        let stored = stored.clone();
        async move { stored.send(d).await.unwrap_or_default() }
    })?;
    // A pull subscription: `recv().await`, or use it as a `Stream`.
    let mut orders = broker.subscription::<MyData>("orders/*")?;

    let my_data = MyData { name: "Ada".into(), id: 1 };
    broker.publish("some-event", &my_data)?;
    broker.publish::<MyData>("sensor/kitchen/temperature", &my_data)?;
    broker.publish("chat/rust", &MyData { name: "Grace".into(), id: 2 })?;
    broker.publish("orders/42", &MyData { name: "Linus".into(), id: 3 })?;

    println!("stored: {:?}", store.recv().await);
    println!("order: {:?}", orders.recv().await);

    println!("published {} messages", broker.stats().published);

    // The recommended defaults in one call.
    let _defaults = Broker::build_default().build();
    Ok(())
}
