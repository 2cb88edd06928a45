"""Settings of the semantic cache: thresholds, categories, gate, admission, learning.

Loaded from a YAML file (`SemanticSettings.from_yaml`) or built in code; every field is checked,
so a typo in a category file fails at start-up with the field's name, not at the first lookup.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvcellar.errors import ConfigError
from kvcellar.semantic.embed import DEFAULT_EMBEDDING_MODEL


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CategoryConfig(_Strict):
    name: str = Field(min_length=1)
    threshold: float | None = Field(None, ge=0.0, le=1.0)  # None: the global threshold
    min_threshold: float | None = Field(None, ge=0.0, le=1.0)  # lower bound under load
    ttl_s: float | None = Field(None, gt=0)
    quota: int | None = Field(None, ge=1)  # entries per tenant in this category (LRU beyond)
    enabled: bool = True  # disabled: never served from cache, never stored (e.g. "realtime")
    examples: list[str] = Field(default_factory=list)  # for the zero-shot classifier


class LearnedThresholds(_Strict):
    """Per-entry decisions from observed (similarity, was-correct) pairs (vCache idea)."""

    enabled: bool = False
    delta: float = Field(0.05, gt=0.0, lt=1.0)  # tolerated error rate per served hit
    confidence: float = Field(0.9, gt=0.5, lt=1.0)  # of the upper bound on the error rate
    min_observations: int = Field(3, ge=1)
    floor: float = Field(0.6, ge=0.0, le=1.0)  # candidates below this are never considered
    reverify_rate: float = Field(0.0, ge=0.0, le=1.0)  # share of hits sent for re-checking


class Admission(_Strict):
    """Limits on writes, so one tenant (or an attacker) cannot flood a shared namespace."""

    writes_per_minute: float | None = Field(600, gt=0)  # per tenant; None: unlimited
    burst: int = Field(60, ge=1)
    max_entries_per_tenant: int | None = Field(100_000, ge=1)  # LRU eviction beyond
    max_response_chars: int = Field(32_000, ge=1)


class SemanticSettings(_Strict):
    path: str = "~/.cache/kvcellar/semantic.sqlite"  # ":memory:" for a throw-away cache
    redis_url: str | None = None  # shared store across servers (source of truth when set)
    redis_prefix: str = "kvcellar:sem"
    embedding_model: str = DEFAULT_EMBEDDING_MODEL  # or a local sentence-transformers dir
    threshold: float = Field(0.65, ge=0.0, le=1.0)  # cosine similarity of the queries
    context_threshold: float = Field(0.70, ge=0.0, le=1.0)  # per preceding turn
    context_window: int = Field(6, ge=0)  # preceding turns compared (0: last message only)
    candidates: int = Field(8, ge=1, le=256)  # ANN neighbours examined per lookup
    ttl_s: float | None = Field(None, gt=0)  # default entry lifetime; None: until evicted
    max_query_chars: int = Field(16_000, ge=1)
    checks: list[str] = Field(default_factory=lambda: ["negation", "question", "numbers", "entities", "substitution",
                                 "scope", "content"])
    # checks on the earlier turns of a conversation; None: those of `checks` that suit them
    # (negation, question, numbers, entities, substitution)
    context_checks: list[str] | None = None
    content_min_score: float = Field(0.3, ge=0.0, le=1.0)
    scope_min_alignment: float = Field(0.6, ge=0.0, le=1.0)
    judge: bool = False  # the served model as a last check (needs the model: server / judge_runner)
    judge_min_yes: float = Field(0.5, ge=0.0, le=1.0)
    verifier_path: str | None = None  # a cross-encoder from `kvcellar semantic train-verifier`
    verifier_min_probability: float = Field(0.7, ge=0.0, le=1.0)  # chosen on holdout3
    categories: list[CategoryConfig] = Field(default_factory=list)
    classifier_min_similarity: float = Field(0.45, ge=0.0, le=1.0)
    load_relax_max: float = Field(0.0, ge=0.0, le=0.5)  # threshold drop at full load
    load_full_depth: int = Field(16, ge=1)  # queue depth counted as full load
    admission: Admission = Field(default_factory=Admission)
    learned: LearnedThresholds = Field(default_factory=LearnedThresholds)
    ic_examples: int = Field(0, ge=0, le=16)  # IC-Cache: similar pairs offered on a miss
    ic_min_similarity: float = Field(0.5, ge=0.0, le=1.0)
    sync_interval_s: float = Field(0.5, ge=0.0)  # how often other processes' writes are pulled
    hnsw_m: int = Field(16, ge=4, le=128)
    hnsw_ef_construction: int = Field(200, ge=10)
    hnsw_ef_search: int = Field(64, ge=8)

    @model_validator(mode="after")
    def _unique_categories(self) -> SemanticSettings:
        names = [c.name for c in self.categories]
        if len(names) != len(set(names)):
            raise ValueError(f"category names must be unique, got {names}")
        return self

    def category(self, name: str | None) -> CategoryConfig | None:
        return next((c for c in self.categories if c.name == name), None)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> SemanticSettings:
        try:
            data = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"semantic cache config {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"semantic cache config {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"semantic cache config {path} must be a mapping of settings")
        return cls.build(**(data | overrides))

    @classmethod
    def build(cls, **values) -> SemanticSettings:
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ConfigError(f"bad semantic cache settings: {problems}") from exc
