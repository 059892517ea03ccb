"""Checkpoint merges (`merge_checkpoints`) in row chunks, from files, and their CLI seeds.

Large tensors are merged in row chunks (`_checkpoint.CHUNK_ELEMENTS`, made tiny here):
the output must be, byte for byte, what whole tensors give, which is `_combine.combine`
of the whole deltas with one generator drawn tensor after tensor (the adapters' code),
for every method; and no float64 scratch of a whole tensor may be made. Checkpoints
may also be one ``.safetensors`` file or a ``torch.save`` state dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edgerep.errors import ConfigError, SourceError

st = pytest.importorskip("safetensors.torch", reason="safetensors comes with edgerep[peft]")

from edgerep.merge import _checkpoint, _combine  # noqa: E402
from edgerep.merge._checkpoint import INDEX, merge_checkpoints  # noqa: E402

F64 = torch.float64
METHODS = sorted(_combine.METHODS)


def _density(method: str) -> float | None:
    return 0.4 if _combine.needs_density(method) else None


def _write(path: Path, tensors: dict[str, torch.Tensor], shards: int) -> Path:
    path.mkdir(parents=True)
    keys, weight_map = list(tensors), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        st.save_file(part, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text("{}")
    return path


def _bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` (so that -0.0 and 0.0 differ)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(path.glob("*.safetensors")):
        out.update(st.load_file(str(p)))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base (3 shards) and three fine-tuned models of mixed dtypes; 'emb' and 'w' are
    larger than the tiny chunk, the rest are one chunk. Many magnitudes tie (deltas on a
    1/8 grid), some deltas are exactly zero, one model leaves rows unchanged."""
    root = tmp_path_factory.mktemp("ckpts")
    gen = torch.Generator().manual_seed(0)
    base = {
        "emb": torch.randn(90, 40, generator=gen),
        "w": torch.randn(64, 50, generator=gen, dtype=F64).bfloat16(),
        "conv": torch.randn(20, 3, 3, 3, generator=gen).half(),
        "b": torch.randn(50, generator=gen, dtype=F64),
        "scale": torch.tensor(2.0),
        "n": torch.tensor([7]),
    }
    paths = [_write(root / "base", base, 3)]
    for i in range(3):
        m = {}
        for k, v in base.items():
            if not v.is_floating_point():
                m[k] = v
                continue
            noise = (torch.randn(v.shape, generator=gen, dtype=F64) * 8).round() / 64
            noise *= torch.rand(v.shape, generator=gen) < 0.7
            m[k] = (v.to(F64) + noise).to(v.dtype)
        if i == 1:
            m["emb"][:5] = base["emb"][:5]
        paths.append(_write(root / f"m{i}", m, 1 + i % 3))
    return paths


@pytest.mark.parametrize("method", METHODS)
def test_row_chunks_give_the_whole_tensor_merge_byte_for_byte(
    models, tmp_path, monkeypatch, method
):
    base, *fine = models
    kwargs = {"method": method, "density": _density(method), "weights": [0.5, 0.3, 0.2], "seed": 7}
    whole = merge_checkpoints(base, fine, tmp_path / "whole", **kwargs)
    monkeypatch.setattr(_checkpoint, "CHUNK_ELEMENTS", 300)  # 'emb': 7 rows a chunk, 'w': 6
    assert len(_checkpoint._row_chunks([90, 40])) > 2 and len(_checkpoint._row_chunks([50])) == 1
    chunked = merge_checkpoints(base, fine, tmp_path / "chunked", **kwargs)
    assert _bytes(tmp_path / "chunked") == _bytes(tmp_path / "whole")
    assert chunked.merged == whole.merged  # same per-tensor statistics, same order
    # and both are the adapters' whole-tensor combination, drawn tensor after tensor
    theta = [_tensors(p) for p in models]
    out = _tensors(tmp_path / "whole")
    gen = torch.Generator().manual_seed(7)
    for row in whole.merged:
        b64 = theta[0][row.key].to(F64)
        deltas = [t[row.key].to(F64) - b64 for t in theta[1:]]
        combined = _combine.combine(
            method, deltas, [0.5, 0.3, 0.2], density=_density(method), generator=gen
        )
        expected = _checkpoint.round_to(b64 + combined, theta[0][row.key].dtype)
        assert torch.equal(_raw(out[row.key]), _raw(expected))


class _Largest(TorchDispatchMode):
    """Records the most entries of any tensor an op allocates, per dtype: views of an
    input's storage and tensors set on a storage (safetensors' memory map) are not
    allocations."""

    def __init__(self) -> None:
        super().__init__()
        self.most: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.set_.source_Storage:
            return out
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.most[t.dtype] = max(self.most.get(t.dtype, 0), t.numel())
        return out


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties", "ties", "breadcrumbs"])
def test_a_large_tensor_never_has_a_float64_copy(models, tmp_path, monkeypatch, method):
    """Only chunks of rows exist in float64 (at most one per model stacked; a tensor of up
    to two chunks is one), never the whole 90x40 'emb' or 64x50 'w' (3,600 and 3,200
    entries); a magnitude trim holds one float32 copy of one delta's magnitudes."""
    base, *fine = models
    monkeypatch.setattr(_checkpoint, "CHUNK_ELEMENTS", 300)
    with _Largest() as seen:
        merge_checkpoints(base, fine, tmp_path / "out", method=method, density=_density(method))
    assert seen.most[F64] <= 3 * 2 * 300 < 3200
    trims = method in ("ties", "breadcrumbs")
    if trims:
        assert seen.most[torch.float32] == 90 * 40
    else:
        assert seen.most.get(torch.float32, 0) <= 2 * 300


def test_top_k_from_float32_rounded_chunks_is_exact():
    """Magnitudes that round to one float32 (1 + j·2^-40), exact ties, zeros: the chunked
    float32 selection finds the same threshold and ties as the float64 one."""
    gen = torch.Generator().manual_seed(3)
    close = 1 + torch.randint(0, 50, (400,), generator=gen).to(F64) * 2.0**-40
    rough = (torch.randn(600, generator=gen, dtype=F64) * 4).round()
    mags = torch.cat([close, rough.abs()])[torch.randperm(1000, generator=gen)]
    for ks in ([0, 1, 7, 150, 400, 500, 999, 1000], [int(0.5 * 1000), 10]):
        want = _combine.top_k(mags.clone(), ks)
        got = _combine.top_k_chunked(lambda: iter(mags.split(77)), 1000, ks)
        assert got == want


def test_exact_ties_at_the_threshold_are_counted_not_collected():
    """A frozen layer's delta is all zero, so the threshold is 0.0 and nearly every entry
    rounds to it: they are counted, never gathered into a whole-tensor float64 or int64
    array (the first version sorted all of them: ~32 bytes an entry)."""
    import tracemalloc

    n, chunk = 40_000, 1_000
    gen = torch.Generator().manual_seed(5)
    mags = torch.rand(n, generator=gen, dtype=F64) * (torch.rand(n, generator=gen) < 0.3)
    ks = [n // 2, n // 10]
    want = _combine.top_k(mags.clone(), ks)
    with _Largest() as seen:  # torch's allocations
        got = _combine.top_k_chunked(lambda: iter(mags.split(chunk)), n, ks)
    assert got == want and want[0].threshold == 0.0
    assert seen.most.get(F64, 0) <= chunk and seen.most.get(torch.int64, 0) <= chunk
    tracemalloc.start()  # numpy's (torch's CPU allocator does not report to tracemalloc)
    try:
        assert _combine.top_k_chunked(lambda: iter(mags.split(chunk)), n, ks) == want
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the coarse pass's boolean masks take one byte an entry; 28,000 tied float64 values
    # gathered would take 224,000 bytes
    assert numpy_peak < 2 * n, numpy_peak


def test_top_k_chunked_equals_top_k_on_random_tie_patterns():
    """Values within one float32 step of each other, exact repeats on either side of the
    first one seen, zeros; random k and chunk sizes."""
    gen = torch.Generator().manual_seed(11)
    for _ in range(60):
        n = int(torch.randint(1, 400, (1,), generator=gen))
        steps = torch.randint(-3, 4, (n,), generator=gen).to(F64)
        mags = (1 + steps * 2.0**-45) * (torch.rand(n, generator=gen) < 0.8)
        ks = torch.randint(0, n + 1, (3,), generator=gen).tolist()
        size = int(torch.randint(1, n + 1, (1,), generator=gen))
        want = _combine.top_k(mags.clone(), ks)
        assert _combine.top_k_chunked(lambda m=mags, s=size: iter(m.split(s)), n, ks) == want


# --- checkpoints as files -----------------------------------------------------------------


def test_safetensors_and_state_dict_files_merge_like_directories(models, tmp_path):
    base, *fine = models
    theta = [_tensors(p) for p in models]
    torch.save(theta[0], tmp_path / "base.pt")
    st.save_file(theta[1], str(tmp_path / "a.safetensors"))
    torch.save(theta[2], tmp_path / "b.bin")
    kwargs = {"method": "ties", "density": 0.4, "weights": [0.5, 0.3, 0.2]}
    merge_checkpoints(base, fine, tmp_path / "dirs", **kwargs)
    report = merge_checkpoints(
        tmp_path / "base.pt",
        [tmp_path / "a.safetensors", tmp_path / "b.bin", fine[2]],
        tmp_path / "files",
        **kwargs,
    )
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [
        "edgerep_merge.json",
        "model.safetensors",
    ]
    got, want = _tensors(tmp_path / "files"), _tensors(tmp_path / "dirs")
    assert got.keys() == want.keys() and report.shards == 1
    assert all(torch.equal(_raw(got[k]), _raw(want[k])) for k in got)
    with st.safe_open(str(tmp_path / "files" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # one .safetensors file as the base: OUT/model.safetensors again
    st.save_file(theta[0], str(tmp_path / "base.safetensors"))
    merge_checkpoints(tmp_path / "base.safetensors", fine, tmp_path / "one", **kwargs)
    assert _tensors(tmp_path / "one").keys() == want.keys()


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("unpickled!",))


def test_files_that_are_not_flat_state_dicts_are_refused(models, tmp_path, capsys):
    base, *fine = models
    theta = _tensors(fine[0])
    torch.save({"state_dict": theta, "epoch": 3}, tmp_path / "trainer.pt")
    torch.save([theta["w"]], tmp_path / "list.pth")
    torch.save({"w": theta["w"], "obj": _Payload()}, tmp_path / "evil.bin")
    torch.save({"w": theta["w"].to(torch.complex64)}, tmp_path / "complex.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    cases = {
        "trainer.pt": "entry 'state_dict' is a dict.*save its 'state_dict' entry alone",
        "list.pth": "holds a list, not a state dict",
        "evil.bin": "weights_only",
        "complex.pt": "complex64",
        "junk.pt": "cannot be read as a state dict",
        "missing.pt": "does not exist",
    }
    for name, match in cases.items():
        with pytest.raises((SourceError, _checkpoint.UnsupportedError), match=match):
            merge_checkpoints(base, [tmp_path / name], tmp_path / "out")
    assert "unpickled!" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="is an input or holds one"):
        torch.save(theta, tmp_path / "ok.pt")
        merge_checkpoints(tmp_path / "ok.pt", fine, tmp_path, overwrite=True)
    assert (tmp_path / "ok.pt").is_file()


# --- the command line ----------------------------------------------------------------------


def test_cli_merge_seed_zero_is_not_ignored(models, tmp_path, capsys):
    from edgerep.cli import EXIT_OK, main

    base, *fine = models
    argv = ["merge", str(base), "--models", *map(str, fine), "--method", "dare_ties"]
    argv += ["--density", "0.5", "--seed", "3", "--json"]
    assert main([*argv, "--merge-seed", "0", "-o", str(tmp_path / "zero")]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["seed"] == 0
    assert main([*argv, "-o", str(tmp_path / "three")]) == EXIT_OK  # no --merge-seed: --seed
    assert json.loads(capsys.readouterr().out)["seed"] == 3
    merge_checkpoints(base, fine, tmp_path / "direct0", method="dare_ties", density=0.5, seed=0)
    assert _bytes(tmp_path / "zero") == _bytes(tmp_path / "direct0")
    assert _bytes(tmp_path / "zero") != _bytes(tmp_path / "three")


def test_cli_models_from_files_and_weights_that_name_a_file(models, tmp_path, capsys):
    from edgerep.cli import EXIT_OK, main

    base, *fine = models
    torch.save(_tensors(base), tmp_path / "base.pt")
    argv = ["merge", str(tmp_path / "base.pt"), "--models", *map(str, fine)]
    assert main([*argv, "-o", str(tmp_path / "soup")]) == EXIT_OK
    assert "checkpoint:" in capsys.readouterr().out
    assert (tmp_path / "soup" / "model.safetensors").is_file()
    code = main([*argv, "--weights", str(tmp_path / "base.pt"), "-o", str(tmp_path / "x")])
    assert code == 2 and "takes one number per model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["merge", "--help"]) == EXIT_OK
    assert "with merge --models: one weight per model" in " ".join(capsys.readouterr().out.split())
