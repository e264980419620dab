// Key policies between the Rust CLI (`whispeer keys`) and the WASM client in Node, through a real
// server: a policy made by the CLI is followed by the WASM client, which opens what the CLI
// seals and seals what the CLI opens; a policy made by the WASM client is opened by the CLI; a
// member the WASM owner removes opens nothing sealed afterwards; a plain subscriber sees
// ciphertext only; the WASM client keeps its keys in the storage it is given; a publish the
// server refuses rejects its promise.
// Usage: node policy.mjs <ws-url> <package-dir> <whispeer-binary>
import { createRequire } from "node:module";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";

const [url, pkg, bin] = process.argv.slice(2);
globalThis.WebSocket = WebSocket;
const { Client, Identity, KeyPolicy } = createRequire(import.meta.url)(`${pkg}/whispeer_wasm.js`);
const work = mkdtempSync(join(tmpdir(), "whispeer-policy-"));
let stage = "starting";
const children = [];
const fail = (message) => {
  console.error(`FAIL: ${message} (at: ${stage})`);
  children.forEach((child) => child.kill("SIGKILL"));
  rmSync(work, { recursive: true, force: true });
  process.exit(1);
};
const timer = setTimeout(() => fail("timed out"), 60000);
const text = (data) => new TextDecoder().decode(data);

// `whispeer keys …` as `who`, with its identity file in the work folder.
const keysArgs = (who, args) => ["keys", ...args, "--as", who, "--identity", join(work, `${who}.identity`), "--server", url];
const keys = (who, args) => {
  const run = spawnSync(bin, keysArgs(who, args), { encoding: "utf8" });
  if (run.status !== 0) fail(`whispeer ${args.join(" ")} as ${who}: ${run.stderr}`);
  return run.stdout;
};
// A `whispeer keys sub` reading `count` messages, once it reads: `closed` resolves with its
// output once it exits.
const reader = async (who, policy, filter, count) => {
  const child = spawn(bin, keysArgs(who, ["sub", policy, filter, "--count", String(count)]));
  children.push(child);
  let out = "";
  child.stdout.on("data", (chunk) => { out += chunk; });
  const closed = new Promise((resolve) => child.on("close", (code) => resolve({ code, out })));
  await new Promise((resolve, reject) => {
    let err = "";
    child.stderr.on("data", (chunk) => { err += chunk; if (err.includes("reading")) resolve(); });
    child.on("close", () => reject(new Error(err)));
  }).catch((e) => fail(`keys sub: ${e.message}`));
  return { closed };
};

stage = "directory";
const client = await Client.connect(url, null, null);
const bob = Identity.generate();
await client.publishIdentity("wasmbob", "node", bob);
const listed = await client.identities("wasmbob");
if (listed.length !== 1 || listed[0].device !== "node" || listed[0].fingerprint !== bob.fingerprint()) {
  fail(`directory: ${JSON.stringify(listed)}`);
}

stage = "a policy made by the CLI, followed by the WASM client";
keys("rustalice", ["publish"]);
const made = keys("rustalice", ["policy", "ops", "--filter", "ops/#", "--member", "wasmbob"]);
if (made.trim() !== "rustalice/ops ops/# epoch 1: rustalice wasmbob") fail(made);
const saved = new Map();
const storage = { getItem: (key) => saved.get(key) ?? null, setItem: (key, value) => saved.set(key, value) };
const policy = await KeyPolicy.follow(client, bob, "rustalice", "ops", { storage });
if (policy.state?.epoch !== 1 || policy.state.members.join(",") !== "rustalice,wasmbob") fail(JSON.stringify(policy.state));
const got = [];
let wake = () => {};
policy.subscribe("ops/#", (topic, data, id, attempt, error) => { got.push({ topic, data, error }); wake(); });
const plain = [];
client.subscribe("ops/#", (topic, data) => plain.push(text(data)));
const next = async () => {
  while (got.length === 0) await new Promise((resolve) => { wake = resolve; });
  return got.shift();
};
keys("rustalice", ["pub", "rustalice/ops", "ops/deploy", "sealed by rust"]);
const opened = await next();
if (opened.error || text(opened.data) !== "sealed by rust" || opened.topic !== "ops/deploy") fail(`${opened.error} ${opened.data}`);
if (plain.some((seen) => seen.includes("sealed by rust"))) fail("a plain subscriber saw the text");

stage = "the WASM client seals, the CLI opens";
const rustReads = await reader("rustalice", "rustalice/ops", "ops/#", 1);
await policy.publishText("ops/status", "sealed by wasm");
const read = await rustReads.closed;
if (read.code !== 0 || read.out !== "sealed by wasm\n") fail(`keys sub: ${JSON.stringify(read)}`);
let outside = "";
try { await policy.publishText("elsewhere/x", "no"); } catch (e) { outside = String(e); }
if (!outside.includes("outside")) fail(`published outside the filter: ${outside}`);
const kept = [...saved.keys()].find((key) => key.startsWith("whispeer.policy.rustalice.ops."));
if (!kept || !saved.get(kept).includes("owner ")) fail(`keys not kept in the storage: ${[...saved.keys()]}`);

stage = "a policy made by the WASM client, opened by the CLI";
const owner = Identity.generate();
const ownerClient = await Client.connect(url, null, null);
await ownerClient.publishIdentity("wasmcarol", "node", owner);
const lab = await KeyPolicy.create(ownerClient, owner, "wasmcarol", "lab", "lab/#", ["rustalice"], {});
if (lab.state?.epoch !== 1) fail(JSON.stringify(lab.state));
const labReads = await reader("rustalice", "wasmcarol/lab", "lab/#", 2);
await lab.publishText("lab/a", "from the wasm owner");
// rustalice is removed: epoch 2 is sealed to the owner alone.
await lab.setMembers([]);
if (lab.state?.epoch !== 2) fail(JSON.stringify(lab.state));
await lab.publishText("lab/a", "after the removal");
const labRead = await labReads.closed;
const lines = labRead.out.trim().split("\n");
if (lines[0] !== "from the wasm owner" || !lines[1]?.startsWith("! lab/a: no key for epoch 2")) fail(labRead.out);

stage = "a publish the server refuses rejects its promise";
// A client of a server without keys may not publish to an inbox (@inbox/…): refused.
const mail = await KeyPolicy.create(ownerClient, owner, "wasmcarol", "mail", "@inbox/#", [], {});
let refusal = "";
try { await mail.publishText("@inbox/someone", "x"); } catch (e) { refusal = String(e); }
if (!refusal.includes("server error")) fail(`a refused publish resolved: ${JSON.stringify(refusal)}`);

stage = "closing";
policy.close();
client.close();
ownerClient.close();
clearTimeout(timer);
rmSync(work, { recursive: true, force: true });
console.log("ok: key policies interoperate between the rust cli and the wasm client in node");
