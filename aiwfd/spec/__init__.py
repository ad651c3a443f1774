"""The agents file -> Compiled: YAML with lines, the type language, schemas, validators, OpenAPI, artifacts. Imports neither aiohttp nor openai."""
