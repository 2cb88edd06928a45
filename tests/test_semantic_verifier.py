"""The trained pair verifier: training from the CLI, loading, scoring, and its place in the gate.

A tiny training run (32 labelled pairs, 6 epochs) is enough to check the plumbing and that
the model fits what it was shown; its accuracy on unseen pairs is measured in
benchmarks/semantic_verifier.py, not here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kvcellar import SemanticCache
from kvcellar.cli import app
from kvcellar.errors import ConfigError
from kvcellar.semantic.verifier import META_FILE, PairVerifier, VerifierCheck, load_pairs

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "semantic"
cli = CliRunner()


def _small_set() -> list[dict]:
    rows = load_pairs([DATA / "pairs.jsonl"])
    same = [r for r in rows if r["same"]][:16]
    different = [r for r in rows if not r["same"]][:16]
    return same + different


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("verifier")
    pairs = _small_set()
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    res = cli.invoke(app, ["semantic", "train-verifier", "--out", str(root / "model"),
                           "--data", str(data), "--epochs", "6", "--lr", "1e-4"])
    assert res.exit_code == 0, res.output
    assert "trained on 32 pairs" in res.output
    return root / "model", pairs


def test_trained_verifier_fits_its_pairs_and_scores_both_orders_alike(trained):
    path, pairs = trained
    meta = json.loads((path / META_FILE).read_text())
    assert meta["pairs"] == 32 and len(meta["losses"]) == 6
    verifier = PairVerifier(path)
    scores = verifier.scores([(p["b"], p["a"]) for p in pairs])
    same = np.array([p["same"] for p in pairs])
    auc = (scores[same][:, None] > scores[~same][None, :]).mean()
    assert auc > 0.9 and scores[same].mean() > scores[~same].mean() + 0.1
    assert meta["losses"][-1] < meta["losses"][0]
    assert ((scores > 0) & (scores < 1)).all()
    a, b = pairs[0]["a"], pairs[0]["b"]
    assert verifier.probability_same(a, b) == verifier.probability_same(b, a)


def test_verifier_is_a_gate_check(trained, embedder, tmp_path):
    path, _ = trained
    query, paraphrase = "How do I reset my router?", "how can I reset my router"
    strict = SemanticCache(embedder=embedder, path=":memory:", verifier_path=str(path),
                           verifier_min_probability=1.0)
    strict.store(query, "Hold the reset button for 10 seconds.")
    assert strict.lookup(query) is not None  # exact text: no verification needed
    decision = strict.lookup_detailed(paraphrase)
    assert decision.hit is None and decision.rejected_by == "gate:verifier"
    assert "trained verifier" in decision.reason
    same_text = VerifierCheck(PairVerifier(path), min_probability=1.0)
    assert same_text("What other books did she write?", "what other books did she write") is None
    lenient = SemanticCache(embedder=embedder, path=":memory:", verifier_path=str(path),
                            verifier_min_probability=0.0)
    lenient.store(query, "Hold the reset button for 10 seconds.")
    assert lenient.lookup(paraphrase) is not None
    strict.close()
    lenient.close()


def test_missing_verifier_and_bad_data_are_clear_errors(embedder, tmp_path):
    with pytest.raises(ConfigError, match="not a trained verifier"):
        SemanticCache(embedder=embedder, path=":memory:", verifier_path=str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / META_FILE).write_text("{}")  # the weights never written (an interrupted training)
    with pytest.raises(ConfigError, match="cannot be loaded"):
        PairVerifier(broken)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x", "b": "y", "same": true}\n{"a": "only a"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2"):
        load_pairs([bad])
    res = cli.invoke(app, ["semantic", "train-verifier", "--out", str(tmp_path / "m"),
                           "--data", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.output
    assert not (tmp_path / "m").exists()


def test_verifier_from_the_packaged_chat_model(tmp_path):
    """SmolLM2 has no pair encoding: it is trained and scored on one prompt holding both
    questions, read at its last token; the directory records that, so loading it scores the
    same way. (Its accuracy is measured in the benchmark; two steps here prove the plumbing.)"""
    pairs = _small_set()[::4]  # 4 paraphrases, 4 traps
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "smol"
    res = cli.invoke(app, ["semantic", "train-verifier", "--out", str(out), "--data", str(data),
                           "--epochs", "1", "--base", "SmolLM2-135M-Instruct"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / META_FILE).read_text())
    assert meta["input"] == "prompt" and meta["pairs"] == 8
    verifier = PairVerifier(out)
    assert verifier.style == "prompt" and verifier.model.config.pad_token_id is not None
    a, b = pairs[0]["a"], pairs[0]["b"]
    p = verifier.probability_same(a, b)
    assert 0 < p < 1 and p == verifier.probability_same(b, a)
    # a batch pads the shorter prompts; each pair must score as it does alone
    batch = verifier.scores([(x["b"], x["a"]) for x in pairs])
    alone = [PairVerifier(out).probability_same(x["b"], x["a"]) for x in pairs[:3]]
    assert np.allclose(batch[:3], alone, atol=1e-4)
    bad = cli.invoke(app, ["semantic", "train-verifier", "--out", str(tmp_path / "x"),
                           "--data", str(data), "--base", "no-such-model"])
    assert bad.exit_code == 2 and "unknown model" in bad.output
