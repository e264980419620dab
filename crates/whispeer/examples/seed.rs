//! The embedded API as the product's plan shows it (`shared` seed 000), pasted with one change:
//! `BrokerOptions {}` is `BrokerOptions::default()` (a struct with fields cannot be written
//! empty), and `PersistenceType::Sqlite` takes a path buffer.
//!
//! ```sh
//! cargo run -p whispeer --features websocket,sqlite --example seed [-- <websocket-url> <db>]
//! ```
//!
//! With no arguments it listens on `http://localhost:8080` and keeps its database under
//! `./path/to/db`, as the plan does; CI passes a free port and a temporary file. The key comes
//! from `WHISPEER_KEY` when set (as the CLI's does), else one is generated and printed so other
//! parties could open the messages.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use whispeer::{
    Broker, BrokerOptions, BrokerWs, Compression, Encryption, Persistence, PersistenceType,
    WebSocket,
};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct MyData {
    name: String,
    id: i32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "http://localhost:8080".into());
    let db = args.next().map_or_else(|| PathBuf::from("./path/to/db"), PathBuf::from);

    let broker = Broker::builder(BrokerOptions::default())
        .with(Encryption::new())
        .with(Compression::new())
        .with(WebSocket::new(url.as_str()))
        .with(Persistence::sqlite(Path::new(&db)))
        .build();
    println!("WebSocket clients: ws://{}/ws", broker.local_addrs()[0]);
    if std::env::var_os(whispeer::engines::KEY_VARIABLE).is_none()
        && let Some(keys) = broker.encryption_keys()
    {
        println!("generated key (share as WHISPEER_KEY): {} characters", keys.to_text().len());
    }

    // --- Use:
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let _subscriber = broker.subscribe("some-event", move |data: MyData| {
        let _ = tx.try_send(data);
    })?;
    let my_data = MyData { name: "Ada".into(), id: 1 };
    let receipt = broker.publish("some-event", &my_data)?;
    assert_eq!(rx.recv().await.as_ref(), Some(&my_data));
    assert!(broker.durable(&receipt).await, "stored in SQLite");
    println!("some-event: {my_data:?}, stored durably");
    drop(broker);

    // The plan's shorter forms.
    let _ = Broker::build_default().build();
    let _ = Broker::build_default_with_ws("127.0.0.1:0").build();
    let other_db = db.with_extension("other");
    let _ =
        Broker::build_default_with_persistence(PersistenceType::Sqlite(other_db.clone()))?.build();
    let both = PersistenceType::Sqlite(other_db.clone());
    let _ = Broker::build_default_with_persistence_ws("127.0.0.1:0", both)?.build();
    for path in [&db, &other_db] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    Ok(())
}
