"""One exception hierarchy, so callers can catch every kvcellar failure with one clause.

Messages say what was wrong and what to do about it.
"""

from __future__ import annotations


class KvcellarError(Exception):
    """Base of every error raised on purpose by kvcellar."""


class ConfigError(KvcellarError, ValueError):
    """A setting has a bad value, or the config file cannot be read."""


class ModelLoadError(KvcellarError):
    """The model could not be found or loaded."""


class PromptTooLongError(KvcellarError, ValueError):
    """The request does not fit in the model's context window."""


class CodecError(KvcellarError):
    """A stored KV frame cannot be decoded; the engine treats it as a miss."""


class TruncatedFrameError(CodecError):
    """The frame is shorter than its header says (partial write, cut transfer)."""


class CorruptFrameError(CodecError):
    """The frame's magic, header or checksum is wrong (bit rot, foreign data)."""


class UnknownCodecError(CodecError):
    """The frame names a codec this process does not have."""


class StorageError(KvcellarError):
    """A storage tier failed in a way that is not a plain miss."""
