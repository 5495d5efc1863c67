"""Benchmarks: speed and memory as ratios measured side by side (see BENCHMARKS.md)."""
