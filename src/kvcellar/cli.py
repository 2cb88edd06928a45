"""The ``kvcellar`` command line: ``chat`` (the demo) and ``cache stats|clear``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from kvcellar.config import Settings
from kvcellar.errors import KvcellarError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="kvcellar: a KV and response cache for LLM inference.",
)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect or clear the local cache tiers.")
app.add_typer(cache_app, name="cache")
semantic_app = typer.Typer(no_args_is_help=True, help="Semantic response cache tools.")
app.add_typer(semantic_app, name="semantic")
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file")]
ModelOpt = Annotated[str | None, typer.Option(help="registry name or local model directory")]
ChunkOpt = Annotated[int | None, typer.Option(help="tokens per KV chunk")]
MemOpt = Annotated[str | None, typer.Option(help="memory tier budget, e.g. 2GB")]
DiskPathOpt = Annotated[Path | None, typer.Option(help="disk tier directory")]
DiskBytesOpt = Annotated[str | None, typer.Option(help="disk tier budget, e.g. 10GB (0 = none)")]
TenantOpt = Annotated[str | None, typer.Option(help="tenant whose keys to use")]
MemCodecOpt = Annotated[
    str | None, typer.Option(help="KV codec of the memory tier (default raw = exact)")
]
RemoteOpt = Annotated[
    str | None,
    typer.Option(help="shared remote tier: redis://host:port/db or redis+cluster://host:port"),
]
DiskCodecOpt = Annotated[
    str | None, typer.Option(help="KV codec of the disk tier, e.g. kivi4, cachegen (lossy)")
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _settings(config: Path | None, **flags: Any) -> Settings:
    try:
        return Settings.load(config, **flags)
    except KvcellarError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def chat(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    chunk_size: ChunkOpt = None,
    memory_bytes: MemOpt = None,
    disk_path: DiskPathOpt = None,
    disk_bytes: DiskBytesOpt = None,
    memory_codec: MemCodecOpt = None,
    disk_codec: DiskCodecOpt = None,
    remote_url: RemoteOpt = None,
    tenant: TenantOpt = None,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="type your own turns")
    ] = False,
    compare: Annotated[bool, typer.Option(help="also time each turn without the cache")] = True,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="run the plain model")] = False,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate per turn")] = 48,
    semantic: Annotated[
        bool, typer.Option(help="after the scripted chat, a new user asks similar questions "
                           "through the semantic cache")
    ] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """A multi-turn chat that shows, per turn, how much of the prompt came from the cache."""
    from kvcellar.demo_script import QUESTIONS, SYSTEM_PROMPT
    from kvcellar.llm import LLM

    _setup_logging(verbose)
    settings = _settings(
        config,
        model=model,
        chunk_size=chunk_size,
        memory_bytes=memory_bytes,
        disk_path=disk_path,
        disk_bytes=disk_bytes,
        memory_codec=memory_codec,
        disk_codec=disk_codec,
        remote_url=remote_url,
        tenant=tenant,
        enabled=False if no_cache else None,
    )
    with console.status("loading model (the first run converts it once, ~30 s)"):
        try:
            llm = LLM(**settings.model_dump())
        except KvcellarError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
    tiers = (
        "off"
        if llm.engine is None
        else ", ".join(
            f"{t.name} {t.budget_bytes / 1e9:.1f} GB" for t in llm.engine.storage.stats()
        )
    )
    codecs_used = f"  codecs: memory {settings.memory_codec}, disk {settings.disk_codec}"
    console.print(
        f"[bold]kvcellar chat[/bold]  model={settings.model}  chunk={settings.chunk_size}  "
        f"tiers: {tiers}{codecs_used}"
    )
    llm.generate("Warm-up.", max_tokens=1, use_cache=False)  # keep first-call costs out of turn 1
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    table = Table(title="per-turn cache reuse")
    for col in (
        "turn",
        "prompt tok",
        "from cache",
        "prefilled",
        "TTFT cache",
        "TTFT no cache",
        "speedup",
    ):
        table.add_column(col, justify="right")
    turn = 0
    answered: list[tuple[str, str]] = []
    script = iter(QUESTIONS)
    while True:
        if interactive:
            try:
                question = console.input("[bold cyan]you> [/bold cyan]").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if question in ("", "/quit", "/exit"):
                break
        else:
            question = next(script, None)
            if question is None:
                break
            console.print(f"[bold cyan]you>[/bold cyan] {question}")
        turn += 1
        messages.append({"role": "user", "content": question})
        base = (
            llm.generate(messages, max_tokens=1, use_cache=False)
            if compare and llm.engine
            else None
        )
        out = llm.generate(messages, max_tokens=max_tokens)
        console.print(f"[bold green]assistant>[/bold green] {out.text.strip()}")
        speed = f"{base.ttft_s / out.ttft_s:.1f}x" if base else "-"
        where = "/".join(
            sorted(
                {
                    t if c == "raw" else f"{t} {c}"
                    for t, c in zip(out.chunk_tiers, out.chunk_codecs, strict=True)
                }
            )
        )
        console.print(
            f"[dim]  prompt {out.prompt_tokens} tok | from cache {out.cached_tokens}"
            + (f" ({where})" if where else "")
            + f" | prefilled "
            f"{out.prefilled_tokens} | TTFT {out.ttft_s * 1000:.0f} ms"
            + (f" vs {base.ttft_s * 1000:.0f} ms without cache ({speed})" if base else "")
            + "[/dim]"
        )
        table.add_row(
            str(turn),
            str(out.prompt_tokens),
            str(out.cached_tokens),
            str(out.prefilled_tokens),
            f"{out.ttft_s * 1000:.0f} ms",
            f"{base.ttft_s * 1000:.0f} ms" if base else "-",
            speed,
        )
        messages.append({"role": "assistant", "content": out.text})
        answered.append((question, out.text))
    console.print(table)
    if semantic and not interactive and answered:
        _semantic_demo(llm, answered, max_tokens)
    llm.close()


def _semantic_demo(llm: Any, answered: list[tuple[str, str]], max_tokens: int) -> None:
    """The chat's answers go into a semantic cache; a new user's rewordings are answered from
    it without the model, and look-alike questions that ask something else are not."""
    import time

    from kvcellar.demo_script import SEMANTIC_QUESTIONS, SYSTEM_PROMPT
    from kvcellar.semantic.cache import SemanticCache

    with console.status("loading the embedding model (all-MiniLM-L6-v2)"):
        cache = SemanticCache(path=":memory:")
    system = {"role": "system", "content": SYSTEM_PROMPT}
    for question, answer in answered:
        cache.store([system, {"role": "user", "content": question}], answer, tenant="demo")
    console.print("\n[bold]semantic cache[/bold]: the answers above are cached; a new user asks")
    table = Table(title="semantic cache: similar questions from a new conversation")
    for col in ("question", "answered by", "similarity", "why", "time"):
        table.add_column(col)
    for question in SEMANTIC_QUESTIONS:
        msgs = [system, {"role": "user", "content": question}]
        console.print(f"[bold cyan]user>[/bold cyan] {question}")
        t0 = time.perf_counter()
        decision = cache.lookup_detailed(msgs, tenant="demo")
        lookup_s = time.perf_counter() - t0
        sim = f"{decision.similarity:.2f}" if decision.similarity is not None else "-"
        if decision.hit is not None:
            console.print(f"[bold green]cache>[/bold green] {decision.hit.response.strip()}")
            table.add_row(question, f"cache ({decision.hit.kind})", sim, "same question",
                          f"{lookup_s * 1000:.0f} ms")
            continue
        out = llm.generate(msgs, max_tokens=max_tokens)
        cache.store(msgs, out.text, tenant="demo")
        console.print(f"[bold green]model>[/bold green] {out.text.strip()}")
        table.add_row(question, "model", sim, decision.reason,
                      f"{(lookup_s + out.total_s) * 1000:.0f} ms")
    console.print(table)
    cache.close()


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="listen address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (default 8000)")] = None,
    model: ModelOpt = None,
    chunk_size: ChunkOpt = None,
    memory_bytes: MemOpt = None,
    disk_path: DiskPathOpt = None,
    disk_bytes: DiskBytesOpt = None,
    memory_codec: MemCodecOpt = None,
    disk_codec: DiskCodecOpt = None,
    remote_url: RemoteOpt = None,
    role: Annotated[
        str | None,
        typer.Option(help="both (default) | prefill (store prompt KV only) | decode (load it)"),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="serve the plain model")] = False,
    semantic: Annotated[
        bool, typer.Option("--semantic", help="answer repeated/paraphrased chats from the "
                           "semantic response cache")
    ] = False,
    semantic_config: Annotated[
        Path | None, typer.Option(help="YAML of semantic cache settings (categories, ...)")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve the OpenAI-compatible API (chat, completions, models) plus /cache/* and /metrics."""
    _setup_logging(verbose)
    logging.getLogger("kvcellar").setLevel(logging.INFO)
    settings = _settings(
        config,
        host=host,
        port=port,
        model=model,
        chunk_size=chunk_size,
        memory_bytes=memory_bytes,
        disk_path=disk_path,
        disk_bytes=disk_bytes,
        memory_codec=memory_codec,
        disk_codec=disk_codec,
        remote_url=remote_url,
        role=role,
        enabled=False if no_cache else None,
        semantic_cache=True if semantic or semantic_config else None,
        semantic_config=semantic_config,
    )
    from kvcellar.server.app import run

    try:
        run(settings)
    except KvcellarError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


UrlOpt = Annotated[
    str | None, typer.Option(help="a running server (e.g. http://127.0.0.1:8000); else local tiers")
]
KeyOpt = Annotated[str | None, typer.Option(envvar="KVCELLAR_API_KEY", help="API key for --url")]
TextArg = Annotated[str, typer.Option("--text", help="prompt text whose cached prefix to use")]


def _controller(url: str, api_key: str | None) -> Any:
    from kvcellar.controller import CacheController

    return CacheController(url, api_key)


def _remote(fn: Any) -> None:
    from rich.pretty import pprint

    try:
        pprint(fn(), expand_all=True)
    except KvcellarError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None


@cache_app.command("lookup")
def cache_lookup(text: TextArg, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """How many tokens of a prompt a running server has cached, per tier."""
    if url is None:
        console.print("[red]error:[/red] lookup needs --url (the memory tier lives in the server)")
        raise typer.Exit(2)
    _remote(lambda: _controller(url, api_key).lookup(text=text))


@cache_app.command("pin")
def cache_pin(
    text: TextArg,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    ttl: Annotated[float | None, typer.Option(help="seconds (default: until unpinned)")] = None,
) -> None:
    """Keep a prompt's cached prefix from eviction on a running server."""
    if url is None:
        console.print("[red]error:[/red] pin needs --url")
        raise typer.Exit(2)
    _remote(lambda: _controller(url, api_key).pin(text=text, ttl_s=ttl))


@cache_app.command("unpin")
def cache_unpin(text: TextArg, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Release the pins of a prompt's chunks on a running server."""
    if url is None:
        console.print("[red]error:[/red] unpin needs --url")
        raise typer.Exit(2)
    _remote(lambda: _controller(url, api_key).unpin(text=text))


def _local_tiers(settings: Settings) -> list[Any]:
    from kvcellar.storage.disk import DiskBackend

    if settings.disk_bytes <= 0:
        return []
    return [DiskBackend(settings.resolved_disk_path(), settings.disk_bytes)]


@cache_app.command("stats")
def cache_stats(
    config: ConfigOpt = None,
    disk_path: DiskPathOpt = None,
    disk_bytes: DiskBytesOpt = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Entries and bytes per tier: of a running server (--url) or of the local disk tier."""
    if url is not None:
        _remote(lambda: _controller(url, api_key).stats())
        return
    settings = _settings(config, disk_path=disk_path, disk_bytes=disk_bytes)
    table = Table(title="kvcellar local tiers")
    for col in ("tier", "path", "entries", "used", "budget", "use %"):
        table.add_column(col, justify="right")
    for tier in _local_tiers(settings):
        st = tier.stats()
        pct = 100 * st.used_bytes / st.budget_bytes if st.budget_bytes else 0.0
        table.add_row(
            st.name,
            str(settings.resolved_disk_path()),
            str(st.entries),
            _fmt_bytes(st.used_bytes),
            _fmt_bytes(st.budget_bytes),
            f"{pct:.1f}",
        )
        tier.close()
    table.add_row("memory", "(per process)", "-", "-", _fmt_bytes(settings.memory_bytes), "-")
    console.print(table)


@cache_app.command("clear")
def cache_clear(
    config: ConfigOpt = None,
    disk_path: DiskPathOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    tenant: TenantOpt = None,
    tier: Annotated[str | None, typer.Option(help="with --url: clear this tier only")] = None,
    everything: Annotated[bool, typer.Option("--all", help="with --url: every tenant")] = False,
) -> None:
    """Delete cached KV: the local disk tier, or on a server (--url) the caller's tenant."""
    if url is not None:
        _remote(
            lambda: _controller(url, api_key).clear(tenant=tenant, tier=tier, everything=everything)
        )
        return
    settings = _settings(config, disk_path=disk_path)
    tiers = _local_tiers(settings)
    if not tiers:
        console.print("no disk tier configured (disk_bytes is 0); nothing to clear")
        return
    path = settings.resolved_disk_path()
    if not yes and not typer.confirm(f"delete every cached KV chunk under {path}?"):
        raise typer.Exit(1)
    for tier in tiers:
        n = tier.stats().entries
        tier.clear()
        tier.close()
        console.print(f"cleared {n} entries from the {tier.name} tier at {path}")


VERIFIER_DATA = "benchmarks/data/semantic"


@semantic_app.command("train-verifier")
def semantic_train_verifier(
    out: Annotated[Path, typer.Option(help="directory to write the trained verifier to")],
    data: Annotated[
        list[Path] | None,
        typer.Option(help="JSON-lines files of labelled pairs {a, b, same} (repeatable); default: "
                          f"the development sets under {VERIFIER_DATA}/ of this checkout"),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    lr: Annotated[float, typer.Option(min=0.0)] = 5e-5,
    seed: int = 0,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 0.01,
    base: Annotated[
        str | None,
        typer.Option(help="model to start from: all-MiniLM-L6-v2 (default, a cross-encoder), "
                          "SmolLM2-135M-Instruct (the packaged chat model, read as one prompt) "
                          "or a local transformers directory"),
    ] = None,
) -> None:
    """Fine-tune the verification gate's pair verifier on labelled question pairs.

    Use it with `verifier_path: DIR` in the semantic cache settings."""
    from rich.progress import Progress

    from kvcellar.models.registry import resolve_model_dir
    from kvcellar.semantic.verifier import TRAINING_FILES, load_pairs, train_verifier

    if not data:
        root = Path(VERIFIER_DATA)
        data = [f for pattern in TRAINING_FILES for f in sorted(root.glob(pattern))]
        if not data:
            console.print(f"[red]error:[/red] no {VERIFIER_DATA}/ here: run from the repository "
                          "root or pass --data FILE")
            raise typer.Exit(2)
    try:
        pairs = load_pairs(data)
        base_dir = resolve_model_dir(base, Settings().model_cache_dir) if base else None
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"training on {len(pairs)} pairs", total=None)
            meta = train_verifier(pairs, out, base_model=base_dir, epochs=epochs, lr=lr, seed=seed,
                                  weight_decay=weight_decay,
                                  progress=lambda step, steps, _loss: bar.update(
                                      task, completed=step, total=steps))
    except (KvcellarError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"trained on {meta['pairs']} pairs from {len(data)} files in "
                  f"{meta['train_s']:.0f} s; loss per epoch "
                  f"{', '.join(f'{x:.3f}' for x in meta['losses'])}; saved to {out}")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


if __name__ == "__main__":
    app()
