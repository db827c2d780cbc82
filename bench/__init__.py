"""Benchmarks of the serving path (``twotower bench …``): retriever speed under swaps,
click-to-served freshness, and cold-item latency. Each writes its figures as JSON."""
