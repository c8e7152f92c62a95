"""Throughput benchmark, memory plans and the checks of a plan against a tracked run."""
