"""Least-squares recovery: exact where the answer is known, and better than none on a zoo net."""

from __future__ import annotations

import torch

from edgerep.fold import fold
from edgerep.prune import prune
from edgerep.zoo import RepVGGNet, randomize_
from tests.prune._nets import chain


def test_ls_recovery_is_exact_when_removed_channels_duplicate_kept_ones() -> None:
    model = chain().double()
    # channels 16..31 of layer 2 are half of 0..15; ReLU(z / 2) = ReLU(z) / 2, so the
    # consumer can take them over exactly, and their smaller norm marks them for removal
    with torch.no_grad():
        model[2].weight[16:] = model[2].weight[:16] / 2
        model[2].bias[16:] = model[2].bias[:16] / 2
    x = torch.randn(64, 3, 12, 12, dtype=torch.float64)
    held_out = torch.randn(16, 3, 12, 12, dtype=torch.float64)
    # these tests compare output errors, not speed: measure=False (tiny nets at narrow
    # widths can be measured slower on onnxruntime, and would be refused)
    plain, _ = prune(model, x[:1], target="widths=2:16", recovery="none", measure=False)
    solved, report = prune(
        model, x[:1], target="widths=2:16", calib=x, recovery="ls", ridge=0.0, measure=False
    )
    assert solved[2].out_channels == 16
    with torch.no_grad():
        ref = model(held_out)
        err_plain = float((plain(held_out) - ref).abs().max() / ref.abs().max())
        err_solved = float((solved(held_out) - ref).abs().max() / ref.abs().max())
    assert err_plain > 1e-2  # dropping the duplicates without recovery is wrong ...
    assert err_solved < 1e-8  # ... and the re-solved consumer makes it exact
    (row,) = report.recovery
    assert row.name == "4" and row.kept and row.condition is not None and row.condition > 1
    assert row.rel_error_after < 1e-8 < row.rel_error_before


def test_recovery_lowers_output_error_on_a_folded_zoo_net() -> None:
    net = randomize_(RepVGGNet((8, 16, 24), (1, 2, 2), num_classes=10), seed=0).eval()
    x = torch.randn(96, 3, 16, 16)
    folded, _ = fold(net, (x[:1],))
    held_out = torch.randn(32, 3, 16, 16)
    errors = {}
    for mode in ("none", "mean", "ls"):
        pruned, _ = prune(folded, x[:1], target="macs=0.5", calib=x, recovery=mode, measure=False)
        with torch.no_grad():
            ref = folded(held_out)
            errors[mode] = float((pruned(held_out) - ref).norm() / ref.norm())
    assert errors["ls"] < 0.7 * errors["none"], errors
    assert errors["mean"] < errors["none"], errors


def test_linear_chains_are_pruned_and_recovered() -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(20, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 5),
    ).eval()
    x, held_out = torch.randn(256, 20), torch.randn(64, 20)
    errors = {}
    for mode in ("none", "ls"):
        pruned, report = prune(
            mlp,
            x[:1],
            target="params=0.5",
            calib=x if mode == "ls" else None,
            recovery=mode,
            measure=False,
        )
        assert report.achieved is not None and report.achieved <= 0.5
        assert pruned[4].out_features == 5 and pruned[0].in_features == 20
        with torch.no_grad():
            errors[mode] = float((pruned(held_out) - mlp(held_out)).norm() / mlp(held_out).norm())
    assert errors["ls"] < 0.7 * errors["none"], errors


def test_recovery_without_ridge_takes_the_minimum_norm_solution_of_a_singular_system():
    """A channel that is always 0 after its ReLU makes XᵀX singular at ridge 0: the
    least-squares re-solve falls back to the minimum-norm solution (it crashed) and
    reports no condition number."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)
    ).eval()
    with torch.no_grad():
        model[2].weight[0].fill_(1.0)
        model[2].bias[0] = -1e6  # channel 0 of the middle conv is dead after its ReLU
    calib = torch.randn(64, 3, 8, 8)
    _, report = prune(model, calib[:1], target="widths=2:7", calib=calib, measure=False, ridge=0.0)
    (row,) = report.recovery
    assert row.kept and row.condition is None and row.rel_error_after < row.rel_error_before
