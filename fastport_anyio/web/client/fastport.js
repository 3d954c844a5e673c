// fastport browser client: one dependency-free ES module (browsers, and Node >= 20 with a WebSocket class).
//
//   import { connect, generateKey } from "/client/fastport.js";
//   const client = await connect("ws://127.0.0.1:3000", { session, password, key });
//   await client.subscribe("chat", ({ topic, payload, messageId, timestamp }) => console.log(payload));
//   const id = await client.publish("chat", "hello");
//   await client.close();
//
// It speaks fastport's protocol v1 (docs/protocol.md) and seals payloads with the same two envelope suites
// as the Python clients (DESIGN.md §4, docs/security.md), byte for byte: "authenticated" (the default:
// HKDF-derived keys, AES-256-CBC, HMAC-SHA256 over every field that gives the ciphertext its meaning,
// verified before decrypting) and "legacy" (the original fastPort format, for interop only). WebCrypto does
// the cryptography; it exists only in secure contexts (https://, or http:// on localhost / 127.0.0.1).
//
// Delivery behaviour mirrors fastport_core/client.py: publishes stay pending until the server's
// publish_response and are re-sent on a timer and after every reconnection (same messageId, so the server
// deduplicates); every received message is ACKed, handed to the application once per (topic, messageId)
// within a bounded window; messages failing verification are ACKed, counted and reported through
// onIntegrityFailure, never delivered. After the first successful connection, a lost connection is
// re-established with exponential backoff and full jitter, then re-init, re-subscribe, resend.
// The first connection is not retried: a wrong URL or password should fail loudly, not hang.

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

const KEY_SIZE = 32;
const IV_SIZE = 16;
const MAC_PREFIX = "v1:";
const MAC_DOMAIN = encoder.encode("fastport/v1");
const INFO_ENC = encoder.encode("fastport/v1/enc");
const INFO_MAC = encoder.encode("fastport/v1/mac");
const KEYGEN_HINT = "make one with `fastport keygen`";
const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;
const HEX64 = /^[0-9a-f]{64}$/;

const TRANSIENT_PUBLISH_REFUSALS = new Set([
  "session_suspended",
  "session_full",
  "store_unavailable",
  "cluster_unavailable",
]);
const RETRYABLE_INIT_REFUSALS = new Set([
  "auth_throttled",
  "session_suspended",
  "too_many_connections",
  "server_busy",
  "cluster_unavailable",
]);
const CLOSE_REPLACED = 4003;

/** A refusal or failure reported by the server or the client (``code`` is the protocol's error code). */
export class FastportError extends Error {
  constructor(message, code = null) {
    super(message);
    this.name = "FastportError";
    this.code = code;
  }
}

/** A received message that failed verification or decryption (the reason is in ``message``). */
export class IntegrityError extends FastportError {
  constructor(message) {
    super(message, "integrity");
    this.name = "IntegrityError";
  }
}

function subtle() {
  const value = globalThis.crypto?.subtle;
  if (!value) {
    throw new FastportError(
      "WebCrypto is not available: open the page over https:// or on localhost (a secure context)",
    );
  }
  return value;
}

// ------------------------------------------------------------------------------------------ bytes helpers

function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

/** Strict standard base64 (as Python's ``b64decode(validate=True)``); ``null`` if it is not. */
function fromBase64(text) {
  if (text.length % 4 !== 0 || !BASE64.test(text)) return null;
  let binary;
  try {
    binary = atob(text);
  } catch {
    return null;
  }
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function fromHex(text) {
  const bytes = new Uint8Array(text.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return bytes;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

/** F(s): 4-byte big-endian length of utf8(s), then utf8(s). */
function field(text) {
  const raw = encoder.encode(text);
  const out = new Uint8Array(4 + raw.length);
  new DataView(out.buffer).setUint32(0, raw.length);
  out.set(raw, 4);
  return out;
}

function randomBytes(n) {
  return globalThis.crypto.getRandomValues(new Uint8Array(n));
}

// ------------------------------------------------------------------------------------------------- keys

/** A new shared key: standard base64 of 32 random bytes (what ``fastport keygen`` prints). */
export function generateKey() {
  return toBase64(randomBytes(KEY_SIZE));
}

/** The 32 raw bytes of a configured key: base64 text (standard or URL-safe, padding optional) or bytes. */
export function parseKey(key) {
  if (key instanceof Uint8Array || key instanceof ArrayBuffer) {
    const raw = new Uint8Array(key);
    if (raw.length !== KEY_SIZE) {
      throw new FastportError(`raw key is ${raw.length} bytes; AES-256 needs ${KEY_SIZE} — ${KEYGEN_HINT}`);
    }
    return raw;
  }
  if (typeof key !== "string") {
    throw new FastportError(`key must be a base64 string or ${KEY_SIZE} bytes — ${KEYGEN_HINT}`);
  }
  let text = key.trim().replaceAll("-", "+").replaceAll("_", "/");
  if (!text) throw new FastportError(`key is empty — ${KEYGEN_HINT}`);
  text += "=".repeat((4 - (text.length % 4)) % 4);
  const raw = fromBase64(text);
  if (raw === null) throw new FastportError(`key is not valid base64 — ${KEYGEN_HINT}`);
  if (raw.length !== KEY_SIZE) {
    throw new FastportError(`key decodes to ${raw.length} bytes; AES-256 needs ${KEY_SIZE} — ${KEYGEN_HINT}`);
  }
  return raw;
}

async function hkdf(key, info) {
  const base = await subtle().importKey("raw", key, "HKDF", false, ["deriveBits"]);
  const bits = await subtle().deriveBits(
    { name: "HKDF", hash: "SHA-256", salt: new Uint8Array(0), info },
    base,
    KEY_SIZE * 8,
  );
  return new Uint8Array(bits);
}

/** HKDF-SHA256 ``[enc_key, mac_key]`` of the authenticated suite (exported for the known-answer tests). */
export async function deriveKeys(key) {
  const raw = parseKey(key);
  return [await hkdf(raw, INFO_ENC), await hkdf(raw, INFO_MAC)];
}

/** ``M`` of DESIGN.md §4: what the authenticated suite's MAC covers (exported for the known-answer tests). */
export function macInput({ session, topic, messageId, timestamp, encoding, data }) {
  return concat([
    MAC_DOMAIN,
    field(session),
    field(topic),
    field(messageId),
    field(String(timestamp)),
    field(encoding),
    field(data),
  ]);
}

// ----------------------------------------------------------------------------------------------- suites

function payloadBytes(payload) {
  if (typeof payload === "string") return [encoder.encode(payload), "text"];
  if (payload instanceof Uint8Array) return [payload, "binary"];
  if (payload instanceof ArrayBuffer) return [new Uint8Array(payload), "binary"];
  throw new FastportError("payload must be a string, a Uint8Array or an ArrayBuffer");
}

async function encrypt(aesKey, iv, plaintext) {
  const ciphertext = new Uint8Array(await subtle().encrypt({ name: "AES-CBC", iv }, aesKey, plaintext));
  return toBase64(iv) + ":" + toBase64(ciphertext);
}

async function decrypt(aesKey, data) {
  const colon = data.indexOf(":");
  if (colon < 0) throw new IntegrityError("message data is not 'iv:ciphertext' (no colon)");
  const iv = fromBase64(data.slice(0, colon));
  const ciphertext = fromBase64(data.slice(colon + 1));
  if (iv === null || ciphertext === null) throw new IntegrityError("message data is not valid base64");
  if (iv.length !== IV_SIZE) throw new IntegrityError(`message IV is ${iv.length} bytes, expected ${IV_SIZE}`);
  if (!ciphertext.length || ciphertext.length % IV_SIZE) {
    throw new IntegrityError(`message ciphertext is ${ciphertext.length} bytes, not a multiple of ${IV_SIZE}`);
  }
  try {
    return new Uint8Array(await subtle().decrypt({ name: "AES-CBC", iv }, aesKey, ciphertext));
  } catch {
    throw new IntegrityError("message does not decrypt (bad padding): wrong key or altered data");
  }
}

function asPayload(plaintext, encoding) {
  if (encoding === "binary") return plaintext;
  try {
    return strictDecoder.decode(plaintext);
  } catch {
    throw new IntegrityError("message decrypts to invalid UTF-8 text");
  }
}

function checkOpenArgs({ session, topic, messageId, timestamp, data, hash, encoding }) {
  if (![session, topic, messageId, data, hash].every((v) => typeof v === "string")) {
    throw new IntegrityError("message session, topic, id, data and hash must be strings");
  }
  if (encoding !== "text" && encoding !== "binary") throw new IntegrityError("unknown message encoding");
  if (!Number.isSafeInteger(timestamp)) throw new IntegrityError("message timestamp is not an integer");
}

async function importAes(raw) {
  return subtle().importKey("raw", raw, "AES-CBC", false, ["encrypt", "decrypt"]);
}

/**
 * Build an envelope suite: ``{name, seal(fields), open(fields)}``. ``seal({session, topic, messageId,
 * timestamp, payload, iv?})`` resolves to ``{data, hash, encoding}``; ``open({session, topic, messageId,
 * timestamp, data, hash, encoding})`` to the payload (a string, or a Uint8Array for ``binary``), or
 * rejects with {@link IntegrityError}. ``iv`` exists for known-answer tests only.
 */
export async function makeSuite(name, key) {
  const raw = parseKey(key);
  if (name === "legacy") {
    const aes = await importAes(raw);
    return {
      name,
      async seal({ payload, iv }) {
        const [plaintext, encoding] = payloadBytes(payload);
        const data = await encrypt(aes, iv ?? randomBytes(IV_SIZE), plaintext);
        const hash = toHex(new Uint8Array(await subtle().digest("SHA-256", encoder.encode(data))));
        return { data, hash, encoding };
      },
      async open(fields) {
        checkOpenArgs(fields);
        const expected = toHex(new Uint8Array(await subtle().digest("SHA-256", encoder.encode(fields.data))));
        if (expected !== fields.hash) {
          const hint = fields.hash.startsWith(MAC_PREFIX)
            ? "; it looks like an 'authenticated' suite tag: configure the same suite on every client"
            : "";
          throw new IntegrityError("message hash does not match its data" + hint);
        }
        return asPayload(await decrypt(aes, fields.data), fields.encoding);
      },
    };
  }
  if (name === "authenticated") {
    const aes = await importAes(await hkdf(raw, INFO_ENC));
    const mac = await subtle().importKey(
      "raw",
      await hkdf(raw, INFO_MAC),
      { name: "HMAC", hash: "SHA-256" },
      false,
      ["sign", "verify"],
    );
    return {
      name,
      async seal({ session, topic, messageId, timestamp, payload, iv }) {
        if (!Number.isSafeInteger(timestamp)) throw new FastportError("timestamp must be an integer (ms)");
        const [plaintext, encoding] = payloadBytes(payload);
        const data = await encrypt(aes, iv ?? randomBytes(IV_SIZE), plaintext);
        const message = macInput({ session, topic, messageId, timestamp, encoding, data });
        const tag = new Uint8Array(await subtle().sign("HMAC", mac, message));
        return { data, hash: MAC_PREFIX + toHex(tag), encoding };
      },
      async open(fields) {
        checkOpenArgs(fields);
        const { hash } = fields;
        if (!hash.startsWith(MAC_PREFIX)) {
          const hint = HEX64.test(hash)
            ? "; it looks like a 'legacy' suite hash: configure the same suite on every client"
            : "";
          throw new IntegrityError(
            "message tag has no 'v1:' prefix, so it was not sealed by the 'authenticated' suite" + hint,
          );
        }
        const tagHex = hash.slice(MAC_PREFIX.length);
        // WebCrypto's verify compares in constant time; a tag that is not 64 lowercase hex digits cannot
        // be one we (or the Python clients) made.
        const ok =
          HEX64.test(tagHex) && (await subtle().verify("HMAC", mac, fromHex(tagHex), macInput(fields)));
        if (!ok) {
          throw new IntegrityError(
            "message authentication failed: wrong key, or the message was altered or moved " +
              "(its session, topic, id, timestamp or encoding differ from what was sealed)",
          );
        }
        return asPayload(await decrypt(aes, fields.data), fields.encoding);
      },
    };
  }
  throw new FastportError(`unknown crypto suite ${JSON.stringify(name)}; expected legacy or authenticated`);
}

// ------------------------------------------------------------------------------------------- the client

/** Whether ``topic`` matches subscription ``filter`` (MQTT style: ``+`` one level, trailing ``#`` any). */
export function topicMatches(filter, topic) {
  if (filter === topic) return true;
  if (!filter.includes("+") && !filter.includes("#")) return false;
  const f = filter.split("/");
  const t = topic.split("/");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === "#" && i === f.length - 1) return true;
    if (i >= t.length || (f[i] !== "+" && f[i] !== t[i])) return false;
  }
  return f.length === t.length;
}

function newId() {
  return toHex(randomBytes(16));
}

const SERVER_DEDUPE_TTL = 600000; // ms a default server remembers a published messageId (dedupe_ttl)

const DEFAULTS = {
  suite: "authenticated",
  publishRetryInterval: 5000,
  publishGiveUpAfter: 300000,
  connectTimeout: 10000,
  reconnectInitialDelay: 500,
  reconnectMaxDelay: 30000,
  reconnectGiveUpAfter: null,
  dedupeWindow: 10000,
  maxPendingPublishes: 10000,
};

/**
 * Connect and authenticate; resolves to a {@link Client} once the server accepted ``init``.
 *
 * Options: ``session``, ``password``, ``key`` (required); ``suite`` ("authenticated" | "legacy");
 * ``WebSocket`` (a WebSocket class; default ``globalThis.WebSocket``); ``clientId``;
 * ``onIntegrityFailure({topic, messageId, error})``; ``onStateChange(state, detail)``;
 * ``onServerError({error, code})``; timings in milliseconds: ``publishRetryInterval`` (5000),
 * ``publishGiveUpAfter`` (300000, below the server's 600000 ms dedupe window),
 * ``connectTimeout`` (10000), ``reconnectInitialDelay`` (500), ``reconnectMaxDelay`` (30000),
 * ``reconnectGiveUpAfter`` (null: never); ``dedupeWindow`` (10000 ids); ``maxPendingPublishes`` (10000).
 */
export async function connect(url, options) {
  const client = new Client(url, options, await makeSuite(options.suite ?? DEFAULTS.suite, options.key));
  await client._start();
  return client;
}

export class Client {
  /** Use {@link connect}. */
  constructor(url, options, suite) {
    for (const name of ["session", "password"]) {
      if (typeof options[name] !== "string" || !options[name]) {
        throw new FastportError(`option ${name} must be a non-empty string`);
      }
    }
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    const giveUp = this.options.publishGiveUpAfter;
    if (!(typeof giveUp === "number" && giveUp > 0 && giveUp < SERVER_DEDUPE_TTL)) {
      throw new FastportError(
        `publishGiveUpAfter must be a number of ms in (0, ${SERVER_DEDUPE_TTL}): the server's dedupe window`,
      );
    }
    this.session = options.session;
    this.clientId = options.clientId ?? newId();
    this.state = "disconnected";
    this.integrityFailures = 0;
    this._suite = suite;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new FastportError("no WebSocket class: pass one as the WebSocket option (Node < 22)");
    }
    this._ws = null;
    this._handlers = new Map(); // topic -> handler, in subscription order (re-subscribed in that order)
    this._topicWaiters = new Map(); // topic -> [{resolve, reject, kind}] in request order
    this._pending = new Map(); // messageId -> {frame, resolve, reject, timer, firstSent}, in publish order
    this._seen = new Map(); // "topic\0messageId" -> true, oldest first (bounded dedupe window)
    this._reconnectTimer = null;
    this._connectTimer = null;
    this._cap = this.options.reconnectInitialDelay;
    this._failingSince = null;
    this._closed = false;
    this._ready = null;
    this._deliveries = Promise.resolve(); // messages are opened and handed over one at a time, in order
  }

  _setState(state, detail = "") {
    this.state = state;
    this.options.onStateChange?.(state, detail);
  }

  /** First connection: resolve once ready, reject on any failure (not retried). */
  _start() {
    return new Promise((resolve, reject) => {
      this._ready = { resolve, reject };
      this._dial();
    });
  }

  _dial() {
    this._setState("connecting");
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (error) {
      this._fail(`cannot open ${this.url}: ${error.message}`);
      return;
    }
    this._ws = ws;
    this._connectTimer = setTimeout(
      () => this._fail(`no successful init within connectTimeout (${this.options.connectTimeout} ms)`),
      this.options.connectTimeout,
    );
    ws.onopen = () => {
      if (this._ws !== ws) return;
      this._setState("initialising");
      ws.send(
        JSON.stringify({
          type: "init",
          sessionName: this.session,
          password: this.options.password,
          clientId: this.clientId,
        }),
      );
    };
    ws.onmessage = (event) => {
      if (this._ws === ws) this._onText(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      const reason = `connection closed (${event.code}${event.reason ? ": " + event.reason : ""})`;
      this._fail(reason, { fatal: event.code === CLOSE_REPLACED });
    };
    ws.onerror = () => {}; // a close event always follows, with the code
  }

  _send(obj) {
    this._ws.send(JSON.stringify(obj));
  }

  _dropTransport(reason = "client reconnecting") {
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    for (const entry of this._pending.values()) {
      clearTimeout(entry.timer);
      entry.timer = null;
    }
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      if (ws.readyState <= 1) ws.close(1000, reason);
    }
  }

  _fail(reason, { fatal = false } = {}) {
    this._dropTransport();
    if (this._closed) return;
    if (this._ready) {
      // The first attempt is not retried (see the module comment).
      const ready = this._ready;
      this._ready = null;
      this._closed = true;
      this._setState("closed", reason);
      this._rejectAll(new FastportError(reason));
      ready.reject(new FastportError(reason));
      return;
    }
    const now = Date.now();
    this._failingSince ??= now;
    const giveUp = this.options.reconnectGiveUpAfter;
    if (fatal || (giveUp !== null && now - this._failingSince >= giveUp)) {
      this._closed = true;
      this._setState("closed", `giving up: ${reason}`);
      this._rejectAll(new FastportError(`giving up: ${reason}`));
      return;
    }
    // Full jitter: uniform in [0, cap]; the cap doubles per failure up to reconnectMaxDelay.
    const delay = Math.random() * this._cap;
    this._cap = Math.min(this.options.reconnectMaxDelay, this._cap * 2);
    this._setState("waiting", reason);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this._dial();
    }, delay);
  }

  _rejectAll(error) {
    for (const entry of this._pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(error);
    }
    this._pending.clear();
    for (const waiters of this._topicWaiters.values()) for (const w of waiters) w.reject(error);
    this._topicWaiters.clear();
  }

  _onText(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return; // not JSON: nothing a server of ours sends
    }
    if (frame === null || typeof frame !== "object") return;
    if (this.state === "initialising") {
      if (frame.type === "init_response" && frame.success) this._onReady();
      else if (frame.type === "init_response" || frame.type === undefined) this._onInitRefused(frame);
      return;
    }
    switch (frame.type) {
      case "message":
        this._onMessage(frame);
        break;
      case "publish_response":
        this._onPublishResponse(frame);
        break;
      case "subscribe_response":
      case "unsubscribe_response":
        this._onTopicResponse(frame);
        break;
      case undefined: // the protocol's error frame has no type
        if (typeof frame.error === "string") this.options.onServerError?.(frame);
        break;
      default:
        break; // ack_received and future frames
    }
  }

  _onReady() {
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this._cap = this.options.reconnectInitialDelay;
    this._failingSince = null;
    this._setState("ready");
    for (const topic of this._handlers.keys()) this._send({ type: "subscribe", topic });
    for (const id of this._pending.keys()) this._sendPublish(id);
    if (this._ready) {
      const ready = this._ready;
      this._ready = null;
      ready.resolve();
    }
  }

  _onInitRefused(frame) {
    const code = frame.code ?? null;
    const reason = `init refused: ${frame.error ?? "unknown error"}${code ? ` (${code})` : ""}`;
    this._fail(reason, { fatal: !RETRYABLE_INIT_REFUSALS.has(code) });
  }

  _onTopicResponse(frame) {
    const waiters = this._topicWaiters.get(frame.topic);
    const waiter = waiters?.shift();
    if (waiters && !waiters.length) this._topicWaiters.delete(frame.topic);
    if (!frame.success && frame.type === "subscribe_response" && !waiters?.length) {
      this._handlers.delete(frame.topic); // the latest request was refused: stop re-subscribing it
    }
    if (!waiter) return; // a re-subscription after a reconnect
    if (frame.success) waiter.resolve();
    else waiter.reject(new FastportError(frame.error ?? `${frame.type} refused`, frame.code ?? null));
  }

  _onPublishResponse(frame) {
    const entry = this._pending.get(frame.messageId);
    if (!entry) return; // a second confirmation of a re-sent publish
    if (!frame.success && TRANSIENT_PUBLISH_REFUSALS.has(frame.code)) return; // retried by its timer
    this._pending.delete(frame.messageId);
    clearTimeout(entry.timer);
    if (frame.success) entry.resolve(frame.messageId);
    else entry.reject(new FastportError(frame.error ?? "publish refused", frame.code ?? null));
  }

  _handlerFor(topic) {
    const exact = this._handlers.get(topic);
    if (exact) return exact;
    for (const [filter, handler] of this._handlers) if (topicMatches(filter, topic)) return handler;
    return null;
  }

  _onMessage(frame) {
    const { topic, messageId } = frame;
    if (typeof topic !== "string" || typeof messageId !== "string") return;
    // Every copy is ACKed, delivered or not: the ACK is what stops the server from re-sending it.
    this._send({ type: "ack", topic, messageId });
    this._deliveries = this._deliveries
      .then(() => this._deliver(frame))
      .catch((error) => console.error("fastport: delivering a message failed", error));
  }

  async _deliver(frame) {
    const { topic, messageId } = frame;
    const key = `${topic}\u0000${messageId}`;
    if (!this._handlerFor(topic) || this._seen.has(key) || this._closed) return;
    let payload;
    try {
      payload = await this._suite.open({
        session: this.session,
        topic,
        messageId,
        timestamp: frame.timestamp,
        data: frame.data,
        hash: frame.hash,
        encoding: frame.encoding ?? "text",
      });
    } catch (error) {
      // Not remembered as seen: a forged copy must not shadow the genuine message behind it.
      this.integrityFailures += 1;
      const failure = { topic, messageId, error: error instanceof Error ? error.message : String(error) };
      if (this.options.onIntegrityFailure) this.options.onIntegrityFailure(failure);
      else console.warn("fastport: message failed verification", failure);
      return;
    }
    this._seen.set(key, true);
    while (this._seen.size > this.options.dedupeWindow) this._seen.delete(this._seen.keys().next().value);
    const handler = this._handlerFor(topic);
    if (!handler) return;
    try {
      handler({ topic, payload, messageId, timestamp: frame.timestamp });
    } catch (error) {
      console.error("fastport: a message handler threw", error);
    }
  }

  _sendPublish(id) {
    const entry = this._pending.get(id);
    if (!entry || this.state !== "ready") return;
    const now = Date.now();
    entry.firstSent ??= now;
    const left = entry.firstSent + this.options.publishGiveUpAfter - now;
    clearTimeout(entry.timer);
    if (left <= 0) {
      // A later re-send could reach a server whose dedupe window forgot the id: it would be fanned out twice.
      this._pending.delete(id);
      const after = this.options.publishGiveUpAfter;
      const text = `publish ${id} not confirmed within publishGiveUpAfter (${after} ms) of its first send`;
      entry.reject(new FastportError(`${text}; it is no longer re-sent`));
      return;
    }
    this._ws.send(entry.frame);
    entry.timer = setTimeout(() => this._sendPublish(id), Math.min(this.options.publishRetryInterval, left));
  }

  _checkOpen(operation) {
    if (this._closed) throw new FastportError(`cannot ${operation}: the client is closed`);
  }

  /** Publish ``payload`` (a string, or bytes) on ``topic``; resolves to its messageId once confirmed. */
  async publish(topic, payload) {
    this._checkOpen("publish");
    if (typeof topic !== "string" || !topic) throw new FastportError("topic must be a non-empty string");
    if (this._pending.size >= this.options.maxPendingPublishes) {
      throw new FastportError(`${this.options.maxPendingPublishes} publishes already await confirmation`);
    }
    const messageId = newId();
    const timestamp = Date.now();
    const sealed = await this._suite.seal({ session: this.session, topic, messageId, timestamp, payload });
    this._checkOpen("publish");
    const frame = { type: "publish", topic, data: sealed.data, hash: sealed.hash, timestamp, messageId };
    if (sealed.encoding === "binary") frame.encoding = "binary";
    return new Promise((resolve, reject) => {
      this._pending.set(messageId, { frame: JSON.stringify(frame), resolve, reject, timer: null });
      this._sendPublish(messageId);
    });
  }

  _topicRequest(type, topic) {
    return new Promise((resolve, reject) => {
      const waiters = this._topicWaiters.get(topic) ?? [];
      waiters.push({ resolve, reject });
      this._topicWaiters.set(topic, waiters);
      if (this.state === "ready") this._send({ type, topic });
    });
  }

  /** Call ``handler({topic, payload, messageId, timestamp})`` for each message on ``topic``; resolves once
   * the server confirmed the subscription (it is renewed after every reconnection). */
  async subscribe(topic, handler) {
    this._checkOpen("subscribe");
    if (typeof topic !== "string" || !topic) throw new FastportError("topic must be a non-empty string");
    if (typeof handler !== "function") throw new FastportError("handler must be a function");
    this._handlers.set(topic, handler);
    return this._topicRequest("subscribe", topic);
  }

  /** Stop receiving ``topic`` (at once: later messages for it are ACKed and dropped). */
  async unsubscribe(topic) {
    this._checkOpen("unsubscribe");
    if (!this._handlers.delete(topic)) return;
    if (this.state === "ready") await this._topicRequest("unsubscribe", topic);
  }

  /** Close for good (WebSocket close 1000). Unconfirmed publishes are rejected. Idempotent. */
  async close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._reconnectTimer);
    const ws = this._ws;
    this._dropTransport("client closing");
    this._rejectAll(new FastportError("the client was closed"));
    this._setState("closed", "closed by the application");
    if (ws && ws.readyState <= 1) {
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, 2000);
        ws.onclose = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }
}
