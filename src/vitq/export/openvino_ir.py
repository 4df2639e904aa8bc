"""OpenVINO IR out (``vitq export --format openvino``): the model is written as ONNX QDQ by
:func:`vitq.export.onnx.export`, then OpenVINO's own converter (``openvino.convert_model``) reads it and
``openvino.save_model`` writes ``NAME.xml`` / ``NAME.bin`` (no fp16 compression: the float parts keep float32,
the QDQ pairs become OpenVINO's FakeQuantize and the weight codes stay int8/uint8). The preprocessing JSON is
written beside the ``.xml`` as for ONNX.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from torch import nn

from vitq.errors import VitqError
from vitq.export.onnx import export as export_onnx
from vitq.export.onnx import sidecar_path
from vitq.export.runtimes import require
from vitq.state import check_output_parent, make_parents, remove_created


def export_openvino(qmodel: nn.Module, path: str | os.PathLike, overwrite: bool = False, **onnx_kwargs) -> dict:
    """Write ``qmodel`` as OpenVINO IR at ``path`` (``NAME.xml``; ``NAME.bin`` and ``NAME.preprocess.json``
    beside it). ``onnx_kwargs`` go to :func:`vitq.export.onnx.export` (opset, int4, float_model, metadata).
    Returns the ONNX export's record with the IR's paths and sizes."""
    ov = require("openvino")
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".xml"):
        raise VitqError(f"--out {path}: expected a file name ending in .xml for --format openvino")
    root = path[:-len(".xml")]
    outputs = (path, root + ".bin", sidecar_path(path))
    for p in outputs:
        if os.path.exists(p) and not overwrite:
            raise VitqError(f"output file {p} already exists (expected a new path, or pass --overwrite)")
    check_output_parent(path)
    created = make_parents(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.", dir=os.path.dirname(path))
    try:
        info = export_onnx(qmodel, os.path.join(tmp, "model.onnx"), **onnx_kwargs)
        ov_model = ov.convert_model(info["path"])
        ov.save_model(ov_model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
        with open(info["preprocess_json"]) as f:
            side = json.load(f)
        side["export"]["format"] = "openvino-ir (from vitq-onnx-1)"
        with open(os.path.join(tmp, "model.preprocess.json"), "w") as f:
            json.dump(side, f, indent=2)
            f.write("\n")
        for name, dest in zip(("model.xml", "model.bin", "model.preprocess.json"), outputs, strict=True):
            os.replace(os.path.join(tmp, name), dest)
    except BaseException:
        remove_created(created)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info.update({"format": "openvino", "path": path, "bin_path": outputs[1], "preprocess_json": outputs[2],
                 "file_bytes": os.path.getsize(path) + os.path.getsize(outputs[1]),
                 "onnx_file_bytes": info["file_bytes"]})
    return info
