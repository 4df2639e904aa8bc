"""What the export tests share: running an exported file in onnxruntime on one thread (with or without its graph
optimizations, i.e. the fused integer kernels or the plain QDQ nodes), and the row-wise cosine of two logit
arrays. The test modules import onnxruntime with ``pytest.importorskip`` before they use this."""

from __future__ import annotations

import numpy as np


def run_ort(path, x, optimize: bool = True) -> np.ndarray:
    """The file at ``path`` on the batch ``x`` (a tensor) in onnxruntime's CPU provider, one thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
