// The WASM client in headless Chromium against a real server: the page receives a message sealed
// by the Rust CLI and publishes a sealed reply that a Rust subscriber prints; then, under a key
// policy made by the CLI (no shared key), the page opens what the CLI seals and the CLI what the
// page seals, and the page keeps the policy's keys in localStorage.
// Usage: node browser.mjs <ws-url> <web-package-dir> <whispeer-binary> <key-file>
import http from "node:http";
import { spawn, spawnSync } from "node:child_process";
import { readFile } from "node:fs/promises";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const [url, pkg, bin, keyFile] = process.argv.slice(2);
const here = dirname(fileURLToPath(import.meta.url));
let stage = "starting";
const fail = (message) => { console.error(`FAIL: ${message} (at: ${stage})`); process.exit(1); };
const timer = setTimeout(() => fail("timed out"), 60000);
const key = readFileSync(keyFile, "utf8").trim();

const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm" };
const server = http.createServer(async (request, response) => {
  const path = new URL(request.url, "http://localhost").pathname;
  if (path === "/favicon.ico") return response.writeHead(204).end();
  const file = path === "/" || path === "/index.html" ? join(here, "index.html")
    : path.startsWith("/pkg/") && !path.includes("..") ? join(pkg, path.slice(5)) : null;
  try {
    if (!file) throw new Error("not found");
    const body = await readFile(file);
    response.writeHead(200, { "content-type": types[file.slice(file.lastIndexOf("."))] ?? "application/octet-stream" });
    response.end(body);
  } catch {
    response.writeHead(404).end();
  }
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const page_url = `http://127.0.0.1:${server.address().port}/index.html?ws=${encodeURIComponent(url)}&key=${encodeURIComponent(key)}`;

stage = "launching chromium";
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage();
page.on("console", (message) => console.log(`[page] ${message.text()}`));
stage = "loading the page";
await page.goto(page_url);
stage = "waiting for the page to connect";
await page.waitForFunction(() => window.ready || window.failure, null, { timeout: 20000 });
const failure = await page.evaluate(() => window.failure);
if (failure) fail(`page: ${failure}`);

stage = "starting whispeer sub";
const rust = spawn(bin, ["sub", "rust/reply", "--count", "1", "--server", url, "--key-file", keyFile]);
let rustOut = "";
let rustErr = "";
rust.stdout.on("data", (chunk) => { rustOut += chunk; });
// Listen for "close" now, not after publishing: the child may exit while we await anything.
// "close" (not "exit") fires only after the child's output has been read.
const rustClosed = new Promise((resolve) => rust.on("close", resolve));
rust.stderr.on("data", (chunk) => { rustErr += chunk; if (process.env.DEBUG_RUST) process.stderr.write(`[rust] ${chunk}`); });
await new Promise((resolve) => {
  const check = () => (rustErr.includes("subscribed") ? resolve() : setTimeout(check, 10));
  check();
});

stage = "publishing from rust";
const pub = spawnSync(bin, ["pub", "web/greeting", "sealed by rust", "--server", url, "--key-file", keyFile]);
if (pub.status !== 0) fail(`whispeer pub exited with ${pub.status}: ${pub.stderr}`);
stage = "waiting for the page to receive";
await page.waitForFunction(() => window.received, null, { timeout: 20000 });
const received = await page.evaluate(() => window.received);
if (received.topic !== "web/greeting" || received.text !== "sealed by rust") fail(JSON.stringify(received));

stage = "waiting for rust to receive the reply";
await page.evaluate(() => window.client.publishText("rust/reply", "sealed by the browser"));
const code = await rustClosed;
if (code !== 0 || rustOut !== "sealed by the browser\n") fail(`rust sub got ${JSON.stringify(rustOut)} (exit ${code})`);

stage = "a key policy made by the rust cli, followed in the browser";
const work = mkdtempSync(join(tmpdir(), "whispeer-browser-policy-"));
const keysArgs = (args) => ["keys", ...args, "--as", "rustdave", "--identity", join(work, "dave.identity"), "--server", url];
const keys = (args) => {
  const run = spawnSync(bin, keysArgs(args), { encoding: "utf8" });
  if (run.status !== 0) fail(`whispeer keys ${args.join(" ")}: ${run.stderr}`);
  return run.stdout;
};
await page.evaluate(async (ws) => {
  const { Client, Identity } = window.whispeer;
  window.plainClient = await Client.connect(ws, null, null);
  window.me = Identity.stored("webcarol.chromium");
  if (Identity.stored("webcarol.chromium").fingerprint() !== window.me.fingerprint()) throw new Error("identity not kept");
  await window.plainClient.publishIdentity("webcarol", "chromium", window.me);
}, url);
keys(["publish"]);
keys(["policy", "web", "--filter", "webp/#", "--member", "webcarol"]);
await page.evaluate(async () => {
  const { KeyPolicy } = window.whispeer;
  window.policy = await KeyPolicy.follow(window.plainClient, window.me, "rustdave", "web");
  window.policy.subscribe("webp/#", (topic, data, id, attempt, error) => {
    window.policyGot = error ? `error: ${error}` : new TextDecoder().decode(data);
  });
});
keys(["pub", "rustdave/web", "webp/x", "sealed for the browser"]);
await page.waitForFunction(() => window.policyGot, null, { timeout: 20000 });
const policyGot = await page.evaluate(() => window.policyGot);
if (policyGot !== "sealed for the browser") fail(`the page opened ${JSON.stringify(policyGot)}`);

stage = "the browser seals under the policy, the rust cli opens";
const daveReads = spawn(bin, keysArgs(["sub", "rustdave/web", "webp/#", "--count", "1"]));
let daveOut = "";
daveReads.stdout.on("data", (chunk) => { daveOut += chunk; });
const daveClosed = new Promise((resolve) => daveReads.on("close", resolve));
await new Promise((resolve) => {
  let err = "";
  daveReads.stderr.on("data", (chunk) => { err += chunk; if (err.includes("reading")) resolve(); });
});
await page.evaluate(() => window.policy.publishText("webp/y", "sealed by the browser"));
const daveCode = await daveClosed;
if (daveCode !== 0 || daveOut !== "sealed by the browser\n") fail(`keys sub got ${JSON.stringify(daveOut)} (exit ${daveCode})`);
const stored = await page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith("whispeer.policy.rustdave.web.") || k === "whispeer.identity.webcarol.chromium").length);
if (stored !== 2) fail(`the identity and the policy's keys are not in localStorage (${stored})`);
rmSync(work, { recursive: true, force: true });

stage = "closing";
await browser.close();
server.close();
clearTimeout(timer);
console.log("ok: wasm client in chromium exchanged sealed messages with the rust cli, with a shared key and under a key policy");
