"""Key chain properties: deterministic across processes, prefix-sensitive, namespaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from kvcellar.keys import chunk_keys, chunk_spans, namespace, namespace_tag

tokens_st = st.lists(st.integers(min_value=0, max_value=2**31 - 1), min_size=0, max_size=300)
chunk_st = st.integers(min_value=1, max_value=64)
NS = namespace("model-a|fp|float32|L30H3D64", "tenant-1")


@given(tokens_st, chunk_st, st.booleans())
def test_spans_cover_tokens(tokens, chunk, partial):
    spans = chunk_spans(len(tokens), chunk, partial)
    assert len(chunk_keys(tokens, chunk, NS, partial)) == len(spans)
    covered = spans[-1][1] if spans else 0
    assert covered == (len(tokens) if partial else len(tokens) // chunk * chunk)
    assert all(e - s == chunk for s, e in spans[: len(tokens) // chunk])


@given(tokens_st, chunk_st)
def test_same_prefix_same_keys(tokens, chunk):
    extended = tokens + [7, 8, 9] * chunk
    a = chunk_keys(tokens, chunk, NS)
    b = chunk_keys(extended, chunk, NS)
    assert b[: len(a)] == a


@given(st.lists(st.integers(0, 50000), min_size=2, max_size=200), chunk_st, st.data())
def test_changed_token_changes_its_chunk_and_every_later_one(tokens, chunk, data):
    i = data.draw(st.integers(0, len(tokens) - 1))
    changed = list(tokens)
    changed[i] = (changed[i] + 1) % 50001
    a = chunk_keys(tokens, chunk, NS, include_partial=True)
    b = chunk_keys(changed, chunk, NS, include_partial=True)
    first = i // chunk
    assert a[:first] == b[:first]
    assert all(x != y for x, y in zip(a[first:], b[first:], strict=True))


@given(st.lists(st.integers(0, 50000), min_size=1, max_size=200), chunk_st)
def test_other_model_or_tenant_gives_disjoint_keys(tokens, chunk):
    base = set(chunk_keys(tokens, chunk, NS, True))
    other_tenant = set(
        chunk_keys(tokens, chunk, namespace("model-a|fp|float32|L30H3D64", "tenant-2"), True)
    )
    other_model = set(
        chunk_keys(tokens, chunk, namespace("model-b|fp|float32|L30H3D64", "tenant-1"), True)
    )
    assert base.isdisjoint(other_tenant)
    assert base.isdisjoint(other_model)


def test_keys_identical_in_another_process():
    samples = [list(range(n)) + [49151] * (n % 7) for n in (0, 5, 64, 300, 1000)]
    here = [chunk_keys(t, 32, NS, True) for t in samples]
    code = (
        "import json,sys; from kvcellar.keys import chunk_keys;"
        "d=json.load(sys.stdin); print(json.dumps([chunk_keys(t,32,d['ns'],True) for t in d['s']]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps({"ns": NS, "s": samples}),
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert json.loads(out.stdout) == here
    assert all(len(k) == 40 and int(k, 16) >= 0 for ks in here for k in ks)
    assert all(k.startswith(namespace_tag(NS)) for ks in here for k in ks)
