// The JavaScript client's publish give-up horizon (publishGiveUpAfter), in Node with a scripted WebSocket:
// a publish the server never confirms is re-sent until the horizon, then rejected and never sent again,
// and a horizon at or past the server's dedupe window (600000 ms) is refused. Prints one JSON report;
// tests/web/test_playground.py runs it with `node`.
//
//   node tests/js/publish_give_up.mjs fastport_anyio/web/client/fastport.js

import path from "node:path";
import { pathToFileURL } from "node:url";

const [modulePath] = process.argv.slice(2);
const fastport = await import(pathToFileURL(path.resolve(modulePath)).href);
const sent = [];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Accepts init, records every frame, answers nothing else (no publish is ever confirmed). */
class ScriptedWebSocket {
  constructor() {
    this.readyState = 0;
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.();
    }, 0);
  }

  send(text) {
    const frame = JSON.parse(text);
    sent.push(frame.type);
    if (frame.type === "init") {
      const answer = { type: "init_response", success: true, sessionName: "s" };
      setTimeout(() => this.onmessage?.({ data: JSON.stringify(answer) }), 0);
    }
  }

  close() {
    this.readyState = 3;
  }
}

const options = { session: "s", password: "p", key: fastport.generateKey(), WebSocket: ScriptedWebSocket };
const report = {};
try {
  await fastport.connect("ws://scripted", { ...options, publishGiveUpAfter: 600000 });
} catch (error) {
  report.refused = error.message;
}
const client = await fastport.connect("ws://scripted", {
  ...options,
  publishRetryInterval: 40,
  publishGiveUpAfter: 200,
});
const started = Date.now();
try {
  const stuck = sleep(2000).then(() => Promise.reject(new Error("still pending after 2000 ms")));
  await Promise.race([client.publish("t", "x"), stuck]);
} catch (error) {
  report.error = error.message;
}
report.elapsed = Date.now() - started;
report.publishes = sent.filter((type) => type === "publish").length;
await sleep(150);
report.publishesLater = sent.filter((type) => type === "publish").length;
await client.close();
console.log(JSON.stringify(report));
