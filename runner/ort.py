"""ONNX Runtime helpers shared by the export's parity check and the probes' feature extraction: a session
with the project's settings, and the relative error that judges ONNX Runtime against the module."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx


def max_rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |a - e| / max |e|`` over the finite entries that are not Caffe's ``-FLT_MAX`` sentinel.

    Entries where the reference is NaN, ±inf or ±FLT_MAX (MAX pooling's empty window) must be equal
    exactly (NaN to NaN); otherwise the error is ``inf``. The scale is the whole blob's, so values near
    zero are judged against the blob's magnitude, not their own.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return math.inf
    flt_max = float(np.finfo(np.float32).max)
    special = ~np.isfinite(e) | (np.abs(e) >= flt_max)
    if np.any(special):
        same = (a[special] == e[special]) | (np.isnan(a[special]) & np.isnan(e[special]))
        if not np.all(same):
            return math.inf
    a, e = a[~special], e[~special]
    if not e.size:
        return 0.0
    if not np.all(np.isfinite(a)):
        return math.inf
    scale = np.max(np.abs(e))
    diff = np.max(np.abs(a - e))
    return float(diff / scale) if scale > 0 else float(diff)


def ort_session(model: onnx.ModelProto | bytes | str | Path, providers: list[str] | None = None,
                threads: int = 0, profile_prefix: str | None = None, spinning: bool = False):
    """An onnxruntime InferenceSession (CPU unless ``providers`` says otherwise); with ``profile_prefix`` it
    records every node's time (``end_profiling()`` writes the JSON trace there).

    Idle pool threads sleep between operators unless ``spinning`` (ORT's own default). ``bench_probe.py``
    (BCNN batch 16, 2 cores, each run after a 50 ms pause) finds both about equal: 145-156 images/s sleeping
    against 147-154 spinning, and 122-126 against 123-132 in the probe pipeline, where images are decoded
    alongside. (Timed back to back, spinning looked up to 16 % faster: a pool still spinning from the last
    run starts the next one sooner.) Sleeping threads leave their cores to decoding and to other jobs, so
    sessions sleep."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if threads:
        opts.intra_op_num_threads = threads
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else \
        (str(model) if isinstance(model, Path) else model)
    return ort.InferenceSession(source, opts, providers=providers or ["CPUExecutionProvider"])
