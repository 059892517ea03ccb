"""The embeddable runtime: ``edgerep.load(bundle_dir) -> Predictor``, numpy in, numpy out.

`load` reads and validates the bundle's manifest (schema, checksums), then picks
one artifact and the runtime to run it:

1. ``prefer=[...]``: the runtimes named, in that order (unknown names fail);
2. else, when the bundle holds a recorded benchmark (``bench.json`` written by
   ``edgerep bench --out BUNDLE``), the runtimes it measured, fastest p50 first;
3. else the documented priority `DEFAULT_PRIORITY`: tensorrt > openvino >
   onnxruntime > executorch > coreml > torch.

A candidate is tried only if the bundle has an artifact of its format that was
built (``not-built-here`` TensorRT plans are skipped), the runtime can run here
(installed, right OS/GPU) and has the device; the first one that loads wins. When
none does, the error lists every candidate with its reason.

`Predictor.run` checks the feeds against the manifest before running: exactly the
input names, each array's rank, fixed dims and dtype, and symbolic dims consistent
across inputs (``N`` must be the same wherever it appears). It is safe to call from
several threads: calls take a session from a pool of ``pool_size`` sessions
(default 1, i.e. one lock around one session) and put it back afterwards.

This module needs numpy and one runtime; it never imports torch.
"""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgerep.bundle import read_manifest
from edgerep.errors import ConfigError, EdgerepError, UnsupportedError, did_you_mean

__all__ = ["DEFAULT_PRIORITY", "Predictor", "load"]

logger = logging.getLogger(__name__)

#: runtimes tried in this order when neither `prefer` nor a recorded benchmark decides
DEFAULT_PRIORITY = ("tensorrt", "openvino", "onnxruntime", "executorch", "coreml", "torch")
_BENCH_FILE = "bench.json"


def _recorded_order(directory: Path) -> list[str]:
    """Runtimes by recorded p50 (fastest first) from the bundle's ``bench.json``, if any."""
    path = directory / _BENCH_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        best: dict[str, float] = {}
        for row in data.get("rows", []):
            p50 = float(row["latency"]["stats"]["p50_ms"])
            name = str(row["runtime"])
            best[name] = min(p50, best.get(name, float("inf")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("ignoring unreadable %s: %s", path, e)
        return []
    return sorted(best, key=best.__getitem__)


def _worst_error(parity: Mapping[str, Any]) -> float | None:
    """The largest ``max_rel_error`` over the outputs of a manifest parity record."""
    values = [
        float(o["max_rel_error"])
        for o in (parity.get("outputs") or {}).values()
        if isinstance(o, Mapping) and o.get("max_rel_error") is not None
    ]
    return max(values, default=None)


def _symbol_bounds(spec: Mapping[str, Any], symbol: str) -> tuple[int, int | None]:
    """(min, max) of a symbolic dim from the manifest's input entry (max None: unbounded)."""
    r = (spec.get("ranges") or {}).get(symbol)
    if not isinstance(r, Mapping):
        return 1, None
    hi = r.get("max")
    return max(int(r.get("min", 1)), 1), (None if hi is None else int(hi))


class Predictor:
    """A loaded bundle: validated inputs, numpy in and out, thread-safe.

    Attributes:
        runtime: the runtime that runs it (e.g. ``"openvino"``).
        format: the artifact's format.
        artifact: the artifact's manifest entry.
        inputs, outputs: the manifest's tensor descriptions.
        skipped: candidates not used, with the reason.
    """

    def __init__(
        self,
        sessions: Sequence[Any],
        *,
        runtime: str,
        artifact: Mapping[str, Any],
        manifest: Mapping[str, Any],
        skipped: Sequence[tuple[str, str]] = (),
        as_verified: bool = True,
    ) -> None:
        self.runtime = runtime
        self.artifact = dict(artifact)
        self.format = str(artifact["format"])
        self.inputs: list[dict[str, Any]] = [dict(t) for t in manifest["inputs"]]
        self.outputs: list[dict[str, Any]] = [dict(t) for t in manifest["outputs"]]
        self.skipped = list(skipped)
        self.as_verified = as_verified
        self._sessions = list(sessions)
        self._pool: queue.Queue[Any] = queue.Queue()
        for s in self._sessions:
            self._pool.put(s)
        self._closed = False

    @property
    def precision(self) -> str:
        """The precision the runtime computes in (e.g. ``"f32"``, ``"bf16"``), as its
        session reports it, else the artifact's precision."""
        ran = self._sessions[0].describe().get("inference_precision")
        return str(ran) if ran else str(self.artifact.get("precision", "unknown"))

    def _parity_note(self) -> dict[str, Any]:
        parity = self.artifact.get("parity") or {}
        worst = _worst_error(parity)
        verified_ran = (parity.get("runtime") or {}).get("inference_precision") or (
            self.artifact.get("precision")
        )
        if self.as_verified or self.precision == verified_ran:
            return {
                "applies": True,
                "max_rel_error": worst,
                "note": f"runs as verified ({self.artifact.get('status', 'verified')}, "
                f"{self.artifact.get('precision')}); the manifest's parity figure applies",
            }
        for also in parity.get("also_ran") or []:
            if isinstance(also, Mapping) and also.get("precision") == self.precision:
                return {
                    "applies": True,
                    "max_rel_error": _worst_error(also),
                    "note": f"runs at {self.precision}, measured at bundle time (not gating)",
                }
        return {
            "applies": False,
            "max_rel_error": None,
            "note": f"runs at {self.precision}, not the precision it was verified at; the "
            f"manifest's parity figure ({worst}) does not apply",
        }

    @property
    def input_names(self) -> list[str]:
        """The inputs `run` expects, in manifest order."""
        return [t["name"] for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """The outputs, in the order `run` returns them."""
        return [t["name"] for t in self.outputs]

    def check(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """The feeds as contiguous numpy arrays, after checking them against the manifest.

        Raises:
            ConfigError: every mismatch (names, rank, fixed dims, symbolic dims, dtype),
                listed together.
        """
        import numpy as np

        names = self.input_names
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        problems = []
        if missing:
            problems.append(f"missing input(s) {', '.join(map(repr, missing))}")
        for n in extra:
            problems.append(f"unexpected input {n!r};{did_you_mean(n, names)}")
        arrays: dict[str, Any] = {}
        symbols: dict[str, tuple[int, str]] = {}
        for spec in self.inputs:
            name = spec["name"]
            if name not in feeds:
                continue
            arr = np.ascontiguousarray(feeds[name])
            arrays[name] = arr
            shape = list(spec["shape"])
            want = "x".join(str(d) for d in shape)
            if arr.ndim != len(shape):
                problems.append(
                    f"input {name!r} must have {len(shape)} dims ({want}); got shape {arr.shape}"
                )
            else:
                for axis, (d, got) in enumerate(zip(shape, arr.shape)):
                    if isinstance(d, int):
                        if got != d:
                            problems.append(
                                f"input {name!r} dim {axis} must be {d} (shape {want}); got "
                                f"shape {arr.shape}"
                            )
                    elif d in symbols and symbols[d][0] != got:
                        other, where = symbols[d]
                        problems.append(
                            f"symbolic dim {d!r} is {got} in input {name!r} but {other} in "
                            f"{where}; it must be the same everywhere"
                        )
                    else:
                        lo, hi = _symbol_bounds(spec, d)
                        if got < lo or (hi is not None and got > hi):
                            allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                            problems.append(
                                f"input {name!r} dim {axis} ({d}) must be in {allowed} (the "
                                f"range the bundle was exported and verified for); got {got}"
                            )
                        symbols.setdefault(d, (got, f"input {name!r}"))
            if arr.dtype.name != spec["dtype"]:
                problems.append(
                    f"input {name!r} must be {spec['dtype']}; got {arr.dtype.name} (convert "
                    f"with .astype(np.{spec['dtype']}))"
                )
        if problems:
            raise ConfigError(
                f"feeds do not match the bundle's inputs ({self._inputs_text()}): "
                + "; ".join(problems)
            )
        return arrays

    def _inputs_text(self) -> str:
        return ", ".join(
            f"{t['name']}:{'x'.join(str(d) for d in t['shape'])}:{t['dtype']}" for t in self.inputs
        )

    def run(self, feeds: Mapping[str, Any] | Any) -> list[Any]:
        """Run once: the outputs as numpy arrays, in `output_names` order.

        Args:
            feeds: ``{input name: array}``, or one array for a one-input model.

        Raises:
            ConfigError: the feeds do not match the inputs, or the predictor is closed.
        """
        if not isinstance(feeds, Mapping):
            if len(self.inputs) != 1:
                raise ConfigError(
                    f"this model has {len(self.inputs)} inputs ({self._inputs_text()}); pass a "
                    "mapping {name: array}"
                )
            feeds = {self.inputs[0]["name"]: feeds}
        arrays = self.check(feeds)
        if self._closed:
            raise ConfigError("this Predictor is closed")
        session = self._pool.get()
        try:
            return list(session.run(arrays))
        finally:
            self._pool.put(session)

    def __call__(self, feeds: Mapping[str, Any] | Any) -> dict[str, Any]:
        """`run`, as ``{output name: array}``."""
        return dict(zip(self.output_names, self.run(feeds)))

    def describe(self) -> dict[str, Any]:
        """The runtime's description of its session, the artifact and what was skipped."""
        session = self._sessions[0]
        return {
            "runtime": self.runtime,
            "format": self.format,
            "file": self.artifact["file"],
            "precision": self.precision,
            "artifact_precision": self.artifact.get("precision"),
            "parity": self._parity_note(),
            "sessions": len(self._sessions),
            "session": session.describe(),
            "skipped": [{"runtime": r, "reason": why} for r, why in self.skipped],
        }

    def close(self) -> None:
        """Close every session."""
        self._closed = True
        for s in self._sessions:
            s.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Predictor(runtime={self.runtime!r}, format={self.format!r}, inputs={self._inputs_text()!r})"


def _precision_options(artifact: Mapping[str, Any], precision: str | None) -> dict[str, Any]:
    """Runtime options for `precision` (None: the options the artifact was verified with)."""
    from edgerep.parity import parity_runs

    if precision is None:
        return dict(parity_runs(str(artifact["format"]))[0].options)
    if precision == "default":
        return {}
    return {"inference_precision": precision}


def _candidates(prefer: Sequence[str] | None, directory: Path) -> tuple[list[str], str]:
    from edgerep.runtimes import available_runtimes

    known = available_runtimes()
    if prefer:
        for name in prefer:
            if name not in known:
                raise ConfigError(
                    f"unknown runtime {name!r} in prefer;{did_you_mean(name, known)} known: "
                    f"{', '.join(known)}"
                )
        return list(prefer), "prefer"
    recorded = [r for r in _recorded_order(directory) if r in known]
    if recorded:
        rest = [r for r in DEFAULT_PRIORITY if r not in recorded]
        return recorded + rest, "recorded benchmark"
    return list(DEFAULT_PRIORITY), "default priority"


def load(
    bundle_dir: str | Path,
    prefer: Sequence[str] | None = None,
    *,
    device: str = "cpu",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    pool_size: int = 1,
    verify_files: bool = True,
    precision: str | None = None,
    trust_unsigned: bool = False,
    key: bytes | None = None,
) -> Predictor:
    """Load the best artifact of a bundle on this host.

    Args:
        bundle_dir: the bundle directory (with ``manifest.json``).
        prefer: runtime names to try, in order (e.g. ``["openvino", "onnxruntime"]``);
            only these are tried.
        device: the device to run on (``"cpu"``, ``"cuda"``, ``"gpu"``, ...).
        options: per runtime name, the options of its ``load`` (e.g.
            ``{"onnxruntime": {"threads": 2}}``).
        pool_size: sessions to create; concurrent `Predictor.run` calls use up to
            this many at once (1: calls are serialized by one lock).
        verify_files: check every file's SHA-256 against the manifest.
        precision: None (default): run each artifact the way it was verified (OpenVINO
            with the f32 precision hint, not the CPU's bf16 default), so the manifest's
            parity figure applies; ``"default"``: the runtime's own choice; or a
            precision name the runtime takes (``"bf16"``, ``"f16"``, ``"f32"`` for
            OpenVINO). `Predictor.precision` and `Predictor.describe` say what runs.
        trust_unsigned: accept a manifest without its checksum (written by another
            tool); off: such a manifest is refused.
        key: the HMAC key of a signed bundle: its signature must then match.

    Raises:
        VerificationError: the manifest is missing, invalid or does not match the files.
        ConfigError: an unknown runtime in `prefer`, or a bad `pool_size`.
        UnsupportedError: no candidate can run here (every reason listed).
    """
    from edgerep.runtimes import get_runtime

    if pool_size < 1:
        raise ConfigError(f"pool_size must be >= 1; got {pool_size}")
    directory = Path(bundle_dir)
    manifest = read_manifest(
        directory, verify_files=verify_files, trust_unsigned=trust_unsigned, key=key
    )
    order, why = _candidates(prefer, directory)
    options = options or {}
    skipped: list[tuple[str, str]] = []
    for name in order:
        runtime = get_runtime(name)
        arts = [
            a
            for a in manifest["artifacts"]
            if a["format"] in runtime.formats and a.get("status") != "not-built-here"
        ]
        if not arts:
            skipped.append((name, "the bundle has no built artifact for it"))
            continue
        reason = runtime.unavailable_reason()
        if reason:
            skipped.append((name, reason))
            continue
        kind = device.split(":")[0]
        devices = runtime.devices()
        if device not in devices and kind not in devices:
            skipped.append((name, f"no device {device!r} (has {', '.join(devices) or 'none'})"))
            continue
        art = arts[0]
        run_options = {**_precision_options(art, precision), **dict(options.get(name) or {})}
        try:
            sessions = [
                runtime.load(directory / art["file"], device=device, options=run_options or None)
                for _ in range(pool_size)
            ]
        except EdgerepError as e:
            skipped.append((name, f"load failed: {e}"))
            continue
        logger.info("edgerep.load: %s runs %s (chosen by %s)", name, art["file"], why)
        as_verified = precision is None and "inference_precision" not in (options.get(name) or {})
        return Predictor(
            sessions,
            runtime=name,
            artifact=art,
            manifest=manifest,
            skipped=skipped,
            as_verified=as_verified,
        )
    listing = "; ".join(f"{r}: {w}" for r, w in skipped) or "no candidates"
    raise UnsupportedError(
        f"no runtime can run bundle {str(directory)!r} here (tried by {why}: {listing}); "
        "install a runtime for one of its formats, or export a format that runs here"
    )
