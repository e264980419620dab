//! A shared byte budget: its bound holds, and subscribers that read keep getting messages while
//! stalled ones hold the rest.

use bytes::Bytes;
use whispeer_proto::{ContentType, Envelope, Flags, MessageId};

use super::*;

fn message(n: u64, bytes: usize) -> Message {
    let topic = Topic::parse("t").unwrap();
    let flags = Flags::with_content(ContentType::Raw);
    let payload = Bytes::from(vec![0u8; bytes]);
    let envelope = Envelope::new(MessageId(u128::from(n)), topic, 0, flags, payload);
    Message::new(envelope, 1, None, None)
}

fn queue(budget: &ByteBudget) -> Queue {
    let filter = Filter::parse("t").unwrap();
    Queue::new(filter, 1 << 20, usize::MAX, SlowConsumer::DropOldest)
        .with_budget(Some(budget.clone()))
}

#[test]
fn a_reader_keeps_its_messages_while_stalled_queues_hold_the_shared_budget() {
    // The server's budget: 64 messages of 1 KiB (and their 256-byte allowance); each
    // connection's budget could hold it all.
    let server = ByteBudget::new(64 * 1280);
    let stalled: Vec<Queue> =
        (0..8).map(|_| queue(&ByteBudget::within(64 * 1280, &server))).collect();
    let reader = queue(&ByteBudget::within(64 * 1280, &server));
    let mut read = 0;
    for n in 0..10_000 {
        for q in &stalled {
            q.push(message(n, 1024));
        }
        // The reader takes each message after the next one arrives: it always holds one or two.
        assert_eq!(reader.push(message(n, 1024)), Pushed::Queued, "message {n}");
        if n > 0 {
            read += usize::from(reader.try_pop().is_some());
        }
        assert!(server.used() <= server.max(), "{} > {}", server.used(), server.max());
    }
    assert_eq!(read, 9_999);
    assert_eq!(reader.counters.dropped_oldest.load(Ordering::Relaxed), 0);
    // The stalled queues hold seven eighths between them, evenly.
    let held: Vec<usize> = stalled.iter().map(Queue::len).collect();
    assert!(held.iter().all(|n| (5..=8).contains(n)), "{held:?}");
    drop(stalled);
    drop(reader);
    assert_eq!(server.used(), 0);
    assert_eq!(server.holders(), 0, "every holder gone");
}
