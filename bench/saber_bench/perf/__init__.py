"""Benchmark harnesses and the test servers they share (not used by the shipped components)."""
