// End-to-end keys between the Rust CLI and the WASM client in Node, through a real chat server,
// both sealing by default: a message sealed by `whispeer chat` opens in the WASM client, and one
// sealed by the WASM client opens in the CLI, direct and in a group (a key made by the CLI as
// it first sends, learned by the WASM client); the server keeps only boxes; the WASM client
// keeps its identity in the storage it is given; and its inbox acknowledgements: what was never
// handed to the page comes again on the device's next connection, what was does not.
// Usage: node chat_sealed.mjs <node-package-dir> <whispeer-binary>
import { createRequire } from "node:module";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";

const [pkg, bin] = process.argv.slice(2);
globalThis.WebSocket = WebSocket;
const { Chat } = createRequire(import.meta.url)(`${pkg}/whispeer_wasm.js`);
let stage = "starting the server";
const children = [];
const work = mkdtempSync(join(tmpdir(), "whispeer-sealed-"));
const fail = (message) => {
  console.error(`FAIL: ${message} (at: ${stage})`);
  children.forEach((child) => child.kill("SIGKILL"));
  rmSync(work, { recursive: true, force: true });
  process.exit(1);
};
const timer = setTimeout(() => fail("timed out"), 60000);
const lines = (stream, onLine) => {
  let buffer = "";
  stream.on("data", (chunk) => {
    buffer += chunk;
    let at;
    while ((at = buffer.indexOf("\n")) >= 0) {
      onLine(buffer.slice(0, at));
      buffer = buffer.slice(at + 1);
    }
  });
};
const waitFor = (stream, pattern) => new Promise((resolve) => lines(stream, (line) => {
  const found = line.match(pattern);
  if (found) resolve(found);
}));

const server = spawn(bin, ["serve", "--listen", "127.0.0.1:0", "--chat-listen", "127.0.0.1:0"], { stdio: ["ignore", "pipe", "ignore"] });
children.push(server);
const url = (await waitFor(server.stdout, /whispeer: chat listening on (\S+)/))[1];

stage = "the WASM client connects, sealing by default";
const saved = new Map();
const storage = { getItem: (key) => saved.get(key) ?? null, setItem: (key, value) => saved.set(key, value) };
const chat = await Chat.connect(url, "wasmbob", "node", null, { storage });
if (!chat.fingerprint || !saved.has("whispeer.chat.wasmbob.node.identity")) fail("no identity kept in the storage");
const events = [];
let wake = () => {};
chat.onEvent((event) => { events.push(event); wake(); });
const nextWhere = async (wanted) => {
  for (;;) {
    const found = events.findIndex(wanted);
    if (found >= 0) return events.splice(found, 1)[0];
    await new Promise((resolve) => { wake = resolve; });
  }
};

stage = "the Rust CLI starts, sealing by default";
const alice = spawn(bin, ["chat", "--as", "alice", "--server", url, "--keys-dir", work]);
children.push(alice);
await waitFor(alice.stderr, /messages are sealed end to end/);
const aliceSaw = waitFor(alice.stdout, /→alice wasmbob: (.*)$/);

stage = "rust seals, wasm opens";
alice.stdin.write("/msg wasmbob hi from rust\n");
const opened = await nextWhere((e) => e.msg !== undefined);
if (opened.msg !== "hi from rust" || !opened.sealed || opened.unreadable) fail(`opened ${JSON.stringify(opened)}`);

stage = "the server holds only the box";
const raw = await Chat.connect(url, "wasmbob", "raw", null, { plain: true });
const stored = (await raw.history("alice", 10)).messages[0];
raw.close();
if (typeof stored?.msg?.sealed !== "string" || JSON.stringify(stored).includes("hi from rust")) fail(`stored ${JSON.stringify(stored)}`);

stage = "wasm seals, rust opens";
await chat.sendTo("alice", "hi from wasm");
const shown = (await aliceSaw)[1];
if (shown !== "hi from wasm") fail(`the CLI showed ${JSON.stringify(shown)}`);

stage = "group: rust makes the key as it sends, wasm learns and opens";
await chat.createGroup("team", true);
const aliceSawGroup = waitFor(alice.stdout, /#team wasmbob: (.*)$/);
alice.stdin.write("/join team\n/msg #team group hi from rust\n");
const keyEvent = await nextWhere((e) => e.type === "group_key");
if (keyEvent.group !== "team" || keyEvent.from !== "alice") fail(`key event ${JSON.stringify(keyEvent)}`);
const groupOpened = await nextWhere((e) => e.group === "team" && e.msg !== undefined);
if (groupOpened.msg !== "group hi from rust" || !groupOpened.sealed) fail(`opened ${JSON.stringify(groupOpened)}`);
stage = "group: wasm seals under the learned key, rust opens";
await chat.sendGroup("team", "group hi from wasm");
const groupShown = (await aliceSawGroup)[1];
if (groupShown !== "group hi from wasm") fail(`the CLI showed ${JSON.stringify(groupShown)}`);
if (!saved.has("whispeer.chat.wasmbob.node.keys")) fail("the group key was not kept in the storage");

stage = "a box for someone else does not open";
const eve = await Chat.connect(url, "eve", "node", null);
const refused = eve.open(stored);
eve.close();
if (!String(refused.unreadable).includes("not for this device")) fail(`eve: ${JSON.stringify(refused)}`);

stage = "what was never handed to onEvent comes again on the device's next connection";
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const carol = await Chat.connect(url, "carol", "node", null, { plain: true });
const tab = await Chat.connect(url, "dave", "tab", null, { plain: true });
await carol.sendTo("dave", "one");
await carol.sendTo("dave", "two");
await pause(300); // both reach the tab, kept: no callback yet
tab.close();
await pause(300);
const messagesOf = (connection) => {
  const got = [];
  connection.onEvent((event) => { if (event.msg !== undefined) got.push(event.msg); });
  return got;
};
const again = await Chat.connect(url, "dave", "tab", null, { plain: true });
const gotAgain = messagesOf(again);
for (let waited = 0; gotAgain.length < 2 && waited < 5000; waited += 50) await pause(50);
if (JSON.stringify(gotAgain) !== JSON.stringify(["one", "two"])) fail(`again: ${JSON.stringify(gotAgain)}`);
stage = "what was handed to onEvent is acknowledged: not again";
again.close();
await pause(300);
const third = await Chat.connect(url, "dave", "tab", null, { plain: true });
const gotThird = messagesOf(third);
await pause(500);
if (gotThird.length !== 0) fail(`came again: ${JSON.stringify(gotThird)}`);
third.close();
carol.close();

console.log("ok: sealed direct and group messages between the Rust CLI and the WASM client in Node, both ways, by default; what the page never took comes again, what it took does not");
chat.close();
clearTimeout(timer);
children.forEach((child) => child.kill("SIGTERM"));
rmSync(work, { recursive: true, force: true });
