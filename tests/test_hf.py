"""Hugging Face model directories as sources (`edgerep._hf`), built offline and tiny."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from edgerep.errors import ConfigError, SourceError
from edgerep.source import load_model

transformers = pytest.importorskip("transformers", reason="transformers comes with edgerep[peft]")


def _llama(path):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _vit(path):
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=5,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.ViTForImageClassification(config).save_pretrained(path)
    return path


def test_causal_lm_directory_loads_with_inputs_from_its_config(tmp_path):
    path = _llama(tmp_path / "llama")
    model, description = load_model(str(path), task="causal-lm")
    assert description["kind"] == "huggingface-dir"
    assert description["architecture"] == "LlamaForCausalLM"
    assert description["inputs"] == ["input_ids:1xL[1..16..32]:int64"]
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.LlamaForCausalLM.from_pretrained(path).eval()(input_ids=ids).logits
        assert torch.equal(model(ids), ref)


def test_image_classification_directory(tmp_path):
    path = _vit(tmp_path / "vit")
    model, description = load_model(str(path), task="image-classification")
    assert description["inputs"] == ["pixel_values:1x3x16x16"]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_bad_tasks_and_options(tmp_path):
    path = _llama(tmp_path / "llama")
    with pytest.raises(ConfigError, match="did you mean 'causal-lm'"):
        load_model(str(path), task="causal_lm")
    with pytest.raises(ConfigError, match="holds its own weights"):
        load_model(str(path), weights="w.pt", task="causal-lm")
    with pytest.raises(ConfigError, match="applies to Hugging Face model directories"):
        load_model("model.pt2", task="causal-lm")
    with pytest.raises(SourceError, match="cannot load"):
        load_model(str(path), task="image-classification")


def test_causal_lm_converts_to_onnx_with_a_dynamic_sequence_length(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime comes with edgerep[onnx]")
    from edgerep.cli import EXIT_OK, main

    path = _llama(tmp_path / "llama")
    out = tmp_path / "bundle"
    code = main(["convert", str(path), "--task", "causal-lm", "--to", "onnx", "-o", str(out)])
    assert code == EXIT_OK, capsys.readouterr().err
    model, _ = load_model(str(path), task="causal-lm")
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"))
    for length in (3, 11):
        ids = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(length))
        (got,) = session.run(None, {"input_ids": ids.numpy()})
        with torch.no_grad():
            ref = model(ids).numpy()
        assert got.shape == (1, length, 64)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
