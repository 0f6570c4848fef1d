"""Spec schema and loading, composer, workloads, benchmarks."""
