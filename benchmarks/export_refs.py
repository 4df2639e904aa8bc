"""The reference quantizers of the export benchmark (benchmarks/bench_export.py), run in the same process as the
vitq rows: onnxruntime's ``quantize_dynamic`` and ``quantize_static`` (QDQ, two settings) on the float ONNX file,
and NNCF's post-training quantization (TRANSFORMER model type, with and without SmoothQuant) on the float
model read by OpenVINO, saved as OpenVINO IR. NNCF is in the ``bench`` extra (``pip install -e '.[bench]'``)."""

from __future__ import annotations

import os

import numpy as np


def calib_reader(calib_x: np.ndarray, batch: int = 16):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib_x[i:i + batch]} for i in range(0, len(calib_x), batch)])

        def get_next(self):
            return next(self.it, None)

    return Reader()


def ort_references(float_onnx: str, calib_x: np.ndarray, tmp: str, more: bool = False) -> dict[str, str]:
    """onnxruntime's own quantizers: label -> file (``more``: a second quantize_static setting)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    files = {}
    settings = [("ort quantize_static (QDQ U8S8 per-channel, MatMul only, MinMax)", ["MatMul"],
                 CalibrationMethod.MinMax)]
    if more:  # a second setting (the best of the earlier runs is the one above)
        settings.append(("ort quantize_static (QDQ U8S8 per-channel, MatMul/Gemm/Conv, Percentile)",
                         ["MatMul", "Gemm", "Conv"], CalibrationMethod.Percentile))
    for label, ops, method in settings:
        path = os.path.join(tmp, f"static{len(files)}.onnx")
        quantize_static(float_onnx, path, calib_reader(calib_x), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=ops, calibrate_method=method)
        files[label] = path
    files["ort quantize_dynamic (u8 act per batch, s8 W)"] = path = os.path.join(tmp, "dynamic.onnx")
    quantize_dynamic(float_onnx, path, weight_type=QuantType.QInt8)
    return files


def nncf_references(float_onnx: str, calib_x: np.ndarray, tmp: str, batch: int = 1) -> tuple[dict[str, str], str]:
    """NNCF PTQ (TRANSFORMER model type, default preset) -> OpenVINO IR, with its default SmoothQuant and with
    SmoothQuant off: label -> .xml file, and the NNCF version (``{}, "missing"`` without NNCF)."""
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    except ImportError:
        return {}, "missing"
    import openvino as ov

    items = [calib_x[i:i + batch] for i in range(0, len(calib_x), batch)]
    files = {}
    for label, adv in (("NNCF PTQ TRANSFORMER (default: SmoothQuant on) → OpenVINO int8", None),
                       ("NNCF PTQ TRANSFORMER, SmoothQuant off → OpenVINO int8",
                        AdvancedQuantizationParameters(smooth_quant_alpha=-1.0))):
        model = ov.Core().read_model(float_onnx)
        q = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items),
                          advanced_parameters=adv)
        path = os.path.join(tmp, f"nncf{len(files)}.xml")
        ov.save_model(q, path, compress_to_fp16=False)
        files[label] = path
    return files, nncf.__version__


def file_bytes(path: str) -> int:
    """Size of a model file (with its .bin for OpenVINO IR)."""
    size = os.path.getsize(path)
    if path.endswith(".xml"):
        size += os.path.getsize(path[:-4] + ".bin")
    return size
