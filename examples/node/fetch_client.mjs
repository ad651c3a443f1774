// @ts-check
// Call an aiwfd agent with Node's built-in fetch (Node 18 or later), no
// dependencies. TypeScript checks this file as it is (`// @ts-check`, JSDoc
// types); the same code with the types written inline is a .ts file.
//
//   AIWFD_URL=http://127.0.0.1:8080 AIWFD_API_KEY=... \
//       node examples/node/fetch_client.mjs greeter '{"name": "Alice"}'
//
// Prints `data` and the trace on success (exit 0). An error answer of aiwfd
// ({"error": {"type", "message", "details"}, "request_id"}) goes to stderr
// with exit status 1; no answer at all (connection refused, timeout) is exit
// status 2.

import { pathToFileURL } from "node:url";

const BASE_URL = (process.env.AIWFD_URL ?? "http://127.0.0.1:8080").replace(/\/+$/, "");
const API_KEY = process.env.AIWFD_API_KEY ?? "";
// Longer than aiwfd's own deadline (55 s by default), so that its answer,
// even a 504, arrives before the client gives up.
const TIMEOUT_MS = 70_000;

/**
 * @typedef {{prompt: number, completion: number, total: number}} Usage
 * @typedef {{step_name: string, usage: Usage, attempts: number, duration: string,
 *            model: string, request_id: string}} Trace
 * @typedef {{data: unknown, trace: Trace}} AgentResult
 * @typedef {{path: string, message: string}} ErrorDetail
 */

/** An error answered by aiwfd (or by a proxy in front of it). */
export class AgentError extends Error {
  /**
   * @param {number} status
   * @param {string} type
   * @param {string} message
   * @param {ErrorDetail[]} details
   * @param {string | null} requestId
   * @param {string | null} retryAfter
   */
  constructor(status, type, message, details, requestId, retryAfter) {
    super(`${status} ${type}: ${message}`);
    this.status = status;
    this.type = type;
    this.detail = message;
    this.details = details;
    this.requestId = requestId;
    this.retryAfter = retryAfter;
  }
}

/**
 * POST /agent/{agent}: the validated answer, or an AgentError.
 * @param {string} agent
 * @param {Record<string, unknown>} body
 * @returns {Promise<AgentResult>}
 */
export async function callAgent(agent, body) {
  /** @type {Record<string, string>} */
  const headers = { "Content-Type": "application/json" }; // required when a Content-Type is sent
  if (API_KEY) headers["X-API-Key"] = API_KEY;
  const response = await fetch(`${BASE_URL}/agent/${encodeURIComponent(agent)}`, {
    method: "POST",
    headers,
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(TIMEOUT_MS),
  });
  const text = await response.text();
  /** @type {any} */
  let doc = null;
  try {
    doc = JSON.parse(text);
  } catch {
    // not JSON: handled below
  }
  if (response.ok && doc && typeof doc === "object" && "data" in doc) return doc;
  const err = doc && typeof doc === "object" ? doc.error : null;
  const retryAfter = response.headers.get("Retry-After");
  if (!err || typeof err !== "object") {
    // Not aiwfd's error shape: e.g. an HTML page from a proxy.
    throw new AgentError(response.status, "http_error", text.slice(0, 200).trim(), [],
      response.headers.get("X-Request-ID"), retryAfter);
  }
  throw new AgentError(response.status, err.type ?? "unknown", err.message ?? "", err.details ?? [],
    doc.request_id ?? response.headers.get("X-Request-ID"), retryAfter);
}

/** @param {string[]} args */
async function main(args) {
  const agent = args[0] ?? "greeter";
  const body = args[1] ? JSON.parse(args[1]) : { name: "Alice" };
  /** @type {AgentResult} */
  let result;
  try {
    result = await callAgent(agent, body);
  } catch (e) {
    if (e instanceof AgentError) {
      console.error(`error: ${e.status} ${e.type}: ${e.detail} (request_id ${e.requestId})`);
      for (const d of e.details) console.error(`  ${d.path || "(body)"}: ${d.message}`);
      // 429 and 503 are worth retrying, after this many seconds.
      if (e.retryAfter) console.error(`  retry after ${e.retryAfter} s`);
      return 1;
    }
    // fetch rejects with a TypeError (its `cause` says why) or a TimeoutError.
    const cause = e instanceof Error && e.cause instanceof Error ? `: ${e.cause.message}` : "";
    console.error(`error: no answer from ${BASE_URL}: ${e instanceof Error ? e.message : e}${cause}`);
    return 2;
  }
  const t = result.trace;
  console.log(`data: ${JSON.stringify(result.data)}`);
  console.log(`trace: step_name=${t.step_name} attempts=${t.attempts} tokens=${t.usage.total} ` +
    `duration=${t.duration} model=${t.model} request_id=${t.request_id}`);
  return 0;
}

// Run as a program (not when imported for callAgent).
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await main(process.argv.slice(2));
}
