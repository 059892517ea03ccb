"""``python -m edgerep.demo``: train, fold, export, verify and time a small net, offline.

The demo trains `edgerep.zoo.demo_net` (RepVGG, ACNet, DBB and MobileOne blocks)
on scikit-learn's bundled digits (upsampled to 32x32) for a few seconds,
fine-tunes LoRA adapters (PEFT) on two of its layers for a couple of seconds and
merges them back into plain layers with `edgerep.merge`, folds it, exports the folded and the unfolded model to ONNX through
`edgerep.pipeline.convert` (each verified against the original model through
onnxruntime), and prints one row per variant: parameters, FLOPs, test accuracy
and batch-1 latency. It needs ``pip install 'edgerep[demo]'`` and no network.

Everything is written under ``--out`` (default ``edgerep-demo-out`` in the current
directory, which the repository's ``.gitignore`` ignores), replaced only once the new
run has succeeded; the paths recorded in it (``bench/bench.json``) are the final ones:

- ``folded/`` and ``unfolded/``: the two ONNX bundles (manifest, report, model);
- ``folded-quantized/`` with ``--quantize MODE``: the folded bundle plus the
  quantized variant each backend chose (`edgerep.quantize.quantize_bundle`:
  calibrated on training digits, kept only when at least 1.15x faster than float
  and within one point of top-1 on the test digits; the report says why not);
- ``pruned/`` with ``--prune TARGET`` (e.g. ``latency=0.6``): `edgerep convert --prune`
  of the trained model (folded, channels pruned to the target measured on onnxruntime,
  recovered by least squares on 256 training digits, no fine-tuning), its ONNX
  verified against the pruned model, its accuracy loss in the ledger; with
  ``--quantize MODE`` also ``pruned-quantized/`` (the same quantize step on it);
- ``demo_net.pt``: the trained weights (a state dict);
- ``demo.json``: the table, the errors and the fold report, machine-readable;
- ``summary.txt``: what the demo printed;
- ``bench/`` and ``digits_test.npz``: the `edgerep bench` report over every backend
  here (``bench.json``, ``bench.md``, ``bench.html``) and the held-out digits it ran on.

An existing ``--out`` is replaced only if it holds a previous demo's
``demo.json``, so a mistyped path cannot delete an unrelated directory.

Threads: torch and onnxruntime both use ``--threads`` intra-op threads (default
1). On a busy machine more threads than idle cores make small kernels much
slower (the threads wait on each other), and a 90k-parameter net at batch 1
gains little from more threads anyway; the torch setting is restored on return.

Exit codes are those of the ``edgerep`` command (`edgerep.cli`): 0 on success,
2 for a bad option or a missing package, 4 when a folded model does not match
the original, 5 when an export fails, 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, EdgerepError, VerificationError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from edgerep.bench import LatencyStats
    from edgerep.fold.report import FoldReport

__all__ = ["DEFAULT_OUT", "VARIANTS", "main"]

DEFAULT_OUT = "edgerep-demo-out"
#: the table's rows, in order
VARIANTS = ("torch unfolded", "torch folded", "onnxruntime unfolded", "onnxruntime folded")
_MARKER = "demo.json"
_IMAGE_SIZE = 32
# the layers the demo's LoRA step adapts: the last RepVGG block's 3x3 conv and the classifier
_LORA_TARGETS = r"5\.conv_kxk\.conv|6\.2"
# float32 folded vs unfolded: the same gate as ONNX fp32 parity (fraction of max |reference|)
_FLOAT32_REL_TOL = 1e-4


@dataclass(frozen=True)
class _Row:
    variant: str
    params: int
    flops: int
    accuracy: float
    latency: LatencyStats

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latency": self.latency.to_dict()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edgerep.demo",
        description=(
            "Train a small re-parameterizable net on the bundled digits data, fold it, export "
            "folded and unfolded models to ONNX, verify them and compare them."
        ),
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument(
        "--seconds", type=float, default=8.0, help="training time budget in seconds (default 8)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of init, data split and shuffling")
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime"
    )
    p.add_argument(
        "--no-bench",
        action="store_true",
        help="skip the final edgerep bench report over every backend",
    )
    p.add_argument(
        "--lora-seconds",
        type=float,
        default=2.0,
        help="LoRA fine-tune budget in seconds before merging (0 skips the step; default 2)",
    )
    p.add_argument(
        "--quantize",
        metavar="MODE",
        help="also quantize the folded ONNX model (int8, int8-dynamic or fp16) with "
        "`edgerep quantize`: calibrated on training digits, kept only if faster and within "
        "one point of top-1 on the test digits",
    )
    p.add_argument(
        "--prune",
        metavar="TARGET",
        help="also prune the folded model (e.g. latency=0.6: 60%% of the unpruned p50 on "
        "onnxruntime, measured) with `edgerep convert --prune`; with --quantize, the pruned "
        "model is quantized too",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=0.5,
        help="timed seconds per variant for the latency columns (default 0.5)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="also show other libraries' warnings (torchao's kernels, torch's deprecations)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    args = _parser().parse_args(argv)
    from edgerep._quiet import quiet_third_party

    try:
        _check_args(args)
        with quiet_third_party(args.verbose):
            _run_args(args)
    except EdgerepError as e:
        from edgerep.cli import exit_code_for

        print(f"edgerep demo failed: {e}", file=sys.stderr)
        return exit_code_for(e)
    except Exception as e:
        traceback.print_exc()
        print(
            f"edgerep demo failed unexpectedly ({type(e).__name__}: {e}); this is a bug, "
            "please report the traceback above",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_args(args: argparse.Namespace) -> None:
    _run(
        Path(args.out),
        seconds=args.seconds,
        seed=args.seed,
        threads=args.threads,
        latency_seconds=args.latency_seconds,
        lora_seconds=args.lora_seconds,
        bench=not args.no_bench,
        quantize=args.quantize,
        prune=args.prune,
    )


def _check_args(args: argparse.Namespace) -> None:
    if not args.seconds > 0:
        raise ConfigError(f"--seconds must be a positive training budget; got {args.seconds}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1; got {args.threads}")
    if args.lora_seconds < 0:
        raise ConfigError(f"--lora-seconds must be >= 0; got {args.lora_seconds}")
    if args.latency_seconds < 0:
        raise ConfigError(f"--latency-seconds must be >= 0; got {args.latency_seconds}")
    if args.quantize is not None:
        from edgerep.quantize import MODES

        if args.quantize not in MODES:
            raise ConfigError(
                f"--quantize {args.quantize!r} is not a mode; choose one of {', '.join(MODES)}"
            )
    if args.prune is not None:
        from edgerep.prune import parse_target

        parse_target(args.prune)
    out = Path(args.out).expanduser()
    if out.exists() and not (out.is_dir() and (out / _MARKER).is_file()):
        raise ConfigError(
            f"--out {str(out)!r} exists and is not the output of an earlier demo (no {_MARKER} "
            "in it); choose a new directory or remove it"
        )


@contextlib.contextmanager
def _demo_environment(threads: int) -> Iterator[None]:
    """torch threads set and torch's log chatter (shape specialization notes) silenced,
    both restored afterwards."""
    import torch

    torch_logger = logging.getLogger("torch")
    old_level, old_threads = torch_logger.level, torch.get_num_threads()
    torch_logger.setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch_logger.setLevel(old_level)


def _lora_step(
    model: torch.nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    seconds: float,
    seed: int,
    say: Callable[[str], None],
) -> torch.nn.Module:
    """Fine-tune LoRA adapters (PEFT) on two layers, then merge them with `edgerep.merge`."""
    try:
        import peft
    except ImportError as e:
        from edgerep.errors import MissingDependencyError

        raise MissingDependencyError("peft", "demo", "the demo's LoRA fine-tune step") from e
    from edgerep.merge import merge
    from edgerep.zoo import accuracy, train_classifier

    before = accuracy(model, x_test, y_test)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=_LORA_TARGETS)
    tuned = peft.get_peft_model(model, config)
    start = time.perf_counter()
    train_classifier(
        tuned,
        x_train,
        y_train,
        epochs=10_000,
        lr=1e-3,
        batch_size=64,
        seed=seed + 1,
        max_seconds=seconds,
    )
    tuned.eval()
    after = accuracy(tuned, x_test, y_test)
    merged, report = merge(tuned)
    merged_acc = accuracy(merged, x_test, y_test)
    say(
        f"LoRA fine-tune (PEFT, r=4 on {len(report.merged)} layers) for "
        f"{time.perf_counter() - start:.1f} s: test accuracy {before:.2%} -> {after:.2%}; "
        f"merged into plain layers by edgerep.merge (max error {report.max_error:.1e} "
        f"relative, float64); merged accuracy {merged_acc:.2%}"
    )
    if report.kept:
        say("  kept: " + "; ".join(f"{k.path}: {k.reason}" for k in report.kept))
    return merged


def _quantize_step(
    tmp: Path,
    folded: tuple[Any, Any, Any],
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    mode: str,
    latency_seconds: float,
    seed: int,
    say: Callable[[str], None],
    name: str = "folded",
) -> Path | None:
    """`edgerep quantize` on the `name` bundle: every backend here that quantizes, the
    fastest variant within one point of top-1; returns the ONNX variant chosen, if any."""
    from edgerep.bench.latency import LatencyConfig
    from edgerep.quantize import default_backends, quantize_bundle

    data = _digits_calibration(x_train, x_test, y_test, seed)
    config = LatencyConfig(
        warmup_iters=5,
        warmup_seconds=0.05,
        min_iters=30,
        min_seconds=max(latency_seconds, 0.05),
        repeats=3,
    )
    _, report = quantize_bundle(
        tmp / name,
        tmp / f"{name}-quantized",
        data=data,
        backends=default_backends(mode, ("onnx", "openvino", "executorch"), with_model=True),
        mode=mode,
        latency_config=config,
        model=folded,
    )
    say("")
    say(report.to_text())
    chosen = next((b for b in report.backends if b.backend == "onnxruntime"), None)
    if chosen is None or chosen.artifact is None:
        return None
    return tmp / f"{name}-quantized" / chosen.artifact


def _digits_calibration(
    x_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, seed: int
) -> Any:
    """256 training digits to calibrate on, the test digits to judge on."""
    import numpy as np

    from edgerep.quantize import CalibrationData

    picks = np.random.default_rng(seed).permutation(len(x_train))[:256]
    return CalibrationData(
        calib=[{"x": x_train[i : i + 1].numpy()} for i in picks],
        eval_feeds={"x": x_test.numpy()},
        labels=y_test.numpy(),
        source="digits: 256 training images (calibration), the test images (evaluation)",
    )


def _prune_step(
    tmp: Path,
    model: torch.nn.Module,
    specs: list[Any],
    source: dict[str, Any],
    data: Any,
    target: str,
    seed: int,
    threads: int,
    say: Callable[[str], None],
) -> Any:
    """`edgerep convert --prune TARGET` into ``pruned/``; the convert result, or None when
    the pruned model was measured slower than the unpruned one (refused, said why)."""
    from edgerep.pipeline import convert
    from edgerep.prune import PruneRefusedError
    from edgerep.prune._stage import PruneOptions

    options = PruneOptions(target=target, data=data, threads=threads)
    try:
        _, result = convert(
            model,
            specs,
            # the formats of the folded bundle, so that the bench compares every backend
            to=("onnx", "openvino", "executorch"),
            out_dir=tmp / "pruned",
            seed=seed,
            source=source,
            prune=options,
        )
    except PruneRefusedError as e:
        say("")
        say(f"pruning refused: {e}")
        return None
    say("")
    say("prune (convert --prune):")
    assert result.prune is not None  # convert ran the prune stage
    say(result.prune.to_text())
    return result


def _bench_step(
    tmp: Path,
    folded: Path,
    out: Path,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    threads: int,
    latency_seconds: float,
    say: Callable[[str], None],
    pruned: Path | None = None,
) -> None:
    """`edgerep bench` on both bundles (and the pruned one): every backend that runs here, p50/p99, held-out
    accuracy and % of the measured GEMM peak in one table, plus the HTML report."""
    import numpy as np

    from edgerep.bench.latency import LatencyConfig
    from edgerep.bench.report import markdown_table, write_report
    from edgerep.bench.suite import run_bench

    data = tmp / "digits_test.npz"
    np.savez(data, x=x_test.numpy(), y=y_test.numpy())
    config = LatencyConfig(
        warmup_iters=5, warmup_seconds=0.05, min_iters=30, min_seconds=latency_seconds, repeats=3
    )
    report = run_bench(
        [f"unfolded={tmp / 'unfolded'}", f"folded={folded}"]
        + ([f"pruned={pruned}"] if pruned is not None else []),
        data=str(data),
        config=config,
        threads=threads,
    )
    # the report is written inside the temporary directory that becomes `out`: it must
    # name the paths the files will have, not the temporary ones that will be gone
    paths = write_report(_relocated(report, tmp, out.resolve()), tmp / "bench")
    say("")
    say("bench (every backend that runs here; accuracy on the held-out digits):")
    say(markdown_table(report))
    say(f"bench report: {out / paths['html'].relative_to(tmp)}")


def _relocated(value: Any, tmp: Path, out: Path) -> Any:
    """`value` (a JSON tree) with every path under `tmp` moved under `out`."""
    if isinstance(value, str):
        prefix = str(tmp)
        if value == prefix or value.startswith(prefix + "/"):
            return str(out) + value[len(prefix) :]
        return value
    if isinstance(value, Mapping):
        return {k: _relocated(v, tmp, out) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_relocated(v, tmp, out) for v in value]
    return value


def _run(
    out: Path,
    *,
    seconds: float,
    seed: int,
    threads: int,
    latency_seconds: float,
    lora_seconds: float = 2.0,
    bench: bool = True,
    quantize: str | None = None,
    prune: str | None = None,
) -> None:
    """The demo; prints as it goes and keeps what it printed for ``summary.txt``."""
    import torch

    from edgerep.bundle import atomic_output_dir
    from edgerep.fold import fold
    from edgerep.pipeline import convert
    from edgerep.spec import parse_input_spec
    from edgerep.zoo import accuracy, demo_net, load_digits_tensors, train_classifier

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    with _demo_environment(threads), atomic_output_dir(out, overwrite=True) as tmp:
        start = time.perf_counter()
        x_train, y_train, x_test, y_test = load_digits_tensors(_IMAGE_SIZE, seed=seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = demo_net(num_classes=10, in_channels=1)
        train_start = time.perf_counter()
        train_classifier(
            model,
            x_train,
            y_train,
            epochs=10_000,
            lr=3e-3,
            batch_size=64,
            seed=seed,
            max_seconds=seconds,
        )
        train_seconds = time.perf_counter() - train_start
        say(
            f"trained demo_net on {len(x_train)} digits ({_IMAGE_SIZE}x{_IMAGE_SIZE}) for "
            f"{train_seconds:.1f} s; test set: {len(x_test)} images; threads: {threads}"
        )
        if lora_seconds > 0:
            model = _lora_step(  # type: ignore[assignment]
                model, x_train, y_train, x_test, y_test, lora_seconds, seed, say
            )
        torch.save(model.state_dict(), tmp / "demo_net.pt")

        example = x_test[:1]
        folded, report = fold(model, example)
        say("")
        say("fold report:")
        say(report.to_text())

        specs = [parse_input_spec(f"x:N[1..1..8]x1x{_IMAGE_SIZE}x{_IMAGE_SIZE}")]
        source = {
            "kind": "edgerep-demo",
            "path": "edgerep.zoo",
            "factory": "demo_net",
            "weights": "../demo_net.pt (trained by python -m edgerep.demo)",
        }
        bundles: dict[str, Path] = {}
        say("")
        for name, do_fold in (("unfolded", False), ("folded", True)):
            bundle, result = convert(
                model,
                specs,
                # the folded model also goes to every other format that runs here, so the
                # bench report below compares the backends
                to=("onnx", "openvino", "executorch") if do_fold else ("onnx",),
                out_dir=tmp / name,
                fold=do_fold,
                seed=seed,
                source=source,
            )
            status = result.formats[0]
            if status.file is None:
                raise VerificationError(f"the {name} ONNX bundle names no model file")
            bundles[name] = bundle / status.file
            worst = max(p.max_rel_error for p in status.parity)
            say(
                f"exported the {name} model to ONNX: {status.status} against the original "
                f"model through onnxruntime (max rel error {worst:.1e})"
            )

        with torch.no_grad():
            ref_test = model(x_test)
            folded_test = folded(x_test)
        sessions = {name: _ort_session(path, threads) for name, path in bundles.items()}
        ort_test = {name: run(x_test) for name, run in sessions.items()}

        torch_diff = _max_abs(folded_test, ref_test)
        scale = float(ref_test.abs().max())
        ort_diff = _max_abs(torch.from_numpy(ort_test["folded"]), ref_test)
        for what, diff in (("torch", torch_diff), ("onnxruntime", ort_diff)):
            if not diff <= _FLOAT32_REL_TOL * max(scale, 1e-6):
                raise VerificationError(
                    f"the folded model ({what}) differs from the original by {diff:.3e} (max "
                    f"|output| {scale:.3e}) on the test set, above {_FLOAT32_REL_TOL:.0e} of the "
                    "output scale"
                )

        one = x_test[:1]
        one_np = one.numpy()
        measured: dict[str, tuple[Callable[[], Any], float, int, int]] = {
            "torch unfolded": (
                _torch_call(model, one),
                accuracy(model, x_test, y_test),
                report.params_before,
                report.flops_before,
            ),
            "torch folded": (
                _torch_call(folded, one),
                accuracy(folded, x_test, y_test),
                report.params_after,
                report.flops_after,
            ),
            "onnxruntime unfolded": (
                lambda: sessions["unfolded"](one_np),
                _np_accuracy(ort_test["unfolded"], y_test),
                report.params_before,
                report.flops_before,
            ),
            "onnxruntime folded": (
                lambda: sessions["folded"](one_np),
                _np_accuracy(ort_test["folded"], y_test),
                report.params_after,
                report.flops_after,
            ),
        }
        if quantize is not None:
            quantized = _quantize_step(
                tmp,
                (folded, (example,), specs),
                x_train,
                x_test,
                y_test,
                quantize,
                latency_seconds,
                seed,
                say,
            )
            if quantized is not None:
                q_session = _ort_session(quantized, threads)
                measured[f"onnxruntime folded {quantize}"] = (
                    lambda: q_session(one_np),
                    _np_accuracy(q_session(x_test), y_test),
                    report.params_after,
                    report.flops_after,
                )
        pruned_bundle = None
        if prune is not None:
            pruned = _prune_step(
                tmp,
                model,
                specs,
                source,
                _digits_calibration(x_train, x_test, y_test, seed),
                prune,
                seed,
                threads,
                say,
            )
            if pruned is not None:
                pruned_bundle = tmp / "pruned"
                rep = pruned.prune.report
                p_session = _ort_session(pruned_bundle / pruned.formats[0].file, threads)
                measured[f"onnxruntime pruned {prune}"] = (
                    lambda: p_session(one_np),
                    _np_accuracy(p_session(x_test), y_test),
                    rep.params_after,
                    2 * rep.macs_after,
                )
                if quantize is not None:
                    pq = _quantize_step(
                        tmp,
                        (pruned.prune.model, (example,), specs),
                        x_train,
                        x_test,
                        y_test,
                        quantize,
                        latency_seconds,
                        seed,
                        say,
                        name="pruned",
                    )
                    pruned_bundle = tmp / "pruned-quantized"
                    if pq is not None:
                        pq_session = _ort_session(pq, threads)
                        measured[f"onnxruntime pruned {quantize}"] = (
                            lambda: pq_session(one_np),
                            _np_accuracy(pq_session(x_test), y_test),
                            rep.params_after,
                            2 * rep.macs_after,
                        )
        rows = [
            _Row(name, params, flops, acc, _latency(fn, latency_seconds))
            for name, (fn, acc, params, flops) in measured.items()
        ]

        say("")
        say(_table(rows))
        say("")
        say(f"max fold error (float64, worst folded region, relative): {report.max_error:.2e}")
        say(
            f"float32 max abs difference, folded vs unfolded, on the {len(x_test)} test images: "
            f"torch {torch_diff:.2e}, onnxruntime {ort_diff:.2e} (max |logit| {scale:.2f})"
        )
        for name, path in bundles.items():
            say(f"{name} ONNX bundle: {out / path.relative_to(tmp)}")
        if bench:
            folded_bundle = tmp / "folded-quantized" if quantize else tmp / "folded"
            _bench_step(
                tmp,
                folded_bundle,
                out,
                x_test,
                y_test,
                threads,
                latency_seconds,
                say,
                pruned=pruned_bundle,
            )
        say(f"all outputs: {out}  ({time.perf_counter() - start:.1f} s)")

        (tmp / "summary.txt").write_text("\n".join(lines) + "\n")
        (tmp / _MARKER).write_text(
            json.dumps(
                _results(
                    rows, report, torch_diff, ort_diff, scale, seed, seconds, threads, len(x_test)
                ),
                indent=2,
            )
            + "\n"
        )


def _torch_call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    import torch

    def call() -> Any:
        with torch.no_grad():
            return model(x)

    return call


def _ort_session(path: Path, threads: int) -> Callable[[Any], np.ndarray]:
    from edgerep.runtimes import get_runtime

    session = get_runtime("onnxruntime").load(path, options={"threads": threads})
    name = session.input_names[0]

    def run(x: Any) -> np.ndarray:
        arr = x.numpy() if hasattr(x, "numpy") else x
        return session.run({name: arr})[0]

    return run


def _latency(fn: Callable[[], Any], seconds: float) -> LatencyStats:
    from edgerep.bench import measure_latency

    return measure_latency(fn, warmup_iters=10, min_iters=30, min_seconds=seconds, max_iters=20_000)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _np_accuracy(logits: np.ndarray, labels: torch.Tensor) -> float:
    return float((logits.argmax(axis=1) == labels.numpy()).mean())


def _table(rows: Sequence[_Row]) -> str:
    head = (
        f"{'variant':<24} {'params':>8} {'MFLOPs':>7} {'test acc':>8} {'p50 ms':>8} {'p90 ms':>8}"
    )
    body = [
        f"{r.variant:<24} {r.params:>8,} {r.flops / 1e6:>7.2f} {r.accuracy:>8.2%} "
        f"{r.latency.p50_ms:>8.3f} {r.latency.p90_ms:>8.3f}"
        for r in rows
    ]
    note = "batch 1; FLOPs at 1x1x32x32 (matmul/conv only); ONNX rows run the exported graphs"
    return "\n".join([head, "-" * len(head), *body, note])


def _results(
    rows: Sequence[_Row],
    report: FoldReport,
    torch_diff: float,
    ort_diff: float,
    scale: float,
    seed: int,
    seconds: float,
    threads: int,
    test_images: int,
) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "settings": {
            "seed": seed,
            "train_seconds": seconds,
            "threads": threads,
            "test_images": test_images,
        },
        "rows": [r.to_dict() for r in rows],
        "max_fold_error_float64": report.max_error,
        "float32_max_abs_diff_folded_vs_unfolded": {"torch": torch_diff, "onnxruntime": ort_diff},
        "float32_max_abs_output": scale,
        "fold_report": report.to_dict(),
    }


if __name__ == "__main__":
    raise SystemExit(main())
