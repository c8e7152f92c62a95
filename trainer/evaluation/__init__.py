"""Evaluation: sample sets, features and metrics, and the forgetting analyses."""
