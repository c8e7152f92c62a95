"""Continual multi-stage transfer: the stages file and the driver that runs a chain of stages."""
