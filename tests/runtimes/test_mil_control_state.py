"""Control flow, lists, iOS18 states and multi-function programs in the Core ML
reference evaluator.

Every program is converted to an ``.mlpackage`` and read back (what ships is what is
evaluated), then evaluated in float64 and compared with numpy or PyTorch in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")
pytest.importorskip("scipy")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from edgerep.errors import ConfigError, UnsupportedError  # noqa: E402
from edgerep.runtimes._mil import Evaluator, _registry, load_program, ops_control  # noqa: E402
from edgerep.runtimes.coreml_reference import CoreMLReferenceRuntime  # noqa: E402

RNG = np.random.default_rng(7)
FP32 = ct.precision.FLOAT32


def _shipped(prog_or_model, path, target=ct.target.iOS17, **kwargs):
    """Convert (a MIL program or TorchScript module), save, and read the package back."""
    model = ct.convert(
        prog_or_model,
        convert_to="mlprogram",
        minimum_deployment_target=target,
        compute_precision=kwargs.pop("precision", FP32),
        **kwargs,
    )
    model.save(str(path))
    program, _ = load_program(path)
    return program


def _loop_program():
    """x -> while i < n: x = x * w + (i if sum(x) > 0 else -i); returns (x, i)."""

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=(2, 3)),
            mb.TensorSpec(shape=(2, 3)),
            mb.TensorSpec(shape=(1,), dtype=types.int32),
        ],
        opset_version=ct.target.iOS17,
    )
    def prog(x, w, n):
        limit = mb.squeeze(x=n)

        def cond(i, acc):
            return mb.less(x=i, y=limit)

        def body(i, acc):
            fi = mb.cast(x=i, dtype="fp32")
            step = mb.cond(
                pred=mb.greater(x=mb.reduce_sum(x=acc), y=0.0),
                _true_fn=lambda: mb.add(x=mb.mul(x=acc, y=w), y=fi),
                _false_fn=lambda: mb.sub(x=mb.mul(x=acc, y=w), y=fi),
            )
            return mb.add(x=i, y=1), step

        i, acc = mb.while_loop(_cond=cond, _body=body, loop_vars=(np.int32(0), x))
        return mb.identity(x=acc, name="acc"), mb.identity(x=i, name="count")

    return prog


def _loop_reference(x, w, n):
    x = x.astype(np.float64)
    for i in range(n):
        x = x * w + (i if x.sum() > 0 else -i)
    return x, n


@pytest.mark.parametrize("n", [0, 1, 5])
def test_while_loop_with_nested_cond_matches_numpy(tmp_path, n):
    program = _shipped(_loop_program(), tmp_path / "loop.mlpackage")
    ev = Evaluator(program, precision="float64")
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    w = RNG.uniform(0.5, 1.5, (2, 3)).astype(np.float32)
    got = ev.run({"x": x, "w": w, "n": np.array([n], np.int32)})
    want, count = _loop_reference(x, w.astype(np.float64), n)
    np.testing.assert_allclose(got["acc"], want, rtol=1e-12, atol=1e-12)
    assert int(got["count"]) == count


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_loop_with_branch_matches_torch(tmp_path):
    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            y = x
            for _ in range(int(n[0])):
                if bool(y.sum() > 0):
                    y = y * 0.5 - 1.0
                else:
                    y = torch.tanh(y) + 0.25
            return y

    scripted = torch.jit.script(Net().eval())
    program = _shipped(
        scripted,
        tmp_path / "ts.mlpackage",
        target=ct.target.iOS16,
        inputs=[
            ct.TensorType(name="x", shape=(2, 3)),
            ct.TensorType(name="n", shape=(1,), dtype=np.int32),
        ],
    )
    main = program.functions["main"]
    (loop,) = [op for op in main.operations if op.op_type == "while_loop"]
    assert [op.op_type for op in loop.blocks[1].operations if op.op_type == "cond"] == ["cond"]
    ev = Evaluator(program, precision="float64")
    for n in (0, 3, 7):
        x = torch.randn(2, 3, dtype=torch.float64)
        want = scripted(x, torch.tensor([n]))
        got = ev.run({"x": x.numpy().astype(np.float32), "n": np.array([n], np.int32)})
        want32 = scripted(x.float().double(), torch.tensor([n]))
        (value,) = got.values()
        np.testing.assert_allclose(value, want32.numpy(), rtol=1e-12, atol=1e-12)
        assert want.shape == value.shape


def test_cond_picks_the_branch_and_declared_mode_rounds_inside_blocks(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(4,))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.cond(
            pred=mb.greater(x=mb.reduce_max(x=x), y=0.0),
            _true_fn=lambda: mb.mul(x=x, y=1.0 / 3.0),
            _false_fn=lambda: mb.exp(x=x),
            name="out",
        )

    program = _shipped(prog, tmp_path / "c.mlpackage", precision=ct.precision.FLOAT16)
    x = np.array([0.3, 1.7, -2.0, 5.0], np.float32)
    exact = Evaluator(program, precision="float64").run({"x": x})["out"]
    declared = Evaluator(program, precision="declared").run({"x": x})["out"]
    # float64 is graph semantics (the fp16 casts do not round); declared mode keeps
    # fp16 storage inside the branch, with fp32 arithmetic (the constant ships in fp16)
    third = np.float64(np.float16(1 / 3))
    np.testing.assert_allclose(exact, x.astype(np.float64) * third, rtol=1e-12)
    x16 = x.astype(np.float16).astype(np.float32)
    want16 = (x16 * np.float16(1 / 3).astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(declared, want16.astype(np.float32))
    neg = -np.abs(x)
    np.testing.assert_allclose(
        Evaluator(program, precision="float64").run({"x": neg})["out"],
        np.exp(neg.astype(np.float64)),
        rtol=1e-12,
    )


def test_lists_in_a_loop_match_numpy(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 2))], opset_version=ct.target.iOS17)
    def prog(x):
        ls = mb.make_list(init_length=1, dynamic_length=True, elem_shape=(2,), dtype="fp32")

        def cond(i, ls):
            return mb.less(x=i, y=3)

        def body(i, ls):
            row = mb.gather(x=x, indices=i, axis=0)
            return mb.add(x=i, y=1), mb.list_write(ls=ls, index=i, value=mb.mul(x=row, y=row))

        _, ls = mb.while_loop(_cond=cond, _body=body, loop_vars=(np.int32(0), ls))
        stacked = mb.list_gather(ls=ls, indices=np.array([2, 0], np.int32))
        return (
            mb.identity(x=stacked, name="stacked"),
            mb.identity(x=mb.list_length(ls=ls), name="length"),
            mb.identity(x=mb.list_read(ls=ls, index=1), name="second"),
        )

    program = _shipped(prog, tmp_path / "l.mlpackage")
    x = RNG.standard_normal((3, 2)).astype(np.float32)
    got = Evaluator(program, precision="float64").run({"x": x})
    sq = x.astype(np.float64) ** 2
    np.testing.assert_allclose(got["stacked"], sq[[2, 0]], rtol=1e-12)
    np.testing.assert_allclose(got["second"], sq[1], rtol=1e-12)
    assert int(got["length"]) == 3


def test_a_runaway_loop_stops_with_a_named_error(tmp_path, monkeypatch):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS17)
    def prog(x):
        _, y = mb.while_loop(
            _cond=lambda i, y: mb.greater(x=mb.reduce_sum(x=x), y=-1e30),
            _body=lambda i, y: (mb.add(x=i, y=1), mb.add(x=y, y=1.0)),
            loop_vars=(np.int32(0), x),
        )
        return y

    program = _shipped(prog, tmp_path / "r.mlpackage")
    monkeypatch.setattr(ops_control, "MAX_LOOP_ITERATIONS", 50)
    with pytest.raises(UnsupportedError, match="did not end after 50 iterations"):
        Evaluator(program, precision="float64").run({"x": np.zeros(1, np.float32)})


# --- iOS18 states --------------------------------------------------------------------


def _stateful_program():
    @mb.program(
        input_specs=[mb.TensorSpec(shape=(2, 3)), mb.StateTensorSpec((2, 3), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(x, acc):
        total = mb.add(x=mb.read_state(input=acc), y=mb.cast(x=x, dtype="fp16"))
        mb.coreml_update_state(state=acc, value=total)
        return mb.mul(x=total, y=np.float16(2), name="out")

    return prog


def test_states_carry_across_runs_of_the_evaluator(tmp_path):
    program = _shipped(
        _stateful_program(),
        tmp_path / "s.mlpackage",
        target=ct.target.iOS18,
        precision=ct.precision.FLOAT16,
    )
    ev = Evaluator(program, precision="float64")
    assert ev.input_names == ["x"] and ev.state_names == ["acc"]
    state = ev.make_state()
    np.testing.assert_array_equal(state["acc"], np.zeros((2, 3)))  # Core ML zero-fills
    xs = [RNG.standard_normal((2, 3)).astype(np.float32) for _ in range(3)]
    total = np.zeros((2, 3))
    for x in xs:
        out = ev.run({"x": x}, state=state)["out"]
        total = total + x.astype(np.float64)  # float64: graph semantics, casts keep value
        np.testing.assert_allclose(out, 2 * total, rtol=1e-12)
        np.testing.assert_allclose(state["acc"], total, rtol=1e-12)
    # a fresh state starts again; a missing or misshaped one is refused
    np.testing.assert_allclose(
        ev.run({"x": xs[0]}, state=ev.make_state())["out"], 2 * xs[0].astype(np.float64), rtol=1e-12
    )
    with pytest.raises(ConfigError, match="stateful"):
        ev.run({"x": xs[0]})
    with pytest.raises(ConfigError, match="shape"):
        ev.run({"x": xs[0]}, state={"acc": np.zeros(3)})


def test_runtime_session_holds_one_state_and_resets_it(tmp_path):
    path = tmp_path / "s.mlpackage"
    _shipped(_stateful_program(), path, target=ct.target.iOS18, precision=ct.precision.FLOAT16)
    session = CoreMLReferenceRuntime().load(path, options={"precision": "declared"})
    assert session.describe()["states"] == ["acc"]
    assert session.thread_safe is False  # runs share one state: they must not interleave
    x = np.full((2, 3), 0.5, np.float32)
    outs = [session.run({"x": x})[0] for _ in range(3)]
    np.testing.assert_array_equal(np.stack(outs)[:, 0, 0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(session.state["acc"], np.full((2, 3), 1.5))
    session.reset_state()
    np.testing.assert_array_equal(session.run({"x": x})[0], np.full((2, 3), 1.0))


class _Accumulator(torch.nn.Module):
    """A registered buffer updated in forward (an iOS18 state after conversion), then a
    row gather whose index is an input: an index out of range fails *after* the update."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("acc", torch.zeros(2, 3, dtype=torch.float16))

    def forward(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        self.acc.add_(x.half())
        return torch.index_select(self.acc * 2.0, 0, row).float()


def _stateful_torch_package(path):
    model = _Accumulator().eval()
    traced = torch.jit.trace(model, (torch.zeros(2, 3), torch.zeros(1, dtype=torch.int32)))
    _shipped(
        traced,
        path,
        target=ct.target.iOS18,
        precision=ct.precision.FLOAT16,
        inputs=[
            ct.TensorType(name="x", shape=(2, 3), dtype=np.float32),
            ct.TensorType(name="row", shape=(1,), dtype=np.int32),
        ],
        outputs=[ct.TensorType(name="y", dtype=np.float32)],
        states=[
            ct.StateType(wrapped_type=ct.TensorType(shape=(2, 3), dtype=np.float16), name="acc")
        ],
    )


def test_a_failed_run_leaves_the_state_as_it_was(tmp_path, monkeypatch):
    """Core ML semantics: a prediction that fails does not change the state. The update
    op runs before the failing one, so a state written in place would be half-advanced."""
    path = tmp_path / "acc.mlpackage"
    _stateful_torch_package(path)
    program, _ = load_program(path)
    fn_ops = [op.op_type for op in program.functions["main"].operations]
    assert fn_ops.index("coreml_update_state") < fn_ops.index("gather")  # update first
    session = CoreMLReferenceRuntime().load(path, options={"precision": "declared"})
    x = RNG.uniform(0.5, 1.5, (2, 3)).astype(np.float32)
    good = session.run({"x": x, "row": np.array([1], np.int32)})[0]
    np.testing.assert_allclose(good, 2 * x.astype(np.float16)[1:].astype(np.float32), rtol=1e-3)
    before = session.state
    assert before["acc"].any()
    # an op after the update fails on this input (gather index out of range)
    with pytest.raises(UnsupportedError, match="gather index out of range"):
        session.run({"x": x, "row": np.array([5], np.int32)})
    np.testing.assert_array_equal(session.state["acc"], before["acc"])
    # an interrupt inside a later kernel (Ctrl-C mid-run) leaves it unchanged too
    ev = Evaluator(program, precision="float64")
    state = ev.make_state()
    ev.run({"x": x, "row": np.array([0], np.int32)}, state=state)
    saved = {k: v.copy() for k, v in state.items()}

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(_registry.KERNELS, "gather", [(0, interrupted)])
    interrupted_ev = Evaluator(program, precision="float64")
    with pytest.raises(KeyboardInterrupt):
        interrupted_ev.run({"x": x, "row": np.array([0], np.int32)}, state=state)
    np.testing.assert_array_equal(state["acc"], saved["acc"])
    # and the next successful run continues from the state before the failures
    out = ev.run({"x": x, "row": np.array([0], np.int32)}, state=state)["y"]
    np.testing.assert_allclose(out, 2 * (saved["acc"][:1] + x[:1].astype(np.float64)), rtol=1e-12)
    assert not np.array_equal(state["acc"], saved["acc"])


# --- multi-function programs -----------------------------------------------------------


def test_multifunction_package_evaluates_each_named_function(tmp_path):
    convs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        convs.append(torch.nn.Conv2d(3, 4, 3, padding=1).eval())
    for i, conv in enumerate(convs):
        traced = torch.jit.trace(conv, torch.zeros(1, 3, 8, 8))
        ct.convert(
            traced,
            inputs=[ct.TensorType(name="x", shape=(1, 3, 8, 8))],
            outputs=[ct.TensorType(name="y")],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=FP32,
        ).save(str(tmp_path / f"f{i}.mlpackage"))
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(tmp_path / "f0.mlpackage"), "main", "first")
    desc.add_function(str(tmp_path / "f1.mlpackage"), "main", "second")
    desc.default_function_name = "second"
    path = tmp_path / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(path))

    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    feeds = {"x": x.numpy().astype(np.float32)}
    program, _ = load_program(path)
    assert sorted(program.functions) == ["first", "second"]
    for name, conv in zip(("first", "second"), convs):
        got = Evaluator(program, function=name, precision="float64").run(feeds)["y"]
        want = conv.double()(x.float().double()).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    runtime = CoreMLReferenceRuntime()
    default = runtime.load(path, options={"precision": "float64"})
    assert default.describe()["function"] == "second"  # the package's default function
    first = runtime.load(path, options={"precision": "float64", "function": "first"})
    np.testing.assert_allclose(
        first.run(feeds)[0],
        convs[0].double()(x.float().double()).detach().numpy(),
        rtol=1e-10,
        atol=1e-10,
    )
    with pytest.raises(ConfigError, match=r"no function 'third'.*first, second"):
        runtime.load(path, options={"function": "third"})
