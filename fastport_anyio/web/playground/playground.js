// The playground page: a real fastport client (/client/fastport.js) driven by a form, for trying a
// session by hand. Nothing entered here is stored; the key never leaves the page.

import { connect, generateKey } from "/client/fastport.js";

const $ = (id) => document.getElementById(id);
let client = null;

function log(text, className = "") {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  if (className) li.className = className;
  $("log").prepend(li);
}

function setConnected(connected) {
  $("connect").disabled = connected;
  $("disconnect").disabled = !connected;
  $("subscribe").disabled = !connected;
  $("publish").disabled = !connected;
  for (const id of ["url", "session", "password", "key", "suite", "generate"]) $(id).disabled = connected;
}

function onState(state, detail) {
  $("status").textContent = state;
  $("status-detail").textContent = detail ? `(${detail})` : "";
  if (detail) log(`${state}: ${detail}`);
  if (state === "closed") {
    client = null;
    setConnected(false);
    $("subscriptions").replaceChildren();
  }
}

function showMessage({ topic, payload, messageId }) {
  const li = document.createElement("li");
  li.className = "message";
  const t = document.createElement("span");
  t.className = "topic";
  t.textContent = topic;
  const body = document.createElement("span");
  body.className = "payload";
  body.textContent = typeof payload === "string" ? payload : `(${payload.length} bytes)`;
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = messageId;
  li.append(t, body, id);
  $("messages").prepend(li);
}

async function onConnect(event) {
  event.preventDefault();
  const password = $("password").value;
  $("connect").disabled = true;
  try {
    client = await connect($("url").value, {
      session: $("session").value,
      password,
      key: $("key").value,
      suite: $("suite").value,
      onStateChange: onState,
      onIntegrityFailure: ({ topic, messageId, error }) =>
        log(`integrity failure on ${topic} (${messageId}): ${error}`, "error"),
      onServerError: ({ error, code }) => log(`server error ${code}: ${error}`, "error"),
    });
    setConnected(true);
    log(`connected to session ${$("session").value} (${$("suite").value} suite)`, "ok");
  } catch (error) {
    $("connect").disabled = false;
    log(`cannot connect: ${error.message}`, "error");
    $("status").textContent = "disconnected";
  }
}

async function onSubscribe(event) {
  event.preventDefault();
  const topic = $("sub-topic").value;
  try {
    await client.subscribe(topic, showMessage);
  } catch (error) {
    log(`subscribe to ${topic} refused: ${error.message}`, "error");
    return;
  }
  log(`subscribed to ${topic}`, "ok");
  const li = document.createElement("li");
  li.className = "subscription";
  li.dataset.topic = topic;
  const name = document.createElement("span");
  name.className = "topic";
  name.textContent = topic;
  const stop = document.createElement("button");
  stop.type = "button";
  stop.textContent = "Unsubscribe";
  stop.addEventListener("click", async () => {
    await client?.unsubscribe(topic);
    li.remove();
    log(`unsubscribed from ${topic}`);
  });
  li.append(name, stop);
  $("subscriptions").append(li);
}

async function onPublish(event) {
  event.preventDefault();
  const topic = $("pub-topic").value;
  const text = $("pub-text").value;
  $("publish-result").textContent = "sending…";
  $("publish-result").className = "muted";
  try {
    const messageId = await client.publish(topic, text);
    $("publish-result").textContent = `confirmed ${messageId}`;
    $("publish-result").className = "ok";
  } catch (error) {
    $("publish-result").textContent = `refused: ${error.message}`;
    $("publish-result").className = "error";
  }
}

$("url").value = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;
$("generate").addEventListener("click", () => {
  $("key").value = generateKey();
});
$("connect-form").addEventListener("submit", onConnect);
$("disconnect").addEventListener("click", () => client?.close());
$("subscribe-form").addEventListener("submit", onSubscribe);
$("publish-form").addEventListener("submit", onPublish);
