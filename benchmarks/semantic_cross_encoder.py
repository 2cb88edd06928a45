"""Would a verifier trained on our labelled pairs beat the rule gate on unseen questions?

all-MiniLM-L6-v2 (the packaged embedder's weights) is fine-tuned as a cross-encoder (both
questions in one input, one logit: "same question?") on the labelled pairs of the sets already
used for development (``pairs``, ``holdout``, ``holdout2``; each pair in both orders), then
scored on ``holdout3_pairs.jsonl``, which was not used to build anything. Compared in the same
run on holdout3's (a, b) pairs, without retrieval:

- ``rules``: cosine >= the default threshold and the default gate passes (the shipped cache),
- ``rules + cross-encoder >= t``: the cross-encoder as one more check,
- ``factual rules + cross-encoder >= t``: negation/question/numbers/entities kept, the wording
  checks (substitution, scope, content) replaced by the cross-encoder.

Nothing here is shipped: the model is trained in memory and dropped.

    python benchmarks/semantic_cross_encoder.py            # ~15 min on 2 cores
    python benchmarks/semantic_cross_encoder.py --quick    # smoke: 64 pairs, 1 epoch
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import machine
from rich.console import Console
from rich.table import Table
from semantic_cache import _load

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TRAIN = ("pairs.jsonl", "holdout_pairs.jsonl", "holdout2_pairs.jsonl")
TEST = "holdout3_pairs.jsonl"
FACT_CHECKS = frozenset({"negation", "question", "numbers", "entities"})
THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.98)
console = Console(width=140)


def train_cross_encoder(pairs: list[dict], epochs: int, lr: float, seed: int):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kvcellar.semantic.embed import resolve_model_dir

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model_dir = str(resolve_model_dir("all-MiniLM-L6-v2"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    examples = [(p["a"], p["b"], float(p["same"])) for p in pairs]
    examples += [(b, a, y) for a, b, y in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(epochs):
        rng.shuffle(examples)
        total = 0.0
        for i in range(0, len(examples), 16):
            batch = examples[i:i + 16]
            enc = tok([x[0] for x in batch], [x[1] for x in batch], padding=True,
                      truncation=True, max_length=96, return_tensors="pt")
            logits = model(**enc).logits.squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.tensor([x[2] for x in batch]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total)
    model.eval()

    def score(items: list[dict]) -> np.ndarray:
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(items), 64):
                batch = items[i:i + 64]
                enc = tok([x["a"] for x in batch], [x["b"] for x in batch], padding=True,
                          truncation=True, max_length=96, return_tensors="pt")
                out += torch.sigmoid(model(**enc).logits.squeeze(-1)).reshape(-1).tolist()
        return np.array(out)

    return score, losses


def rule_verdicts(test: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine >= threshold, gate passes, the vetoing check is a factual one) per pair."""
    from kvcellar import SemanticCache
    from kvcellar.semantic.embed import Embedder

    emb = Embedder()
    cache = SemanticCache(embedder=emb, path=":memory:")
    va, vb = emb.encode([p["a"] for p in test]), emb.encode([p["b"] for p in test])
    above = (va * vb).sum(axis=1) >= cache.settings.threshold
    verdicts = [cache.gate.verify(p["b"], p["a"]) for p in test]
    cache.close()
    return (above, np.array([v.ok for v in verdicts]),
            np.array([v.check in FACT_CHECKS for v in verdicts]))


def _rates(serve: np.ndarray, same: np.ndarray) -> dict:
    return {"served": float(serve[same].mean()), "wrong_on_traps": float(serve[~same].mean())}


def run(args: argparse.Namespace) -> dict:
    train = [p for name in TRAIN for p in _load(name)]
    test = _load(TEST)
    if args.quick:
        train, test = train[:64], test[::10]
    t0 = time.perf_counter()
    score, losses = train_cross_encoder(train, args.epochs, args.lr, args.seed)
    train_s = time.perf_counter() - t0
    probs = score(test)
    same = np.array([p["same"] for p in test])
    pos, neg = probs[same], probs[~same]
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    above, gate_ok, fact_veto = rule_verdicts(test)
    systems = {"rules (shipped gate)": _rates(above & gate_ok, same)}
    for t in THRESHOLDS:
        systems[f"cross-encoder alone >= {t}"] = _rates(probs >= t, same)
        systems[f"rules + cross-encoder >= {t}"] = _rates(above & gate_ok & (probs >= t), same)
        systems[f"factual rules + cross-encoder >= {t}"] = _rates(
            above & ~fact_veto & (probs >= t), same)
    return {"train_pairs": len(train), "test_pairs": len(test), "epochs": args.epochs,
            "lr": args.lr, "train_s": train_s, "train_losses": losses, "auc": auc,
            "systems": systems}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 64 training pairs, 1 epoch")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.epochs is None:
        args.epochs = 1 if args.quick else 3
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    res = run(args)
    t = Table(title=f"{TEST}: {res['test_pairs']} pairs; cross-encoder trained on "
                    f"{res['train_pairs']} pairs x2 orders, {args.epochs} epochs "
                    f"({res['train_s']:.0f} s); AUC {res['auc']:.3f}")
    for c in ("system", "true matches served", "wrong on traps"):
        t.add_column(c, justify="right")
    for name, r in res["systems"].items():
        t.add_row(name, f"{r['served']:.1%}", f"{r['wrong_on_traps']:.1%}")
    console.print(t)
    out = args.out or RESULTS / f"semantic_cross_encoder{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "semantic_cross_encoder",
                               "args": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items()},
                               "machine": machine(), **res}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
