"""Model providers: the ModelClient protocol, the OpenAI-compatible client (shared aiohttp session or the SDK), the mock."""
