"""The HTTP layer: app factory, middleware, handlers, stream, batch, CORS, metrics, docs, the runtime state handlers serve from."""
