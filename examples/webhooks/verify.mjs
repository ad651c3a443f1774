import { createHmac, timingSafeEqual } from "node:crypto";

// True when `body` (the raw bytes, a Buffer) was signed by aiwfd with `secret` ("whsec_…").
// `headers`: Node's req.headers, or a fetch Headers object.
export function verify(secret, headers, body, toleranceSeconds = 300) {
  const header = (name) => (typeof headers.get === "function" ? headers.get(name) : headers[name]) ?? "";
  const [id, timestamp] = [header("webhook-id"), header("webhook-timestamp")];
  if (!/^\d+$/.test(timestamp) || Math.abs(Date.now() / 1000 - Number(timestamp)) > toleranceSeconds) {
    return false; // a replay, or a clock far off
  }
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  const hmac = createHmac("sha256", key).update(`${id}.${timestamp}.`).update(body);
  const expected = Buffer.from(hmac.digest("base64"));
  for (const signature of header("webhook-signature").split(" ")) {
    const [version, value = ""] = signature.split(",");
    const given = Buffer.from(value);
    if (version === "v1" && given.length === expected.length && timingSafeEqual(given, expected)) return true;
  }
  return false;
}
