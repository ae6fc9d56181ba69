"""The root of every error pyprobes raises on purpose: one clear line for the user."""


class PyprobesError(Exception):
    """An error with a message fit to show a user as is."""
