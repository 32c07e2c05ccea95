"""`idlm bench`: throughput and latency against concurrency, per decoding mode, and HF transformers."""
