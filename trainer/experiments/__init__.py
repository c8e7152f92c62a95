"""Experiments and the builders of their shipped assets (the demo's, the digits')."""
