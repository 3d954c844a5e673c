'use strict';
/**
 * A MODEL of the original fastPort Node.js server's hot path -- NOT the original.
 *
 * We do not have the original's source. This file rebuilds, from the system guide
 * (/work/shared/reference/fastport-system-guide.md) and the defects DESIGN.md §3 lists, the minimal
 * server a Node developer would write for that description, so that benchmarks/run.py can put
 * fastport side by side with "the original under the same load" on the same machine, in the same run:
 *
 *   - wsHandler:      a `ws` WebSocketServer (defaults of ws 8: no permessage-deflate, UTF-8 validated,
 *                     no optional native add-ons), JSON.parse per text frame, a switch on `type`.
 *   - sessionManager: Map<sessionName, session>; a session holds its password and
 *                     Map<topic, WebSocket[]> (the guide's routing table); `init` checks name + password.
 *   - messageCache:   ONE Map<messageId, entry> for all sessions (the original stored messages by
 *                     messageId alone, DESIGN §3.2), entry = the message + pendingAck + retry bookkeeping.
 *                     An `ack` deletes the entry: the first ACK completes the message for everyone (§3.1).
 *                     A setInterval retry loop re-sends un-ACKed entries to every subscriber of the topic
 *                     every retryInterval, up to maxRetryLimit, and drops them after messageExpiryTime.
 *   - publish:        cache the message, JSON.stringify it ONCE, ws.send() the same string to every other
 *                     subscriber (one socket write per frame: ws corks header + payload per send).
 *
 * One deliberate ADDITION, which the original did not have: a `publish_response {success, messageId,
 * deliveredTo}` after each publish. The original never confirmed a publish (the Dart client waited for
 * an `ack_received` that never came, DESIGN §3.3), but the shared load generator keeps a window of
 * unconfirmed publishes and needs the confirmation to advance. It costs the model one extra small
 * JSON.stringify + send per publish, exactly what fastport also does, so the comparison stays even.
 *
 * Choices that favour the model (so a fastport/model ratio below 1 is not flattered): the message is
 * stringified once per publish, not once per subscriber; plain string compare of the password (the
 * original's auth cost is not on the measured path anyway); no logging on the hot path.
 *
 * Usage: node server.js --host 127.0.0.1 --port 3101 --session bench:password [--session ...]
 * Prints "listening <port>" on stdout once bound. SIGTERM / SIGINT stop it.
 */

const { WebSocketServer, WebSocket } = require('ws');

// Session defaults of the original admin API (milliseconds), the same values fastport defaults to.
const DEFAULTS = { retryInterval: 5000, maxRetryLimit: 10, messageExpiryTime: 300000 };
const RETRY_TICK_MS = 1000; // how often the retry loop scans the cache

function parseArgs(argv) {
  const options = { host: '127.0.0.1', port: 3101, sessions: [] };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === '--host') options.host = value;
    else if (flag === '--port') options.port = Number(value);
    else if (flag === '--session') {
      const colon = value.indexOf(':');
      options.sessions.push({ name: value.slice(0, colon), password: value.slice(colon + 1) });
    } else throw new Error(`unknown option ${flag}`);
  }
  return options;
}

// -- sessionManager ------------------------------------------------------------------------------------

const sessions = new Map(); // sessionName -> { password, settings, topics: Map<topic, WebSocket[]> }

function createSession(name, password) {
  sessions.set(name, { password, settings: { ...DEFAULTS }, topics: new Map() });
}

function addSubscriber(session, topic, ws) {
  let list = session.topics.get(topic);
  if (list === undefined) {
    list = [];
    session.topics.set(topic, list);
  }
  if (!list.includes(ws)) list.push(ws);
}

function removeClient(ws) {
  const session = sessions.get(ws.sessionName);
  if (session === undefined) return;
  for (const [topic, list] of session.topics) {
    const kept = list.filter((other) => other !== ws);
    if (kept.length) session.topics.set(topic, kept);
    else session.topics.delete(topic);
  }
}

// -- messageCache --------------------------------------------------------------------------------------

const messageCache = new Map(); // messageId -> { sessionName, message, pendingAck, retries, createdAt, lastSent }

function sendToSubscribers(session, topic, payload, except) {
  const list = session.topics.get(topic);
  let deliveredTo = 0;
  if (list === undefined) return deliveredTo;
  for (const ws of list) {
    if (ws !== except && ws.readyState === WebSocket.OPEN) {
      ws.send(payload);
      deliveredTo++;
    }
  }
  return deliveredTo;
}

function retryLoop() {
  const now = Date.now();
  for (const [messageId, entry] of messageCache) {
    const session = sessions.get(entry.sessionName);
    const settings = session === undefined ? DEFAULTS : session.settings;
    if (
      session === undefined ||
      now - entry.createdAt > settings.messageExpiryTime ||
      entry.retries >= settings.maxRetryLimit
    ) {
      messageCache.delete(messageId);
      continue;
    }
    if (entry.pendingAck && now - entry.lastSent >= settings.retryInterval) {
      entry.retries++;
      entry.lastSent = now;
      const payload = JSON.stringify({ ...entry.message, retry: entry.retries });
      sendToSubscribers(session, entry.message.topic, payload, null); // the original: to all, sender too
    }
  }
}

// -- wsHandler -----------------------------------------------------------------------------------------

function sendError(ws, error) {
  ws.send(JSON.stringify({ type: 'error', error }));
}

function handleInit(ws, msg) {
  const session = sessions.get(msg.sessionName);
  if (session === undefined || session.password !== msg.password) {
    ws.send(JSON.stringify({ type: 'init_response', success: false, error: 'Invalid session or password' }));
    return;
  }
  ws.sessionName = msg.sessionName; // the original let a second init move the connection (DESIGN §3.2)
  ws.send(JSON.stringify({ type: 'init_response', success: true, sessionName: msg.sessionName }));
}

function handleSubscribe(ws, session, msg) {
  addSubscriber(session, msg.topic, ws);
  ws.send(JSON.stringify({ type: 'subscribe_response', success: true, topic: msg.topic }));
}

function handlePublish(ws, session, msg) {
  const { topic, data, hash, timestamp, messageId } = msg;
  const message = { type: 'message', topic, data, hash, timestamp, messageId };
  const now = Date.now();
  messageCache.set(messageId, {
    sessionName: ws.sessionName,
    message,
    pendingAck: true,
    retries: 0,
    createdAt: now,
    lastSent: now,
  });
  const deliveredTo = sendToSubscribers(session, topic, JSON.stringify(message), ws);
  // MODEL ADDITION (see the header): the original sent no publish confirmation.
  ws.send(JSON.stringify({ type: 'publish_response', success: true, messageId, deliveredTo }));
}

function handleAck(msg) {
  messageCache.delete(msg.messageId); // by messageId alone, whoever ACKs (DESIGN §3.1, §3.2)
}

function onMessage(ws, raw, isBinary) {
  if (isBinary) {
    sendError(ws, 'Binary frames are not supported');
    return;
  }
  let msg;
  try {
    msg = JSON.parse(raw);
  } catch {
    sendError(ws, 'Invalid JSON');
    return;
  }
  if (msg.type === 'init') {
    handleInit(ws, msg);
    return;
  }
  const session = sessions.get(ws.sessionName);
  if (session === undefined) {
    sendError(ws, 'Not initialized');
    return;
  }
  switch (msg.type) {
    case 'publish':
      handlePublish(ws, session, msg);
      break;
    case 'ack':
      handleAck(msg);
      break;
    case 'subscribe':
      handleSubscribe(ws, session, msg);
      break;
    default:
      sendError(ws, `Unknown message type: ${msg.type}`);
  }
}

function main() {
  const options = parseArgs(process.argv.slice(2));
  for (const { name, password } of options.sessions) createSession(name, password);
  const wss = new WebSocketServer({ host: options.host, port: options.port });
  wss.on('connection', (ws) => {
    ws.sessionName = null;
    ws.on('message', (raw, isBinary) => onMessage(ws, raw, isBinary));
    ws.on('close', () => removeClient(ws));
    ws.on('error', () => {});
  });
  wss.on('listening', () => process.stdout.write(`listening ${wss.address().port}\n`));
  const timer = setInterval(retryLoop, RETRY_TICK_MS);
  const stop = () => {
    clearInterval(timer);
    for (const ws of wss.clients) ws.terminate();
    wss.close(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main();
