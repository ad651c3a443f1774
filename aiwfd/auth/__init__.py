"""Who is calling (SPEC §8.1): API keys by digest, JWT bearer tokens verified
against an issuer's JWKS, and the client each resolves to."""
