// The chat page in headless Chromium: `whispeer serve --chat-listen --chat-page` serves it with
// the WASM client; alice and bob open it side by side, alice sends (sealed by default, the
// identity kept in the browser's localStorage), bob's page shows it opened while the server
// holds only a box, and a screenshot of both is saved; then a message sealed by the Rust CLI
// (sealing by default too) opens in the page, and one sealed in the page opens in the CLI.
// Usage: node chat_page.mjs <whispeer-binary> <web-package-dir> <screenshot.png>
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [bin, web, screenshot] = process.argv.slice(2);
let stage = "starting the server";
let server;
const fail = (message) => {
  console.error(`FAIL: ${message} (at: ${stage})`);
  server?.kill("SIGKILL");
  process.exit(1);
};
const timer = setTimeout(() => fail("timed out"), 90000);

server = spawn(bin, ["serve", "--listen", "127.0.0.1:0", "--chat-listen", "127.0.0.1:0", "--chat-page", web], {
  stdio: ["ignore", "pipe", "ignore"],
});
const pageUrl = await new Promise((resolve) => {
  let out = "";
  server.stdout.on("data", (chunk) => {
    out += chunk;
    const found = out.match(/whispeer: chat page on (\S+)/);
    if (found) resolve(found[1]);
  });
  server.on("exit", (code) => { if (stage !== "done") fail(`the server exited with ${code}`); });
});

stage = "launching chromium";
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const context = await browser.newContext({ viewport: { width: 560, height: 420 } });
const open = async (user) => {
  const page = await context.newPage();
  page.on("console", (message) => console.log(`[${user}] ${message.text()}`));
  await page.goto(`${pageUrl}?user=${user}`);
  await page.waitForFunction(() => window.chatReady || window.chatFailure, null, { timeout: 20000 });
  const failure = await page.evaluate(() => window.chatFailure);
  if (failure) fail(`${user}'s page: ${failure}`);
  return page;
};
stage = "opening the pages";
const alice = await open("alice");
const bob = await open("bob");

stage = "alice sends from her page";
await alice.fill("#to", "bob");
await alice.fill("#text", "hello from alice's browser");
await alice.press("#text", "Enter");
stage = "bob's page shows it";
await bob.waitForFunction(() => document.getElementById("log").textContent.includes("hello from alice's browser"),
  null, { timeout: 20000 });
const shown = await bob.evaluate(() => document.getElementById("log").textContent);
if (!shown.includes("alice: hello from alice's browser")) fail(`bob's page shows ${JSON.stringify(shown)}`);

stage = "the page's Chat: history, unread, a refusal";
const history = await bob.evaluate(() => window.chat.history("alice", 10));
if (history.messages.length !== 1 || history.messages[0].msg !== "hello from alice's browser" || !history.messages[0].sealed) {
  fail(`history ${JSON.stringify(history)}`);
}
stage = "the server holds a box, and the identity stays in localStorage";
const raw = await bob.evaluate(async () => {
  const { Chat } = await import("./pkg/whispeer_wasm.js");
  const endpoint = `ws://${location.host}/ws`;
  const plain = await Chat.connect(endpoint, "bob", "raw", null, { plain: true });
  const page = await plain.history("alice", 10);
  plain.close();
  return { page, stored: localStorage.getItem("whispeer.chat.bob.browser.identity") !== null };
});
const box = raw.page.messages[0]?.msg;
if (typeof box?.sealed !== "string" || JSON.stringify(raw.page).includes("hello from alice")) fail(`stored ${JSON.stringify(raw.page)}`);
if (!raw.stored) fail("no identity in localStorage");
const unread = await bob.evaluate(() => window.chat.unread());
if (unread.conversations[0]?.unread !== 1) fail(`unread ${JSON.stringify(unread)}`);
const refusal = await bob.evaluate(() => window.chat.sendGroup("nowhere", "hi").then(() => "sent", (e) => String(e)));
if (!refusal.includes("no_such_group")) fail(`a post to a group that does not exist: ${refusal}`);
await alice.waitForFunction(() => document.getElementById("log").textContent.includes("delivered by bob"),
  null, { timeout: 20000 });

stage = "sealed between the Rust CLI and the page";
const work = mkdtempSync(join(tmpdir(), "whispeer-page-"));
const carol = spawn(bin, ["chat", "--as", "carol", "--server", pageUrl.replace(/^http/, "ws").replace(/\/$/, "/ws"),
  "--keys-dir", work]);
const carolOut = { text: "" };
carol.stdout.on("data", (chunk) => { carolOut.text += chunk; });
await new Promise((resolve) => {
  let err = "";
  carol.stderr.on("data", (chunk) => { err += chunk; if (err.includes("messages are sealed end to end")) resolve(); });
});
carol.stdin.write("/msg bob sealed by rust\n");
await bob.waitForFunction(() => document.getElementById("log").textContent.includes("carol: sealed by rust"),
  null, { timeout: 20000 });
await bob.evaluate(() => window.chat.sendTo("carol", "sealed in chromium"));
for (let i = 0; i < 200 && !carolOut.text.includes("bob: sealed in chromium"); i++) {
  await new Promise((resolve) => setTimeout(resolve, 50));
}
if (!carolOut.text.includes("bob: sealed in chromium")) fail(`the CLI showed ${JSON.stringify(carolOut.text)}`);
carol.kill("SIGTERM");
rmSync(work, { recursive: true, force: true });

stage = "the screenshot";
const both = await context.newPage();
await both.setViewportSize({ width: 1140, height: 440 });
await both.setContent(`<body style="margin:0;display:flex;gap:20px">
  <img src="data:image/png;base64,${(await alice.screenshot()).toString("base64")}">
  <img src="data:image/png;base64,${(await bob.screenshot()).toString("base64")}"></body>`);
await both.screenshot({ path: screenshot });
console.log(`chat page: alice -> bob shown in the browser; screenshot ${screenshot}`);

stage = "done";
await browser.close();
server.kill("SIGTERM");
clearTimeout(timer);
