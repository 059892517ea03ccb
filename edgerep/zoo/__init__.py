"""Training-time reference blocks, tiny nets and demo data.

The blocks are plain modules written from their papers' equations, with no
deploy or fusing code: `edgerep.fold` must find the plain layer each one equals.
`BLOCKS` maps a short name to each block class; `get_block(name)` looks one up.
`ADAPTERS` and `get_adapter(name)` do the same for the adapter modules of
`edgerep.zoo.adapters`, which `edgerep.merge` must turn into plain layers.
"""

from __future__ import annotations

from edgerep.zoo._registry import BLOCKS, get_block, register_block
from edgerep.zoo.adapters import (
    ADAPTERS,
    BottleneckAdapter,
    ETHERAdapter,
    ETHERPlusAdapter,
    FedParaAdapter,
    FLoRAAdapter,
    GLoRAAdapter,
    HydraAdapter,
    PHMAdapter,
    PiSSAAdapter,
    RoSAAdapter,
    RoutedLowRankAdapter,
    SORSAAdapter,
    SSFAdapter,
    get_adapter,
    register_adapter,
)
from edgerep.zoo.blocks import (
    ACBlock,
    AngularDifferenceConv2d,
    BNAndPad,
    CentralDifferenceConv2d,
    ConvBN,
    DEConv,
    DiverseBranchBlock,
    HorizontalDifferenceConv2d,
    MobileOneBlock,
    RepGhostBlock,
    RepMLPUnit,
    RepVGG1dBlock,
    RepVGGBlock,
    SSFConv,
    SSFLinear,
    VerticalDifferenceConv2d,
    WeightNormConv,
)
from edgerep.zoo.data import accuracy, load_digits_tensors, train_classifier
from edgerep.zoo.mobile_blocks import (
    BNLinearHead,
    EfficientViMBlock,
    GhostModuleV3,
    LCNetV2Block,
    RegNetXBlock,
    RepVGGDW,
    RepViTBlock,
    SHViTBlock,
    TinyViTBlock,
)
from edgerep.zoo.nets import RepVGGNet, demo_net, mobileone_net, randomize_, repvgg_a0

__all__ = [
    # adapters (edgerep.zoo.adapters)
    "ADAPTERS",
    "BottleneckAdapter",
    "ETHERAdapter",
    "ETHERPlusAdapter",
    "FLoRAAdapter",
    "FedParaAdapter",
    "GLoRAAdapter",
    "HydraAdapter",
    "PHMAdapter",
    "PiSSAAdapter",
    "RoSAAdapter",
    "RoutedLowRankAdapter",
    "SORSAAdapter",
    "SSFAdapter",
    "get_adapter",
    "register_adapter",
    # blocks, nets and data
    "ACBlock",
    "AngularDifferenceConv2d",
    "BLOCKS",
    "BNAndPad",
    "BNLinearHead",
    "CentralDifferenceConv2d",
    "ConvBN",
    "DEConv",
    "DiverseBranchBlock",
    "EfficientViMBlock",
    "GhostModuleV3",
    "HorizontalDifferenceConv2d",
    "LCNetV2Block",
    "MobileOneBlock",
    "RepGhostBlock",
    "RegNetXBlock",
    "RepMLPUnit",
    "RepVGG1dBlock",
    "RepVGGBlock",
    "RepVGGDW",
    "RepVGGNet",
    "RepViTBlock",
    "SHViTBlock",
    "SSFConv",
    "SSFLinear",
    "TinyViTBlock",
    "VerticalDifferenceConv2d",
    "WeightNormConv",
    "accuracy",
    "demo_net",
    "get_block",
    "load_digits_tensors",
    "mobileone_net",
    "randomize_",
    "register_block",
    "repvgg_a0",
    "train_classifier",
]
