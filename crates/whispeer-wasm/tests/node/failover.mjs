// The WASM client in Node with several nodes: it skips a node that does not answer, and when its
// node dies (SIGKILL) it connects to the next one and subscribes there again; on a cluster's
// durable topic (a real nats-server with JetStream) it resumes after its last offset there.
// Usage: node failover.mjs <package-dir> <whispeer-binary>
import { createRequire } from "node:module";
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";

const [pkg, bin] = process.argv.slice(2);
globalThis.WebSocket = WebSocket; // Node 20 has no global WebSocket
const { Client } = createRequire(import.meta.url)(`${pkg}/whispeer_wasm.js`);
const children = [];
// nats-server's store, removed once the servers are stopped.
const natsDir = mkdtempSync(join(tmpdir(), "whispeer-nats-"));
const stop = () => {
  for (const child of children) child.kill("SIGKILL");
  rmSync(natsDir, { recursive: true, force: true });
};
const fail = (message) => {
  console.error(`FAIL: ${message}`);
  stop();
  process.exit(1);
};
const timer = setTimeout(() => fail("timed out"), 30000);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A `whispeer serve` with a WebSocket listener; resolves with its child and URL.
const serve = (env = {}) => new Promise((resolve, reject) => {
  const child = spawn(bin, ["serve", "--listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0"], {
    stdio: ["ignore", "pipe", "ignore"],
    env: { ...process.env, ...env },
  });
  children.push(child);
  let out = "";
  child.stdout.on("data", (chunk) => {
    out += chunk;
    const found = out.match(/websocket listening on (\S+)/);
    if (found) resolve({ child, url: found[1] });
  });
  child.on("exit", (code) => reject(new Error(`whispeer serve exited with ${code}`)));
});

// Does `act` every 50 ms until `done` holds.
const until = async (what, done, act) => {
  for (let i = 0; i < 200; i++) {
    act();
    await sleep(50);
    if (done()) return;
  }
  fail(what);
};

const a = await serve();
const b = await serve();
const client = await Client.connect(`ws://127.0.0.1:1/ws,${a.url},${b.url}`, null, null);
const got = [];
client.subscribe("f/#", (topic, data) => got.push(new TextDecoder().decode(data)));

const onA = await Client.connect(a.url, null, null);
await until("a message through the first live node", () => got.includes("on a"), () => onA.publishText("f/x", "on a"));
onA.close();
a.child.kill("SIGKILL");
const onB = await Client.connect(b.url, null, null);
await until("a message after moving to the next node", () => got.includes("on b"), () => {
  try { onB.publishText("f/x", "on b"); } catch (err) { fail(`publishing on b: ${err}`); }
});
// While it is away, a publish fails loudly instead of vanishing.
b.child.kill("SIGKILL");
await until("a publish refused while no node answers", () => {
  try { client.publishText("f/x", "nowhere"); return false; } catch { return true; }
}, () => {});

client.close();
onB.close();

// A cluster's durable topic: offsets are the engine's, the same on both nodes.
const port = await new Promise((resolve) => {
  const probe = createServer().listen(0, "127.0.0.1", () => {
    const { port } = probe.address();
    probe.close(() => resolve(port));
  });
});
const nats = spawn("nats-server", ["-a", "127.0.0.1", "-p", String(port), "-js", "-sd", natsDir], { stdio: "ignore" });
children.push(nats);
await sleep(500);
const node = (name) => serve({
  WHISPEER_CLUSTER__URLS: `["nats://127.0.0.1:${port}"]`,
  WHISPEER_CLUSTER__NODE: name,
  WHISPEER_STORAGE__DURABLE: '["orders/#"]',
});
const n1 = await node("n1");
const n2 = await node("n2");
const reader = await Client.connect(`${n1.url},${n2.url}`, null, null);
reader.setSharedOffsets(true);
const seen = [];
reader.subscribe("orders/x", (topic, data) => seen.push(new TextDecoder().decode(data)));
const w1 = await Client.connect(n1.url, null, null);
await until("a durable message through the first node", () => seen.includes("m0"), () => w1.publishText("orders/x", "m0"));
w1.close();
n1.child.kill("SIGKILL");
// Published on the other node before the reader is back: it reads them after its last offset.
const w2 = await Client.connect(n2.url, null, null);
const wanted = ["m1", "m2", "m3", "m4", "m5"];
for (const m of wanted) w2.publishText("orders/x", m);
for (let i = 0; i < 200 && !wanted.every((m) => seen.includes(m)); i++) await sleep(50);
if (!wanted.every((m) => seen.includes(m))) fail(`the messages published while the reader moved: read ${seen}`);
if (seen.filter((m) => m !== "m0").join() !== wanted.join()) fail(`read ${seen}`);
reader.close();
w2.close();
clearTimeout(timer);
stop();
console.log("ok: wasm client skipped a dead node, moved to the next when its node died, subscribed there again, and resumed a durable topic after its last offset");
process.exit(0);
