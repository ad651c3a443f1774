// The official `openai` npm package against aiwfd's OpenAI-compatible API
// (tests/http/test_openai_api.py). Usage: node openai_client.mjs <base URL of /v1> <API key>
// Runs each step in order and prints one JSON object: what the SDK returned or raised.
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const out = {};

function caught(e) {
  return {
    error: e.constructor.name,
    isAPIError: e instanceof OpenAI.APIError,
    status: e.status ?? null,
    message: e.message,
    code: e.code ?? null,
    param: e.param ?? null,
    type: e.type ?? null,
  };
}

async function step(name, fn) {
  try {
    out[name] = await fn();
  } catch (e) {
    out[name] = caught(e);
  }
}

await step("models", async () => {
  const ids = [];
  for await (const model of client.models.list()) ids.push(model);
  return ids;
});

await step("create", async () =>
  client.chat.completions.create({
    model: "greeter",
    messages: [
      { role: "system", content: "ignored" },
      { role: "user", content: JSON.stringify({ name: "Alice" }) },
    ],
    temperature: 1.5,
  }));

await step("plain", async () =>
  client.chat.completions.create({ model: "greeter", messages: [{ role: "user", content: "Bob" }] }));

await step("stream", async () => {
  const stream = await client.chat.completions.create({
    model: "greeter",
    messages: [{ role: "user", content: JSON.stringify({ name: "Carol" }) }],
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
});

await step("invalid", async () =>
  client.chat.completions.create({ model: "two", messages: [{ role: "user", content: JSON.stringify({ name: "Dan" }) }] }));

await step("unknown", async () =>
  client.chat.completions.create({ model: "no-such-agent", messages: [{ role: "user", content: "{}" }] }));

await step("unauthorized", async () => {
  const wrong = new OpenAI({ baseURL, apiKey: "wrong-key", maxRetries: 0 });
  return wrong.chat.completions.create({ model: "greeter", messages: [{ role: "user", content: "Eve" }] });
});

await step("unauthorizedModels", async () => {
  const wrong = new OpenAI({ baseURL, apiKey: "wrong-key", maxRetries: 0 });
  return wrong.models.list();
});

console.log(JSON.stringify(out));
