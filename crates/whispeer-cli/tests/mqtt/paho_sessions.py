"""Paho (Python) against whispeer's MQTT listener, sessions and options: MQTT 5 subscription
options (no local, retain as published, retain handling), wills with a delay, persistent
sessions past the broker's group linger, clean starts, session expiry set at DISCONNECT,
client ids bound to their principal, enhanced authentication refused. One scenario per run,
"ok: ..." on success, "FAIL: ..." and exit 1 otherwise.

Usage: python3 paho_sessions.py <port> options|will-delay|expiry|bound|auth-method
"""

import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paho_check import PATIENCE, client, connect, fail, subscribe, take  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

import paho_check  # noqa: E402

PORT = paho_check.PORT
SCENARIO = paho_check.SCENARIO


def subscribe_with(c, topic, **options):
    done = []
    c.on_subscribe = lambda *args: done.append(args)
    c.subscribe(topic, options=SubscribeOptions(qos=1, **options))
    deadline = time.time() + PATIENCE
    while not done and time.time() < deadline:
        time.sleep(0.02)
    if not done:
        fail(f"no SUBACK for {topic}")


def nothing_more(c, wait=1.0, what="nothing more"):
    extra = take(c, wait)
    if extra is not None:
        fail(f"{what}: got {extra.topic} {extra.payload!r} retain={extra.retain}")


def options():
    tag = uuid.uuid4().hex[:6]
    base = f"opt-{tag}"
    pub = client("opt-pub")
    connect(pub)
    pub.publish(f"{base}/state", b"kept", qos=1, retain=True).wait_for_publish()

    # Retain handling 2: no retained message at subscription.
    never = client("opt-never")
    connect(never)
    subscribe_with(never, f"{base}/#", retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
    nothing_more(never, 1.0, "retain handling 2 sent a retained message")

    # Retain handling 0 with retain as published: the retained one, flagged; live retained
    # publishes keep their flag too.
    rap = client("opt-rap")
    connect(rap)
    subscribe_with(rap, f"{base}/#", retainAsPublished=True)
    first = take(rap)
    if first is None or first.payload != b"kept" or not first.retain:
        fail(f"retained message at subscription: {first and (first.payload, first.retain)}")

    # Retain handling 1: given on a new subscription, not when it is subscribed again.
    once = client("opt-once")
    connect(once)
    subscribe_with(once, f"{base}/#", retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
    got = take(once)
    if got is None or got.payload != b"kept":
        fail("retain handling 1: a new subscription gets the retained message")
    subscribe_with(once, f"{base}/#", retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
    nothing_more(once, 1.0, "retain handling 1 sent it again on an existing subscription")

    # No local: a client does not get its own publishes.
    local = client("opt-local")
    connect(local)
    subscribe_with(local, f"{base}/#", noLocal=True, retainHandling=2)
    local.publish(f"{base}/mine", b"own", qos=1).wait_for_publish()
    pub.publish(f"{base}/live", b"live", qos=1, retain=True).wait_for_publish()
    got = take(local)
    if got is None or got.payload != b"live":
        fail(f"no local: {got and got.payload}")
    nothing_more(local, 1.0, "no local delivered the client's own publish")

    # The live retained publish: flagged for retain-as-published, not for the others.
    live = take(never)
    if live is None or live.payload != b"own":
        fail(f"the other client's publish reaches a plain subscriber: {live and live.payload}")
    live = take(never)
    if live is None or live.payload != b"live" or live.retain:
        fail(f"without retain as published the flag is cleared: {live and live.retain}")
    for expected in (b"own", b"live"):
        message = take(rap)
        if message is None or message.payload != expected:
            fail(f"retain as published: {message and message.payload}")
        if message.retain != (expected == b"live"):
            fail(f"retain as published keeps the publisher's flag: {expected} {message.retain}")
    pub.publish(f"{base}/state", b"", qos=1, retain=True).wait_for_publish()
    pub.publish(f"{base}/live", b"", qos=1, retain=True).wait_for_publish()
    print("ok: no local, retain as published, retain handling 0, 1 and 2")


def will_client(name, cid, topic, delay, expiry):
    c = client(name, cid=cid)
    will = Properties(PacketTypes.WILLMESSAGE)
    will.WillDelayInterval = delay
    c.will_set(topic, b"gone", qos=1, properties=will)
    return c, expiry


def connect_with(c, clean=True, **properties):
    """An MQTT 5 CONNECT with these properties: CONNACK's reason code and session present."""
    state = {}

    def on_connect(_c, _u, flags, rc, properties=None):
        state["present"] = bool(getattr(flags, "session_present", False))
        state["rc"] = rc if isinstance(rc, int) else rc.value

    c.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    for name, value in properties.items():
        setattr(props, name, value)
    c.connect("127.0.0.1", PORT, keepalive=30, clean_start=clean, properties=props)
    c.loop_start()
    deadline = time.time() + PATIENCE
    while "rc" not in state and time.time() < deadline:
        time.sleep(0.02)
    if "rc" not in state:
        fail("no CONNACK")
    return state


def connect_expiring(c, expiry, clean=True):
    state = connect_with(c, clean, SessionExpiryInterval=expiry)
    if state["rc"] != 0:
        fail(f"connect: {state}")


def vanish(c):
    """Ends the connection without DISCONNECT: the socket closes."""
    c.loop_stop()
    c.socket().close()


def will_delay():
    tag = uuid.uuid4().hex[:6]
    watcher = client("will-watch")
    connect(watcher)
    subscribe(watcher, f"wills-{tag}/#")

    # Back within the delay: no will.
    cid = f"back-{tag}"
    back, expiry = will_client("back", cid, f"wills-{tag}/back", 3, 60)
    connect_expiring(back, expiry)
    vanish(back)
    time.sleep(0.5)
    again = client("back", cid=cid)
    connect_expiring(again, 60, clean=False)

    # Gone for good: the will after its delay, not before.
    gone, expiry = will_client("gone", f"gone-{tag}", f"wills-{tag}/gone", 2, 60)
    connect_expiring(gone, expiry)
    started = time.time()
    vanish(gone)
    will = take(watcher, 8)
    waited = time.time() - started
    if will is None or will.topic != f"wills-{tag}/gone":
        fail(f"the delayed will: {will and will.topic}")
    if waited < 1.5:
        fail(f"the will came after {waited:.2f} s, before its 2 s delay")

    # The session ends before the delay: the will then.
    short, expiry = will_client("short", f"short-{tag}", f"wills-{tag}/short", 60, 1)
    connect_expiring(short, expiry)
    started = time.time()
    vanish(short)
    will = take(watcher, 8)
    waited = time.time() - started
    if will is None or will.topic != f"wills-{tag}/short" or waited > 5:
        fail(f"the will when the 1 s session ends: {will and will.topic} after {waited:.2f} s")
    nothing_more(watcher, 3.0, "the client that came back in time")
    again.disconnect()
    print(f"ok: wills wait for their delay ({waited:.1f} s for a 1 s session), none if back in time")


def expiry():
    tag = uuid.uuid4().hex[:6]
    pub = client("exp-pub")
    connect(pub)
    for v5 in (False, True):
        version = "v5" if v5 else "v3.1.1"
        cid = f"away-{tag}-{int(v5)}"
        topic = f"exp-{tag}-{int(v5)}"
        first = client("away", v5=v5, clean=False, cid=cid)
        connect(first, v5=v5, persistent=True)
        subscribe(first, f"{topic}/#")
        first.disconnect()
        first.loop_stop()
        # Longer than the broker's group linger (set short by the test): still queued.
        time.sleep(1.5)
        for i in range(3):
            pub.publish(f"{topic}/{i}", str(i), qos=1).wait_for_publish()
        again = client("away", v5=v5, clean=False, cid=cid)
        state = {}
        connect(again, v5=v5, persistent=True, result=state)
        got = [take(again) for _ in range(3)]
        if not state["present"] or any(m is None for m in got):
            fail(f"{version}: resumed past the linger: {state} {[m and m.payload for m in got]}")
        again.disconnect()
        again.loop_stop()

    # A clean start ends the old session: what it queued meanwhile is not delivered.
    cid = f"away-{tag}-1"
    topic = f"exp-{tag}-1"
    pub.publish(f"{topic}/old", b"old", qos=1).wait_for_publish()
    fresh = client("away", cid=cid)
    connect_expiring(fresh, 300, clean=True)
    subscribe(fresh, f"{topic}/#")
    pub.publish(f"{topic}/new", b"new", qos=1).wait_for_publish()
    got = take(fresh)
    if got is None or got.payload != b"new":
        fail(f"a clean start gets only what comes after: {got and got.payload}")
    nothing_more(fresh, 1.0, "a clean start")

    # DISCONNECT with a session expiry of 0 ends the session.
    ending = Properties(PacketTypes.DISCONNECT)
    ending.SessionExpiryInterval = 0
    fresh.disconnect(properties=ending)
    fresh.loop_stop()
    time.sleep(0.3)
    pub.publish(f"{topic}/after", b"after", qos=1).wait_for_publish()
    back = client("away", cid=cid)
    state = connect_with(back, False, SessionExpiryInterval=300)
    if state["present"]:
        fail("a session whose expiry was set to 0 at DISCONNECT was resumed")
    nothing_more(back, 1.0, "an ended session")
    print("ok: sessions kept past the group linger (3.1.1 and 5), clean start and expiry 0 end them")


def bound():
    tag = uuid.uuid4().hex[:6]
    cid = f"owned-{tag}"
    alice = client("alice", password="alice-key", cid=cid)
    lost = {}
    alice.on_disconnect = lambda *args: lost.setdefault("gone", args)
    if connect(alice) != 0:
        fail("alice refused")
    subscribe(alice, f"bound-{tag}/#")
    # Another principal with alice's client id: refused (135), alice keeps her connection.
    bob = client("bob", password="bob-key", cid=cid)
    rc = connect(bob)
    bob.loop_stop()
    if rc != 135:
        fail(f"another principal's client id: {rc}, wanted 135")
    # A wrong password with her client id: refused (134), and it takes nothing over.
    intruder = client("intruder", password="wrong", cid=cid)
    rc = connect(intruder)
    intruder.loop_stop()
    if rc != 134:
        fail(f"a wrong password: {rc}, wanted 134")
    pub = client("bound-pub", password="bob-key")
    connect(pub)
    pub.publish(f"bound-{tag}/x", b"still here", qos=1).wait_for_publish()
    got = take(alice)
    if got is None or got.payload != b"still here" or lost:
        fail(f"alice's connection survived: {got and got.payload} {lost}")
    # Alice herself takes her session over.
    twin = client("alice", password="alice-key", cid=cid)
    if connect(twin) != 0:
        fail("the same principal takes its own client id")
    print("ok: a client id is bound to its principal; a wrong password takes nothing over")


def auth_method():
    c = client("scram")
    state = connect_with(c, AuthenticationMethod="SCRAM-SHA-256")
    c.loop_stop()
    if state["rc"] != 140:
        fail(f"enhanced authentication: {state}, wanted 140 (bad authentication method)")
    print("ok: enhanced authentication refused with 0x8C")


SCENARIOS = {
    "options": options,
    "will-delay": will_delay,
    "expiry": expiry,
    "bound": bound,
    "auth-method": auth_method,
}

if __name__ == "__main__":
    if SCENARIO not in SCENARIOS:
        fail(f"unknown scenario {SCENARIO}")
    SCENARIOS[SCENARIO]()
