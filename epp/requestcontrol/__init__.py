"""Request-control plugins: run around a routed request, outside scheduling.

Declared in the config's `plugins:` list (kind REQUEST_CONTROL); the reference activates them by
being declared. One module a plugin type:
- `destination-endpoint-served-verifier` (conformance): echoes the served endpoint on the response.
- `request-attribute-reporter`: a number from the response's `usage` (e.g.
  `x-gateway-inference-request-cost`) in `envoy.lb` metadata on the last response-body reply (as
  the reference: usage is known only then), for Envoy rate limiting.
The extension points and the builder are in `base.py`.
"""
