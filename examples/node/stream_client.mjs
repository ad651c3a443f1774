// @ts-check
// Stream an aiwfd agent's answer and rebuild it from its `patch` events, with
// Node's built-in fetch (Node 18 or later), no dependencies.
//
//   AIWFD_URL=http://127.0.0.1:8080 AIWFD_API_KEY=... \
//       node examples/node/stream_client.mjs review-analyzer '{"product": "Kettle", "review": "Boils fast."}'
//
// POST /agent/{agent}/stream, read the server-sent events, apply each `patch`
// to the document (./patch.mjs, starting from null) and, on a terminal,
// redraw the document as it grows. A `retry` event resets the document to
// null. At `result` the rebuilt document must equal `result.data`: then
// `data`, the trace and a `stream:` line are printed (exit 0), else the
// difference is (exit 3). With `--json` the only output is one JSON object,
// {"document", "data", "trace", "patches", "retries"}, for programs.
//
// Errors as in fetch_client.mjs: an error answer before the stream (401, 404,
// 422, ...) or an `error` event in it goes to stderr with exit status 1; no
// answer at all, or a stream that ends before its `result`, is exit status 2.

import { pathToFileURL } from "node:url";
import { AgentError } from "./fetch_client.mjs";
import { apply } from "./patch.mjs";

const BASE_URL = (process.env.AIWFD_URL ?? "http://127.0.0.1:8080").replace(/\/+$/, "");
const API_KEY = process.env.AIWFD_API_KEY ?? "";
// The longest silence tolerated between two reads. aiwfd sends a keep-alive
// comment every 15 s, so only a dead connection is this quiet. (Not
// AbortSignal.timeout: that would cut a long stream that is still talking.)
const IDLE_TIMEOUT_MS = 70_000;
// Redraw at most this often: rendering the whole document on every patch
// would make the client's cost grow with the square of the answer.
const REDRAW_EVERY_MS = 50;

/**
 * @typedef {import("./fetch_client.mjs").AgentResult} AgentResult
 * @typedef {import("./patch.mjs").PatchOp} PatchOp
 * @typedef {AgentResult & {document: unknown, patches: number, retries: number}} StreamResult
 */

/** No answer at all, or a stream that ended (or broke) before its `result` event. */
export class StreamBroken extends Error {}

/**
 * Each server-sent event of `body` as {name, data} (data parsed); comments skipped.
 * @param {ReadableStream<Uint8Array>} body
 * @param {() => void} onChunk called whenever bytes arrive
 * @returns {AsyncGenerator<{name: string, data: any}>}
 */
async function* events(body, onChunk) {
  const decoder = new TextDecoder(); // with {stream: true}: a code point split across chunks is kept whole
  let buffer = "";
  let name = "message";
  /** @type {string[]} */
  let data = [];
  const reader = body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      onChunk();
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        if (line === "") { // a blank line ends an event
          if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
          name = "message";
          data = [];
        } else if (!line.startsWith(":")) { // ":" starts a comment (`: keep-alive`)
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") name = value;
          else if (field === "data") data.push(value);
        }
      }
    }
  } finally {
    // The caller stopped early (an `error` event, say): close the connection.
    await reader.cancel().catch(() => {});
  }
}

/** The document so far, redrawn in place on a terminal; nothing otherwise. */
export class Screen {
  /** @param {boolean} enabled */
  constructor(enabled) {
    this.enabled = enabled;
    this.drawn = 0; // lines on screen now
    this.last = 0;
  }

  /** @param {unknown} doc @param {boolean} [force] */
  show(doc, force = false) {
    const now = Date.now();
    if (!this.enabled || (!force && now - this.last < REDRAW_EVERY_MS)) return;
    this.last = now;
    const columns = process.stdout.columns ?? 80;
    const rows = process.stdout.rows ?? 24;
    // Only what fits: the cursor cannot move back above the top of the
    // screen, and a wrapped line would count twice.
    const lines = (JSON.stringify(doc, null, 2) ?? "null").split("\n")
      .map((ln) => ln.slice(0, columns - 1)).slice(-(rows - 1));
    this.clear();
    process.stdout.write(lines.map((ln) => ln + "\n").join(""));
    this.drawn = lines.length;
  }

  clear() {
    // Up to the first line drawn, erase below.
    if (this.enabled && this.drawn) process.stdout.write(`\x1b[${this.drawn}F\x1b[J`);
    this.drawn = 0;
  }
}

/**
 * Equal as JSON values (key order aside: the patches add keys in the model's order).
 * @param {any} a
 * @param {any} b
 * @returns {boolean}
 */
function jsonEqual(a, b) {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  return ka.length === kb.length && ka.every((k) => Object.hasOwn(b, k) && jsonEqual(a[k], b[k]));
}

/**
 * An error answer before the stream: aiwfd's shape, or a proxy's page.
 * @param {Response} response
 * @returns {Promise<AgentError>}
 */
async function errorAnswer(response) {
  const text = await response.text();
  /** @type {any} */
  let doc = null;
  try {
    doc = JSON.parse(text);
  } catch {
    // not JSON: handled below
  }
  const err = doc && typeof doc === "object" ? doc.error : null;
  const retryAfter = response.headers.get("Retry-After");
  if (!err || typeof err !== "object") {
    // Not aiwfd's error shape: e.g. an HTML page from a proxy.
    return new AgentError(response.status, "http_error", text.slice(0, 200).trim(), [],
      response.headers.get("X-Request-ID"), retryAfter);
  }
  return new AgentError(response.status, err.type ?? "unknown", err.message ?? "", err.details ?? [],
    doc.request_id ?? response.headers.get("X-Request-ID"), retryAfter);
}

/**
 * POST /agent/{agent}/stream: the `result` event's data with the document
 * rebuilt from the patches; throws AgentError or StreamBroken.
 * @param {string} agent
 * @param {Record<string, unknown>} body
 * @param {Screen} [screen] where the document is drawn as it grows (default: nowhere)
 * @returns {Promise<StreamResult>}
 */
export async function streamAgent(agent, body, screen = new Screen(false)) {
  /** @type {Record<string, string>} */
  const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
  if (API_KEY) headers["X-API-Key"] = API_KEY;
  const abort = new AbortController();
  /** @type {NodeJS.Timeout | undefined} */
  let idle;
  const touch = () => {
    clearTimeout(idle);
    idle = setTimeout(() => abort.abort(new Error(`no data for ${IDLE_TIMEOUT_MS / 1000} s`)), IDLE_TIMEOUT_MS);
  };
  touch();
  /** @type {any} */
  let doc = null;
  let patches = 0;
  let retries = 0;
  let answered = false;
  try {
    const response = await fetch(`${BASE_URL}/agent/${encodeURIComponent(agent)}/stream`, {
      method: "POST", headers, body: JSON.stringify(body), signal: abort.signal,
    });
    if (!response.ok || !response.body) throw await errorAnswer(response);
    answered = true;
    for await (const { name, data } of events(response.body, touch)) {
      if (name === "patch") {
        doc = apply(doc, /** @type {PatchOp[]} */ (data));
        patches += 1;
        screen.show(doc);
      } else if (name === "retry") {
        // The output so far failed validation: it is discarded, and the next
        // patch starts from null again.
        doc = null;
        retries += 1;
        screen.clear();
        const problems = (data.errors ?? []).map(
          (/** @type {{path: string, message: string}} */ e) => `${e.path || "(root)"}: ${e.message}`).join("; ");
        console.error(`retry: attempt ${data.attempt}: ${problems}`);
      } else if (name === "result") {
        screen.show(doc, true);
        screen.clear();
        return { ...data, document: doc, patches, retries };
      } else if (name === "error") {
        screen.clear();
        const err = data.error ?? {};
        // An error event comes after the 200 went out: it has no status of its own.
        throw new AgentError(0, err.type ?? "unknown", err.message ?? "", err.details ?? [],
          data.request_id ?? null, null);
      }
      // start and delta: nothing to do here (delta is the raw text the patches parse)
    }
    throw new StreamBroken(`the stream from ${BASE_URL} ended without a result event`);
  } catch (e) {
    if (e instanceof AgentError || e instanceof StreamBroken) throw e;
    screen.clear();
    // fetch rejects with a TypeError (its `cause` says why) or the abort's reason.
    const cause = e instanceof Error && e.cause instanceof Error ? `: ${e.cause.message}` : "";
    const where = answered ? `the stream from ${BASE_URL} broke` : `no answer from ${BASE_URL}`;
    throw new StreamBroken(`${where}: ${e instanceof Error ? e.message : e}${cause}`);
  } finally {
    clearTimeout(idle);
  }
}

/** @param {string[]} argv */
async function main(argv) {
  const asJson = argv.includes("--json");
  const args = argv.filter((a) => a !== "--json");
  const agent = args[0] ?? "greeter";
  const body = args[1] ? JSON.parse(args[1]) : { name: "Alice" };
  /** @type {StreamResult} */
  let result;
  try {
    result = await streamAgent(agent, body, new Screen(Boolean(process.stdout.isTTY) && !asJson));
  } catch (e) {
    if (e instanceof AgentError) {
      const status = e.status ? `${e.status} ` : "";
      console.error(`error: ${status}${e.type}: ${e.detail} (request_id ${e.requestId})`);
      for (const d of e.details) console.error(`  ${d.path || "(body)"}: ${d.message}`);
      // 429 and 503 are worth retrying, after this many seconds.
      if (e.retryAfter) console.error(`  retry after ${e.retryAfter} s`);
      return 1;
    }
    console.error(`error: ${e instanceof Error ? e.message : e}`);
    return 2;
  }
  const { document, data, trace: t, patches, retries } = result;
  // Patches are sent for object outputs only: with none, there is nothing to compare.
  const same = patches === 0 || jsonEqual(document, data);
  if (asJson) {
    console.log(JSON.stringify({ document, data, trace: t, patches, retries }));
  } else {
    console.log(`data: ${JSON.stringify(data)}`);
    console.log(`trace: step_name=${t.step_name} attempts=${t.attempts} tokens=${t.usage.total} ` +
      `duration=${t.duration} model=${t.model} request_id=${t.request_id}`);
    console.log(`stream: patches=${patches} retries=${retries} ` +
      `rebuilt=${patches === 0 ? "none" : same ? "equal" : "different"}`);
  }
  if (!same) {
    console.error(`error: the patches rebuilt\n  ${JSON.stringify(document)}\nbut result.data is\n  ${JSON.stringify(data)}`);
    return 3;
  }
  return 0;
}

// Run as a program (not when imported for streamAgent).
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await main(process.argv.slice(2));
}
