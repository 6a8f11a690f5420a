"""Errors the backend raises on purpose. Both are ValueErrors so callers can catch either."""


class InputError(ValueError):
    """Bad user input: the message names the input and says how to fix it."""


class CheckpointError(ValueError):
    """A model file that is missing, truncated or does not match: the message names the file,
    the key and what was expected."""


class GenerationInterrupted(RuntimeError):
    """Raised between denoising steps when the caller asked generation to stop."""
