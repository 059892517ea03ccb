"""Checkpoint merge benchmark: streaming merges of sharded safetensors checkpoints.

Run from the repository root::

    .venv/bin/python bench/checkpoint_merge_bench.py            # ~2-3 min on 2 idle cores

It writes ``bench/results/checkpoint_merge_bench.json`` (``--out`` to change). Two
cases, each measured in a fresh subprocess whose peak RSS is sampled every 2 ms
by a thread (``peak_rss_over_baseline_bytes``: the highest sample minus the RSS
after importing torch, transformers, peft, safetensors and edgerep):

* ``adapter``: a Llama-shaped checkpoint (TinyLlama-1.1B shape by default:
  hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 KV heads, vocabulary
  32000; random bf16 weights, written as safetensors shards of ``--shard-mb``)
  and a LoRA adapter (r=16, alpha 32, random nonzero A and B) on every linear
  layer; ``edgerep.merge._checkpoint.merge_adapter_checkpoint``. Correctness: for
  a sample of merged tensors, the output must be the bf16 value nearest the exact
  float64 ``W + s·B·A`` (bit for bit), and its error is compared with the bf16
  arithmetic ``W + (B·A)·s`` PEFT's ``merge_and_unload`` does on a bf16 model.
* ``models``: TIES (density 0.5) and DARE-TIES (density 0.5) merges of three
  BERT-base-shaped float32 checkpoints (random base, each model = base + noise)
  with ``merge_checkpoints``; its peak RSS is compared with the largest input shard.
  ``--previous SRC_DIR`` also runs the models case with the ``edgerep`` package under
  SRC_DIR (e.g. an older checkout, ``git archive``'d), interleaved in the same run,
  and checks that both write the same bytes.

The checkpoints are generated once into ``--work`` (default
``/tmp/edgerep-checkpoint-bench``; about 2.5 GB for the Llama, 2 GB for the BERTs)
and reused; nothing is downloaded. ``--small`` runs a ~100M-parameter Llama instead
(for a quick check).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

from _args import positive_int
from _merge_common import bert_base, busy_note, machine, run_worker
from _rss import PeakRss as _PeakRss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


def _save_shards(path: Path, tensors: Any, shard_bytes: int) -> None:
    """Write (name, tensor) pairs as safetensors shards of about `shard_bytes` + an index.

    Each shard is written as soon as it is full (memory holds one shard), under a
    temporary name renamed once the number of shards is known.
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    part: dict[str, Any] = {}
    size, parts, total = 0, [], 0
    names: list[list[str]] = []

    def flush() -> None:
        nonlocal part, size
        tmp = path / f"part-{len(parts)}.tmp"
        save_file(part, str(tmp), metadata={"format": "pt"})
        parts.append(tmp)
        names.append(list(part))
        part, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if part and size + nbytes > shard_bytes:
            flush()
        part[name] = t
        size += nbytes
        total += nbytes
    if part:
        flush()
    weight_map = {}
    for i, (tmp, keys) in enumerate(zip(parts, names)):
        fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        tmp.rename(path / fname)
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _llama_tensors(cfg: dict[str, int], gen: Any) -> Any:
    import torch

    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]

    def rnd(*shape: int) -> Any:
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    yield "model.embed_tokens.weight", rnd(v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
        for name, shape in (
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (i, h)),
            ("mlp.up_proj", (i, h)),
            ("mlp.down_proj", (h, i)),
        ):
            yield p + name + ".weight", rnd(*shape)
        yield p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
    yield "model.norm.weight", torch.ones(h, dtype=torch.bfloat16)
    yield "lm_head.weight", rnd(v, h)


def _make_llama(root: Path, size: str, shard_mb: int, rank: int) -> tuple[Path, Path, int]:
    import torch
    import transformers
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = LLAMA[size]
    base, adapter = root / f"llama-{size}-{shard_mb}mb", root / f"llama-{size}-lora{rank}"
    marker = base / "complete"
    if not marker.exists():
        gen = torch.Generator().manual_seed(0)
        _save_shards(base, _llama_tensors(cfg, gen), shard_mb << 20)
        config = transformers.LlamaConfig(**cfg, tie_word_embeddings=False, dtype="bfloat16")
        config.save_pretrained(base)
        marker.write_text("ok")
    if not (adapter / "adapter_model.safetensors").exists():
        gen = torch.Generator().manual_seed(1)
        tensors = {}
        from safetensors import safe_open

        index = json.loads((base / "model.safetensors.index.json").read_text())
        for key, fname in index["weight_map"].items():
            module = key.removesuffix(".weight")
            if not module.endswith(tuple(TARGETS)):
                continue
            with safe_open(str(base / fname), framework="pt") as f:
                out_f, in_f = f.get_slice(key).get_shape()
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, in_f, generator=gen) / in_f**0.5
            ).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(out_f, rank, generator=gen) * 0.01
            ).to(torch.bfloat16)
        adapter.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS).save_pretrained(adapter)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    params = index["metadata"]["total_size"] // 2
    return base, adapter, params


def _make_berts(root: Path, shard_mb: int) -> list[Path]:
    import torch
    import transformers

    paths = [root / f"bert-{n}" for n in ("base", "a", "b", "c")]
    if all((p / "complete").exists() for p in paths):
        return paths
    base = bert_base(0).state_dict()
    gen = torch.Generator().manual_seed(1)
    for n, p in enumerate(paths):
        if n == 0:
            items = list(base.items())
        else:
            items = [
                (k, v + torch.randn(v.shape, generator=gen) * 0.01 if v.is_floating_point() else v)
                for k, v in base.items()
            ]
        _save_shards(p, ((k, v.contiguous()) for k, v in items), shard_mb << 20)
        transformers.BertConfig().save_pretrained(p)
        (p / "complete").write_text("ok")
    return paths


def _imports() -> None:
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from edgerep.merge import _checkpoint  # noqa: F401


def _worker_adapter(base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    import shutil

    _imports()
    import torch
    from safetensors import safe_open

    from edgerep.fold.probe import round_to
    from edgerep.merge._checkpoint import merge_adapter_checkpoint

    shutil.rmtree(out, ignore_errors=True)
    with _PeakRss() as mem:
        start = time.perf_counter()
        report = merge_adapter_checkpoint(base, adapter, out)
        seconds = time.perf_counter() - start
    # correctness on a sample of layers
    index = json.loads((base / "model.safetensors.index.json").read_text())
    lora = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            lora[k] = f.get_tensor(k)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    sample = [r.key for r in report.merged][:: max(1, len(report.merged) // 6)]
    checks = []
    for module in sample:
        key = module + ".weight"
        with safe_open(str(base / index["weight_map"][key]), framework="pt") as f:
            w = f.get_tensor(key)
        with safe_open(str(out / index["weight_map"][key]), framework="pt") as f:
            ours = f.get_tensor(key)
        a = lora[f"base_model.model.{module}.lora_A.weight"]
        b = lora[f"base_model.model.{module}.lora_B.weight"]
        exact = w.double() + (b.double() @ a.double()) * scale
        peft_bf16 = w + (b @ a) * scale  # what merge_and_unload computes on a bf16 model
        err_ours = (ours.double() - exact).abs()
        err_peft = (peft_bf16.double() - exact).abs()
        checks.append(
            {
                "tensor": key,
                "nearest_bf16_bit_for_bit": bool(
                    torch.equal(ours, round_to(exact, torch.bfloat16))
                ),
                "ours_max_abs_error": err_ours.max().item(),
                "peft_bf16_max_abs_error": err_peft.max().item(),
                "ours_never_farther_than_peft": bool((err_ours <= err_peft).all()),
            }
        )
    return {
        "seconds": seconds,
        "rss_baseline_bytes": mem.start,
        "peak_rss_over_baseline_bytes": mem.peak - mem.start,
        "layers_merged": len(report.merged),
        "routes": report.routes,
        "max_rel_error_float64": report.max_error,
        "shards": report.shards,
        "largest_shard_bytes": max(p.stat().st_size for p in base.glob("*.safetensors")),
        "checks": checks,
    }


def _worker_models(paths: list[Path], out: Path, method: str) -> dict[str, Any]:
    import shutil

    _imports()
    import edgerep
    from edgerep.merge._checkpoint import merge_checkpoints

    shutil.rmtree(out, ignore_errors=True)
    with _PeakRss() as mem:
        start = time.perf_counter()
        report = merge_checkpoints(
            paths[0], paths[1:], out, method=method, density=0.5, weights=[0.5, 0.3, 0.2], seed=0
        )
        seconds = time.perf_counter() - start
    conflicts = [r.sign_conflicts for r in report.merged if r.sign_conflicts is not None]
    kept = [r.density_kept for r in report.merged if r.density_kept is not None]
    return {
        "method": method,
        "seconds": seconds,
        "peak_rss_over_baseline_bytes": mem.peak - mem.start,
        "tensors_merged": len(report.merged),
        "mean_sign_conflicts": sum(conflicts) / len(conflicts),
        "mean_density_kept": sum(kept) / len(kept),
        "output_sha256": _digest(out),
        "edgerep": str(Path(edgerep.__file__).parent),
    }


def _run(args: list[str], pythonpath: str | None = None) -> dict[str, Any]:
    return run_worker(__file__, args, None if pythonpath is None else {"PYTHONPATH": pythonpath})


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(path.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/checkpoint_merge_bench.json")
    parser.add_argument("--work", default="/tmp/edgerep-checkpoint-bench")
    parser.add_argument("--small", action="store_true", help="a ~100M-parameter Llama")
    parser.add_argument("--shard-mb", type=positive_int, default=1000)
    parser.add_argument("--rank", type=positive_int, default=16)
    parser.add_argument("--prepare", action="store_true", help="only generate the checkpoints")
    parser.add_argument(
        "--previous",
        metavar="SRC_DIR",
        help="also run the models case with the edgerep package under SRC_DIR, interleaved",
    )
    parser.add_argument(
        "--worker", choices=["adapter", "ties", "dare_ties"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    work = Path(args.work)
    size = "small" if args.small else "1b"
    if args.worker == "adapter":
        base, adapter, _ = _make_llama(work, size, args.shard_mb, args.rank)
        print(json.dumps(_worker_adapter(base, adapter, work / "merged-llama")))
        return
    if args.worker:
        print(json.dumps(_worker_models(_make_berts(work, 200), work / "merged-bert", args.worker)))
        return
    start = time.perf_counter()
    _, _, params = _make_llama(work, size, args.shard_mb, args.rank)
    _make_berts(work, 200)
    prepared = time.perf_counter() - start
    if args.prepare:
        print(f"prepared in {prepared:.0f} s")
        return
    load_before = os.getloadavg()
    common = ["--work", str(work), "--shard-mb", str(args.shard_mb), "--rank", str(args.rank)]
    common += ["--small"] if args.small else []
    adapter = _run(["--worker", "adapter", *common])
    models, previous = [], []
    for m in ("ties", "dare_ties"):
        models.append(_run(["--worker", m, *common]))
        if args.previous:
            previous.append(_run(["--worker", m, *common], pythonpath=args.previous))
    load_after = os.getloadavg()
    berts = _make_berts(work, 200)
    largest_bert_shard = max(p.stat().st_size for p in berts[0].glob("*.safetensors"))
    inputs_bytes = sum(p.stat().st_size for b in berts for p in b.glob("*.safetensors"))
    notes = [
        "peak_rss_over_baseline counts everything the merge added to a process that had already "
        "imported torch, transformers, peft, safetensors and edgerep, including mapped pages of "
        "the input shards that were read (file-backed, reclaimable)",
        "adapter case: shards are written tensor by tensor and inputs unmapped after each "
        "shard, so memory holds about one tensor in float64 (plus PEFT's float64 copy of it), "
        "not one shard",
        "models case: tensors over 2 x 2^18 entries are merged in row chunks of about 2^18 "
        "entries (inputs unmapped between chunks); TIES also holds one float32 copy of one "
        "delta's magnitudes while its threshold is found (the word embeddings: 94 MB)",
    ]
    notes += busy_note(load_before, load_after)
    record = {
        "bench": "checkpoint_merge_bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(load_before, load_after),
        "adapter_case": {
            "model": f"Llama-shaped {LLAMA[size]}, random bf16, shards of {args.shard_mb} MB",
            "params": params,
            "lora": {"r": args.rank, "alpha": 2 * args.rank, "targets": TARGETS},
            **adapter,
        },
        "models_case": {
            "model": "3 BERT-base-shaped float32 checkpoints (base + N(0, 0.01) noise), "
            "weights 0.5,0.3,0.2, density 0.5, seed 0, shards of 200 MB",
            "runs": models,
            "largest_shard_bytes": largest_bert_shard,
            "inputs_bytes": inputs_bytes,
            **(
                {"previous_implementation": {"src": args.previous, "runs": previous}}
                if args.previous
                else {}
            ),
        },
        "targets": {
            "adapter_seconds": 60,
            "adapter_peak_rss_over_baseline_bytes": 2 << 30,
            "models_seconds": 30,
        },
        "meets_targets": {
            "adapter_seconds": adapter["seconds"] <= 60,
            "adapter_peak_rss": adapter["peak_rss_over_baseline_bytes"] <= 2 << 30,
            "adapter_nearest_bf16": all(c["nearest_bf16_bit_for_bit"] for c in adapter["checks"]),
            "models_seconds": all(m["seconds"] <= 30 for m in models),
            "models_peak_rss_le_largest_shard": all(
                m["peak_rss_over_baseline_bytes"] <= largest_bert_shard for m in models
            ),
            **(
                {
                    "models_same_bytes_as_previous": all(
                        a["output_sha256"] == b["output_sha256"] for a, b in zip(models, previous)
                    )
                }
                if args.previous
                else {}
            ),
        },
        "notes": notes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"adapter merge ({params / 1e9:.2f} B params): {adapter['seconds']:.1f} s, peak RSS +"
        f"{adapter['peak_rss_over_baseline_bytes'] / 2**20:.0f} MiB; "
        + "; ".join(
            f"{m['method']}: {m['seconds']:.1f} s, +{m['peak_rss_over_baseline_bytes'] / 2**20:.0f} MiB"
            for m in models
        )
        + f"\n-> {out}"
    )


if __name__ == "__main__":
    main()
