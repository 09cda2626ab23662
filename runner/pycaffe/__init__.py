"""``import caffe``: BVLC Caffe 1.0's Python interface (pycaffe) on egomotion's core.

Nets are :class:`converter.net.CaffeNet` modules, solvers are ``egomotion train``'s own (runner/train.py), so a
pycaffe script trains to the same numbers as the command line. Blob ``.data`` / ``.diff`` are numpy arrays
that share memory with the module's tensors (CPU mode), as pycaffe's share Caffe's memory.
"""

from __future__ import annotations

from converter.layers.python import PythonLayerBase as Layer  # noqa: F401  (class MyLayer(caffe.Layer))
from runner.pycaffe import coord_map, draw, io, net_spec, proto  # noqa: F401  (caffe.<module>)
from runner.pycaffe._caffe import (  # noqa: F401
    TEST,
    TRAIN,
    Blob,
    Net,
    layer_type_list,
    set_device,
    set_mode_cpu,
    set_mode_gpu,
    set_random_seed,
)
from runner.pycaffe._solver import (  # noqa: F401
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    get_solver,
)
from runner.pycaffe.classifier import Classifier  # noqa: F401
from runner.pycaffe.detector import Detector  # noqa: F401
from runner.pycaffe.net_spec import NetSpec, layers, params, to_proto  # noqa: F401

__version__ = "1.0.0"
