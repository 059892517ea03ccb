"""Input specs: parsing, validation, JSON round trip, example tensors."""

from __future__ import annotations

import pytest
import torch

from edgerep.errors import ConfigError
from edgerep.spec import (
    DimRange,
    InputSpec,
    example_inputs,
    parse_input_spec,
    torch_dynamic_shapes,
    validate_specs,
)


@pytest.mark.parametrize(
    ("text", "shape", "dtype", "example", "ranges"),
    [
        ("x:1x3x224x224", (1, 3, 224, 224), "float32", (1, 3, 224, 224), ()),
        ("x:Nx3x224x224", ("N", 3, 224, 224), "float32", (1, 3, 224, 224), ()),
        ("ids:1x16:int64", (1, 16), "int64", (1, 16), ()),
        ("m:Nx16:bool", ("N", 16), "bool", (1, 16), ()),
        ("x:N[1..64]x3x8x8", ("N", 3, 8, 8), "float32", (1, 3, 8, 8), (DimRange("N", 1, 1, 64),)),
        (
            "x:N[1..8..64]x3xH[16..32..]xW[16..32..]:float16",
            ("N", 3, "H", "W"),
            "float16",
            (8, 3, 32, 32),
            (DimRange("N", 1, 8, 64), DimRange("H", 16, 32, None), DimRange("W", 16, 32, None)),
        ),
        ("feat.in:7", (7,), "float32", (7,), ()),
    ],
)
def test_parse_good(text, shape, dtype, example, ranges):
    spec = parse_input_spec(text)
    assert spec.shape == shape
    assert spec.dtype == dtype
    assert spec.example_shape() == example
    assert spec.ranges == ranges
    # the text form and the JSON form both round-trip
    assert parse_input_spec(spec.to_text()) == spec
    assert InputSpec.from_json(spec.to_json()) == spec
    assert spec.to_dict()["version"] == 1


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "NAME:SHAPE"),
        ("x", "NAME:SHAPE"),
        ("x:", "NAME:SHAPE"),
        (":1x3", "NAME:SHAPE"),
        ("1x:3", "bad input name"),
        ("x:1x-3", "bad dim '-3'"),
        ("x:1x3.5", "bad dim '3.5'"),
        ("x:1x3:float", "did you mean"),
        ("x:1x3:int64:extra", "NAME:SHAPE"),
        ("x:N[a..b]x3", "N[MIN..MAX]"),
        ("x:N[8..1]x3", "min <= opt <= max"),
        ("x:N[1..4..2]x3", "min <= opt <= max"),
        ("x:N[1..2]xN[1..3]", "two different ranges"),
    ],
)
def test_parse_bad(text, needle):
    with pytest.raises(ConfigError) as e:
        parse_input_spec(text)
    assert needle in str(e.value)
    if text:
        assert repr(text) in str(e.value) or text.split(":")[0] in str(e.value)


def test_bad_spec_message_shows_accepted_form():
    with pytest.raises(ConfigError, match=r"'x=1x3'.*NAME:SHAPE\[:DTYPE\], e\.g\. x:1x3x224x224"):
        parse_input_spec("x=1x3")


def test_inputspec_validates_fields():
    with pytest.raises(ConfigError, match="not valid"):
        InputSpec("x", ("max", 3))  # 'x' separates dims, so it cannot be in a symbol
    with pytest.raises(ConfigError, match="must be >= 1"):
        InputSpec("x", (1, -1))
    with pytest.raises(ConfigError, match="not a dim"):
        InputSpec("x", (1, 3), ranges=(DimRange("N", 1, 2, 4),))


def test_from_dict_rejects_unknown_version_and_garbage():
    with pytest.raises(ConfigError, match="version 2"):
        InputSpec.from_dict({"version": 2, "name": "x", "shape": [1]})
    with pytest.raises(ConfigError, match="malformed"):
        InputSpec.from_dict({"version": 1, "shape": [1]})
    with pytest.raises(ConfigError, match="not valid JSON"):
        InputSpec.from_json("{")


def test_validate_specs():
    a = parse_input_spec("x:N[1..8]x3")
    with pytest.raises(ConfigError, match="given twice"):
        validate_specs([a, parse_input_spec("x:1x3")])
    with pytest.raises(ConfigError, match="one range"):
        validate_specs([a, parse_input_spec("y:N[1..4]x3")])
    # a bare symbol takes the range given in another input
    both = [parse_input_spec("y:Nx3"), a]
    assert example_inputs(both, seed=0)[0].shape == (1, 3)
    assert torch_dynamic_shapes(both)[0][0].max == 8
    # a bare symbol takes the range given in another input
    both = [parse_input_spec("y:Nx3"), a]
    assert example_inputs(both, seed=0)[0].shape == (1, 3)
    assert torch_dynamic_shapes(both)[0][0].max == 8
    with pytest.raises(ConfigError, match="no inputs"):
        validate_specs([])
    validate_specs([a, parse_input_spec("y:N[1..8]x5")])


def test_example_inputs_dtypes_seed_and_dims():
    specs = [
        parse_input_spec("x:Nx3x4"),
        parse_input_spec("ids:Nx5:int64"),
        parse_input_spec("m:2:bool"),
        parse_input_spec("h:2:float16"),
    ]
    a = example_inputs(specs, seed=3)
    b = example_inputs(specs, seed=3)
    c = example_inputs(specs, seed=4)
    assert [t.dtype for t in a] == [torch.float32, torch.int64, torch.bool, torch.float16]
    assert a[0].shape == (1, 3, 4) and a[1].shape == (1, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert int(a[1].min()) >= 0 and int(a[1].max()) < 10
    big = example_inputs(specs, seed=0, dims={"N": 3})
    assert big[0].shape == (3, 3, 4) and big[1].shape == (3, 5)


def test_torch_dynamic_shapes_shares_dims():
    specs = [parse_input_spec("x:N[1..16]x3"), parse_input_spec("y:Nx3"), parse_input_spec("z:2")]
    shapes = torch_dynamic_shapes(specs)
    assert shapes is not None
    assert shapes[0][0] is shapes[1][0]
    assert shapes[2] is None
    assert torch_dynamic_shapes([parse_input_spec("x:1x3")]) is None
