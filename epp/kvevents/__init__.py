"""Engine KV events: what the model servers really hold in their prefix caches.

vLLM (and SGLang) publish every KV block they store and evict over ZMQ (protocol.md §11). This
package decodes that wire format (`wire`), recomputes the picker's own block keys from the events'
token ids (`keys`), keeps the precise per-endpoint block index (`index`) and runs the subscribers
that feed it off the serving loop (`subscriber`). Nothing here knows scheduling or protobuf: the
`precise-prefix-cache-producer` (epp.producers.precise_prefix) reads the index.
"""
