"""The built-in connectors (text, openai, http), one module each.

They live inside the hub package so that an installed hub adds no top-level module of a
generic name to site-packages. hub.connectors.BUILTIN_CONNECTORS names them, and they are
loaded exactly like third-party entry points; like a third-party connector, they import only
the public contract (hub.connectors, hub.http).
"""
