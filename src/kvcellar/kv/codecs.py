"""Codecs turn a KVChunk into a self-describing, checksummed frame of bytes and back.

Frame layout (little-endian)::

    magic "KVCL" | version u8 | codec id u8 | dtype u8 | ndim u8 | n_tokens u32 | payload_len u64
    | checksum u64 | shape u32 * ndim | token ids i32 * n_tokens | payload

The checksum (xxh3-64, ~16 GB/s here, so it costs little on the hit path) covers every byte of the
frame except itself. Any process can decode any frame: the codec id and the original dtype travel
with it. Decoding never returns wrong data: a short frame raises TruncatedFrameError, a flipped
bit CorruptFrameError, an unknown codec UnknownCodecError.

Codec parameters that decoding needs (bit widths, group sizes, scale dtype, per-layer steps) are
not in this outer header: each parameterised codec starts its payload with its own small,
versioned parameter header (see :mod:`kvcellar.kv.quant`). So the outer layout, and VERSION 1,
stayed the same when the quantizing codecs were added: frames written before them still decode,
and an older kvcellar reading a new codec's frame fails cleanly with UnknownCodecError.

Codec ids (stable, written into frames): 1 raw, 2 fp16, 3 int8, 4 kivi2, 5 kivi4,
6 int4-rotated, 7 cachegen.
"""

from __future__ import annotations

import struct
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
import xxhash

from kvcellar.errors import (
    CodecError,
    CorruptFrameError,
    TruncatedFrameError,
    UnknownCodecError,
)
from kvcellar.kv.chunk import KVChunk

MAGIC = b"KVCL"
VERSION = 1
_HEAD = struct.Struct("<4sBBBBIQQ")
_CHECKSUM_OFFSET = _HEAD.size - 8

_DTYPES: dict[int, torch.dtype] = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16}
_DTYPE_IDS = {v: k for k, v in _DTYPES.items()}


def _view(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``buf`` without copying; callers copy out before the buffer goes away."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write to it
        return (
            torch.frombuffer(buf, dtype=dtype).view(shape)
            if len(buf)
            else torch.empty(shape, dtype=dtype)
        )


class Codec(ABC):
    """One way of encoding a KV tensor's payload. Subclasses register themselves by id."""

    codec_id: ClassVar[int]
    name: ClassVar[str]
    lossless: ClassVar[bool]

    def configured(self, **options: Any) -> Codec:
        """This codec with user options applied (e.g. ``kivi_group_size``); options a codec does
        not use are ignored. Decoding never needs them: parameters travel in the payload."""
        return self

    @abstractmethod
    def encode_payload(self, kv: torch.Tensor, start: int = 0) -> bytes | memoryview:
        """Bytes of ``kv`` (any float dtype); ``decode_payload`` inverts it. ``start`` is the
        position of ``kv``'s first token in its sequence: quantizing codecs keep the first
        tokens of a sequence (attention sinks) more precisely."""

    @abstractmethod
    def decode_payload(
        self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Tensor of ``shape``/``dtype`` from the payload; may be a view over ``payload``."""


class RawCodec(Codec):
    """The tensor's own bytes in its own dtype: exact, and decoding is a zero-copy view."""

    codec_id = 1
    name = "raw"
    lossless = True

    def encode_payload(self, kv: torch.Tensor, start: int = 0) -> memoryview:
        # A view of the tensor's memory, not a copy: encode() copies it once, into the frame.
        if kv.numel() == 0:
            return b""
        kv = kv.contiguous()
        arr = kv.view(torch.int16).numpy() if kv.dtype == torch.bfloat16 else kv.numpy()
        return memoryview(arr).cast("B")

    def decode_payload(
        self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        return _view(payload, dtype, shape)


class Fp16Codec(Codec):
    """Half precision: half the bytes of fp32; lossy for fp32 models (about 1e-3 relative)."""

    codec_id = 2
    name = "fp16"
    lossless = False

    def encode_payload(self, kv: torch.Tensor, start: int = 0) -> bytes:
        return kv.to(torch.float16).contiguous().numpy().tobytes()

    def decode_payload(
        self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        return _view(payload, torch.float16, shape).to(dtype)


_REGISTRY: dict[int, Codec] = {}
_BY_NAME: dict[str, Codec] = {}


def register(codec: Codec) -> None:
    """Add a codec; ids and names are unique and stable (they are written into frames)."""
    if codec.codec_id in _REGISTRY or codec.name in _BY_NAME:
        raise ValueError(f"codec id {codec.codec_id} or name {codec.name!r} already registered")
    _REGISTRY[codec.codec_id] = codec
    _BY_NAME[codec.name] = codec


for _c in (RawCodec(), Fp16Codec()):
    register(_c)


def codec_names() -> list[str]:
    return sorted(_BY_NAME)


def get_codec(name: str) -> Codec:
    """The registered codec called ``name`` with its default parameters."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownCodecError(
            f"unknown codec {name!r}; known codecs: {', '.join(codec_names())}"
        ) from None


def make_codec(name: str, **options: Any) -> Codec:
    """The codec ``name`` configured with ``options`` (e.g. ``kivi_group_size=64``)."""
    return get_codec(name).configured(**options)


def encode(chunk: KVChunk, codec: Codec, start: int = 0) -> bytes:
    """Frame ``chunk`` with ``codec``; ``start`` = position of its first token in the sequence."""
    kv = chunk.kv
    if kv.dtype not in _DTYPE_IDS:
        raise TypeError(f"cannot encode KV of dtype {kv.dtype}")
    payload = codec.encode_payload(kv.detach().cpu(), start=start)
    shape = tuple(kv.shape)
    body = struct.pack(f"<{len(shape)}I", *shape) + np.asarray(chunk.tokens, dtype="<i4").tobytes()
    head = _HEAD.pack(
        MAGIC,
        VERSION,
        codec.codec_id,
        _DTYPE_IDS[kv.dtype],
        len(shape),
        len(chunk.tokens),
        len(payload),
        0,
    )
    h = xxhash.xxh3_64()
    h.update(head[:_CHECKSUM_OFFSET])
    h.update(body)
    h.update(payload)
    head = head[:_CHECKSUM_OFFSET] + struct.pack("<Q", h.intdigest())
    return b"".join((head, body, payload))


def decode(frame: bytes | bytearray | memoryview) -> KVChunk:
    """Parse and verify a frame. The returned tensor may view ``frame``: copy it before reuse."""
    mv = memoryview(frame).cast("B")
    if len(mv) < _HEAD.size:
        raise TruncatedFrameError(f"frame of {len(mv)} bytes is shorter than its header")
    magic, version, codec_id, dtype_id, ndim, n_tokens, payload_len, checksum = _HEAD.unpack_from(
        mv
    )
    if magic != MAGIC:
        raise CorruptFrameError("not a kvcellar KV frame (bad magic)")
    if version != VERSION:
        raise CorruptFrameError(f"frame version {version} is not supported (expected {VERSION})")
    body_len = 4 * ndim + 4 * n_tokens
    expected = _HEAD.size + body_len + payload_len
    if len(mv) < expected:
        raise TruncatedFrameError(f"frame is truncated: {len(mv)} of {expected} bytes")
    if len(mv) > expected:
        raise CorruptFrameError(f"frame has {len(mv) - expected} trailing bytes")
    h = xxhash.xxh3_64()
    h.update(mv[:_CHECKSUM_OFFSET])
    h.update(mv[_HEAD.size :])
    if h.intdigest() != checksum:
        raise CorruptFrameError("frame checksum mismatch (corrupted data)")
    if codec_id not in _REGISTRY:
        raise UnknownCodecError(f"frame uses codec id {codec_id}, unknown to this kvcellar")
    if dtype_id not in _DTYPES:
        raise CorruptFrameError(f"frame names unknown dtype id {dtype_id}")
    pos = _HEAD.size
    shape = struct.unpack_from(f"<{ndim}I", mv, pos)
    pos += 4 * ndim
    tokens = tuple(np.frombuffer(mv[pos : pos + 4 * n_tokens], dtype="<i4").tolist())
    pos += 4 * n_tokens
    try:
        kv = _REGISTRY[codec_id].decode_payload(mv[pos:], shape, _DTYPES[dtype_id])
    except CodecError:
        raise
    except (ValueError, RuntimeError, struct.error) as exc:
        # A checksum-valid frame whose payload does not fit its header: written by a buggy or
        # foreign encoder. Still a miss, never an exception escaping to the caller.
        raise CorruptFrameError(f"frame payload does not match its header: {exc}") from None
    if tuple(kv.shape) != tuple(shape):
        raise CorruptFrameError(f"payload decoded to shape {tuple(kv.shape)}, header says {shape}")
    try:
        return KVChunk(kv, tokens)
    except ValueError as exc:
        raise CorruptFrameError(f"frame header is inconsistent: {exc}") from None


def frame_codec_name(frame: bytes | bytearray | memoryview) -> str:
    """Name of the codec that wrote a (verified) frame, so callers can report lossy reuse."""
    codec_id = memoryview(frame)[5]
    codec = _REGISTRY.get(codec_id)
    return codec.name if codec else f"unknown-{codec_id}"


# The quantizing codecs register themselves; imported last because they subclass Codec.
import kvcellar.kv.quant  # noqa: E402, F401
