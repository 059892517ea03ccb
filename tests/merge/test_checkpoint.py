"""Streaming checkpoint merges (`edgerep.merge._checkpoint`) on tiny generated checkpoints.

A tiny Llama (and a GPT-2, whose Conv1D layers store weights transposed) is saved in
bf16 as ≥ 3 safetensors shards; a PEFT adapter with random nonzero factors is saved
next to it. The streamed merge must equal, bit for bit, the in-memory `edgerep.merge`
of the same PeftModel, and each merged weight must be the bf16 value nearest the
exact (float64) PEFT merge, so never farther from it than PEFT's own bf16
``merge_and_unload``. Model merging is checked against hand-computed cases on
hand-made safetensors files. Bad inputs raise named errors and write nothing.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import edgerep
from edgerep.errors import ConfigError, SourceError
from edgerep.fold.probe import round_to
from tests.merge import randomize_adapters

peft = pytest.importorskip("peft", reason="peft is an optional extra (pip install 'edgerep[peft]')")
transformers = pytest.importorskip("transformers", reason="transformers comes with edgerep[peft]")
st = pytest.importorskip("safetensors.torch", reason="safetensors comes with edgerep[peft]")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from edgerep.merge._checkpoint import (  # noqa: E402
    INDEX,
    REPORT,
    is_checkpoint_dir,
    merge_adapter_checkpoint,
    merge_checkpoints,
)

F64 = torch.float64
LLAMA_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
]


def _llama_config():
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )


def _gpt2_config():
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)


MODELS = {
    "llama": (transformers.LlamaForCausalLM, _llama_config, LLAMA_TARGETS, {}),
    "gpt2": (
        transformers.GPT2LMHeadModel,
        _gpt2_config,
        ["c_attn", "c_fc"],
        {"fan_in_fan_out": True},
    ),
}
ADAPTERS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


def _save_base(path: Path, model: str, dtype: torch.dtype = torch.bfloat16) -> None:
    cls, config, _, _ = MODELS[model]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls(config()).to(dtype).save_pretrained(path, max_shard_size="20KB")


def _save_adapter(
    path: Path, model: str, adapter: str, *, seed: int = 1, base: Path | None = None
) -> None:
    """An adapter trained on `base` (as saved: PEFT stores a targeted embedding's weights)."""
    cls, config, targets, extra = MODELS[model]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra, **ADAPTERS[adapter])
        net = cls(config()) if base is None else _load(base, model, torch.float32)
        pm = get_peft_model(net, lora)
    randomize_adapters(pm, seed=seed, std=0.1)
    pm.save_pretrained(path)


def _load(path: Path, model: str, dtype: torch.dtype) -> torch.nn.Module:
    cls = MODELS[model][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path, dtype=dtype)


def _peft(base: Path, adapter: Path, model: str, dtype: torch.dtype) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_load(base, model, dtype), adapter).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    _save_base(root / "base", "llama")
    _save_adapter(root / "adapter", "llama", "lora", base=root / "base")
    return root


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("model", list(MODELS))
def test_streamed_merge_equals_in_memory_merge_bit_for_bit(tmp_path, model, adapter):
    _save_base(tmp_path / "base", model)
    _save_adapter(tmp_path / "adapter", model, adapter, base=tmp_path / "base")
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) >= 3

    report = merge_adapter_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")

    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert json.loads((out / INDEX).read_text()) == json.loads(
        (tmp_path / "base" / INDEX).read_text()
    )
    assert (out / "config.json").read_bytes() == (tmp_path / "base" / "config.json").read_bytes()
    assert json.loads((out / REPORT).read_text())["routes"] == report.routes
    assert report.merged and set(report.routes) <= {"fast:lora", "fast:peft-merge"}
    assert sum(report.routes.values()) == len(report.merged)
    assert report.max_error <= 1e-9

    streamed = _load(out, model, torch.bfloat16).state_dict()
    in_memory, _ = edgerep.merge(
        _peft(tmp_path / "base", tmp_path / "adapter", model, torch.bfloat16)
    )
    in_memory_sd = in_memory.state_dict()
    assert streamed.keys() == in_memory_sd.keys()
    for k in streamed:
        assert streamed[k].dtype == torch.bfloat16
        assert torch.equal(streamed[k], in_memory_sd[k]), k

    # the nearest bf16 to PEFT's exact (float64) merge; PEFT's bf16 merge is never closer
    exact = (
        _peft(tmp_path / "base", tmp_path / "adapter", model, F64).merge_and_unload().state_dict()
    )
    theirs = _peft(tmp_path / "base", tmp_path / "adapter", model, torch.bfloat16)
    theirs = theirs.merge_and_unload().state_dict()
    changed = 0
    for k in streamed:
        assert torch.equal(streamed[k], round_to(exact[k], torch.bfloat16)), k
        ours_err = (streamed[k].to(F64) - exact[k]).abs()
        assert (ours_err <= (theirs[k].to(F64) - exact[k]).abs()).all(), k
        changed += int(
            not torch.equal(
                streamed[k], _load(tmp_path / "base", model, torch.bfloat16).state_dict()[k]
            )
        )
    assert changed >= len(report.merged)  # every targeted layer moved


@pytest.mark.parametrize("tuner", ["vera", "lora+modules_to_save"])
def test_shared_projections_and_modules_to_save_stream_bit_for_bit(tmp_path, tuner):
    """VeRA's projections are shared by every layer (each slices its corner); a
    modules_to_save copy replaces the checkpoint's tensors. Both equal the in-memory merge."""
    from peft import VeraConfig

    _save_base(tmp_path / "base", "llama")
    torch.manual_seed(1)
    if tuner == "vera":
        config = VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    else:
        config = LoraConfig(r=4, target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_load(tmp_path / "base", "llama", torch.float32), config)
    randomize_adapters(pm, seed=1, std=0.1)  # the lm_head copy too: it is trainable
    pm.save_pretrained(tmp_path / "adapter")

    report = merge_adapter_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    if tuner == "vera":
        assert report.routes == {"fast:peft-merge": 2 * 4}
    else:
        assert report.routes == {"fast:lora": 2 * 2, "swap": 1}
    streamed = _load(tmp_path / "out", "llama", torch.bfloat16).state_dict()
    in_memory, _ = edgerep.merge(
        _peft(tmp_path / "base", tmp_path / "adapter", "llama", torch.bfloat16)
    )
    in_memory_sd = in_memory.state_dict()
    base_sd = _load(tmp_path / "base", "llama", torch.bfloat16).state_dict()
    assert streamed.keys() == in_memory_sd.keys()
    for k in streamed:
        assert torch.equal(streamed[k], in_memory_sd[k]), k
    assert not torch.equal(
        streamed["model.layers.0.self_attn.q_proj.weight"],
        base_sd["model.layers.0.self_attn.q_proj.weight"],
    )
    if tuner != "vera":
        assert not torch.equal(streamed["lm_head.weight"], base_sd["lm_head.weight"])


def test_vera_without_its_projections_is_refused(tmp_path):
    from peft import VeraConfig

    _save_base(tmp_path / "base", "llama")
    config = VeraConfig(r=4, target_modules=["q_proj"], save_projection=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_load(tmp_path / "base", "llama", torch.float32), config)
        pm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(edgerep.errors.UnsupportedError, match="save_projection=False"):
        merge_adapter_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_single_file_checkpoint_and_fp16(tmp_path):
    _, config, _, _ = MODELS["llama"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config()).half().save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base" / INDEX).exists() and is_checkpoint_dir(tmp_path / "base")
    _save_adapter(tmp_path / "adapter", "llama", "lora", base=tmp_path / "base")
    merge_adapter_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    streamed = _load(tmp_path / "out", "llama", torch.float16).state_dict()
    exact = (
        _peft(tmp_path / "base", tmp_path / "adapter", "llama", F64).merge_and_unload().state_dict()
    )
    for k in streamed:
        assert streamed[k].dtype == torch.float16
        assert torch.equal(streamed[k], round_to(exact[k], torch.float16)), k


# --- bad inputs: named errors, nothing written ---------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _nothing_written(parent: Path, name: str = "out") -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.*"))


def test_missing_shard(llama, tmp_path):
    base = _copy(llama / "base", tmp_path / "base")
    victim = sorted(base.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(SourceError, match=f"names shard.*{victim.name}"):
        merge_adapter_checkpoint(base, llama / "adapter", tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_index_pointing_at_a_missing_file(llama, tmp_path):
    base = _copy(llama / "base", tmp_path / "base")
    index = json.loads((base / INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-99999-of-00003.safetensors"
    (base / INDEX).write_text(json.dumps(index))
    with pytest.raises(SourceError, match=r"model-99999-of-00003\.safetensors"):
        merge_adapter_checkpoint(base, llama / "adapter", tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_index_that_does_not_match_the_shards(llama, tmp_path):
    base = _copy(llama / "base", tmp_path / "base")
    index = json.loads((base / INDEX).read_text())
    wm = index["weight_map"]
    a = next(iter(wm))
    b = next(k for k in wm if wm[k] != wm[a])  # a tensor of another shard
    wm[a] = wm[b]
    (base / INDEX).write_text(json.dumps(index))
    with pytest.raises(SourceError, match="does not match the shards"):
        merge_adapter_checkpoint(base, llama / "adapter", tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_adapter_for_another_base(llama, tmp_path):
    _save_adapter(tmp_path / "gpt2_adapter", "gpt2", "lora")
    with pytest.raises(ConfigError, match=r"does not have.*another base model"):
        merge_adapter_checkpoint(llama / "base", tmp_path / "gpt2_adapter", tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_adapter_of_another_shape(llama, tmp_path):
    cls, config, targets, _ = MODELS["llama"]
    wide = config()
    wide.hidden_size, wide.intermediate_size = 48, 96
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(cls(wide), LoraConfig(r=4, target_modules=targets))
    randomize_adapters(pm)
    pm.save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match="do not fit the checkpoint"):
        merge_adapter_checkpoint(llama / "base", tmp_path / "wide", tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_missing_adapter_weights_and_existing_output(llama, tmp_path):
    adapter = _copy(llama / "adapter", tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(SourceError, match=r"adapter_model\.safetensors"):
        merge_adapter_checkpoint(llama / "base", adapter, tmp_path / "out")
    assert _nothing_written(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        merge_adapter_checkpoint(llama / "base", llama / "adapter", tmp_path / "out")
    with pytest.raises(ConfigError, match="is an input"):
        merge_adapter_checkpoint(llama / "base", llama / "adapter", llama / "base", overwrite=True)


# --- model merging: hand-computed cases ----------------------------------------------------


def _write(path: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """A checkpoint of `tensors` split over `shards` files (an index when more than one)."""
    path.mkdir(parents=True)
    keys = list(tensors)
    if shards == 1:
        st.save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        st.save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text("{}")
    return path


def _read(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(st.load_file(str(f)))
    return out


@pytest.fixture
def three(tmp_path):
    """A base and three 'fine-tuned' models of 2x3 weights (float64: exact arithmetic)."""
    base = {
        "w": torch.zeros(2, 3, dtype=F64),
        "b": torch.ones(3, dtype=F64),
        "n": torch.tensor([7]),
    }
    deltas = [
        torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.5]], dtype=F64),
        torch.tensor([[-1.0, 1.0, 2.0], [0.25, 4.0, -3.0]], dtype=F64),
        torch.tensor([[2.0, -1.0, -4.0], [-0.5, 1.5, 0.75]], dtype=F64),
    ]
    paths = [_write(tmp_path / "base", base, shards=3)]
    for i, d in enumerate(deltas):
        m = {"w": base["w"] + d, "b": base["b"] + d[0], "n": base["n"]}
        paths.append(_write(tmp_path / f"m{i}", m, shards=1 + i % 2))
    return paths, deltas


def test_average_is_the_model_soup(three, tmp_path):
    (base, *models), deltas = three
    report = merge_checkpoints(base, models, tmp_path / "soup")
    out = _read(tmp_path / "soup")
    assert torch.allclose(out["w"], sum(deltas) / 3, rtol=0, atol=1e-15)
    assert torch.allclose(out["b"], 1 + sum(d[0] for d in deltas) / 3, rtol=0, atol=1e-15)
    assert torch.equal(out["n"], torch.tensor([7]))
    assert report.weights == [1 / 3] * 3 and {r.key for r in report.merged} == {"w", "b"}
    assert sorted(p.name for p in (tmp_path / "soup").glob("*.safetensors")) == sorted(
        p.name for p in base.glob("*.safetensors")
    )


def test_task_arithmetic_with_weights(three, tmp_path):
    (base, *models), deltas = three
    merge_checkpoints(
        base, models, tmp_path / "ta", method="task_arithmetic", weights=[0.5, 0.3, 0.2]
    )
    expected = 0.5 * deltas[0] + 0.3 * deltas[1] + 0.2 * deltas[2]
    assert torch.allclose(_read(tmp_path / "ta")["w"], expected, rtol=0, atol=1e-15)


def test_ties_by_hand(three, tmp_path):
    (base, *models), _ = three
    report = merge_checkpoints(base, models, tmp_path / "ties", method="ties", density=0.5)
    # trim to the 3 largest |entries| of each delta (density 0.5 of 6; no ties in magnitude)
    t0 = torch.tensor([[0.0, -2.0, 3.0], [0.0, 0.0, -1.5]], dtype=F64)
    t1 = torch.tensor([[0.0, 0.0, 2.0], [0.0, 4.0, -3.0]], dtype=F64)
    t2 = torch.tensor([[2.0, 0.0, -4.0], [0.0, 1.5, 0.0]], dtype=F64)
    # weights 1/3 each; elected sign by mass, then the mean of the agreeing entries
    c = [t / 3 for t in (t0, t1, t2)]
    expected = torch.tensor(
        [
            [c[2][0, 0], c[0][0, 1], (c[0][0, 2] + c[1][0, 2]) / 2],
            [0.0, (c[1][1, 1] + c[2][1, 1]) / 2, (c[0][1, 2] + c[1][1, 2]) / 2],
        ],
        dtype=F64,
    )
    assert torch.allclose(_read(tmp_path / "ties")["w"], expected, rtol=0, atol=1e-15)
    row = next(r for r in report.merged if r.key == "w")
    # entries whose nonzero deltas disagree in sign: (0,0) (0,1) (0,2) (1,0) (1,2) -> 5 of 6
    assert row.sign_conflicts == pytest.approx(5 / 6)
    assert row.density_kept == pytest.approx(5 / 6)
    assert "sign conflicts" in report.to_text()


def test_dare_is_seeded(three, tmp_path):
    (base, *models), _ = three
    outs = []
    for i, seed in enumerate((0, 0, 1)):
        merge_checkpoints(
            base, models, tmp_path / f"dare{i}", method="dare_ties", density=0.5, seed=seed
        )
        outs.append(_read(tmp_path / f"dare{i}"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not torch.equal(outs[0]["w"], outs[2]["w"])


def test_della_streams_the_shared_combination(three, tmp_path):
    """The checkpoint merge draws DELLA's masks from one seeded generator, tensor by tensor
    in the order it processes them (the report's order), with the adapters' code."""
    from edgerep.merge import _combine

    (base, *models), deltas = three
    weights = [0.5, 0.3, 0.2]
    report = merge_checkpoints(
        base, models, tmp_path / "della", method="della", density=0.5, weights=weights, seed=5
    )
    out = _read(tmp_path / "della")
    gen = torch.Generator().manual_seed(5)
    per_key = {"w": deltas, "b": [d[0] for d in deltas]}
    start = {"w": torch.zeros(2, 3, dtype=F64), "b": torch.ones(3, dtype=F64)}
    assert [r.key for r in report.merged] in (["w", "b"], ["b", "w"])
    for row in report.merged:
        combined = _combine.combine("della", per_key[row.key], weights, density=0.5, generator=gen)
        assert torch.equal(out[row.key], start[row.key] + combined)


def test_mismatched_checkpoints_are_named(three, tmp_path):
    (base, *models), _ = three
    bad = _write(
        tmp_path / "bad",
        {"w": torch.zeros(3, 2, dtype=F64), "b": torch.ones(3, dtype=F64), "n": torch.tensor([7])},
    )
    with pytest.raises(ConfigError, match=r"'w' has shape \[3, 2\], the base \[2, 3\]"):
        merge_checkpoints(base, [models[0], bad], tmp_path / "out")
    half = _write(
        tmp_path / "half",
        {k: v.half() if v.is_floating_point() else v for k, v in _read(models[0]).items()},
    )
    with pytest.raises(ConfigError, match="stored as F16, the base as F64"):
        merge_checkpoints(base, [half], tmp_path / "out")
    fewer = _write(tmp_path / "fewer", {"w": torch.zeros(2, 3, dtype=F64), "n": torch.tensor([7])})
    with pytest.raises(ConfigError, match=r"lacks 1 tensor.*'b'"):
        merge_checkpoints(base, [fewer], tmp_path / "out")
    with pytest.raises(ConfigError, match="one weight per model"):
        merge_checkpoints(base, models, tmp_path / "out", weights=[0.5, 0.5])
    with pytest.raises(ConfigError, match="needs density"):
        merge_checkpoints(base, models, tmp_path / "out", method="ties")
    assert _nothing_written(tmp_path)


# --- the command line ----------------------------------------------------------------------


def test_cli_merges_an_adapter_into_a_checkpoint(llama, tmp_path, capsys):
    from edgerep.cli import EXIT_OK, main

    out = tmp_path / "out"
    code = main(["merge", str(llama / "base"), "--adapter", str(llama / "adapter"), "-o", str(out)])
    assert code == EXIT_OK, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "fast:lora 14" in text and f"checkpoint: {out}" in text
    assert is_checkpoint_dir(out)
    assert (
        main(["merge", str(llama / "base"), "--adapter", str(llama / "adapter"), "-o", str(out)])
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    code = main(
        [
            "merge",
            str(llama / "base"),
            "--adapter",
            str(llama / "adapter"),
            "-o",
            str(tmp_path / "x"),
            "--fold",
        ]
    )
    assert code == 2 and "--fold do not apply" in capsys.readouterr().err
    broken = _copy(llama / "base", tmp_path / "broken")
    sorted(broken.glob("*.safetensors"))[0].unlink()
    code = main(
        ["merge", str(broken), "--adapter", str(llama / "adapter"), "-o", str(tmp_path / "y")]
    )
    assert code == 3 and "names shard" in capsys.readouterr().err
    assert _nothing_written(tmp_path, "y")


def test_cli_merges_checkpoints(three, tmp_path, capsys):
    from edgerep.cli import EXIT_OK, main

    (base, *models), _ = three
    argv = ["merge", str(base), "--models", *map(str, models), "--method", "dare_ties"]
    argv += ["--density", "0.5", "--weights", "0.5,0.3,0.2", "--seed", "3", "--json"]
    assert main([*argv, "-o", str(tmp_path / "a")]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "dare_ties" and report["seed"] == 3
    assert report["weights"] == [0.5, 0.3, 0.2]
    direct = merge_checkpoints(
        base,
        models,
        tmp_path / "b",
        method="dare_ties",
        density=0.5,
        weights=[0.5, 0.3, 0.2],
        seed=3,
    )
    assert direct.seed == 3
    a, b = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main([*argv[:-7], "--weights", "0.5,x", "-o", str(tmp_path / "c")]) == 2
    assert "one number per model" in capsys.readouterr().err


def test_adapter_into_a_non_floating_tensor(tmp_path):
    _write(tmp_path / "base", {"lin.weight": torch.ones(4, 3, dtype=torch.int8)})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    LoraConfig(r=2, target_modules=["lin"]).save_pretrained(adapter)
    st.save_file(
        {
            "base_model.model.lin.lora_A.weight": torch.ones(2, 3),
            "base_model.model.lin.lora_B.weight": torch.ones(4, 2),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    with pytest.raises(ConfigError, match=r"'lin\.weight' is stored as I8, not a floating type"):
        merge_adapter_checkpoint(tmp_path / "base", adapter, tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_a_trained_copy_of_tied_embeddings_is_refused_and_nothing_written(tmp_path):
    """GPT-2 ties wte and lm_head: PEFT trains a copy of wte only, a streamed swap of the
    one stored tensor would change the head too; refused, named, OUT not created."""
    from edgerep.errors import UnsupportedError

    _save_base(tmp_path / "base", "gpt2")
    config = LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["wte"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_load(tmp_path / "base", "gpt2", torch.float32), config)
    randomize_adapters(pm, seed=1, std=0.1)
    pm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="tie_word_embeddings"):
        merge_adapter_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
