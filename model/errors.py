"""Errors a user can act on. The CLI prints them as one line; the app maps them to 4xx."""


class ClipforgeError(Exception):
    """Base class: the message says what is wrong and, where it can, how to fix it."""


class ConfigError(ClipforgeError, ValueError):
    """An invalid model configuration (bad field, value or combination)."""


class CheckpointError(ClipforgeError):
    """A checkpoint directory that is missing, corrupt, or does not match its config."""


class ImageError(ClipforgeError, ValueError):
    """An image that cannot be decoded or is not an image at all."""


class ImageTooLargeError(ImageError):
    """An image whose pixel count exceeds the configured limit (decompression-bomb guard)."""
