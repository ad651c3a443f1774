// The official TypeScript MCP client (@modelcontextprotocol/sdk) against a real aiwfd, with its
// default settings: `node mcp_client.mjs <url of /mcp> <bearer key or "">`. Prints one JSON object
// of what it saw; tests/http/test_mcp.py checks it.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, key] = process.argv.slice(2);

function transport(withKey) {
  const headers = withKey && key ? { Authorization: `Bearer ${key}` } : {};
  return new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
}

function failure(e) {
  return { name: e?.constructor?.name, code: e?.code ?? null, message: String(e?.message ?? e) };
}

const out = {};

// Without credentials: the transport must see the 401.
{
  const client = new Client({ name: "aiwfd-test", version: "1.0.0" });
  try {
    await client.connect(transport(false));
    out.unauthenticated = { connected: true };
    await client.close();
  } catch (e) {
    out.unauthenticated = failure(e);
  }
}

const client = new Client({ name: "aiwfd-test", version: "1.0.0" });
await client.connect(transport(true));
out.server = client.getServerVersion();
out.capabilities = client.getServerCapabilities();
out.instructions = client.getInstructions();
out.tools = (await client.listTools()).tools;
out.ping = await client.ping();
out.greeter = await client.callTool({ name: "greeter", arguments: { name: "Ann" } });
out.color = await client.callTool({ name: "color", arguments: { name: "Ann" } });
out.invalid = await client.callTool({ name: "greeter", arguments: { name: 42 } });
try {
  out.unknown = await client.callTool({ name: "no-such-agent", arguments: {} });
} catch (e) {
  out.unknown = failure(e);
}
await client.close();
console.log(JSON.stringify(out));
