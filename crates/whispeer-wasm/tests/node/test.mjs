// The WASM client in Node against a real server: sealed messages both ways with the Rust CLI.
// Usage: node test.mjs <ws-url> <package-dir> <whispeer-binary> <key-file>
import { createRequire } from "node:module";
import { spawn, spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import WebSocket from "ws";

const [url, pkg, bin, keyFile] = process.argv.slice(2);
globalThis.WebSocket = WebSocket; // Node 20 has no global WebSocket
const { Client } = createRequire(import.meta.url)(`${pkg}/whispeer_wasm.js`);
const fail = (message) => { console.error(`FAIL: ${message}`); process.exit(1); };
const timer = setTimeout(() => fail("timed out"), 20000);
const key = readFileSync(keyFile, "utf8");

const client = await Client.connect(url, key, null);
let subscription;
const received = new Promise((resolve) => {
  subscription = client.subscribe("web/#", (topic, data, id) => resolve({ topic, text: new TextDecoder().decode(data), id }));
});
// A Rust subscriber waits for the reply; it prints once it has subscribed.
const rust = spawn(bin, ["sub", "rust/reply", "--count", "1", "--server", url, "--key-file", keyFile]);
let rustOut = "";
rust.stdout.on("data", (chunk) => { rustOut += chunk; });
// Listen for "close" now, not after publishing: the child may exit while we await anything.
// "close" (not "exit") fires only after the child's output has been read.
const rustClosed = new Promise((resolve) => rust.on("close", resolve));
await new Promise((resolve) => rust.stderr.once("data", resolve));

const pub = spawnSync(bin, ["pub", "web/greeting", "sealed by rust", "--server", url, "--key-file", keyFile]);
if (pub.status !== 0) fail(`whispeer pub exited with ${pub.status}: ${pub.stderr}`);
const message = await received;
if (message.topic !== "web/greeting" || message.text !== "sealed by rust") fail(JSON.stringify(message));
if (message.id.length !== 32) fail(`message id ${message.id}`);
client.ack(subscription, message.id);
let refused = false;
try { client.ack(subscription, "not hex"); } catch { refused = true; }
if (!refused) fail("an invalid message id was accepted");

client.publishText("rust/reply", "sealed by wasm");
const code = await rustClosed;
if (code !== 0 || rustOut !== "sealed by wasm\n") fail(`rust sub got ${JSON.stringify(rustOut)} (exit ${code})`);

// Without the key, the same message reaches a subscriber but does not open.
const stranger = await Client.connect(url, null, null);
let opened = false;
stranger.subscribe("web/#", () => { opened = true; });
const again = spawnSync(bin, ["pub", "web/greeting", "still sealed", "--server", url, "--key-file", keyFile]);
if (again.status !== 0) fail("second pub failed");
await new Promise((resolve) => setTimeout(resolve, 300));
if (opened) fail("a client without the key opened a sealed message");

// QoS 1: a message left unacknowledged comes again, marked with its attempt; acked, it stops.
const attempts = [];
const redelivered = new Promise((resolve) => {
  const jobs = client.subscribeWith("jobs/#", (topic, data, id, attempt) => {
    attempts.push(attempt);
    if (attempt > 1) { client.ack(jobs, id); resolve(); }
  }, 1, "wasm-workers");
});
await new Promise((resolve) => setTimeout(resolve, 100));
const job = spawnSync(bin, ["pub", "jobs/1", "build", "--ack", "--server", url, "--key-file", keyFile]);
if (job.status !== 0) fail(`qos 1 pub failed: ${job.stderr}`);
await redelivered;
await new Promise((resolve) => setTimeout(resolve, 1000));
if (JSON.stringify(attempts) !== "[1,2]") fail(`qos 1 attempts ${JSON.stringify(attempts)}`);

client.close();
stranger.close();
clearTimeout(timer);
console.log("ok: wasm client in node exchanged sealed messages with the rust cli, and acked a qos 1 redelivery");
