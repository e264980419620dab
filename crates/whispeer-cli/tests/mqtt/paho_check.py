"""Paho (Python) against whispeer's MQTT listener: one scenario per run, "ok: ..." on success,
"FAIL: ..." and exit 1 otherwise. Works with paho-mqtt 1.6 (Debian) and 2.x (PyPI).

Usage: python3 paho_check.py <port> shared|request|properties|wrong-password|persistent
"""

import queue
import sys
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PORT = int(sys.argv[1])
SCENARIO = sys.argv[2]
PATIENCE = 10


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def client(name, v5=True, password=None, clean=True, transport="tcp", cid=None):
    protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
    cid = cid or f"{name}-{uuid.uuid4().hex[:8]}"
    if hasattr(mqtt, "CallbackAPIVersion"):
        extra = {} if v5 else {"clean_session": clean}
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=cid,
            protocol=protocol,
            transport=transport,
            **extra,
        )
    elif v5:
        c = mqtt.Client(client_id=cid, protocol=protocol, transport=transport)
    else:
        c = mqtt.Client(client_id=cid, protocol=protocol, clean_session=clean, transport=transport)
    if transport == "websockets":
        c.ws_set_options(path="/mqtt")
    if password is not None:
        c.username_pw_set("user", password)
    c.inbox = queue.Queue()
    c.on_message = lambda _c, _u, message: c.inbox.put(message)
    return c


def connect(c, v5=True, persistent=False, result=None):
    result = {} if result is None else result

    def on_connect(_c, _u, flags, rc, properties=None):
        present = getattr(flags, "session_present", None)
        if present is None and isinstance(flags, dict):
            present = flags.get("session present")
        result["present"] = bool(present)
        result["rc"] = rc

    c.on_connect = on_connect
    if v5 and persistent:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        c.connect("127.0.0.1", PORT, keepalive=30, clean_start=False, properties=props)
    elif v5:
        c.connect("127.0.0.1", PORT, keepalive=30, clean_start=True)
    else:
        c.connect("127.0.0.1", PORT, keepalive=30)
    c.loop_start()
    deadline = time.time() + PATIENCE
    while "rc" not in result and time.time() < deadline:
        time.sleep(0.02)
    if "rc" not in result:
        fail("no CONNACK")
    rc = result["rc"]
    return rc if isinstance(rc, int) else rc.value


def subscribe(c, topic, qos=1):
    done = queue.Queue()
    c.on_subscribe = lambda *args: done.put(args)
    c.subscribe(topic, qos)
    done.get(timeout=PATIENCE)


def take(c, timeout=PATIENCE):
    try:
        return c.inbox.get(timeout=timeout)
    except queue.Empty:
        return None


def shared():
    members = [client(f"worker{i}") for i in range(2)]
    for m in members:
        if connect(m) != 0:
            fail("worker refused")
        subscribe(m, "$share/workers/jobs/#")
    pub = client("boss")
    connect(pub)
    for i in range(40):
        pub.publish(f"jobs/{i % 4}", str(i), qos=1).wait_for_publish()
    got = [[], []]
    deadline = time.time() + PATIENCE
    while sum(len(g) for g in got) < 40 and time.time() < deadline:
        for index, m in enumerate(members):
            message = take(m, 0.05)
            if message is not None:
                got[index].append(int(message.payload))
    every = sorted(got[0] + got[1])
    if every != list(range(40)):
        fail(f"each job once to one worker: {every}")
    if not got[0] or not got[1]:
        fail(f"both workers share the jobs: {len(got[0])} and {len(got[1])}")
    print(f"ok: 40 jobs shared by a $share group, {len(got[0])} and {len(got[1])}, each once")


def ask(topic, payload, correlation):
    """A requester that published `payload` to `topic` with its reply topic and correlation."""
    requester = client("requester")
    connect(requester)
    inbox = f"reply/{uuid.uuid4().hex[:8]}"
    subscribe(requester, inbox)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = inbox
    props.CorrelationData = correlation
    requester.publish(topic, payload, qos=1, properties=props).wait_for_publish()
    return requester, inbox


def expect_answer(requester, payload, correlation):
    answer = take(requester)
    if answer is None or answer.payload != payload:
        fail(f"no answer {payload}: {answer and answer.payload}")
    if getattr(answer.properties, "CorrelationData", None) != correlation:
        fail(f"correlation data lost: {answer.properties}")


def request():
    responder = client("responder")
    connect(responder)
    subscribe(responder, "svc/echo")
    requester, inbox = ask("svc/echo", b"ping", b"corr-42")
    asked = take(responder)
    if asked is None:
        fail("the request did not arrive")
    if getattr(asked.properties, "ResponseTopic", None) != inbox:
        fail(f"response topic lost: {asked.properties}")
    reply = Properties(PacketTypes.PUBLISH)
    reply.CorrelationData = asked.properties.CorrelationData
    responder.publish(inbox, b"pong:" + asked.payload, qos=1, properties=reply).wait_for_publish()
    expect_answer(requester, b"pong:ping", b"corr-42")
    print("ok: MQTT 5 request/response through response topic and correlation data")


def properties():
    sub = client("props-sub")
    connect(sub)
    subscribe(sub, "props/#")
    pub = client("props-pub")
    connect(pub)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("source", "paho")
    props.MessageExpiryInterval = 60
    props.ContentType = "text/plain"
    pub.publish("props/a", b"with properties", qos=1, properties=props).wait_for_publish()
    message = take(sub)
    if message is None:
        fail("nothing arrived")
    user = dict(getattr(message.properties, "UserProperty", []) or [])
    if user.get("source") != "paho":
        fail(f"user property lost: {message.properties}")
    if getattr(message.properties, "ContentType", None) != "text/plain":
        fail(f"content type lost: {message.properties}")
    expiry = getattr(message.properties, "MessageExpiryInterval", None)
    if expiry is None or not 0 < expiry <= 60:
        fail(f"message expiry lost: {message.properties}")
    print("ok: user properties, content type and message expiry carried through")


def wrong_password():
    # Paho 2 reports 3.1.1's return code 4 as reason code 134 too.
    for v5, refused in ((True, (134,)), (False, (4, 134))):
        c = client("intruder", v5=v5, password="wrong")
        rc = connect(c, v5=v5)
        c.loop_stop()
        if rc not in refused:
            fail(f"{'v5' if v5 else 'v3.1.1'} wrong password: return code {rc}, wanted {refused}")
    print("ok: a wrong password is refused (3.1.1: 4, 5: 134)")


def websocket():
    # PORT is the WebSocket listener's here: MQTT at /mqtt, subprotocol mqtt.
    for v5 in (True, False):
        sub = client("ws-sub", v5=v5, transport="websockets")
        if connect(sub, v5=v5) != 0:
            fail("refused over WebSocket")
        subscribe(sub, "web/#")
        pub = client("ws-pub", v5=v5, transport="websockets")
        connect(pub, v5=v5)
        pub.publish("web/x", b"over websocket", qos=1).wait_for_publish()
        message = take(sub)
        if message is None or message.payload != b"over websocket":
            fail(f"{'v5' if v5 else 'v3.1.1'} over WebSocket: {message and message.payload}")
    print("ok: MQTT 3.1.1 and 5 over WebSocket at /mqtt")


def persistent():
    for v5 in (False, True):
        version = "v5" if v5 else "v3.1.1"
        cid = f"keeper-{uuid.uuid4().hex[:8]}"
        first = client("keeper", v5=v5, clean=False, cid=cid)
        state = {}
        if connect(first, v5=v5, persistent=True, result=state) != 0 or state["present"]:
            fail(f"{version}: the first connection has no session to resume: {state}")
        subscribe(first, "keep/#")
        first.disconnect()
        first.loop_stop()
        pub = client("keeper-pub")
        connect(pub)
        for i in range(5):
            pub.publish(f"keep/{i}", str(i), qos=1).wait_for_publish()
        again = client("keeper", v5=v5, clean=False, cid=cid)
        state = {}
        connect(again, v5=v5, persistent=True, result=state)
        if not state["present"]:
            fail(f"{version}: the session was not resumed")
        got = []
        while len(got) < 5:
            message = take(again)
            if message is None:
                fail(f"{version}: missed messages, got {got}")
            got.append(int(message.payload))
        if sorted(got) != list(range(5)):
            fail(f"{version}: {got}")
        again.disconnect()
        again.loop_stop()
    print("ok: persistent sessions (3.1.1 and 5) resumed with what arrived while away")


def ask_native():
    # A native `whispeer reply svc/native --message pong` answers an MQTT 5 request.
    requester, _ = ask("svc/native", b"ping", b"c-7")
    expect_answer(requester, b"pong", b"c-7")
    print("ok: a native responder answered an MQTT 5 request")


def answer_native():
    # Answers one request on svc/paho (from `whispeer req`) through its response topic.
    responder = client("answerer")
    connect(responder)
    subscribe(responder, "svc/paho")
    print("ready", flush=True)
    asked = take(responder, 20)
    if asked is None:
        fail("no request came")
    reply = Properties(PacketTypes.PUBLISH)
    reply.CorrelationData = asked.properties.CorrelationData
    topic = asked.properties.ResponseTopic
    responder.publish(topic, b"paho says " + asked.payload, qos=1, properties=reply).wait_for_publish()
    print("ok: answered a native request")


def aliases():
    sub = client("alias-sub")
    connect(sub)
    subscribe(sub, "alias/#")
    pub = client("alias-pub")
    connect(pub)
    first = Properties(PacketTypes.PUBLISH)
    first.TopicAlias = 3
    pub.publish("alias/long/topic", b"one", qos=1, properties=first).wait_for_publish()
    again = Properties(PacketTypes.PUBLISH)
    again.TopicAlias = 3
    pub.publish("", b"two", qos=1, properties=again).wait_for_publish()
    got = [take(sub), take(sub)]
    if any(m is None for m in got):
        fail(f"aliased publishes lost: {got}")
    seen = [(m.topic, m.payload) for m in got]
    if seen != [("alias/long/topic", b"one"), ("alias/long/topic", b"two")]:
        fail(f"topic aliases: {seen}")
    print("ok: MQTT 5 topic aliases set and used")


def takeover():
    cid = f"twin-{uuid.uuid4().hex[:8]}"
    first = client("twin", cid=cid)
    gone = {}

    def on_disconnect(_c, _u, *rest):
        for item in rest:
            value = getattr(item, "value", item)
            if isinstance(value, int) and value >= 128:
                gone["reason"] = value

    first.on_disconnect = on_disconnect
    connect(first)
    second = client("twin", cid=cid)
    connect(second)
    deadline = time.time() + PATIENCE
    while "reason" not in gone and time.time() < deadline:
        time.sleep(0.02)
    first.loop_stop()
    if gone.get("reason") != 142:
        fail(f"the first connection of a client id taken over: {gone}")
    print("ok: a second connection with the client id takes the session over (0x8E)")


SCENARIOS = {
    "takeover": takeover,
    "aliases": aliases,
    "ask-native": ask_native,
    "answer-native": answer_native,
    "persistent": persistent,
    "websocket": websocket,
    "shared": shared,
    "request": request,
    "properties": properties,
    "wrong-password": wrong_password,
}

if __name__ == "__main__":
    if SCENARIO not in SCENARIOS:
        fail(f"unknown scenario {SCENARIO}")
    SCENARIOS[SCENARIO]()
