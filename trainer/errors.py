"""The error of bad input, found before any work starts: its message names the key or file and the fix.

A module of its own that imports nothing, so that what the config validates through (the retention methods'
registry) can raise it without importing the config back."""


class ConfigError(ValueError):
    """A configuration problem found before any work starts."""
