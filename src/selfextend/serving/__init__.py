"""`selfextend serve`: an OpenAI-compatible HTTP server for long documents (needs the `serve` extra).

engine.py runs the model (one request at a time, bounded queue, prefix reuse from prefix_cache.py),
app.py speaks OpenAI's protocol over it, protocol.py holds the request shapes, guards.py the API key
and body cap, metrics.py the Prometheus series, server.py the command that starts it all; local.py waits
for a server started on this machine (tests and benchmarks).
"""
