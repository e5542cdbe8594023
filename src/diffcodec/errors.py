"""Exceptions raised by diffcodec.

Every failure a user can cause (bad file, wrong model, unsupported image) raises a subclass of
:class:`DiffcodecError` with a one-line message; the CLI prints it and exits non-zero without a
traceback.
"""


class DiffcodecError(Exception):
    """Base class of all errors diffcodec raises on purpose."""


class FormatError(DiffcodecError):
    """The bytes are not a valid .dfc file (foreign, corrupt, truncated header, limits exceeded)."""


class DecodeError(DiffcodecError):
    """The file parsed but its payload could not be decoded (corrupt data or desync)."""


class ModelError(DiffcodecError):
    """A model is missing, unknown, or not the one a file was encoded with."""


class ImageError(DiffcodecError):
    """The input image cannot be coded (unreadable, unsupported mode, too large)."""


class LimitError(FormatError):
    """A size declared in a file exceeds a configured limit (e.g. ``max_pixels``); nothing was allocated."""
