"""KV codecs on the real model and real text: size, speed, output quality and disk-hit TTFT.

For every codec (raw, fp16, int8, kivi4, int4-rotated, cachegen, kivi2 at the default KIVI group
of 64 and ``kivi2@192``, groups of 192; ``kivi4+s0`` = kivi4 without the 4 attention-sink tokens
kept in fp16, to show what they buy):

- **size**: frame bytes per token (header and token ids included) and the ratio to fp16, over the
  chunks after a sequence's first (the steady state of a long sequence) and over whole prompts
  (whose first chunk carries the sink tokens in fp16);
- **speed**: encode and decode throughput in MB/s of fp32 KV (the model's dtype), median over
  the chunks (``codecs.encode`` / ``codecs.decode``, checksum included);
- **quality**, against the lossless (raw) cache, on N windows of the texts in
  ``benchmarks/data/`` (original prose written for this project): the first P tokens of a window
  are prefilled, cut into chunks, sent through the codec, loaded back into the model's cache, and
  then
  - *teacher-forced*: the window's true next C tokens are fed in one forward pass; we report the
    agreement of the argmax next-token prediction with the raw cache at each of the C positions
    (N x C predictions) and the change in mean negative log-likelihood of the true tokens
    (nats/token);
  - *free-running greedy*: C greedy tokens from the same start; we report the position-wise match
    rate with the raw cache's greedy continuation, the mean length of the identical prefix, and
    the fraction of prompts whose continuation is identical;
  - *greedy after a new turn*: the same, but F exact tokens (the window's next F, standing for a
    new user turn that is never cached) are prefilled after the loaded KV first: how a cached
    history is used in a chat, and KIVI's own setting (recent tokens in full precision).
  All N prompts run as one batch per pass (same length, no padding), which keeps 7 codecs x 50
  prompts x 64 tokens within minutes on 2 CPU cores;
- **TTFT of a disk-tier hit** through ``LLM(memory_bytes=0, disk_codec=...)``: a ~1k-token prompt
  stored, then served from disk, median of R rounds over all codecs; "warm" = the files are in
  the OS page cache (just read), "cold" = evicted with ``posix_fadvise(DONTNEED)`` before every
  run (the disk is a virtual disk, so "cold" is as cold as this VM gets);
- **break-even bandwidth**: loading h tokens costs bytes / bandwidth + decode time, so a codec
  loads faster than raw frames from any tier slower than (raw bytes - codec bytes) / (codec
  decode time - raw decode time), per token, from the measurements above.

    python benchmarks/codecs.py           # full: 50 prompts of 384 + 1 tokens, 64 continuation
    python benchmarks/codecs.py --quick   # CI smoke: 4 prompts, 16 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import machine
from rich.console import Console
from rich.table import Table

from kvcellar.kv import codecs
from kvcellar.kv.chunk import KVChunk
from kvcellar.llm import LLM

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = HERE / "data"
CODECS = [
    "raw",
    "fp16",
    "int8",
    "kivi4",
    "kivi4+s0",
    "int4-rotated",
    "cachegen",
    "kivi2",
    "kivi2@192",
]
console = Console(width=170)


def parse_spec(spec: str) -> tuple[str, dict]:
    """``NAME[@G][+sN]``: codec NAME, KIVI group size G, N attention-sink tokens kept in fp16."""
    rest, _, sinks = spec.partition("+s")
    base, _, group = rest.partition("@")
    options: dict = {}
    if group:
        options["kivi_group_size"] = int(group)
    if sinks:
        options["codec_sink_tokens"] = int(sinks)
    return base, options


# --- data -------------------------------------------------------------------------------------
def windows(runner, n: int, length: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens, spread evenly over the texts (overlapping if needed)."""
    texts = [runner.encode_text(p.read_text()) for p in sorted(DATA.glob("*.txt"))]
    out: list[list[int]] = []
    per = [n // len(texts) + (i < n % len(texts)) for i in range(len(texts))]
    for ids, k in zip(texts, per, strict=True):
        if k == 0:
            continue
        if len(ids) < length:
            raise SystemExit(f"a text in {DATA} has {len(ids)} tokens, fewer than {length}")
        starts = np.linspace(0, len(ids) - length, k).round().astype(int)
        out += [ids[s : s + length] for s in starts]
    return out


# --- model helpers ------------------------------------------------------------------------------
def batch_cache(runner, kvs: list[torch.Tensor]):
    """A DynamicCache holding a batch of same-length KV tensors [L, 2, H, T, D]."""
    from transformers import DynamicCache

    stacked = torch.stack(kvs)  # [B, L, 2, H, T, D]
    data = [(stacked[:, i, 0], stacked[:, i, 1]) for i in range(runner.num_layers)]
    return DynamicCache(ddp_cache_data=data, config=runner.config)


@torch.inference_mode()
def prefill_kv(runner, prompts: list[list[int]], batch: int) -> list[torch.Tensor]:
    """KV [L, 2, H, P, D] of each prompt, computed without any cache (the lossless reference)."""
    out = []
    for i in range(0, len(prompts), batch):
        part = prompts[i : i + batch]
        cache = runner.new_cache()
        runner.call_model(torch.tensor(part), cache, logits_to_keep=1)
        for b in range(len(part)):
            kv = torch.stack(
                [torch.stack([layer.keys[b], layer.values[b]]) for layer in cache.layers]
            )
            out.append(kv.contiguous())
    return out


@torch.inference_mode()
def teacher_forced(runner, kvs, feed: list[list[int]], batch: int):
    """(argmax [N, C], NLL of the true token [N, C]) after loading ``kvs``.

    ``feed[i]`` = the prompt's last token + the C true continuation tokens; the first C are fed
    in one pass and position j is scored against ``feed[i][j + 1]``.
    """
    arg, logp = [], []
    for i in range(0, len(kvs), batch):
        cache = batch_cache(runner, kvs[i : i + batch])
        ids = torch.tensor(feed[i : i + batch])
        logits = runner.call_model(ids[:, :-1], cache).logits
        lp = torch.log_softmax(logits.float(), dim=-1)
        arg.append(lp.argmax(-1))
        logp.append(-lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1))
    return torch.cat(arg), torch.cat(logp)


@torch.inference_mode()
def greedy(runner, kvs, start: list[list[int]], steps: int, batch: int) -> torch.Tensor:
    """[N, steps] greedy tokens after loading ``kvs`` and feeding ``start[i]`` (same lengths):
    the prompt's last token, or an exact (uncached) new turn ending with it."""
    outs = []
    for i in range(0, len(kvs), batch):
        cache = batch_cache(runner, kvs[i : i + batch])
        tok = torch.tensor(start[i : i + batch])
        got = []
        for _ in range(steps):
            logits = runner.call_model(tok, cache, logits_to_keep=1).logits
            tok = logits[:, -1].argmax(-1, keepdim=True)
            got.append(tok)
        outs.append(torch.cat(got, dim=1))
    return torch.cat(outs)


# --- per-codec measurements -------------------------------------------------------------------
def through_codec(codec, kvs: list[torch.Tensor], prompts, chunk: int):
    """Send each prompt's KV through ``codec`` chunk by chunk; sizes, timings, decoded KV."""
    enc_t, dec_t, sizes, decoded = [], [], [], []
    for kv, ids in zip(kvs, prompts, strict=True):
        parts = []
        for s in range(0, kv.shape[3], chunk):
            c = KVChunk(kv[:, :, :, s : s + chunk].contiguous(), tuple(ids[s : s + chunk]))
            t0 = time.perf_counter()
            frame = codecs.encode(c, codec, start=s)
            t1 = time.perf_counter()
            back = codecs.decode(frame).kv.contiguous()
            t2 = time.perf_counter()
            enc_t.append((c.nbytes, t1 - t0))
            dec_t.append((c.nbytes, t2 - t1))
            sizes.append((len(frame), c.num_tokens, s))
            parts.append(back)
        decoded.append(torch.cat(parts, dim=3))
    return sizes, enc_t, dec_t, decoded


def mbps(samples: list[tuple[int, float]]) -> float:
    return statistics.median(n / t for n, t in samples) / 1e6


def rel_mse(decoded, ref) -> tuple[float, float]:
    """Relative MSE of keys and of values: sum of squared errors / sum of squares around 0."""
    num = torch.zeros(2, dtype=torch.float64)
    den = torch.zeros(2, dtype=torch.float64)
    for d, r in zip(decoded, ref, strict=True):
        for k in (0, 1):
            num[k] += (d[:, k] - r[:, k]).double().pow(2).sum()
            den[k] += r[:, k].double().pow(2).sum()
    return float(num[0] / den[0]), float(num[1] / den[1])


def cachegen_entropy(kvs: list[torch.Tensor], chunk: int) -> dict:
    """zstd's size vs the order-0 entropy of the same symbols: room left for an arithmetic coder."""
    from kvcellar.kv.quant import CacheGenCodec

    cg = CacheGenCodec()
    counts = np.zeros(256, dtype=np.int64)
    zbytes = 0
    import zstandard

    for kv in kvs:
        for s in range(0, kv.shape[3], chunk):
            q = cg.symbols(kv[:, :, :, s : s + chunk])
            sym = torch.cat([q["key_sym"].reshape(-1), q["value_sym"].reshape(-1)]).numpy()
            counts += np.bincount(sym.view(np.uint8), minlength=256)
            zbytes += len(zstandard.ZstdCompressor(level=1).compress(sym.tobytes()))
    p = counts[counts > 0] / counts.sum()
    h = float(-(p * np.log2(p)).sum())
    return {
        "symbols": int(counts.sum()),
        "order0_entropy_bits": h,
        "zstd_bits_per_symbol": float(8 * zbytes / counts.sum()),
    }


def ttft_disk(
    runner, specs: list[str], prompt: list[int], reps: int, chunk: int, root: Path
) -> dict[str, dict]:
    """Median TTFT and load time of a disk-tier hit of ``prompt``, per codec spec.

    One LLM per codec (``memory_bytes=0``, ``disk_codec=...``) stores the prompt first; then the
    runs go round-robin over the codecs (rep by rep, warm then cold), so a change in the machine's
    load during the benchmark does not favour one codec.
    """
    llms, files = {}, {}
    for spec in specs:
        base, options = parse_spec(spec)
        llm = LLM(
            runner=runner,
            memory_bytes=0,
            disk_bytes="4GB",
            disk_path=root / spec,
            disk_codec=base,
            chunk_size=chunk,
            **options,
        )
        llm.generate(prompt, max_tokens=1)  # stores the prompt's chunks
        files[spec] = sorted((root / spec).rglob("*.kvc"))
        for f in files[spec]:  # on disk, so that "cold" runs can drop the pages
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        llms[spec] = llm
    runs: dict[str, dict[str, list]] = {s: {"warm": [], "cold": []} for s in specs}
    for _ in range(reps):
        for mode in ("warm", "cold"):
            for spec in specs:
                for f in files[spec]:
                    if mode == "cold":
                        with f.open("rb") as fh:
                            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    else:
                        f.read_bytes()
                o = llms[spec].generate(prompt, max_tokens=1)
                assert o.cached_tokens > 0 and len(set(o.chunk_codecs)) == 1, o.chunk_codecs
                runs[spec][mode].append((o.ttft_s, o.load_s, o.cached_tokens))
    out = {}
    for spec in specs:
        llms[spec].close()
        res = {
            "cached_tokens": runs[spec]["warm"][0][2],
            "disk_bytes": sum(f.stat().st_size for f in files[spec]),
        }
        for mode in ("warm", "cold"):
            res[f"ttft_{mode}_s"] = statistics.median(x[0] for x in runs[spec][mode])
            res[f"load_{mode}_s"] = statistics.median(x[1] for x in runs[spec][mode])
        out[spec] = res
    return out


def run(args: argparse.Namespace) -> dict:
    llm0 = LLM(memory_bytes=0, disk_bytes=0, threads=args.threads)
    runner = llm0.runner
    P, C = args.prompt_tokens, args.continuation
    F = args.fresh_tokens
    wins = windows(runner, args.prompts, P + max(1 + C, F + 1))
    prompts = [w[:P] for w in wins]  # the cached part of each prompt
    feed = [w[P : P + 1 + C] for w in wins]  # the last prompt token, then C continuation tokens
    last = [[w[P]] for w in wins]
    fresh = [w[P : P + F + 1] for w in wins]  # an exact new turn after the cached part
    t0 = time.perf_counter()
    ref_kv = prefill_kv(runner, prompts, args.batch)
    prefill_s = time.perf_counter() - t0
    console.print(f"prefilled {len(prompts)} x {P} tokens in {prefill_s:.1f} s")
    ttft_prompt = windows(runner, 1, args.ttft_tokens)[0]
    tmp = Path(tempfile.mkdtemp(prefix="kvcellar-codecs-"))

    ref = None
    rows = []
    for name in args.codecs:
        base, options = parse_spec(name)
        codec = codecs.make_codec(base, **options)
        t0 = time.perf_counter()
        sizes, enc_t, dec_t, decoded = through_codec(codec, ref_kv, prompts, args.chunk_size)
        arg, nll = teacher_forced(runner, decoded, feed, args.batch)
        gen = greedy(runner, decoded, last, C, args.batch)
        gen_fresh = greedy(runner, decoded, fresh, C, args.batch)
        if ref is None:
            if name != "raw":
                raise SystemExit("the first codec must be raw (the lossless reference)")
            ref = {"arg": arg, "nll": nll, "gen": gen, "gen_fresh": gen_fresh}
        same = gen == ref["gen"]
        same_fresh = gen_fresh == ref["gen_fresh"]
        diverge = (~same).int().argmax(1).where(~same.all(1), torch.tensor(C))
        # steady state: chunks after a sequence's first (no sink tokens); and whole prompts
        mid = [(b, t) for b, t, start in sizes if start > 0] or [(b, t) for b, t, _ in sizes]
        bytes_tok = sum(b for b, _ in mid) / sum(t for _, t in mid)
        bytes_tok_prompt = sum(b for b, _, _ in sizes) / sum(t for _, t, _ in sizes)
        row = {
            "codec": name,
            "lossless": codec.lossless,
            "bytes_per_token": bytes_tok,
            "bytes_per_token_prompt": bytes_tok_prompt,
            "ratio_vs_fp16": None,
            "ratio_vs_fp16_prompt": None,
            "encode_MBps": mbps(enc_t),
            "decode_MBps": mbps(dec_t),
            "decode_s_per_token": sum(t for _, t in dec_t) / sum(t for _, t, _ in sizes),
            "rel_mse_keys": rel_mse(decoded, ref_kv)[0],
            "rel_mse_values": rel_mse(decoded, ref_kv)[1],
            "tf_argmax_agreement": float((arg == ref["arg"]).float().mean()),
            "nll": float(nll.mean()),
            "delta_nll": float(nll.mean() - ref["nll"].mean()),
            "greedy_match": float(same.float().mean()),
            "greedy_prefix_frac": float(diverge.float().mean() / C),
            "greedy_identical_frac": float(same.all(1).float().mean()),
            "greedy_match_after_fresh": float(same_fresh.float().mean()),
            "greedy_identical_frac_after_fresh": float(same_fresh.all(1).float().mean()),
        }
        rows.append(row)
        console.print(
            f"{name}: {row['bytes_per_token']:.0f} B/token, tf agree "
            f"{row['tf_argmax_agreement']:.3f}, dNLL {row['delta_nll']:+.4f}, greedy "
            f"{row['greedy_match']:.3f}, after {F} exact tokens "
            f"{row['greedy_match_after_fresh']:.3f} ({time.perf_counter() - t0:.0f} s)"
        )
    t0 = time.perf_counter()
    ttft = ttft_disk(runner, args.codecs, ttft_prompt, args.ttft_reps, args.chunk_size, tmp)
    console.print(f"TTFT of disk hits, {args.ttft_reps} rounds: {time.perf_counter() - t0:.0f} s")
    fp16 = next((r for r in rows if r["codec"] == "fp16"), None)
    raw = rows[0]
    for r in rows:
        r["ttft"] = ttft[r["codec"]]
        if fp16:
            r["ratio_vs_fp16"] = fp16["bytes_per_token"] / r["bytes_per_token"]
            r["ratio_vs_fp16_prompt"] = fp16["bytes_per_token_prompt"] / r["bytes_per_token_prompt"]
        # Loading h tokens costs bytes / bandwidth + decode time; the codec beats raw frames on
        # tiers slower than this (e.g. a network link to Redis; None: never loses).
        extra_decode = r["decode_s_per_token"] - raw["decode_s_per_token"]
        saved = raw["bytes_per_token"] - r["bytes_per_token"]
        r["breakeven_GBps"] = saved / extra_decode / 1e9 if extra_decode > 0 and saved > 0 else None
    extra = {}
    if "cachegen" in args.codecs:
        extra["cachegen_entropy"] = cachegen_entropy(ref_kv[: min(8, len(ref_kv))], args.chunk_size)
    llm0.close()
    return {
        "rows": rows,
        "prompts": len(prompts),
        "prompt_tokens": P,
        "continuation_tokens": C,
        "fresh_tokens": F,
        "ttft_prompt_tokens": len(ttft_prompt),
        "reference_prefill_s": prefill_s,
        "bytes_per_token_fp32": runner.bytes_per_token,
        **extra,
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    names = [r["codec"] for r in rows]
    x = np.arange(len(names))
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.4))
    ratio = [r["ratio_vs_fp16"] for r in rows]
    a.bar(x, ratio, color="tab:blue")
    for i, v in enumerate(ratio):
        a.annotate(f"{v:.2f}x", (i, v), ha="center", va="bottom", fontsize=8)
    a.set_ylabel("x smaller than fp16 (frame bytes, chunks after the first)")
    a.set_title("size")
    agree = [100 * r["tf_argmax_agreement"] for r in rows]
    b.bar(x, agree, color="tab:green")
    for i, r in enumerate(rows):
        b.annotate(
            f"{agree[i]:.1f}%\ndNLL\n{r['delta_nll']:+.3f}",
            (i, agree[i]),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    b.axhline(95, color="grey", ls=":", lw=1)
    b.set_ylim(min(agree) - 8, 113)
    b.set_ylabel("next-token agreement with lossless cache (%)")
    b.set_title(f"quality ({res['prompts']} prompts x {res['continuation_tokens']} positions)")
    for mode, off, col in (("warm", -0.2, "tab:orange"), ("cold", 0.2, "tab:red")):
        ttft = [1000 * r["ttft"][f"ttft_{mode}_s"] for r in rows]
        load = [1000 * r["ttft"][f"load_{mode}_s"] for r in rows]
        label = "page cache warm" if mode == "warm" else "page cache dropped"
        c.bar(x + off, ttft, 0.4, color=col, alpha=0.45, label=f"TTFT, {label}")
        c.bar(x + off, load, 0.4, color=col, label=f"of which load, {label}")
    c.set_ylabel("ms")
    c.set_title(f"disk-tier hit, {res['ttft_prompt_tokens']}-token prompt (median)")
    top = max(1000 * r["ttft"][f"ttft_{m}_s"] for r in rows for m in ("warm", "cold"))
    c.set_ylim(0, 1.5 * top)
    c.legend(fontsize=7, loc="upper left", ncol=2)
    for ax in (a, b, c):
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("KV codecs, SmolLM2-135M fp32 on CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small CI smoke run")
    p.add_argument(
        "--codecs",
        nargs="+",
        default=CODECS,
        help="codecs as NAME[@G][+sN]: KIVI group size G (default 64), N sink tokens kept in "
        "fp16 (default 4); raw must come first",
    )
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--prompt-tokens", type=int, default=384, help="cached prefix length")
    p.add_argument("--continuation", type=int, default=64, help="scored / generated tokens")
    p.add_argument(
        "--fresh-tokens",
        type=int,
        default=64,
        help="exact (uncached) tokens fed after the cached part before the second greedy run",
    )
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=25, help="prompts per forward pass")
    p.add_argument("--ttft-tokens", type=int, default=1025, help="prompt of the TTFT runs")
    p.add_argument("--ttft-reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.prompts, args.prompt_tokens, args.continuation = 4, 256, 16
        args.fresh_tokens = 16
        args.ttft_tokens, args.ttft_reps = 257, 1
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    res = run(args)
    res["wall_s"] = time.perf_counter() - t0
    table = Table(
        title=f"KV codecs: {res['prompts']} prompts x {res['prompt_tokens']} cached tokens, "
        f"{res['continuation_tokens']} scored/generated, chunk {args.chunk_size}"
    )
    for col in (
        "codec",
        "B/token",
        "x vs fp16",
        "x, whole prompt",
        "enc MB/s",
        "dec MB/s",
        "next-tok agree",
        "dNLL",
        "greedy match",
        "identical prefix",
        "greedy after new turn",
        "TTFT warm",
        "TTFT cold",
        "load cold",
        "beats raw below",
    ):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        table.add_row(
            r["codec"],
            f"{r['bytes_per_token']:.0f}",
            f"{r['ratio_vs_fp16']:.2f}x" if r["ratio_vs_fp16"] else "-",
            f"{r['ratio_vs_fp16_prompt']:.2f}x" if r["ratio_vs_fp16_prompt"] else "-",
            f"{r['encode_MBps']:.0f}",
            f"{r['decode_MBps']:.0f}",
            f"{100 * r['tf_argmax_agreement']:.1f}%",
            f"{r['delta_nll']:+.4f}",
            f"{100 * r['greedy_match']:.1f}%",
            f"{100 * r['greedy_prefix_frac']:.1f}%",
            f"{100 * r['greedy_match_after_fresh']:.1f}%",
            f"{1000 * r['ttft']['ttft_warm_s']:.0f} ms",
            f"{1000 * r['ttft']['ttft_cold_s']:.0f} ms",
            f"{1000 * r['ttft']['load_cold_s']:.0f} ms",
            f"{r['breakeven_GBps']:.2f} GB/s" if r["breakeven_GBps"] else "-",
        )
    console.print(table)
    if "cachegen_entropy" in res:
        console.print({"cachegen_entropy": res["cachegen_entropy"]})
    name = args.out or RESULTS / f"codecs{'_quick' if args.quick else ''}.json"
    name.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "codecs",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        **res,
    }
    name.write_text(json.dumps(payload, indent=2))
    plot(res, name.with_suffix(".png"))
    console.print(f"wrote {name} and {name.with_suffix('.png')} in {res['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
