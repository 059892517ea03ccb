"""Load a shipped ML Program and evaluate it op by op with the registered kernels.

Loading goes through coremltools only: ``MLModel(path, skip_model_load=True)`` reads the
package without the Core ML framework, and ``milproto.load.load`` rebuilds the pymil
Program of the *shipped* spec, its weights read from the package's blob file. Nothing
is converted again, so what is checked is what ships.

Precision modes:

- ``float64``: every float tensor in float64 (graph semantics, tightest reference);
- ``float32``: every float tensor in float32 (graph semantics at the reference's dtype);
- ``declared``: each op computes in float32 and its output is rounded to the dtype the
  program declares for it, so an fp16 program keeps fp16 storage with fp32
  accumulation, as Core ML's GPU path computes. On an fp32 program it equals
  ``float32``. The Neural Engine (fp16 accumulation, its own transcendental
  approximations) is not modelled.

``const`` and ``constexpr_*`` ops (compressed weights: affine int8, palettized, sparse,
blockwise) are materialized once at load time; ``constexpr_*`` ops by edgerep's kernels
(`ops_constexpr`) on the exact stored values, so one constexpr may read another's output
(joint compression: quantized palettes, sparse palettized or quantized weights).

Control flow: ``cond`` and ``while_loop`` run their nested blocks (compiled once, like
the function body; a block reads the values of the blocks around it by name, and its
block inputs are bound on each entry). MIL lists (``make_list``, ``list_*``) are
immutable `TensorList` values.

States (iOS18, ``ct.StateType``): a state input is not fed; `Evaluator.make_state`
returns a fresh state mapping (name -> zero-filled array of the state's shape and
dtype, as Core ML's ``MLModel.make_state`` zero-fills), and ``run(feeds, state=...)``
reads it and, once the whole run has succeeded, stores the updated values in it, so
passing the same mapping again continues where the previous run left off (Core ML's
``predict(..., state=)``). A run that fails part-way (a kernel raises, an interrupt)
leaves the mapping unchanged: ``coreml_update_state`` writes to a scratch copy that is
committed only at the end.

Multi-function programs (``save_multifunction``): one `Evaluator` per function
(``function=`` name); each is compiled and evaluated on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.runtimes._mil._registry import Kernel, OpContext, StateCell, TensorList, lookup

__all__ = ["PRECISIONS", "Evaluator", "load_program", "unsupported_ops"]

PRECISIONS = ("float64", "float32", "declared")
_LOAD_TIME = ("const",)


def load_program(path: str | Path) -> tuple[Any, Any]:
    """The pymil Program of the ``.mlpackage`` at `path`, and its spec.

    Raises:
        UnsupportedError: not an ML Program (a NeuralNetwork model), or coremltools
            cannot read it.
    """
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
    except Exception as e:
        raise UnsupportedError(f"coremltools cannot read {str(path)!r}: {e}") from e
    if spec.WhichOneof("Type") != "mlProgram":
        raise UnsupportedError(
            f"{str(path)!r} is a {spec.WhichOneof('Type')} model; the reference evaluator "
            "reads ML Programs only (convert with convert_to='mlprogram')"
        )
    try:
        program = load(
            spec,
            specification_version=spec.specificationVersion,
            file_weights_dir=model.weights_dir,
        )
    except Exception as e:
        raise UnsupportedError(
            f"coremltools {ct.__version__} cannot rebuild the ML Program of {str(path)!r}: {e}"
        ) from e
    return program, spec


def _walk(block: Any) -> Iterator[Any]:
    for op in block.operations:
        yield op
        for inner in getattr(op, "blocks", ()) or ():
            yield from _walk(inner)


def _is_load_time(op_type: str) -> bool:
    return op_type in _LOAD_TIME or op_type.startswith("constexpr_")


def unsupported_ops(function: Any) -> dict[str, int]:
    """Op type -> count of the ops in `function` (nested blocks included) that no kernel
    evaluates at its opset."""
    opset = int(function.opset_version)
    missing: dict[str, int] = {}
    for op in _walk(function):
        if op.op_type not in _LOAD_TIME and lookup(op.op_type, opset) is None:
            missing[op.op_type] = missing.get(op.op_type, 0) + 1
    return dict(sorted(missing.items()))


def _np_dtype(var: Any) -> Any:
    from coremltools.converters.mil.mil import types

    try:
        return np.dtype(types.nptype_from_builtin(var.dtype))
    except Exception:  # strings, lists, states: kept as they are
        return None


def _is_state(var: Any) -> bool:
    from coremltools.converters.mil.mil import types

    return bool(types.is_state(var.sym_type))


def _static_shape(var: Any) -> tuple[int | None, ...] | None:
    try:
        shape = var.shape
    except ValueError:  # a list var has no shape
        return None
    if shape is None:
        return None
    return tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in shape)


@dataclass(frozen=True)
class _Step:
    op_type: str
    name: str
    kernel: Kernel
    inputs: tuple[tuple[str, str | tuple[str, ...]], ...]
    outputs: tuple[tuple[str, Any], ...]  # (name, declared numpy dtype)
    output_shapes: tuple[tuple[int | None, ...] | None, ...]
    blocks: tuple[_Plan, ...] = ()


@dataclass(frozen=True)
class _Plan:
    """A compiled block: its block inputs (name, declared dtype), steps and outputs."""

    inputs: tuple[tuple[str, Any], ...]
    steps: tuple[_Step, ...]
    outputs: tuple[str, ...]


class Evaluator:
    """One function of an ML Program, ready to evaluate in one precision mode.

    Attributes:
        input_names: the inputs a run is fed (state inputs excluded).
        state_names: the function's state inputs (iOS18), see `make_state`.
        output_names: the function's outputs.

    Raises (constructor):
        ConfigError: unknown precision or function.
        UnsupportedError: ops no kernel evaluates, all named at once, before any run.
    """

    def __init__(self, program: Any, *, function: str = "main", precision: str = "float32") -> None:
        if precision not in PRECISIONS:
            raise ConfigError(
                f"unknown reference-evaluator precision {precision!r}; choose one of "
                f"{', '.join(PRECISIONS)}"
            )
        if function not in program.functions:
            raise ConfigError(
                f"the ML Program has no function {function!r}; it has "
                f"{', '.join(sorted(program.functions))}"
            )
        fn = program.functions[function]
        missing = unsupported_ops(fn)
        if missing:
            listed = ", ".join(f"{t} (x{n})" for t, n in missing.items())
            raise UnsupportedError(
                f"the reference evaluator cannot evaluate op(s) {listed}; register a kernel "
                "with edgerep.runtimes._mil.kernel(op_type) or verify on macOS"
            )
        self.precision = precision
        self.function = function
        self.opset = int(fn.opset_version)
        self._compute = np.float64 if precision == "float64" else np.float32
        self.state_names = [n for n, v in fn.inputs.items() if _is_state(v)]
        self.input_names = [n for n in fn.inputs if n not in self.state_names]
        self.input_dtypes = {n: _np_dtype(fn.inputs[n]) for n in self.input_names}
        self._state_specs: dict[str, tuple[tuple[int, ...], Any]] = {}
        for n in self.state_names:
            wrapped = fn.inputs[n].sym_type.wrapped_type()
            from coremltools.converters.mil.mil import types

            shape = tuple(int(d) for d in wrapped.get_shape())
            self._state_specs[n] = (
                shape,
                np.dtype(types.nptype_from_builtin(wrapped.get_primitive())),
            )
        self.output_names = [v.name for v in fn.outputs]
        self._consts: dict[str, Any] = {}
        self._exact: dict[str, Any] = {}  # constexpr outputs in their declared dtype
        self._names = set(self.input_names) | set(self.state_names)
        self._plan = self._compile(fn, inputs=())

    # --- compiling ---------------------------------------------------------------------

    def _compile(self, block: Any, inputs: tuple[tuple[str, Any], ...]) -> _Plan:
        self._names.update(n for n, _ in inputs)
        steps = []
        for op in block.operations:
            if _is_load_time(op.op_type):
                self._materialize(op)
            else:
                steps.append(self._step(op))
        outputs = tuple(self._source(v) for v in block.outputs)
        return _Plan(inputs, tuple(steps), outputs)

    def _materialize(self, op: Any) -> None:
        if op.op_type == "const":
            values = [op.outputs[0].val]
        else:
            values = self._decompress(op)
        for var, value in zip(op.outputs, values):
            self._consts[var.name] = self._store(value, _np_dtype(var))

    def _decompress(self, op: Any) -> list[Any]:
        """A ``constexpr_*`` op's outputs, each in its declared dtype; inputs made by
        other constexprs are read in theirs."""
        kernel = lookup(op.op_type, self.opset)
        if kernel is None:  # unsupported_ops ran first
            raise UnsupportedError(f"no reference kernel for MIL op {op.op_type!r}")
        values: dict[str, Any] = {}
        for key, var in op.inputs.items():
            values[key] = self._exact.get(var.name, var.val)
        name = op.outputs[0].name
        ctx = OpContext(op.op_type, name, self.opset, np.float64, values)
        try:
            result = kernel(ctx)
        except (UnsupportedError, ConfigError):
            raise
        except Exception as e:
            raise UnsupportedError(
                f"the reference kernel for {op.op_type} {name!r} failed: {type(e).__name__}: {e}"
            ) from e
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        out = []
        for var, value in zip(op.outputs, results):
            declared = _np_dtype(var)
            a = np.asarray(value)
            exact = a.astype(declared) if declared is not None and a.dtype != declared else a
            self._exact[var.name] = exact
            out.append(exact)
        return out

    def _step(self, op: Any) -> _Step:
        kernel = lookup(op.op_type, self.opset)
        if kernel is None:  # unsupported_ops ran first
            raise UnsupportedError(f"no reference kernel for MIL op {op.op_type!r}")
        inputs: list[tuple[str, str | tuple[str, ...]]] = []
        for key, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                inputs.append((key, tuple(self._source(v) for v in var)))
            else:
                inputs.append((key, self._source(var)))
        blocks = tuple(
            self._compile(b, tuple((v.name, _np_dtype(v)) for v in b.inputs))
            for b in (getattr(op, "blocks", ()) or ())
        )
        self._names.update(v.name for v in op.outputs)
        return _Step(
            op.op_type,
            op.outputs[0].name if op.outputs else op.name,
            kernel,
            tuple(inputs),
            tuple((v.name, _np_dtype(v)) for v in op.outputs),
            tuple(_static_shape(v) for v in op.outputs),
            blocks,
        )

    def _source(self, var: Any) -> str:
        """The env name of `var`; a literal the builder made without a const op is
        materialized here."""
        name = var.name
        if var.op is None and name not in self._names and var.val is not None:
            self._consts[name] = self._store(var.val, _np_dtype(var))
        return name

    def _store(self, value: Any, declared: Any) -> Any:
        """A value as the mode keeps it: floats in the compute dtype, after rounding to
        the declared dtype in ``declared`` mode."""
        if isinstance(value, (str, bytes, TensorList, StateCell)) or value is None:
            return value
        a = np.asarray(value)
        if declared is not None and declared.kind in "iub":
            # an int/bool value stays one (a float fed to an int input is truncated)
            return a if a.dtype == declared else a.astype(declared)
        if a.dtype.kind == "f" or (declared is not None and declared.kind == "f"):
            if self.precision == "declared" and declared is not None and declared.kind == "f":
                a = a.astype(declared, copy=False)
            return a.astype(self._compute, copy=False)
        if declared is not None and a.dtype != declared and a.dtype.kind in "iub":
            return a.astype(declared)
        return a

    # --- running -----------------------------------------------------------------------

    def make_state(self) -> dict[str, np.ndarray]:
        """A fresh state for a stateful program: state name -> zeros of its shape (in the
        mode's float dtype), as Core ML's ``make_state`` starts. Empty for a stateless
        program."""
        return {
            n: self._store(np.zeros(shape, dtype), dtype)
            for n, (shape, dtype) in self._state_specs.items()
        }

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        state: dict[str, np.ndarray] | None = None,
        keep: bool = False,
    ) -> dict[str, np.ndarray]:
        """Evaluate the function on `feeds`; the outputs by name (every value if `keep`).

        `state` (stateful programs only) is read, and updated in place only when the
        whole run succeeds: a run that raises leaves it unchanged.

        Raises:
            ConfigError: feeds do not match the inputs; a stateful program without a
                state (or a state of other names or shapes).
            UnsupportedError: a kernel met an input it does not evaluate (naming the op).
        """
        env: dict[str, Any] = dict(self._consts)
        for name in self.input_names:
            if name not in feeds:
                raise ConfigError(f"missing input {name!r}; the program takes {self.input_names}")
            env[name] = self._store(np.asarray(feeds[name]), self.input_dtypes[name])
        # writes go to a scratch copy, committed to `state` only once the whole run has
        # succeeded: a failed prediction (a kernel that raises, an interrupt) leaves the
        # state as it was (a failed prediction must not change the state)
        scratch: dict[str, np.ndarray] = {}
        if self.state_names:
            self._check_state(state)
            assert state is not None
            scratch = dict(state)
            for name in self.state_names:
                env[name] = StateCell(scratch, name, self._state_store(name))
        elif state:
            raise ConfigError(
                f"the function {self.function!r} has no states; got state for {sorted(state)}"
            )
        self._run_plan(self._plan, env, ())
        result = env if keep else {n: np.asarray(env[n]) for n in self.output_names}
        if state is not None and scratch:
            state.update(scratch)  # StateCell.write replaced entries, never wrote into them
        return result

    def _state_store(self, name: str) -> Callable[[Any], Any]:
        declared = self._state_specs[name][1]
        return lambda value: self._store(value, declared)

    def _check_state(self, state: dict[str, np.ndarray] | None) -> None:
        if state is None:
            raise ConfigError(
                f"the function {self.function!r} is stateful (states {self.state_names}); "
                "pass state=evaluator.make_state() and the same mapping on later runs"
            )
        for name, (shape, _) in self._state_specs.items():
            if name not in state:
                raise ConfigError(
                    f"state {name!r} missing; the program's states are {self.state_names} "
                    "(use evaluator.make_state())"
                )
            if tuple(np.shape(state[name])) != shape:
                raise ConfigError(
                    f"state {name!r} has shape {tuple(np.shape(state[name]))}, the program "
                    f"declares {shape}"
                )

    def _run_plan(self, plan: _Plan, env: dict[str, Any], inputs: Any) -> list[Any]:
        if len(inputs) != len(plan.inputs):
            raise UnsupportedError(
                f"a nested block takes {len(plan.inputs)} input(s), was given {len(inputs)}"
            )
        for (name, declared), value in zip(plan.inputs, inputs):
            env[name] = self._store(value, declared)
        for step in plan.steps:
            values = {
                key: (tuple(env[s] for s in src) if isinstance(src, tuple) else env[src])
                for key, src in step.inputs
            }
            runner = None
            if step.blocks:
                blocks = step.blocks

                def runner(i: int, block_inputs: Any, blocks: Any = blocks) -> list[Any]:
                    return self._run_plan(blocks[i], env, block_inputs)

            ctx = OpContext(
                step.op_type,
                step.name,
                self.opset,
                self._compute,
                values,
                step.output_shapes,
                runner,
            )
            try:
                result = step.kernel(ctx)
            except (UnsupportedError, ConfigError):
                raise
            except Exception as e:
                raise UnsupportedError(
                    f"the reference kernel for {step.op_type} {step.name!r} failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
            results = result if isinstance(result, (tuple, list)) else (result,)
            for (name, declared), value in zip(step.outputs, results):
                env[name] = self._store(value, declared)
        return [env[n] for n in plan.outputs]
