"""Speed and accuracy benchmarks, run from the repository root as `python -m bench.<script>` (see docs/results.md)."""
