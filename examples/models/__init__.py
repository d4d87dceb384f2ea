"""Models used by the demo and the benchmarks."""
