"""Model providers: the ModelClient protocol, the OpenAI-compatible client (shared aiohttp session or the SDK), the mock.

    base.py               ModelClient, ChatResult, OnDelta, Transport
    errors.py             the providers' error tree, the one thing the engine catches
    endpoints.py          key, base URL and headers, resolved as the openai SDK resolves them
    completion.py, sse.py the strict readers of an answer and of an event stream
    openai_compatible.py  the client: over the shared aiohttp session, or through sdk.py
    sdk.py                the SDK transport (imports `openai`; loaded only for AIWF_TRANSPORT=sdk)
    mock.py               the `mock` provider

Importing this package loads neither aiohttp nor openai.
"""

from aiwfd.providers.base import DEFAULT_TIMEOUT, ChatResult, ModelClient, OnDelta, Transport, transport_from_env
from aiwfd.providers.endpoints import BASE_URL_VARS, KEY_VARS, PUBLIC_BASE_URLS, key_var, resolved, signature
from aiwfd.providers.errors import BadAnswer, ProviderError, ProviderTimeout, StatusError, Unreachable

__all__ = [
    "BASE_URL_VARS", "DEFAULT_TIMEOUT", "KEY_VARS", "PUBLIC_BASE_URLS", "BadAnswer", "ChatResult", "ModelClient",
    "OnDelta", "ProviderError", "ProviderTimeout", "StatusError", "Transport", "Unreachable", "key_var",
    "resolved", "signature", "transport_from_env",
]
