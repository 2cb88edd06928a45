"""Frames: exact round trip, self-description, and a specific error for every kind of damage."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcellar.errors import CorruptFrameError, TruncatedFrameError, UnknownCodecError
from kvcellar.kv import codecs
from kvcellar.kv.chunk import KVChunk


def _chunk(tokens=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(4, 2, 3, tokens, 8, generator=g).to(dtype)
    return KVChunk(kv, tuple(range(100, 100 + tokens)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_raw_is_exact_for_every_dtype(dtype):
    c = _chunk(dtype=dtype)
    d = codecs.decode(codecs.encode(c, codecs.get_codec("raw")))
    assert d.kv.dtype == dtype and torch.equal(d.kv, c.kv) and d.tokens == c.tokens


def test_fp16_halves_fp32_and_is_close():
    c = _chunk(tokens=64)
    raw = codecs.encode(c, codecs.get_codec("raw"))
    half = codecs.encode(c, codecs.get_codec("fp16"))
    d = codecs.decode(half)
    assert d.kv.dtype == torch.float32
    assert torch.allclose(d.kv, c.kv, atol=2e-3, rtol=1e-3)
    assert len(half) < 0.55 * len(raw)
    assert codecs.frame_codec_name(half) == "fp16" and not codecs.get_codec("fp16").lossless


def test_empty_token_chunk_round_trips():
    c = KVChunk(torch.zeros(2, 2, 1, 0, 4), ())
    assert codecs.decode(codecs.encode(c, codecs.get_codec("raw"))).num_tokens == 0


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_truncation_or_bit_flip_is_detected(data):
    frame = codecs.encode(_chunk(tokens=4), codecs.get_codec("raw"))
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(TruncatedFrameError):
        codecs.decode(frame[:cut])
    pos = data.draw(st.integers(0, len(frame) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(frame)
    flipped[pos] ^= 1 << bit
    with pytest.raises((CorruptFrameError, TruncatedFrameError, UnknownCodecError)):
        codecs.decode(bytes(flipped))


def test_specific_errors():
    frame = bytearray(codecs.encode(_chunk(), codecs.get_codec("raw")))
    with pytest.raises(TruncatedFrameError):
        codecs.decode(bytes(frame[:-1]))
    with pytest.raises(CorruptFrameError, match="magic"):
        codecs.decode(b"XXXX" + bytes(frame[4:]))
    frame[-1] ^= 0xFF
    with pytest.raises(CorruptFrameError, match="checksum"):
        codecs.decode(bytes(frame))
    with pytest.raises(UnknownCodecError):
        codecs.get_codec("nope")


def test_kvchunk_validates_and_slices():
    c = _chunk(tokens=10)
    s = c.slice(2, 5)
    assert s.num_tokens == 3 and torch.equal(s.kv, c.kv[:, :, :, 2:5])
    joined = KVChunk.concat([c.slice(0, 4), c.slice(4, 10)])
    assert torch.equal(joined.kv, c.kv) and joined.tokens == c.tokens
    with pytest.raises(ValueError):
        KVChunk(torch.zeros(2, 2, 1, 3, 4), (1, 2))
    with pytest.raises(ValueError):
        KVChunk(torch.zeros(2, 3, 1, 3, 4), (1, 2, 3))
