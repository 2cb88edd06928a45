"""The transformers runner: load a causal LM, prefill from a given KV prefix, step the decoder.

It converts between kvcellar's KV layout ``[layers, 2, kv_heads, tokens, head_dim]`` and
transformers' ``DynamicCache`` and knows nothing of storage or keys.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvcellar.errors import ModelLoadError, PromptTooLongError
from kvcellar.kv.chunk import bytes_per_token
from kvcellar.models.fairlock import FairLock

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class HFRunner:
    """One loaded model + tokenizer. Callers hold ``lock`` around ``forward`` (one at a time on CPU)."""

    def __init__(
        self, model_dir: Path, dtype: str = "float32", threads: int = 0, name: str = ""
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.torch_dtype = _TORCH_DTYPES[dtype]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=self.torch_dtype
            )
        except Exception as exc:  # transformers raises many kinds; one clear message for all
            raise ModelLoadError(f"cannot load model from {self.model_dir}: {exc}") from exc
        self.model.eval()
        # newer transformers 5.x name the KV argument `cache` and deprecate `past_key_values`
        self._cache_kwarg = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters
            else "past_key_values"
        )
        cfg = self.model.config
        self.config = cfg
        self.num_layers: int = cfg.num_hidden_layers
        self.num_kv_heads: int = (
            getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        )
        self.head_dim: int = (
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.max_context: int = int(getattr(cfg, "max_position_embeddings", 2048))
        self.bytes_per_token = bytes_per_token(
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            torch.finfo(self.torch_dtype).bits // 8,
        )
        self.eos_token_ids = _eos_ids(self.model, self.tokenizer)
        self.fingerprint = self._fingerprint(dtype)
        self.lock = FairLock()

    def _fingerprint(self, dtype: str) -> str:
        """Model identity for cache namespaces: weights files, config, dtype and KV shape.

        Two runners share KV only if they would compute the same KV.
        """
        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps(self.config.to_dict(), sort_keys=True, default=str).encode())
        for f in sorted(self.model_dir.glob("*.safetensors")) + sorted(
            self.model_dir.glob("*.bin")
        ):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        shape = f"L{self.num_layers}H{self.num_kv_heads}D{self.head_dim}"
        return f"{self.name}|{h.hexdigest()}|{dtype}|{shape}"

    # --- tokens -------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def check_length(self, n_prompt: int, max_new: int) -> None:
        if n_prompt + max_new > self.max_context:
            raise PromptTooLongError(
                f"prompt of {n_prompt} tokens + max_tokens {max_new} exceeds the model's context of "
                f"{self.max_context} tokens; shorten the prompt or lower max_tokens"
            )

    # --- KV layout conversion -------------------------------------------------------------
    def new_cache(self, kv: torch.Tensor | None = None) -> Any:
        """A DynamicCache, empty or holding ``kv`` ([layers, 2, kv_heads, tokens, head_dim])."""
        from transformers import DynamicCache

        if kv is None:
            return DynamicCache(config=self.config)
        if (
            kv.shape[0] != self.num_layers
            or kv.shape[2] != self.num_kv_heads
            or kv.shape[4] != self.head_dim
        ):
            raise ValueError(f"KV of shape {tuple(kv.shape)} does not fit this model")
        data = [(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(self.num_layers)]
        return DynamicCache(ddp_cache_data=data, config=self.config)

    @staticmethod
    def cache_length(cache: Any) -> int:
        return int(cache.get_seq_length())

    def kv_slice(self, cache: Any, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) of ``cache`` as one contiguous [layers, 2, kv_heads, n, head_dim]."""
        out = torch.empty(
            (self.num_layers, 2, self.num_kv_heads, end - start, self.head_dim),
            dtype=self.torch_dtype,
        )
        for i, layer in enumerate(cache.layers):
            out[i, 0].copy_(layer.keys[0, :, start:end])
            out[i, 1].copy_(layer.values[0, :, start:end])
        return out

    # --- compute ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: Sequence[int], cache: Any) -> torch.Tensor:
        """Run ``input_ids`` after what ``cache`` holds (grown in place); last position's logits."""
        ids = torch.tensor([list(input_ids)], dtype=torch.long)
        return self.call_model(ids, cache, logits_to_keep=1).logits[0, -1].float()

    def call_model(self, input_ids: torch.Tensor, cache: Any, **kwargs: Any) -> Any:
        """The model's own forward over ``input_ids`` [B, T] after ``cache`` (grown in place),
        with the cache passed under the argument name this transformers version uses."""
        return self.model(
            input_ids=input_ids, use_cache=True, **{self._cache_kwarg: cache}, **kwargs
        )


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def load_runner(model: str, cache_dir: Path, dtype: str = "float32", threads: int = 0) -> HFRunner:
    """Resolve ``model`` (registry name or directory) and load it."""
    from kvcellar.models.registry import resolve_model_dir

    model_dir = resolve_model_dir(model, cache_dir)
    name = model if not Path(model).expanduser().is_dir() else Path(model).name
    return HFRunner(model_dir, dtype=dtype, threads=threads, name=name)
