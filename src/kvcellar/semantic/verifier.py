"""A cross-encoder trained on labelled question pairs, as one more check in the gate.

The rule checks catch a changed name, figure or negation when the rest of the question is kept,
but not a trap that rewords and changes meaning at once ("shower pressure is way too strong, how
do I turn it down" against "how do I increase shower pressure"), and they turn away paraphrases
that replace every content word. A cross-encoder reads both questions together, so it can learn
both from labelled pairs. It starts from the packaged all-MiniLM-L6-v2 weights (no download) and
is trained with `kvcellar semantic train-verifier` on the labelled pairs in
`benchmarks/data/semantic/`; its quality is measured in `benchmarks/semantic_verifier.py`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from kvcellar.errors import ConfigError
from kvcellar.semantic.cache import normalize_text
from kvcellar.semantic.lru import LRU

MAX_TOKENS = 96  # two questions; longer ones are cut (the start carries what is asked)
META_FILE = "kvcellar_verifier.json"
# the labelled development pairs, relative to benchmarks/data/semantic/ of a checkout; the
# held-out sets (holdout3 to holdout6) are kept out so the benchmark's tests stay unseen
TRAINING_FILES = ("pairs.jsonl", "holdout_pairs.jsonl", "holdout2_pairs.jsonl", "train/*.jsonl")


def load_pairs(paths: Iterable[str | Path]) -> list[dict]:
    """Labelled pairs from JSON-lines files: {"a": ..., "b": ..., "same": bool, ...}."""
    pairs: list[dict] = []
    for path in paths:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append({"a": str(row["a"]), "b": str(row["b"]), "same": bool(row["same"])})
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{n}: not a labelled pair ({exc})") from exc
    return pairs


# A decoder model (SmolLM2) has no pair encoding: it reads both questions in one prompt and is
# scored on its last token.
PROMPT = "Question 1: {}\nQuestion 2: {}\nDo they ask exactly the same thing?"
PROMPT_MAX_TOKENS = 128


def _encode_pairs(tokenizer, first: list[str], second: list[str], style: str = "pair"):
    """The model's input for pairs, the same in training and in use."""
    if style == "prompt":
        return tokenizer([PROMPT.format(a, b) for a, b in zip(first, second, strict=True)],
                         padding=True, truncation=True, max_length=PROMPT_MAX_TOKENS,
                         return_tensors="pt")
    return tokenizer(first, second, padding=True, truncation=True, max_length=MAX_TOKENS,
                     return_tensors="pt")


class PairVerifier:
    """P(same question) for (query, candidate) from a trained cross-encoder directory."""

    def __init__(self, path: str | Path, cache_size: int = 4096) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path).expanduser()
        if not (path / META_FILE).is_file():
            raise ConfigError(f"{path} is not a trained verifier (no {META_FILE}); train one with "
                              "`kvcellar semantic train-verifier --out DIR`")
        try:
            self.meta = json.loads((path / META_FILE).read_text())
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        except (OSError, ValueError) as exc:  # truncated weights, missing tokenizer, bad JSON
            raise ConfigError(f"the trained verifier in {path} cannot be loaded ({exc}); train "
                              "it again") from exc
        self.style = self.meta.get("input", "pair")
        self._torch = torch
        self._cache: LRU[tuple[str, str], float] = LRU(cache_size)

    def scores(self, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> np.ndarray:
        """P(same) for each (query, candidate); both orders are averaged (the model is trained
        on both, and the average removes what order alone decides)."""
        known = {p: self._cache.get(p) for p in dict.fromkeys(pairs)}
        todo = [p for p, score in known.items() if score is None]
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            queries, candidates = [q for q, _ in batch], [c for _, c in batch]
            # both orders in one forward pass: ~30% less time per candidate on 2 cores than two
            probs = self._forward(queries + candidates, candidates + queries)
            for pair, a, b in zip(batch, probs[:len(batch)], probs[len(batch):], strict=True):
                known[pair] = (a + b) / 2
                self._cache.put(pair, known[pair])
        return np.array([known[p] for p in pairs], dtype=np.float64)

    def _forward(self, first: list[str], second: list[str]) -> list[float]:
        enc = _encode_pairs(self.tokenizer, first, second, self.style)
        with self._torch.no_grad():
            logits = self.model(**enc).logits.reshape(-1)
        return self._torch.sigmoid(logits).tolist()

    def probability_same(self, query: str, candidate: str) -> float:
        return float(self.scores([(query, candidate)])[0])


class VerifierCheck:
    """Vetoes a candidate the trained verifier scores below `min_probability`."""

    name = "verifier"

    def __init__(self, verifier: PairVerifier, min_probability: float = 0.5) -> None:
        self.verifier = verifier
        self.min_probability = min_probability

    def __call__(self, query: str, candidate: str) -> str | None:
        if normalize_text(query) == normalize_text(candidate):
            # the same question (a follow-up asked in two conversations): no pair in the
            # training data is identical, so the model's score says nothing here
            return None
        p = self.verifier.probability_same(query, candidate)
        if p < self.min_probability:
            return f"trained verifier says different (P(same) = {p:.2f})"
        return None


def train_verifier(
    pairs: Sequence[dict], out_dir: str | Path, *, base_model: str | Path | None = None,
    epochs: int = 3, lr: float = 5e-5, batch_size: int = 16, seed: int = 0,
    weight_decay: float = 0.01, progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Fine-tune a cross-encoder on labelled pairs (each in both orders) and save it.

    Deterministic for a given seed, data and thread count. Returns what was recorded in the
    directory's metadata file (data size, losses per epoch, seconds)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kvcellar.semantic.embed import resolve_model_dir

    if not pairs:
        raise ConfigError("no labelled pairs to train the verifier on")
    base = Path(base_model) if base_model else resolve_model_dir("all-MiniLM-L6-v2")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    style = "pair" if tokenizer.sep_token else "prompt"  # an encoder, or a decoder (SmolLM2)
    if style == "prompt":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        model.config.pad_token_id = tokenizer.pad_token_id
    examples = [(p["a"], p["b"], float(p["same"])) for p in pairs]
    examples += [(b, a, y) for a, b, y in examples]
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps))
    model.train()
    t0, step, losses = time.perf_counter(), 0, []
    for _ in range(epochs):
        rng.shuffle(examples)
        total = 0.0
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            enc = _encode_pairs(tokenizer, [x[0] for x in batch], [x[1] for x in batch], style)
            logits = model(**enc).logits.reshape(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.tensor([x[2] for x in batch]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
            step += 1
            if progress:
                progress(step, steps, loss.item())
        losses.append(total / len(examples))
    model.eval()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    meta = {"base_model": str(base), "input": style, "pairs": len(pairs), "epochs": epochs,
            "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed,
            "losses": losses, "train_s": round(time.perf_counter() - t0, 1)}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta
