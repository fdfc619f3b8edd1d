"""HTTP handlers: thin shells that parse a request, ask the core, and stream or answer."""
