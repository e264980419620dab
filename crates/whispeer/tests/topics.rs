//! Topics a publish names, checked against the broker's limits wherever they come from.

use whispeer::{Broker, BrokerOptions, PublishError};

/// The broker checks a topic against its limits at routing, skipping the check when an exact
/// subscription's filter (checked when subscribed) is the same text: a topic no exact
/// subscription names is still checked — with nobody subscribed, with only a wildcard
/// subscriber that would match it, and for an envelope whose `Topic` was parsed under looser
/// limits — and a refused publish reaches nobody and is not counted as published.
#[tokio::test]
async fn topics_over_the_limits_are_refused_whoever_subscribed() {
    let mut options = BrokerOptions::default();
    options.limits.max_topic_len = 12;
    options.limits.max_topic_depth = 3;
    let broker = Broker::builder(options).build();
    let too_long = "abc/defghijkl"; // 13 bytes
    let too_deep = "a/b/c/d";
    let refused =
        |result: Result<_, PublishError>| matches!(result, Err(PublishError::InvalidTopic(_)));
    for topic in [too_long, too_deep, "a//b"] {
        assert!(refused(broker.publish_bytes(topic, "x")), "{topic} with no subscriber");
    }
    let mut everything = broker.messages("#").unwrap();
    let mut exact = broker.messages("a/b/c").unwrap();
    for topic in [too_long, too_deep, "a//b", "a/+"] {
        assert!(refused(broker.publish_bytes(topic, "x")), "{topic} beside a wildcard");
        let envelope = whispeer::proto::Envelope::new(
            whispeer::proto::MessageId(1),
            match whispeer::Topic::parse(topic) {
                Ok(parsed) => parsed,
                Err(_) => continue, // not a topic under any limits: no envelope to make
            },
            0,
            whispeer::proto::Flags::default(),
            bytes::Bytes::from_static(b"x"),
        );
        assert!(refused(broker.publish_envelope(envelope)), "{topic} as an envelope");
    }
    assert!(everything.try_recv().is_none(), "a refused topic reached the wildcard subscriber");
    assert_eq!(broker.stats().published, 0);
    // The exact subscription's own topic goes through, to both.
    assert_eq!(broker.publish_bytes("a/b/c", "y").unwrap().subscribers, 2);
    assert_eq!(everything.try_recv().unwrap().payload().as_ref(), b"y");
    assert_eq!(exact.try_recv().unwrap().payload().as_ref(), b"y");
    assert_eq!(broker.stats().published, 1);
}

/// An envelope whose topic the caller parsed under the broker's own limits, as a server's
/// connection reads its clients' publishes, goes through `publish_envelope_checked` without a
/// second check: one parsed under looser limits is not refused there (it is by
/// `publish_envelope`), which is why only a reader under the broker's limits calls it.
#[tokio::test]
async fn a_checked_envelope_is_not_checked_again() {
    let mut options = BrokerOptions::default();
    options.limits.max_topic_len = 12;
    let broker = Broker::builder(options).build();
    let mut everything = broker.messages("#").unwrap();
    let envelope = |topic: &str| {
        whispeer::proto::Envelope::new(
            whispeer::proto::MessageId(1),
            whispeer::Topic::parse(topic).unwrap(),
            0,
            whispeer::proto::Flags::default(),
            bytes::Bytes::from_static(b"x"),
        )
    };
    let too_long = "abc/defghijkl";
    assert!(matches!(
        broker.publish_envelope(envelope(too_long)),
        Err(PublishError::InvalidTopic(_))
    ));
    assert_eq!(broker.publish_envelope_checked(envelope(too_long)).unwrap().subscribers, 1);
    assert_eq!(broker.publish_envelope_checked(envelope("a/b")).unwrap().subscribers, 1);
    let topics: Vec<String> =
        std::iter::from_fn(|| everything.try_recv()).map(|m| m.topic().to_string()).collect();
    assert_eq!(topics, [too_long, "a/b"]);
    // Reserved topics are refused either way.
    let reserved = broker.publish_envelope_checked(envelope("$sys/x"));
    assert!(matches!(reserved, Err(PublishError::ReservedTopic(_))), "{reserved:?}");
}
