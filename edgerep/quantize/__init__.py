"""Quantization: exact equivalence transforms before it, backend engines for it.

`equalize` needs torch; `quantize_onnx` and `select_variant` import onnxruntime
only when called.
"""

from __future__ import annotations

from edgerep.quantize._bundle import (
    MODES,
    BackendResult,
    QuantizeReport,
    available_backends,
    candidates_for,
    default_backends,
    quantize_bundle,
    sqnr_db,
    supported_modes,
)
from edgerep.quantize._calib import CalibrationData, calibration_from_arrays, load_calibration
from edgerep.quantize._coreml import (
    CoreMLQuantConfig,
    CoreMLWeightQuant,
    dense_weights,
    quantize_coreml,
)
from edgerep.quantize._equalize import AbsorbedBias, EqualizedPair, EqualizeReport, equalize
from edgerep.quantize._executorch import ExecuTorchQuantConfig, quantize_executorch
from edgerep.quantize._mixed import MixedPrecisionReport, MixedPrecisionStep, mixed_precision
from edgerep.quantize._nncf import OvQuantConfig, OvQuantizedArtifact, quantize_openvino
from edgerep.quantize._ort import OrtQuantConfig, QuantizedArtifact, quantize_onnx
from edgerep.quantize._select import (
    DEFAULT_CANDIDATES,
    DEFAULT_OV_CANDIDATES,
    CandidateResult,
    SelectionReport,
    select_variant,
)
from edgerep.quantize._sensitivity import (
    DEFAULT_OP_TYPES,
    LayerSensitivity,
    SensitivityReport,
    layer_sensitivity,
)
from edgerep.quantize._smooth import (
    MigratedGroup,
    ReparamReport,
    SmoothReport,
    reparam_scales,
    smooth_quant,
)
from edgerep.quantize._tensorrt import (
    TensorRTQuantConfig,
    build_tensorrt_engine,
    prepare_tensorrt_int8,
    tensorrt_qdq_problems,
)

__all__ = [
    "CoreMLQuantConfig",
    "CoreMLWeightQuant",
    "dense_weights",
    "quantize_coreml",
    "ExecuTorchQuantConfig",
    "quantize_executorch",
    "TensorRTQuantConfig",
    "build_tensorrt_engine",
    "prepare_tensorrt_int8",
    "tensorrt_qdq_problems",
    "MODES",
    "BackendResult",
    "CalibrationData",
    "QuantizeReport",
    "available_backends",
    "candidates_for",
    "default_backends",
    "supported_modes",
    "calibration_from_arrays",
    "load_calibration",
    "quantize_bundle",
    "sqnr_db",
    "DEFAULT_CANDIDATES",
    "DEFAULT_OV_CANDIDATES",
    "OvQuantConfig",
    "OvQuantizedArtifact",
    "quantize_openvino",
    "CandidateResult",
    "SelectionReport",
    "select_variant",
    "AbsorbedBias",
    "EqualizeReport",
    "MigratedGroup",
    "ReparamReport",
    "SmoothReport",
    "reparam_scales",
    "smooth_quant",
    "EqualizedPair",
    "OrtQuantConfig",
    "QuantizedArtifact",
    "equalize",
    "quantize_onnx",
    "DEFAULT_OP_TYPES",
    "LayerSensitivity",
    "MixedPrecisionReport",
    "MixedPrecisionStep",
    "SensitivityReport",
    "layer_sensitivity",
    "mixed_precision",
]
