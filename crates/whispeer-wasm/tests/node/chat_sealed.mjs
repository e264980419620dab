// End-to-end keys between the Rust CLI and the WASM client in Node, through a real chat server:
// a message sealed by `whispeer chat --identity` opens in the WASM client, and one sealed by the
// WASM client opens in the CLI, direct and in a group (a key rotated by the CLI, learned by the
// WASM client); the server keeps only boxes.
// Usage: node chat_sealed.mjs <node-package-dir> <whispeer-binary>
import { createRequire } from "node:module";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";

const [pkg, bin] = process.argv.slice(2);
globalThis.WebSocket = WebSocket;
const { Chat, GroupKeys, Identity } = createRequire(import.meta.url)(`${pkg}/whispeer_wasm.js`);
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

stage = "the WASM client publishes its identity";
const me = Identity.generate();
const chat = await Chat.connect(url, "wasmbob", "node", null);
const events = [];
let wake = () => {};
chat.onEvent((event) => { events.push(event); wake(); });
await chat.publishIdentity(me);
const nextSealed = async () => {
  for (;;) {
    const found = events.findIndex((e) => e.msg?.sealed);
    if (found >= 0) return events.splice(found, 1)[0];
    await new Promise((resolve) => { wake = resolve; });
  }
};

stage = "the Rust CLI starts with its identity";
const alice = spawn(bin, ["chat", "--as", "alice", "--server", url, "--identity", join(work, "alice.id")]);
children.push(alice);
await waitFor(alice.stderr, /whispeer: identity \(new\)/);
const aliceSaw = waitFor(alice.stdout, /wasmbob: \[sealed\] (.*)$/);

stage = "rust seals, wasm opens";
alice.stdin.write("/msg wasmbob hi from rust\n");
const sealed = await nextSealed();
if (JSON.stringify(sealed.msg).includes("hi from rust")) fail("the server carried plaintext");
const opened = await chat.openSealed(me, sealed);
if (opened !== "hi from rust") fail(`opened ${JSON.stringify(opened)}`);

stage = "wasm seals, rust opens";
await chat.sendSealedTo(me, "alice", "hi from wasm");
const shown = (await aliceSaw)[1];
if (shown !== "hi from wasm") fail(`the CLI showed ${JSON.stringify(shown)}`);

stage = "group: rust rotates the key and seals, wasm learns and opens";
const groupKeys = new GroupKeys();
await chat.createGroup("team", true);
const aliceSawGroup = waitFor(alice.stdout, /#team wasmbob: \[sealed\] (.*)$/);
alice.stdin.write("/join team\n/rotate team\n/msg #team group hi from rust\n");
const nextWith = async (field) => {
  for (;;) {
    const found = events.findIndex((e) => e.msg?.[field]);
    if (found >= 0) return events.splice(found, 1)[0];
    await new Promise((resolve) => { wake = resolve; });
  }
};
const keyEvent = await nextWith("group_key");
if (groupKeys.learn(me, keyEvent, await chat.keys("alice")) !== 1) fail("the group key's epoch");
const groupSealed = await nextWith("sealed_group");
const groupOpened = await chat.openGroup(groupKeys, groupSealed);
if (groupOpened !== "group hi from rust") fail(`opened ${JSON.stringify(groupOpened)}`);
stage = "group: wasm seals, rust opens";
await chat.sendSealedGroup(me, groupKeys, "team", "group hi from wasm");
const groupShown = (await aliceSawGroup)[1];
if (groupShown !== "group hi from wasm") fail(`the CLI showed ${JSON.stringify(groupShown)}`);

stage = "a box for someone else does not open";
const other = Identity.generate();
const refused = await chat.openSealed(other, sealed).then(() => "opened", (e) => String(e));
if (!refused.includes("not for this device")) fail(`another identity: ${refused}`);

console.log("ok: sealed direct and group messages between the Rust CLI and the WASM client in Node, both ways");
chat.close();
clearTimeout(timer);
children.forEach((child) => child.kill("SIGTERM"));
rmSync(work, { recursive: true, force: true });
