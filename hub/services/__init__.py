"""The rules every face and the workers call: intake, pipeline, delivery, keys, routes, events,
rate limits, templates. They take values, never Flask's request globals, and import only the
store and the bottom layer (the connector kit, ops, settings)."""
