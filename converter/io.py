"""Reading and writing Caffe's files: nets and solvers (text and binary), blobs, and Caffe's upgrades.

Every reader applies the upgrades BVLC Caffe applies on read (``upgrade_proto.cpp``), so the rest of
the project only ever sees V2 nets (``layer { type: "Convolution" }``) and solvers with a ``type``
string. Every writer is atomic (temporary file + rename): a killed process never leaves a half-written
file under the final name.

User mistakes raise :class:`CaffeError` with one line: ``path:line:col: message`` for syntax errors.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format

from converter import caffe_pb2
from converter.errors import CaffeError

BINARY_SUFFIXES = {".caffemodel", ".binaryproto", ".solverstate", ".pb"}


# ---------------------------------------------------------------------------------------------
# Generic message I/O
# ---------------------------------------------------------------------------------------------
def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CaffeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CaffeError(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise CaffeError(f"{path}: cannot read ({e.strerror})") from None


def parse_text(text: str, message: pb_message.Message, path: str | os.PathLike = "<text>") -> None:
    """Parse prototxt ``text`` into ``message``; a syntax error becomes ``path:line:col: message``.

    ``Parse`` (not ``Merge``), like Caffe's TextFormat::Parse: a non-repeated field given twice is an error.
    """
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        detail = str(e)
        prefix = f"{line}:{col} : "
        if detail.startswith(prefix):
            detail = detail[len(prefix):]
        raise CaffeError(f"{path}:{line}:{col}: {detail}") from None


def read_text(path: str | os.PathLike, message: pb_message.Message) -> pb_message.Message:
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaffeError(f"{path}: not a text prototxt (byte {e.start} is not UTF-8); "
                         "binary files should end in .caffemodel/.binaryproto/.solverstate") from None
    parse_text(text, message, path)
    return message


def read_binary(path: str | os.PathLike, message: pb_message.Message) -> pb_message.Message:
    data = _read_bytes(path)
    try:
        message.ParseFromString(data)
    except pb_message.DecodeError as e:
        raise CaffeError(f"{path}: not a valid binary {message.DESCRIPTOR.name} ({e})") from None
    return message


def _is_binary(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in BINARY_SUFFIXES


def read_message(path: str | os.PathLike, message: pb_message.Message) -> pb_message.Message:
    """Text or binary by the file's extension, as Caffe's tools decide it."""
    return read_binary(path, message) if _is_binary(path) else read_text(path, message)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s existing ancestors that is not a folder (so nothing can be made under it)."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def replaceable(path: str | os.PathLike) -> Path:
    """The file a finished temporary may be renamed onto: where a symbolic link points (the link stays), and
    never a device node, FIFO, socket or folder, which a rename would replace (``-o /dev/full`` did)."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        raise CaffeError(f"{path}: exists and is not a regular file (a folder, device, FIFO or socket); "
                         "refusing to replace it")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``. The file gets the
    mode a plain ``open`` would give it (0666 less the umask), not mkstemp's private 0600."""
    path = replaceable(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        in_the_way = _file_in_the_way(path)
        raise CaffeError(f"{path}: {in_the_way} is a file, not a folder" if in_the_way is not None
                         else f"{path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    except OSError as e:
        raise CaffeError(f"{path}: cannot write ({e.strerror})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CaffeError(f"{path}: cannot write ({e.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, flag: str, discard: bool = False) -> Iterator[Path]:
    """An output folder a command makes if needed: a file there, or a place it cannot be made, is one line
    naming ``flag``. When the block fails, a folder this command made is removed again: with everything in
    it (``discard``), or only if the failure left it empty (earlier complete results in it are kept)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CaffeError(f"{flag} {path}: exists and is not a folder")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CaffeError(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from None
    try:
        yield path
    except BaseException:
        if created and discard:
            shutil.rmtree(path, ignore_errors=True)
        elif created and not any(path.iterdir()):
            path.rmdir()
        raise


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A folder written as a whole: the caller fills a hidden sibling, which replaces ``path`` only when the
    block ends without error. Any failure (a full disk, a file-size limit, a bad place) removes the sibling
    and is one CaffeError line; an existing ``path`` is untouched until then, and a file there is refused."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CaffeError(f"{path}: exists and is not a folder")
    in_the_way = _file_in_the_way(path)
    if in_the_way is not None:
        raise CaffeError(f"{path}: cannot create the folder ({in_the_way} is a file)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        os.chmod(stage, 0o777 & ~_umask())
    except OSError as e:
        raise CaffeError(f"{path}: cannot create the folder ({e.strerror or e})") from None
    try:
        yield stage
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(stage, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise CaffeError(f"{path}: cannot write ({e.strerror or e}); nothing was written there") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_message(path: str | os.PathLike, message: pb_message.Message, binary: bool | None = None) -> None:
    """Write ``message`` as binary or text (default: by the file's extension), atomically."""
    if binary is None:
        binary = _is_binary(path)
    data = message.SerializeToString() if binary else text_format.MessageToString(message).encode()
    atomic_write_bytes(path, data)


# ---------------------------------------------------------------------------------------------
# Nets
# ---------------------------------------------------------------------------------------------
def read_net(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """A NetParameter from a prototxt or a .caffemodel, upgraded to V2 as Caffe does on read."""
    net = read_message(path, caffe_pb2.NetParameter())
    return upgrade_net(net, path)


def parse_net(text: str, path: str | os.PathLike = "<text>") -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    parse_text(text, net, path)
    return upgrade_net(net, path)


def upgrade_net(net: caffe_pb2.NetParameter, path: str | os.PathLike = "<net>") -> caffe_pb2.NetParameter:
    """Caffe's UpgradeNetAsNeeded plus the input and BatchNorm upgrades, in Caffe's order."""
    if len(net.layer) and len(net.layers):
        raise CaffeError(f"{path}: mixes V2 'layer' and V1 'layers' fields; use one format "
                         "(egomotion upgrade converts V1 files)")
    if any(v1.HasField("layer") for v1 in net.layers):
        net = _upgrade_v0(net, path)
    _upgrade_data_transformation(net)
    if len(net.layers):
        net = _upgrade_v1(net, path)
    _upgrade_input(net, path)
    _upgrade_batch_norm(net)
    return net


_V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION", "data": "DATA",
    "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL", "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS", "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING", "relu": "RELU",
    "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS", "split": "SPLIT",
    "tanh": "TANH", "window_data": "WINDOW_DATA",
}

# V0 field -> {V0 layer type: (V1 sub-message, field)}; "*" = any type. From UpgradeV0LayerParameter.
_V0_FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"), "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"), "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "scale": {"*": ("transform_param", "scale")},
    "meanfile": {"*": ("transform_param", "mean_file")},
    "batchsize": {"data": ("data_param", "batch_size"), "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "cropsize": {"*": ("transform_param", "crop_size")},
    "mirror": {"*": ("transform_param", "mirror")},
    "rand_skip": {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}


def _upgrade_v0(net: caffe_pb2.NetParameter, path) -> caffe_pb2.NetParameter:
    """V0 (``layers { layer { type: "conv" } }``) → V1, folding V0 padding layers into conv/pool pads."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    producer: dict[str, caffe_pb2.V1LayerParameter] = {name: None for name in net.input}
    for conn in net.layers:
        v0 = conn.layer
        bottoms = list(conn.bottom)
        pad = None
        for j, blob in enumerate(bottoms):
            if blob not in producer:
                raise CaffeError(f"{path}: V0 layer '{v0.name}' reads unknown blob '{blob}'")
            source = producer[blob]
            if source is not None and source.layer.type == "padding":
                if v0.type not in ("conv", "pool") or len(bottoms) != 1:
                    raise CaffeError(f"{path}: V0 padding layer '{source.layer.name}' feeds '{v0.name}' "
                                     f"({v0.type}); only a single-input conv or pool may follow padding")
                pad = source.layer.pad
                bottoms[j] = source.bottom[0]
        for top in conn.top:
            producer[top] = conn
        if v0.type == "padding":
            continue
        v1 = out.layers.add()
        v1.bottom.extend(bottoms)
        v1.top.extend(conn.top)
        if v0.HasField("name"):
            v1.name = v0.name
        if v0.HasField("type"):
            if v0.type not in _V0_TYPES:
                raise CaffeError(f"{path}: V0 layer '{v0.name}' has unknown type '{v0.type}'")
            v1.type = caffe_pb2.V1LayerParameter.LayerType.Value(_V0_TYPES[v0.type])
        v1.blobs.extend(v0.blobs)
        v1.blobs_lr.extend(v0.blobs_lr)
        v1.weight_decay.extend(v0.weight_decay)
        for field, targets in _V0_FIELDS.items():
            if not v0.HasField(field):
                continue
            target = targets.get(v0.type) or targets.get("*")
            if target is None:
                raise CaffeError(f"{path}: V0 layer '{v0.name}': field {field} is not valid for type "
                                 f"'{v0.type}'")
            sub_name, sub_field = target
            sub = getattr(v1, sub_name)
            value = getattr(v0, field)
            if sub_field is None:
                sub.CopyFrom(value)
            elif isinstance(value, pb_message.Message):
                getattr(sub, sub_field).CopyFrom(value)
            elif sub.DESCRIPTOR.fields_by_name[sub_field].is_repeated:
                getattr(sub, sub_field).append(value)
            else:
                setattr(sub, sub_field, value)
        if pad is not None:
            sub = v1.convolution_param if v0.type == "conv" else v1.pooling_param
            del sub.pad[:]
            sub.pad.append(pad)
    return out


_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
_DATA_PARAMS = {"DATA": "data_param", "IMAGE_DATA": "image_data_param", "WINDOW_DATA": "window_data_param"}


def _upgrade_data_transformation(net: caffe_pb2.NetParameter) -> None:
    """Move scale/mean_file/crop_size/mirror from V1 data params into transform_param."""
    for v1 in net.layers:
        param_name = _DATA_PARAMS.get(caffe_pb2.V1LayerParameter.LayerType.Name(v1.type))
        if param_name is None or not v1.HasField(param_name):
            continue
        param = getattr(v1, param_name)
        for field in _TRANSFORM_FIELDS:
            if param.HasField(field):
                setattr(v1.transform_param, field, getattr(param, field))
                param.ClearField(field)


def _v1_type_names() -> dict[int, str]:
    """V1 enum → V2 type string (UpgradeV1LayerType): CamelCase of the enum, with Caffe's exceptions."""
    special = {"NONE": "", "ABSVAL": "AbsVal", "ARGMAX": "ArgMax", "BNLL": "BNLL", "HDF5_DATA": "HDF5Data",
               "HDF5_OUTPUT": "HDF5Output", "IM2COL": "Im2col", "LRN": "LRN", "MVN": "MVN",
               "RELU": "ReLU", "SOFTMAX_LOSS": "SoftmaxWithLoss", "TANH": "TanH"}
    names = {}
    for value in caffe_pb2.V1LayerParameter.LayerType.DESCRIPTOR.values:
        names[value.number] = special.get(
            value.name, "".join(part.capitalize() for part in value.name.split("_")))
    return names


_V1_COPIED_FIELDS = ("name", "bottom", "top", "include", "exclude", "blobs", "loss_weight")


def _upgrade_v1(net: caffe_pb2.NetParameter, path) -> caffe_pb2.NetParameter:
    """V1 ``layers { type: ENUM blobs_lr … param: "name" }`` → V2 ``layer { param { … } }``."""
    type_names = _v1_type_names()
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    v2_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for v1 in net.layers:
        lp = out.layer.add()
        for field in _V1_COPIED_FIELDS:
            if field == "name":
                if v1.HasField("name"):
                    lp.name = v1.name
            else:
                getattr(lp, field).extend(getattr(v1, field))
        if v1.HasField("type"):
            lp.type = type_names[v1.type]

        def spec(i: int, lp=lp) -> caffe_pb2.ParamSpec:
            while len(lp.param) <= i:
                lp.param.add()
            return lp.param[i]

        for i, name in enumerate(v1.param):
            spec(i).name = name
        for i, mode in enumerate(v1.blob_share_mode):
            spec(i).share_mode = mode  # same numbering: STRICT 0, PERMISSIVE 1
        for i, lr in enumerate(v1.blobs_lr):
            spec(i).lr_mult = lr
        for i, decay in enumerate(v1.weight_decay):
            spec(i).decay_mult = decay
        for field, value in v1.ListFields():
            if field.message_type is not None and field.name.endswith("_param") and field.name in v2_fields:
                getattr(lp, field.name).CopyFrom(value)
        if v1.HasField("layer"):
            raise CaffeError(f"{path}: layer '{v1.name}' mixes V0 and V1 definitions")
    return out


def _upgrade_input(net: caffe_pb2.NetParameter, path) -> None:
    """``input:``/``input_dim:``/``input_shape:`` → a first ``Input`` layer named "input"."""
    if not len(net.input):
        return
    if len(net.input_shape) or len(net.input_dim):
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, name in enumerate(net.input):
            layer.top.append(name)
            shape = layer.input_param.shape.add()
            if len(net.input_shape):
                if i >= len(net.input_shape):
                    raise CaffeError(f"{path}: input '{name}' has no input_shape "
                                     f"({len(net.input)} inputs, {len(net.input_shape)} input_shape)")
                shape.CopyFrom(net.input_shape[i])
            else:
                dims = net.input_dim[4 * i:4 * i + 4]
                if len(dims) != 4:
                    raise CaffeError(f"{path}: input '{name}' needs 4 input_dim values "
                                     f"({len(net.input)} inputs, {len(net.input_dim)} input_dim)")
                shape.dim.extend(dims)
        layers = [layer] + list(net.layer)
        del net.layer[:]
        net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def _upgrade_batch_norm(net: caffe_pb2.NetParameter) -> None:
    """Old BatchNorm definitions declared their three statistics as params; Caffe clears them."""
    for lp in net.layer:
        if lp.type == "BatchNorm" and len(lp.param) == 3:
            del lp.param[:]


# ---------------------------------------------------------------------------------------------
# Phase / level / stage filtering (Net::FilterNet)
# ---------------------------------------------------------------------------------------------
def state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    return all(s in stages for s in rule.stage) and not any(s in stages for s in rule.not_stage)


def filter_net(net: caffe_pb2.NetParameter, state: caffe_pb2.NetState | None = None,
               path: str | os.PathLike = "") -> caffe_pb2.NetParameter:
    """The net as Caffe builds it for ``state`` (default: the net's own ``state``)."""
    if state is None:
        state = net.state
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    out.state.CopyFrom(state)
    for lp in net.layer:
        if len(lp.include) and len(lp.exclude):
            where = f"{path}: " if path else ""
            raise CaffeError(f"{where}layer '{lp.name}': specify either include rules or exclude rules, not both")
        included = not len(lp.include)
        if any(state_meets_rule(state, r) for r in lp.exclude):
            included = False
        if any(state_meets_rule(state, r) for r in lp.include):
            included = True
        if included:
            out.layer.add().CopyFrom(lp)
    return out


def net_state(phase: str | int, level: int = 0, stages: list[str] | tuple[str, ...] = ()
              ) -> caffe_pb2.NetState:
    if isinstance(phase, str):
        try:
            phase = caffe_pb2.Phase.Value(phase.upper())
        except ValueError:
            raise CaffeError(f"unknown phase '{phase}' (TRAIN or TEST)") from None
    return caffe_pb2.NetState(phase=phase, level=level, stage=list(stages))


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------
_SOLVER_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad", "RMSPROP": "RMSProp",
                 "ADADELTA": "AdaDelta", "ADAM": "Adam"}


def read_solver(path: str | os.PathLike) -> caffe_pb2.SolverParameter:
    """A SolverParameter with Caffe's upgrades: solver_type enum → type, snapshot_prefix rules."""
    solver = read_message(path, caffe_pb2.SolverParameter())
    return upgrade_solver(solver, path)


def upgrade_solver(solver: caffe_pb2.SolverParameter, path: str | os.PathLike) -> caffe_pb2.SolverParameter:
    if solver.HasField("solver_type"):
        if solver.HasField("type"):
            raise CaffeError(f"{path}: both the old solver_type enum and the new type string are set")
        solver.type = _SOLVER_TYPES[caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)]
        solver.ClearField("solver_type")
    if solver.type not in _SOLVER_TYPES.values():
        raise CaffeError(f"{path}: unknown solver type '{solver.type}' "
                         f"(one of {', '.join(_SOLVER_TYPES.values())})")
    file = Path(path)
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = str(file.with_suffix(""))
    elif Path(solver.snapshot_prefix).is_dir():
        solver.snapshot_prefix = str(Path(solver.snapshot_prefix) / file.stem)
    return solver


# ---------------------------------------------------------------------------------------------
# Blobs
# ---------------------------------------------------------------------------------------------
def blob_shape(blob: caffe_pb2.BlobProto) -> tuple[int, ...]:
    """A BlobProto's shape: ``shape.dim`` or, for legacy blobs, (num, channels, height, width)."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    if is_legacy_blob(blob):
        return (blob.num, blob.channels, blob.height, blob.width)
    return ()  # Caffe writes a 0-axis blob (e.g. PReLU's shared slope) with an empty shape


def is_legacy_blob(blob: caffe_pb2.BlobProto) -> bool:
    """A blob saved before N-D blobs: num/channels/height/width instead of ``shape``."""
    return any(blob.HasField(f) for f in ("num", "channels", "height", "width"))


def blob_to_array(blob: caffe_pb2.BlobProto, what: str = "blob") -> np.ndarray:
    shape = blob_shape(blob)
    if any(d < 0 for d in shape):  # Blob::Reshape CHECK_GE(shape[i], 0)
        raise CaffeError(f"{what}: shape {shape} has a negative dimension")
    if len(blob.double_data):
        values = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    else:
        values = np.asarray(blob.data, dtype=np.float32)
    count = math.prod(shape)  # Python ints: a product of huge dims must not wrap around as int64 would
    if math.prod(d for d in shape if d) * 4 >= 1 << 63:  # numpy cannot even shape an empty float32 array so
        raise CaffeError(f"{what}: shape {shape} is absurd")
    if values.size != count:
        raise CaffeError(f"{what}: holds {values.size} values but its shape {shape} needs {count}")
    return values.reshape(shape)


def array_to_blob(array: np.ndarray, legacy_4d: bool = False) -> caffe_pb2.BlobProto:
    """A BlobProto with ``shape`` (or the legacy num/channels/height/width fields for mean files)."""
    array = np.asarray(array, dtype=np.float32)
    blob = caffe_pb2.BlobProto()
    if legacy_4d:
        if array.ndim > 4:
            raise CaffeError(f"a legacy blob holds at most 4 axes, got shape {array.shape}")
        n, c, h, w = (1,) * (4 - array.ndim) + array.shape
        blob.num, blob.channels, blob.height, blob.width = n, c, h, w
    else:
        blob.shape.dim.extend(array.shape)
    blob.data.extend(array.ravel().tolist())
    return blob


def read_blobproto(path: str | os.PathLike) -> np.ndarray:
    """A ``.binaryproto`` (e.g. a mean file from compute_image_mean) as a float32 array."""
    return blob_to_array(read_binary(path, caffe_pb2.BlobProto()), str(path))


def write_blobproto(path: str | os.PathLike, array: np.ndarray, legacy_4d: bool = True) -> None:
    write_message(path, array_to_blob(array, legacy_4d), binary=True)
