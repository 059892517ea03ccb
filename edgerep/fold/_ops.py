"""Which captured ops are affine in their activation inputs: one registry.

A rule names which argument positions may carry activations (tensors that depend
on the model input) and the op's role: 'conv' and 'linear' ops decide the kind of
layer a region becomes, 'elementwise' ops (BN, scale, add, pad, avg-pool, identity)
ride along. Arguments computed only from parameters are constants: they are
evaluated inside the region, which is how weight parametrizations and BN-and-pad
values fold too. Keys are ATen overloads (torch.export), Python callables and
module types (torch.fx), or ``("method", name)`` for fx method calls.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["AFFINE_OPS", "AffineRule", "is_structural", "register_affine_op", "rule_for"]


@dataclass(frozen=True)
class AffineRule:
    """How one op is affine.

    Attributes:
        role: 'conv', 'linear' or 'elementwise'.
        act_args: positional indices that may carry activations (None: any).
        max_act: most activation inputs allowed (2 for add/sub, else 1).
        check: extra condition on the node (e.g. batch norm not in training).
    """

    role: str
    act_args: tuple[int, ...] | None = (0,)
    max_act: int = 1
    check: Callable[[fx.Node], bool] | None = None


AFFINE_OPS: dict[Hashable, AffineRule] = {}


def register_affine_op(key: Hashable, rule: AffineRule) -> None:
    """Register an affine op; a key may be registered once."""
    if key in AFFINE_OPS:
        raise ValueError(f"affine op {key!r} is already registered")
    AFFINE_OPS[key] = rule


def _arg(node: fx.Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _not_training(
    index: int, name: str = "training", default: bool = False
) -> Callable[[fx.Node], bool]:
    return lambda n: bool(_arg(n, index, name, default) is False)


def _constant_pad(n: fx.Node) -> bool:
    return _arg(n, 2, "mode", "constant") == "constant"


def _not_transposed(n: fx.Node) -> bool:
    return _arg(n, 6, "transposed", False) is False


def _bn_output(n: fx.Node) -> bool:
    src = n.args[0]
    return bool(
        isinstance(src, fx.Node)
        and src.target is torch.ops.aten._native_batch_norm_legit_no_training.default
        and n.args[1] == 0
    )


def _zero_padding_mode(module: nn.Module) -> bool:
    return getattr(module, "padding_mode", "zeros") == "zeros"


aten = torch.ops.aten
_CONV = AffineRule("conv")
_LINEAR = AffineRule("linear")
_ELEM = AffineRule("elementwise")
_SUM = AffineRule("elementwise", act_args=None, max_act=2)
_PRODUCT = AffineRule("elementwise", act_args=None, max_act=1)

for _key, _rule in [
    # torch.export (ATen) ops
    (aten.conv1d.default, _CONV),
    (aten.conv2d.default, _CONV),
    (aten.conv3d.default, _CONV),
    (aten.conv1d.padding, _CONV),
    (aten.conv2d.padding, _CONV),
    (aten.conv3d.padding, _CONV),
    (aten.convolution.default, AffineRule("conv", check=_not_transposed)),
    (aten.linear.default, _LINEAR),
    (aten.matmul.default, _LINEAR),
    (aten.mm.default, _LINEAR),
    (aten.batch_norm.default, AffineRule("elementwise", check=_not_training(5))),
    (aten._native_batch_norm_legit_no_training.default, _ELEM),
    (operator.getitem, AffineRule("elementwise", check=_bn_output)),
    (aten.add.Tensor, _SUM),
    (aten.add.Scalar, _ELEM),
    (aten.sub.Tensor, _SUM),
    (aten.sub.Scalar, _ELEM),
    (aten.mul.Tensor, _PRODUCT),
    (aten.mul.Scalar, _ELEM),
    (aten.div.Tensor, _ELEM),
    (aten.div.Scalar, _ELEM),
    (aten.neg.default, _ELEM),
    (aten.pad.default, AffineRule("elementwise", check=_constant_pad)),
    (aten.constant_pad_nd.default, _ELEM),
    (aten.avg_pool1d.default, _ELEM),
    (aten.avg_pool2d.default, _ELEM),
    (aten.avg_pool3d.default, _ELEM),
    (aten.clone.default, _ELEM),
    (aten.alias.default, _ELEM),
    (aten.detach.default, _ELEM),
    (aten.dropout.default, AffineRule("elementwise", check=_not_training(2, "train"))),
    # torch.fx (Python-level) ops: the first capture tried
    (operator.add, _SUM),
    (operator.sub, _SUM),
    (operator.mul, _PRODUCT),
    (operator.truediv, _ELEM),
    (operator.neg, _ELEM),
    (torch.add, _SUM),
    (torch.sub, _SUM),
    (torch.mul, _PRODUCT),
    (F.conv1d, _CONV),
    (F.conv2d, _CONV),
    (F.conv3d, _CONV),
    (F.linear, _LINEAR),
    (F.pad, AffineRule("elementwise", check=_constant_pad)),
    (F.avg_pool1d, _ELEM),
    (F.avg_pool2d, _ELEM),
    (F.batch_norm, AffineRule("elementwise", check=_not_training(5))),
    # F.dropout trains unless told not to
    (F.dropout, AffineRule("elementwise", check=_not_training(2, default=True))),
    (("method", "add"), _SUM),
    (("method", "sub"), _SUM),
    (("method", "mul"), _PRODUCT),
    (("method", "div"), _ELEM),
    (("method", "clone"), _ELEM),
    (("method", "contiguous"), _ELEM),
    (nn.Conv1d, AffineRule("conv", check=None)),
    (nn.Conv2d, AffineRule("conv", check=None)),
    (nn.Conv3d, AffineRule("conv", check=None)),
    (nn.Linear, _LINEAR),
    (nn.BatchNorm1d, _ELEM),
    (nn.BatchNorm2d, _ELEM),
    (nn.BatchNorm3d, _ELEM),
    (nn.AvgPool1d, _ELEM),
    (nn.AvgPool2d, _ELEM),
    (nn.Identity, _ELEM),
    (nn.Dropout, _ELEM),
    (nn.ZeroPad2d, _ELEM),
    (nn.ConstantPad1d, _ELEM),
    (nn.ConstantPad2d, _ELEM),
]:
    register_affine_op(_key, _rule)


def rule_for(node: fx.Node, root: nn.Module) -> AffineRule | None:
    """The affine rule of a call node, or None when the op is not known to be affine."""
    if node.op == "call_function":
        key: Hashable = node.target
    elif node.op == "call_method":
        key = ("method", node.target)
    elif node.op == "call_module":
        module = root.get_submodule(str(node.target))
        if module.training or not _zero_padding_mode(module):
            return None
        key = type(module)  # type: ignore[assignment]
    else:
        return None
    try:
        rule = AFFINE_OPS.get(key)
    except TypeError:  # unhashable target
        return None
    if rule is None or (rule.check is not None and not rule.check(node)):
        return None
    return rule


# Ops that only move or copy data (zero pad, identity): a region made of one layer
# and these is already as plain as it gets.
_STRUCTURAL: set[Hashable] = {
    aten.pad.default,
    aten.constant_pad_nd.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.dropout.default,
    F.pad,
    F.dropout,
    ("method", "clone"),
    ("method", "contiguous"),
}
_STRUCTURAL_MODULES = (nn.Identity, nn.Dropout, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)


def is_structural(node: fx.Node) -> bool:
    """Whether the node only pads or copies its input."""
    if node.op == "call_module":
        owner = node.graph.owning_module
        return owner is not None and isinstance(
            owner.get_submodule(str(node.target)), _STRUCTURAL_MODULES
        )
    key: Hashable = ("method", node.target) if node.op == "call_method" else node.target
    try:
        return key in _STRUCTURAL
    except TypeError:
        return False
