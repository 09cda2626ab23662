"""KITTI odometry: the official layout, camera motion between two frames, and the siamese pair LMDBs.

Thesis notes §1.1 (the paper's code, Agrawal et al. 2015), §1.4.3 and §1.4.6 (the thesis's
``preprocess_kitti_siamese.cpp``). Every choice below that one of the two codes made differently is a
flag, and every place where this module departs from both is said so.

**Layout.** ``KITTI_DIR`` is the official ``dataset/`` folder (or its parent): ``sequences/NN/image_K/
%06d.png`` (``image_0``/``image_1`` grey, ``image_2``/``image_3`` colour; 1241×376, 1226×370 or
1224×370 depending on the sequence) and ``poses/NN.txt``, one line per frame: the 3×4 matrix
``[R | t]`` that maps points of the left grey camera (cam0) of that frame into the world frame, which is
cam0 of frame 0. Ground truth exists for sequences 00–10 only; pairs with motion labels cannot be made
from the others (an error says so), SFA pairs can.

**Motion of a pair** (frame 1 = the anchor, frame 2 = its partner), from poses ``P1 = [R1 | t1]`` and
``P2 = [R2 | t2]``:

* translation, ``--translation-frame camera`` (default): ``R1ᵀ (t2 − t1)``, where the camera went,
  in the coordinates of the *first camera* (x right, y down, z forward). This is what the two images
  show: it does not depend on where the car happened to face when the sequence began. ΔX is sideways,
  ΔZ forward motion.
* ``--translation-frame world``: ``t2 − t1`` in world coordinates, **what both the thesis
  (``x = t2[0][3] − t1[0][3]``) and the paper's code (``get_pose_label``: ``deltaT = t2 − t1``) did**.
  After the car has turned 90° its forward motion shows up as ΔX, so the label is not a function of the
  two images alone.
* rotation about Y: the Euler ``y`` of ``M = R2ᵀ R1`` (both codes), ``atan2(M[0,2], hypot(M[2,2],
  M[1,2]))`` — the ``mat2euler`` of transforms3d/nibabel that both codes use. With y pointing down, a
  right turn gives a *negative* value (``R2ᵀR1`` is the inverse of the turn ``R1ᵀR2``).

The labels ignore the few centimetres between cam0 (whose poses these are) and the colour cameras, as
both codes did.

**Classes.** ``--labels thesis``: ΔX from −18 in steps of 1.8 m, rotation from −0.563987 in steps of
0.0536 rad, ΔZ from −14 in steps of 1.3 m, the thesis's loop ``while ((base += STEP) < v && bin < 20)
++bin;`` (float32, as the C++): class ``k`` is ``e_k < v ≤ e_{k+1}`` with ``e_k`` the k-th float32
accumulated edge, so class 0 is open below. Values above the 20th edge (ΔX > 18 m, ΔZ > 12 m, rotation >
0.508 rad) get the thesis's class **20 — a 21st class for 20-way classifiers**, an out-of-range label
that Caffe's SoftmaxWithLoss only DCHECKs (undefined in a release build). Here that is explicit:
``--thesis-overflow clamp`` (default) puts them in class 19, so the last class is open above like the
first is open below; ``drop`` leaves such pairs out. Either way they are counted and reported.
``--labels agrawal2015``: the paper's ``zScoreScaleSeperate`` normalisation, then 20 bins of width
``max_offset / 7`` over [−10, 10]·``max_offset / 7`` and two overflow classes: 0 below, 21 above —
22 classes (the paper's ``binCount = 2·numBins + 2``; its code built ``linspace(-10, 10, 20)``, 20
*edges*, so one of its 22 outputs could never be the target — here the 20 bins it meant). The
normalisation: μ and σ per axis from the consecutive-frame steps of the *training* ranges; the rotation
divided by its own σ, both translations by the larger of their two σ (``scale = σ/max σ`` taken
separately for translations and rotation). Stats come from 1-frame steps but labels from up to 7-frame
pairs — the bin width grows with the frame gap to match. The paper took 100 random forward steps
(i, i+1) of each of the 11 sequences (unseeded, test sequences included); here every step of the
training ranges, **in both directions**, since pairs go both ways: then μ ≈ 0, and a pair going
backwards is not thrown into an overflow class by the forward speed (with the camera frame, a forward
step's mean ΔZ is ~0.8 m against σ ~0.25 m). In the paper's own setting (world frame, whole sequences)
μ of a forward step is already near 0 (0.02 m against σ 0.6 m on sequence 00) and the two agree.

**Pairs.** Per sequence, ``--pairs-per-sequence`` pairs (the thesis: 2,300) or ``--train-pairs`` /
``--val-pairs`` in all, shared by the sequences in proportion to their length (the paper). The anchor is
uniform over the sequence's frames, the partner ``±offset`` away, the side random:

* ``--sampling thesis``: offset uniform in 1..``max_offset`` (7), partner clamped into the sequence (an
  anchor on the first or last frame always looks inward), as ``generate_pairs``; the crop's corner is
  uniform over every position (``rand() % (H − 227)`` in the thesis never takes the last one);
* ``--sampling paper``: offset ``round(U·max_offset)`` — 0..7, with 0 and 7 half as likely — and the
  partner clamped (``kitti_new.py:get_camera_imnames_and_pose``).

SFA pairs (``--task sfa``): the flag is ``|frame1 − frame2| ≤ max_offset`` (close, 1) or not (far, 0).
``thesis``: offsets uniform in 1..``--sfa-max-offset`` (20), about 1/3 close; ``paper``: half the pairs
close (0..7 as above), half far: a partner uniform among the frames more than ``max_offset`` away (the
paper's own far sampler could clamp a "far" partner to 1 frame away; this one cannot). Egomotion pairs
carry the flag as well (always 1 with the default offsets).

**Records.** Pairs of a split are shuffled together (seeded), key ``%08d`` = position. The image LMDB
holds one raw Datum per pair: both frames stacked channel-wise (2 channels grey, 6 colour BGR as Caffe's
``CVMatToDatum``), ``label`` = the SFA flag; the label LMDB the 3-byte Datum (class ΔX, class rotation,
class ΔZ) under the same key — the thesis's order, sliced into ``label_x``, ``label_y`` (rotation about
Y), ``label_z``. ``--store crop`` (the thesis): one random ``crop×crop`` window per pair, the same for
both frames; ``--store full`` (the paper): whole frames (cut at the top left to the smallest frame size
of the chosen sequences, so every Datum has one shape and a mean file fits), cropped at training time by
the Data layer's ``crop_size``, which takes one window per Datum — the same for both frames.
``pairs_<split>.tsv`` lists every record: key, sequence, camera, frames, window, the three values and
classes, the SFA flag. Frames are decoded once and kept while pairs need them (pairs are written in
frame order, their keys already shuffled).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from converter import caffe_pb2, experiment_pb2
from converter.errors import CaffeError
from converter.io import output_folder
from data_prep.imageset import discard_lmdb, read_image
from data_prep.lmdb_io import LMDBWriter, caffe_key

KITTI_URL = "https://www.cvlibs.net/datasets/kitti/eval_odometry.php"
WHERE_KITTI = (f"KITTI odometry comes from {KITTI_URL} (data_odometry_color.zip or data_odometry_gray.zip, "
               "and data_odometry_poses.zip for sequences 00-10; free registration): unpack them into one "
               "folder holding dataset/sequences/ and dataset/poses/ and pass it as KITTI_DIR=/path/to/dataset "
               "(or --kitti-dir); the 151-frame sample is ../shared/data/kitti_odometry_00")
CAMERAS = ("image_0", "image_1", "image_2", "image_3")
GREY_CAMERAS = ("image_0", "image_1")
_SCHEMA = experiment_pb2.KittiPairsParameter()
THESIS_SPLIT = (_SCHEMA.train, _SCHEMA.val)
PAPER_SPLIT = ("00-05,07,08,10", "06,09")
AXES = ("x", "rot_y", "z")  # the label Datum's order (thesis: x, y = rotation about Y, z)

#: ``preprocess_kitti_siamese.cpp``: (MIN, STEP) per axis, in the label Datum's order.
THESIS_BINS = {"x": (-18.0, 1.8), "rot_y": (-0.563987, 0.0536), "z": (-14.0, 1.3)}
THESIS_CLASSES = 20
AGRAWAL_BINS = 20  # + 2 overflow classes


# ---------------------------------------------------------------------------------------------------
# The official layout
# ---------------------------------------------------------------------------------------------------
def find_root(kitti_dir: str | Path) -> Path:
    """The folder holding ``sequences/`` (``KITTI_DIR`` may also be its parent with ``dataset/``)."""
    root = Path(kitti_dir)
    for candidate in (root, root / "dataset"):
        if (candidate / "sequences").is_dir():
            return candidate
    raise CaffeError(f"'{kitti_dir}' holds no sequences/ folder. {WHERE_KITTI}")


@dataclass(frozen=True)
class Range:
    """Frames ``first..last`` (inclusive) of one sequence; ``last`` None = to the end."""

    sequence: str
    first: int = 0
    last: int | None = None


def parse_ranges(spec: str) -> list[Range]:
    """``00-08``, ``0,1,2``, ``00:0-119`` (frames 0..119 of 00), ``none``/empty = no sequence."""
    out: list[Range] = []
    if spec.strip().lower() in ("", "none", "-"):
        return out
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d{1,2})(?:-(\d{1,2}))?(?::(\d+)-(\d+))?", item)
        if not m or (m.group(2) and m.group(3)):
            raise CaffeError(f"sequence spec '{item}': expected NN, NN-MM or NN:FIRST-LAST (frames), e.g. "
                             "'00-08', '00,02', '00:0-119'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise CaffeError(f"sequence spec '{item}': {hi:02d} comes before {lo:02d}")
        if m.group(3):
            first, last = int(m.group(3)), int(m.group(4))
            if last <= first:
                raise CaffeError(f"sequence spec '{item}': the frame range must hold at least 2 frames")
            out.append(Range(f"{lo:02d}", first, last))
        else:
            out += [Range(f"{s:02d}") for s in range(lo, hi + 1)]
    names = [(r.sequence, r.first, r.last) for r in out]
    if len(set(names)) != len(names):
        raise CaffeError(f"sequence spec '{spec}' names a sequence twice")
    return out


ROTATION_TOLERANCE = 1e-3  # KITTI's poses are printed with 7 significant digits: |R Rᵀ - I| ~ 1e-7


def read_poses(path: str | Path) -> np.ndarray:
    """``poses/NN.txt`` as (N, 3, 4) float64: one 3x4 pose [R | t] per line, R a rotation.

    Each line is checked (12 finite numbers, R orthonormal with determinant +1 within
    ``ROTATION_TOLERANCE``); a bad line is a CaffeError naming ``path:line``.
    """
    from data_prep.imageset import read_list_text

    try:
        text = read_list_text(path, "a KITTI poses file (12 numbers a line)")
    except CaffeError as e:
        raise CaffeError(f"{path}: cannot read poses ({e})" if str(e).startswith("cannot read") else str(e)) from None
    poses = []
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 12:
            raise CaffeError(f"{path}:{n}: expected 12 numbers per line (a 3x4 pose), got {len(fields)}")
        try:
            pose = np.array([float(f) for f in fields], dtype=np.float64).reshape(3, 4)
        except ValueError:
            raise CaffeError(f"{path}:{n}: expected 12 numbers per line (a 3x4 pose), got '{line.strip()[:80]}'") \
                from None
        if not np.all(np.isfinite(pose)):
            raise CaffeError(f"{path}:{n}: the pose holds NaN or infinite values")
        r = pose[:, :3]
        error = float(np.abs(r @ r.T - np.eye(3)).max())
        det = float(np.linalg.det(r))
        if error > ROTATION_TOLERANCE or abs(det - 1) > ROTATION_TOLERANCE:
            raise CaffeError(f"{path}:{n}: the left 3x3 block is not a rotation (|R Rᵀ - I| = {error:.3g}, "
                             f"det R = {det:.4g})")
        poses.append(pose)
    if not poses:
        raise CaffeError(f"{path}: holds no poses")
    return np.stack(poses)


@dataclass
class Sequence:
    """One sequence's frames of the chosen cameras, its poses (or None), and the frame range in use."""

    name: str
    folders: dict[str, Path]  # camera -> sequences/NN/image_K
    count: int  # frames 000000 .. count-1 present in every chosen camera
    poses: np.ndarray | None  # (count, 3, 4), cam0-to-world
    first: int
    last: int
    size: tuple[int, int] = (0, 0)  # H, W of the first frame

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def frame_path(self, camera: str, frame: int) -> Path:
        return self.folders[camera] / f"{frame:06d}.png"


def open_sequence(root: Path, rng_spec: Range, cameras: tuple[str, ...], need_poses: bool) -> Sequence:
    name = rng_spec.sequence
    folders = {}
    count = None
    for camera in cameras:
        folder = root / "sequences" / name / camera
        if not folder.is_dir():
            present = sorted(p.name for p in (root / "sequences" / name).glob("image_*"))
            raise CaffeError(f"sequence {name}: no {camera}/ in {root / 'sequences' / name}"
                             + (f" (it has {', '.join(present)})" if present else " (no such sequence)"))
        frames = sorted(p.name for p in folder.glob("*.png"))
        expected = [f"{i:06d}.png" for i in range(len(frames))]
        if frames != expected:
            first_bad = next(f for f, e in zip(frames, expected, strict=True) if f != e)
            raise CaffeError(f"{folder}: frames must be 000000.png, 000001.png, ... without gaps; "
                             f"found {first_bad} where {expected[frames.index(first_bad)]} was expected")
        if len(frames) < 2:
            raise CaffeError(f"{folder}: needs at least 2 frames, found {len(frames)}")
        count = len(frames) if count is None else min(count, len(frames))
        folders[camera] = folder
    poses = None
    pose_file = root / "poses" / f"{name}.txt"
    if pose_file.exists():
        poses = read_poses(pose_file)
        if len(poses) < count:
            raise CaffeError(f"{pose_file}: {len(poses)} poses for {count} frames")
        poses = poses[:count]  # a sample of the first frames uses the first lines of the full file
    elif need_poses:
        raise CaffeError(f"sequence {name}: no {pose_file}; motion labels need the ground-truth poses, which KITTI "
                         "publishes for sequences 00-10 only (data_odometry_poses.zip). Choose sequences from 00-10, "
                         "or make SFA pairs (--task sfa), which need no poses")
    last = count - 1 if rng_spec.last is None else rng_spec.last
    if rng_spec.first < 0 or last > count - 1:
        raise CaffeError(f"sequence {name}: frames {rng_spec.first}-{last} asked for, it has 0-{count - 1}")
    first_frame = read_frame(folders[cameras[0]] / "000000.png", "gray")
    return Sequence(name, folders, count, poses, rng_spec.first, last, first_frame.shape[-2:])


def read_frame(path: Path, mode: str) -> np.ndarray:
    """A frame as C, H, W uint8 (colour as OpenCV's BGR, what Caffe stores); unreadable frames, empty or
    truncated files and decompression bombs are a CaffeError naming the file."""
    img = read_image(str(path), is_color=mode != "gray")
    return img[None] if img.ndim == 2 else np.ascontiguousarray(img.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------------
# Motion and classes
# ---------------------------------------------------------------------------------------------------
def relative_motion(p1: np.ndarray, p2: np.ndarray, frame: str = "camera") -> np.ndarray:
    """(n, 3) ΔX, ΔZ and rotation about Y from (n, 3, 4) cam-to-world poses (see the module docstring)."""
    r1, r2 = p1[:, :, :3], p2[:, :, :3]
    dt = p2[:, :, 3] - p1[:, :, 3]
    if frame == "camera":
        dt = np.einsum("nji,nj->ni", r1, dt)  # R1ᵀ (t2 - t1)
    elif frame != "world":
        raise ValueError(f"translation frame must be camera or world, got {frame!r}")
    m = np.einsum("nki,nkj->nij", r2, r1)  # R2ᵀ R1
    rot_y = np.arctan2(m[:, 0, 2], np.hypot(m[:, 2, 2], m[:, 1, 2]))
    return np.stack([dt[:, 0], dt[:, 2], rot_y], axis=1)


def thesis_edges(minimum: float, step: float, bins: int = THESIS_CLASSES) -> np.ndarray:
    """The float32 edges ``base += STEP`` walks through in the thesis's loop (``edges[0]`` = MIN)."""
    edges = [np.float32(minimum)]
    for _ in range(bins):
        edges.append(np.float32(float(edges[-1]) + step))  # float += double literal, stored as float
    return np.array(edges, dtype=np.float32)


def thesis_class(values: np.ndarray, axis: str) -> np.ndarray:
    """The thesis's bin loop, 0..20 (20 = above the range): the number of edges e_1..e_20 below v."""
    minimum, step = THESIS_BINS[axis]
    edges = thesis_edges(minimum, step)[1:]
    return np.searchsorted(edges, np.asarray(values, dtype=np.float32), side="left").astype(np.int64)


@dataclass
class ZScore:
    """The paper's ``zScoreScaleSeperate``: per-axis μ; divisors σ_rot and max(σ_x, σ_z).

    μ and σ come from every consecutive-frame step of the training ranges taken both ways, (i, i+1)
    and (i+1, i), because the pairs go both ways too.
    """

    mean: list[float]  # x, rot_y, z (the label order)
    sd: list[float]
    divisor: list[float]
    pairs: int  # consecutive-frame pairs the stats came from
    source: str

    @classmethod
    def fit(cls, sequences: list[Sequence], frame: str) -> ZScore:
        values = []
        for s in sequences:
            if s.poses is None:
                continue
            p = s.poses[s.first:s.last + 1]
            values += [relative_motion(p[:-1], p[1:], frame), relative_motion(p[1:], p[:-1], frame)]
        if not values:
            raise CaffeError("--labels agrawal2015 needs a training split with poses for its statistics")
        v = np.concatenate(values)[:, [0, 2, 1]]  # -> x, rot_y, z
        mean, sd = v.mean(axis=0), v.std(axis=0)
        if np.any(sd == 0):
            raise CaffeError("--labels agrawal2015: a motion component never changes in the training frames")
        trans = max(sd[0], sd[2])
        divisor = [trans, sd[1], trans]
        src = ", ".join(f"{s.name}:{s.first}-{s.last}" for s in sequences)
        return cls(mean.tolist(), sd.tolist(), [float(d) for d in divisor], len(v), src)

    def classes(self, values: np.ndarray, max_offset: int) -> np.ndarray:
        """(n, 3) values (x, rot_y, z) → classes 0..21: 0 below the bins, 1..20 the bins, 21 above."""
        z = (values - np.array(self.mean)) / np.array(self.divisor)
        width = max_offset / 7.0
        edges = np.linspace(-AGRAWAL_BINS / 2, AGRAWAL_BINS / 2, AGRAWAL_BINS + 1) * width
        return np.searchsorted(edges, z, side="right").astype(np.int64)


def classify(values: np.ndarray, opts: PairOptions, zscore: ZScore | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) ΔX, ΔZ, rotation → classes in the label order (x, rot_y, z) and which were out of range.

    Thesis: out of range = the loop's class 20, returned clamped to 19 (``drop`` removes those pairs
    later); agrawal2015: out of range = the overflow classes 0 and 21, which are real classes.
    """
    ordered = np.asarray(values)[:, [0, 2, 1]]
    if opts.labels == "thesis":
        classes = np.stack([thesis_class(ordered[:, i], a) for i, a in enumerate(AXES)], axis=1)
        outside = classes == THESIS_CLASSES
        return np.minimum(classes, THESIS_CLASSES - 1), outside
    if zscore is None:
        raise ValueError("agrawal2015 labels need the training statistics (ZScore.fit)")
    classes = zscore.classes(ordered, opts.max_offset)
    return classes, (classes == 0) | (classes == AGRAWAL_BINS + 1)


# ---------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------
@dataclass
class PairOptions:
    """How pairs are drawn and labelled; every default is the schema's (``KittiPairsParameter`` in
    converter/experiment.proto, where each value is explained), so the experiment, the CLI and this library
    agree by construction."""

    task: str = _SCHEMA.task  # egomotion | sfa
    labels: str = _SCHEMA.labels  # thesis | agrawal2015
    translation_frame: str = _SCHEMA.translation_frame  # world (the thesis and the paper) | camera
    thesis_overflow: str = _SCHEMA.thesis_overflow  # clamp | drop
    sampling: str = _SCHEMA.sampling  # thesis | paper
    max_offset: int = _SCHEMA.max_offset
    sfa_max_offset: int = _SCHEMA.sfa_max_offset
    store: str = _SCHEMA.store  # crop | full
    crop: int = _SCHEMA.crop
    cameras: tuple[str, ...] = tuple(_SCHEMA.camera.split(","))
    mode: str = _SCHEMA.mode  # auto | color | gray
    pairs_per_sequence: int = _SCHEMA.pairs_per_sequence
    total_pairs: dict[str, int] = field(default_factory=dict)  # split -> total, shared ∝ length
    seed: int = _SCHEMA.seed

    def colour(self) -> bool:
        if self.mode == "auto":
            return not all(c in GREY_CAMERAS for c in self.cameras)
        return self.mode == "color"


@dataclass
class Pairs:
    """A split's pairs, one row each, in key order (row i has key ``%08d`` of i)."""

    sequence: np.ndarray  # (n,) str
    camera: np.ndarray  # (n,) str
    frame1: np.ndarray  # (n,) int64, the anchor
    frame2: np.ndarray
    window: np.ndarray  # (n, 4) int64: x, y, width, height of the stored window
    values: np.ndarray  # (n, 3) float64: ΔX, ΔZ, rotation about Y (NaN without poses)
    classes: np.ndarray  # (n, 3) int64 in the label Datum's order: x, rot_y, z (-1 without poses)
    sfa: np.ndarray  # (n,) int64: 1 close, 0 far
    overflow: dict[str, int]  # axis -> pairs out of the thesis's range (clamped or dropped)
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.frame1)

    def take(self, index: np.ndarray) -> Pairs:
        return Pairs(self.sequence[index], self.camera[index], self.frame1[index], self.frame2[index],
                     self.window[index], self.values[index], self.classes[index], self.sfa[index],
                     self.overflow, self.dropped)


def _partners(rng: np.random.Generator, anchor: np.ndarray, first: int, last: int, opts: PairOptions
              ) -> np.ndarray:
    m = len(anchor)
    if opts.task == "sfa" and opts.sampling == "paper":
        close = rng.random(m) < 0.5
        partner = np.empty(m, np.int64)
        partner[close] = _near(rng, anchor[close], first, last, opts.max_offset, "paper")
        partner[~close] = _far(rng, anchor[~close], first, last, opts.max_offset)
        return partner
    most = opts.sfa_max_offset if opts.task == "sfa" else opts.max_offset
    return _near(rng, anchor, first, last, most, opts.sampling)


def _near(rng: np.random.Generator, anchor: np.ndarray, first: int, last: int, most: int, sampling: str
          ) -> np.ndarray:
    m = len(anchor)
    if sampling == "thesis":  # generate_rand(neighbours) + 1: uniform 1..most
        offset = rng.integers(1, most + 1, m)
    else:  # int(round(rand() * mxFrmDiff)): 0..most
        offset = np.floor(rng.random(m) * most + 0.5).astype(np.int64)
    left = rng.integers(0, 2, m).astype(bool)
    if sampling == "thesis":  # the first frame always pairs to the right, the last to the left
        left = np.where(anchor == first, False, np.where(anchor == last, True, left))
    return np.clip(np.where(left, anchor - offset, anchor + offset), first, last)


def _far(rng: np.random.Generator, anchor: np.ndarray, first: int, last: int, gap: int) -> np.ndarray:
    """Uniform among the frames more than ``gap`` away, on a random side that has some."""
    m = len(anchor)
    n_left = np.maximum(anchor - gap - first, 0)  # frames first .. anchor-gap-1
    n_right = np.maximum(last - anchor - gap, 0)  # frames anchor+gap+1 .. last
    if np.any(n_left + n_right == 0):
        raise CaffeError(f"SFA far pairs need frames more than {gap} apart; a range of "
                         f"{last - first + 1} frames is too short for some anchors")
    left = rng.integers(0, 2, m).astype(bool)
    left = np.where(n_left == 0, False, np.where(n_right == 0, True, left))
    u = rng.random(m)
    pick_left = first + np.floor(u * n_left).astype(np.int64)
    pick_right = anchor + gap + 1 + np.floor(u * n_right).astype(np.int64)
    return np.where(left, pick_left, pick_right)


def split_counts(sequences: list[Sequence], opts: PairOptions, split: str) -> list[int]:
    """Pairs per sequence: a fixed number each (thesis), or a total shared ∝ length (paper's rounding)."""
    total = opts.total_pairs.get(split)
    if total is None:
        return [opts.pairs_per_sequence] * len(sequences)
    lengths = np.array([s.length for s in sequences], dtype=np.float64)
    return [int(round(total * p)) for p in lengths / lengths.sum()]


def plan_pairs(sequences: list[Sequence], opts: PairOptions, rng: np.random.Generator, split: str = "train",
               zscore: ZScore | None = None, window_size: tuple[int, int] | None = None) -> Pairs:
    """Sample a split's pairs, label them, and shuffle them into key order (no image is read)."""
    counts = split_counts(sequences, opts, split)
    cols: dict[str, list] = {k: [] for k in ("seq", "cam", "f1", "f2", "win", "val")}
    with_poses = all(s.poses is not None for s in sequences)
    for s, m in zip(sequences, counts, strict=True):
        anchor = rng.integers(s.first, s.last + 1, m)
        partner = _partners(rng, anchor, s.first, s.last, opts)
        cams = np.asarray(opts.cameras)[rng.integers(0, len(opts.cameras), m)]
        h, w = s.size
        if opts.store == "crop":
            if h < opts.crop or w < opts.crop:
                raise CaffeError(f"sequence {s.name}: frames of {w}x{h} are smaller than the {opts.crop} crop")
            x = rng.integers(0, w - opts.crop + 1, m)
            y = rng.integers(0, h - opts.crop + 1, m)
            win = np.stack([x, y, np.full(m, opts.crop), np.full(m, opts.crop)], axis=1)
        else:
            fw, fh = (w, h) if window_size is None else window_size
            win = np.tile(np.array([0, 0, fw, fh]), (m, 1))
        if with_poses:
            val = relative_motion(s.poses[anchor], s.poses[partner], opts.translation_frame)
        else:
            val = np.full((m, 3), np.nan)
        cols["seq"].append(np.full(m, s.name))
        cols["cam"].append(cams)
        cols["f1"].append(anchor)
        cols["f2"].append(partner)
        cols["win"].append(win.astype(np.int64))
        cols["val"].append(val)
    cat = {k: np.concatenate(v) if v else np.empty(0) for k, v in cols.items()}
    n = len(cat["f1"])
    values = cat["val"].reshape(n, 3) if n else np.empty((0, 3))
    keep = np.ones(n, dtype=bool)
    if with_poses:
        classes, outside = classify(values, opts, zscore)
        if opts.labels == "thesis" and opts.thesis_overflow == "drop":
            keep = ~outside.any(axis=1)
    else:
        classes, outside = np.full((n, 3), -1, np.int64), np.zeros((n, 3), dtype=bool)
    overflow = {a: int(outside[:, i].sum()) for i, a in enumerate(AXES)}
    sfa = (np.abs(cat["f1"] - cat["f2"]) <= opts.max_offset).astype(np.int64) if n else np.empty(0, np.int64)
    pairs = Pairs(cat["seq"].astype(str), cat["cam"].astype(str), cat["f1"].astype(np.int64),
                  cat["f2"].astype(np.int64), cat["win"].reshape(n, 4), values, classes, sfa, overflow)
    kept = np.flatnonzero(keep)
    pairs = pairs.take(rng.permutation(kept))  # random_shuffle of the split (after dropping)
    pairs.dropped = int(n - len(kept))
    return pairs


# ---------------------------------------------------------------------------------------------------
# Frames and records
# ---------------------------------------------------------------------------------------------------
class FrameCache:
    """Decoded frames, each decoded once while pairs need it (pairs come in frame order)."""

    def __init__(self, sequences: dict[str, Sequence], mode: str, budget_mb: int = 2048):
        self.sequences = sequences
        self.mode = mode
        self.budget = budget_mb << 20
        self.frames: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()
        self.bytes = 0
        self.decoded = 0

    def get(self, sequence: str, camera: str, frame: int) -> np.ndarray:
        key = (sequence, camera, frame)
        img = self.frames.get(key)
        if img is None:
            s = self.sequences[sequence]
            img = read_frame(s.frame_path(camera, frame), self.mode)
            if img.shape[1:] != s.size:
                raise CaffeError(f"{s.frame_path(camera, frame)}: {img.shape[2]}x{img.shape[1]}, but frame 0 of "
                                 f"sequence {sequence} is {s.size[1]}x{s.size[0]}")
            self.frames[key] = img
            self.bytes += img.nbytes
            self.decoded += 1
        return img

    def release_before(self, sequence: str, camera: str, frame: int) -> None:
        """Forget frames no later pair needs (other groups, earlier frames), then keep within budget."""
        for key in [k for k in self.frames if k[:2] != (sequence, camera) or k[2] < frame]:
            self.bytes -= self.frames.pop(key).nbytes
        while self.bytes > self.budget and len(self.frames) > 2:
            self.bytes -= self.frames.popitem(last=False)[1].nbytes


def pair_datum(img1: np.ndarray, img2: np.ndarray, window: np.ndarray, sfa: int) -> bytes:
    """The image record: both windows stacked channel-wise, C×H×W uint8, label = the SFA flag."""
    x, y, w, h = (int(v) for v in window)
    data = np.concatenate([img1[:, y:y + h, x:x + w], img2[:, y:y + h, x:x + w]])
    datum = caffe_pb2.Datum(channels=data.shape[0], height=h, width=w, data=data.tobytes(), label=int(sfa),
                            encoded=False)
    return datum.SerializeToString()


def label_datum(classes: np.ndarray) -> bytes:
    """The thesis's label record: channels 3, height 1, width 1, one byte per class (x, rot_y, z)."""
    datum = caffe_pb2.Datum(channels=3, height=1, width=1, data=bytes(np.asarray(classes, np.uint8)), label=0,
                            encoded=False)
    return datum.SerializeToString()


def write_manifest(path: Path, pairs: Pairs) -> None:
    cols = ["key", "sequence", "camera", "frame1", "frame2", "crop_x", "crop_y", "crop_w", "crop_h",
            "dx", "dz", "rot_y", "class_x", "class_rot_y", "class_z", "sfa"]
    lines = ["\t".join(cols)]
    for i in range(len(pairs)):
        v = pairs.values[i]
        lines.append("\t".join([
            caffe_key(i).decode(), pairs.sequence[i], pairs.camera[i], str(pairs.frame1[i]), str(pairs.frame2[i]),
            *(str(int(c)) for c in pairs.window[i]),
            *("" if math.isnan(x) else f"{x:.6f}" for x in v),
            *("" if c < 0 else str(int(c)) for c in pairs.classes[i]), str(int(pairs.sfa[i]))]))
    path.write_text("\n".join(lines) + "\n")


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``pairs_<split>.tsv`` as dicts of strings."""
    lines = Path(path).read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:]]


def write_lmdbs(pairs: Pairs, sequences: dict[str, Sequence], image_db: Path, label_db: Path | None,
                mode: str, overwrite: bool = False, cache_mb: int = 2048, cache: FrameCache | None = None
                ) -> dict[str, float]:
    """Both LMDBs, same keys; pairs are visited in frame order so that each frame is decoded once."""
    cache = cache or FrameCache(sequences, mode, cache_mb)
    first = np.minimum(pairs.frame1, pairs.frame2)
    order = np.lexsort((first, pairs.camera, pairs.sequence))
    start = time.perf_counter()
    lmdb_mode = "overwrite" if overwrite else "new"
    # Every key is new (mode new/overwrite), so the writer need not look each one up; the map is sized
    # up front (a Datum of two windows plus page overhead) instead of growing by doubling.
    channels = 6 if mode == "color" else 2
    record = channels * int(pairs.window[0, 2] * pairs.window[0, 3]) + 4096 if len(pairs) else 4096
    existed = {db: db.exists() for db in (image_db, label_db) if db is not None}
    opened: list[Path] = []  # the LMDBs this call created or emptied, removed again if it fails on bad input
    labels = None
    try:
        if label_db is not None:
            labels = LMDBWriter(label_db, lmdb_mode, skip_existing=False,
                                map_size=(len(pairs) * 64 + (1 << 20)) * 2)
            opened.append(label_db)
        images = LMDBWriter(image_db, lmdb_mode, skip_existing=False, map_size=len(pairs) * record + (64 << 20))
        opened.append(image_db)
        with images:
            for i in order.tolist():
                seq, cam = pairs.sequence[i], pairs.camera[i]
                cache.release_before(seq, cam, int(first[i]))
                img1 = cache.get(seq, cam, int(pairs.frame1[i]))
                img2 = cache.get(seq, cam, int(pairs.frame2[i]))
                key = caffe_key(i)
                images.put(key, pair_datum(img1, img2, pairs.window[i], int(pairs.sfa[i])))
                if labels is not None:
                    labels.put(key, label_datum(pairs.classes[i]))
        if labels is not None:
            labels.close()  # every pair written: finished, its incomplete-marker goes
            labels = None
    except CaffeError:
        if labels is not None:
            labels.close()
            labels = None
        for db in opened:  # a bad frame midway: no half-written LMDB is left looking complete
            discard_lmdb(db, remove_folder=not existed[db])
        raise
    finally:
        if labels is not None:  # stopped part way (interrupted): committed records kept, marked incomplete
            labels.close(finished=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pairs_per_s": len(pairs) / seconds if seconds > 0 else 0.0,
            "frames_decoded": cache.decoded}


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------
def histograms(pairs: Pairs, n_classes: int) -> dict[str, list[int]]:
    return {a: np.bincount(pairs.classes[:, i][pairs.classes[:, i] >= 0], minlength=n_classes).tolist()
            for i, a in enumerate(AXES)}


def format_histograms(hist: dict[str, list[int]]) -> str:
    n = len(next(iter(hist.values())))
    width = max(4, *(len(str(c)) + 1 for h in hist.values() for c in h))
    lines = ["  class " + "".join(f"{c:>{width}}" for c in range(n))]
    for axis, counts in hist.items():
        lines.append(f"  {axis:<6}" + "".join(f"{c:>{width}}" for c in counts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------------
def make_pairs(kitti_dir: str | Path, out: str | Path, opts: PairOptions, train: str = THESIS_SPLIT[0],
               val: str = THESIS_SPLIT[1], overwrite: bool = False, mean: bool = False, cache_mb: int = 2048,
               echo=print) -> dict:
    """Plan, write and report the train and val splits into ``out`` (see the module docstring)."""
    _check_options(opts)
    root = find_root(kitti_dir)
    out = Path(out)
    specs = {"train": parse_ranges(train), "val": parse_ranges(val)}
    if not specs["train"] and not specs["val"]:
        raise CaffeError("no sequences chosen (--train and --val are both empty)")
    need_poses = opts.task == "egomotion"
    splits = {k: [open_sequence(root, r, opts.cameras, need_poses) for r in v] for k, v in specs.items()}
    _check_overlap(splits)
    all_seqs = [s for v in splits.values() for s in v]
    window = None
    if opts.store == "full":
        window = (min(s.size[1] for s in all_seqs), min(s.size[0] for s in all_seqs))
    with_labels = all(s.poses is not None for s in all_seqs)
    zscore = None
    if with_labels and opts.labels == "agrawal2015":
        zscore = ZScore.fit(splits["train"], opts.translation_frame)
    if not with_labels:
        echo("NOTICE: some chosen sequences have no poses: SFA pairs only, no label LMDB")
    n_classes = THESIS_CLASSES if opts.labels == "thesis" else AGRAWAL_BINS + 2
    colour = opts.colour()
    mode = "color" if colour else "gray"
    root_seq = np.random.SeedSequence(opts.seed)
    rngs = dict(zip(("train", "val"), (np.random.default_rng(s) for s in root_seq.spawn(2)), strict=True))
    with output_folder(out, "--out"):
        report: dict = {"kitti_dir": str(root), "options": {**asdict(opts), "train": train, "val": val},
                        "channels": 6 if colour else 2, "classes_per_axis": n_classes,
                        "zscore": asdict(zscore) if zscore else None, "splits": {}}
        for split, seqs in splits.items():
            if not seqs:
                continue
            pairs = plan_pairs(seqs, opts, rngs[split], split, zscore, window)
            if len(pairs) == 0:
                raise CaffeError(f"{split}: no pairs left (every pair was out of the thesis's range and dropped)")
            image_db = out / f"pairs_{split}_lmdb"
            label_db = out / f"pairs_{split}_labels_lmdb" if with_labels else None
            manifest = out / f"pairs_{split}.tsv"
            had_manifest = manifest.exists()
            write_manifest(manifest, pairs)
            try:
                timing = write_lmdbs(pairs, {s.name: s for s in seqs}, image_db, label_db, mode, overwrite, cache_mb)
            except CaffeError:  # write_lmdbs removed its new LMDBs; the manifest of pairs never written goes too
                if not had_manifest:
                    manifest.unlink(missing_ok=True)
                raise
            hist = histograms(pairs, n_classes) if with_labels else {}
            entry = {"pairs": len(pairs), "sequences": [f"{s.name}:{s.first}-{s.last}" for s in seqs],
                     "close": int(pairs.sfa.sum()), "far": int(len(pairs) - pairs.sfa.sum()),
                     "overflow": pairs.overflow, "dropped": pairs.dropped, "histogram": hist, **timing,
                     "image_lmdb": str(image_db), "label_lmdb": str(label_db) if label_db else None}
            if mean and split == "train":
                from data_prep.imageset import compute_image_mean

                entry["mean_file"] = str(out / "mean_train.binaryproto")
                compute_image_mean(image_db, entry["mean_file"])
            report["splits"][split] = entry
            echo(_summary(split, entry, opts))
            if hist:
                echo(format_histograms(hist))
        (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
        return report


def _summary(split: str, e: dict, opts: PairOptions) -> str:
    c = 6 if opts.colour() else 2
    over = ", ".join(f"{a} {n}" for a, n in e["overflow"].items())
    if opts.labels == "thesis":
        fate = f"dropped {e['dropped']} pairs" if opts.thesis_overflow == "drop" else "clamped to class 19"
        over = f"above the thesis's range ({fate}): {over}"
    else:
        over = f"in the overflow classes 0/21: {over}"
    return (f"{split}: {e['pairs']} pairs ({c}-channel) from {', '.join(e['sequences'])}; close {e['close']}, "
            f"far {e['far']}; {over}; {e['frames_decoded']} frames decoded, {e['pairs_per_s']:.0f} pairs/s "
            f"-> {e['image_lmdb']}" + (f" + {e['label_lmdb']}" if e["label_lmdb"] else ""))


def _check_options(opts: PairOptions) -> None:
    choices = {"task": ("egomotion", "sfa"), "labels": ("thesis", "agrawal2015"),
               "translation_frame": ("camera", "world"), "thesis_overflow": ("clamp", "drop"),
               "sampling": ("thesis", "paper"), "store": ("crop", "full"), "mode": ("auto", "color", "gray")}
    for name, allowed in choices.items():
        if getattr(opts, name) not in allowed:
            raise CaffeError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
    for camera in opts.cameras:
        if camera not in CAMERAS:
            raise CaffeError(f"camera '{camera}': expected one of {', '.join(CAMERAS)}")
    if opts.max_offset < 1 or opts.sfa_max_offset < 1 or opts.crop < 1 or opts.pairs_per_sequence < 1:
        raise CaffeError("--max-offset, --sfa-max-offset, --crop and --pairs-per-sequence must be positive")
    for split, total in opts.total_pairs.items():
        if total < 1:
            raise CaffeError(f"--{split}-pairs must be positive, got {total}")


def _check_overlap(splits: dict[str, list[Sequence]]) -> None:
    for a in splits["train"]:
        for b in splits["val"]:
            if a.name == b.name and a.first <= b.last and b.first <= a.last:
                raise CaffeError(f"sequence {a.name}: train frames {a.first}-{a.last} and val frames "
                                 f"{b.first}-{b.last} overlap")
