// Runs the JavaScript client's suites against the known-answer vectors the Python crypto tests use
// (tests/core/data/crypto_vectors.json, made by an independent Node script). Prints one JSON line with the
// failures; tests/anyio/test_js_client.py runs it with `node` and requires an empty list.
//
//   node tests/js/crypto_vectors.mjs fastport_anyio/web/client/fastport.js tests/core/data/crypto_vectors.json

import { readFile } from "node:fs/promises";
import { pathToFileURL } from "node:url";
import path from "node:path";

const [modulePath, vectorsPath] = process.argv.slice(2);
const fastport = await import(pathToFileURL(path.resolve(modulePath)).href);
const vectors = JSON.parse(await readFile(vectorsPath, "utf8"));

const hex = (bytes) => Buffer.from(bytes).toString("hex");
const failures = [];
let checked = 0;

function check(name, what, got, expected) {
  checked += 1;
  if (got !== expected) failures.push({ name, what, got, expected });
}

for (const suiteName of ["legacy", "authenticated"]) {
  for (const c of vectors[suiteName]) {
    const name = `${suiteName}: ${c.name}`;
    const suite = await fastport.makeSuite(suiteName, c.key);
    const binary = c.encoding === "binary";
    const payload = binary ? new Uint8Array(Buffer.from(c.payload_hex, "hex")) : c.payload;
    const fields = { session: c.session, topic: c.topic, messageId: c.message_id, timestamp: c.timestamp };
    const sealed = await suite.seal({ ...fields, payload, iv: new Uint8Array(Buffer.from(c.iv_hex, "hex")) });
    check(name, "data", sealed.data, c.data);
    check(name, "hash", sealed.hash, c.hash);
    check(name, "encoding", sealed.encoding, c.encoding);
    const opened = await suite.open({ ...fields, data: c.data, hash: c.hash, encoding: c.encoding });
    check(name, "open", binary ? hex(opened) : opened, binary ? c.payload_hex : c.payload);
    if (suiteName === "authenticated") {
      const [enc, mac] = await fastport.deriveKeys(c.key);
      check(name, "enc_key", hex(enc), c.enc_key_hex);
      check(name, "mac_key", hex(mac), c.mac_key_hex);
      const input = fastport.macInput({ ...fields, encoding: c.encoding, data: c.data });
      check(name, "mac_input", hex(input), c.mac_input_hex);
      // Tampering with any bound field must be refused.
      for (const [key, value] of [["topic", c.topic + "x"], ["messageId", c.message_id + "x"],
                                  ["session", c.session + "x"], ["timestamp", c.timestamp + 1]]) {
        let refused = false;
        try {
          await suite.open({ ...fields, [key]: value, data: c.data, hash: c.hash, encoding: c.encoding });
        } catch (error) {
          refused = error instanceof fastport.IntegrityError;
        }
        check(name, `refuses changed ${key}`, refused, true);
      }
    }
  }
}
console.log(JSON.stringify({ checked, failures }));
