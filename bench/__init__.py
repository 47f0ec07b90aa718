"""Benchmarks: run from the checkout's root as `python -m bench.NAME` (they use the test scaffolding in
tests/support). Results and the commands that produced them: RESULTS.md."""
