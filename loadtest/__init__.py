"""Load generator for streaming LLM servers: `streampage loadtest` or `python -m loadtest`.

It drives a running server (streampage over WebSocket, or any OpenAI-compatible `/v1/completions`)
with seeded workloads at a request rate or a fixed concurrency, and reports the latency and throughput
metrics of `vllm bench serve` as a console table, a JSON file and PNG plots. See docs/loadtest.md.
"""
