"""Vision layers: Convolution, Deconvolution, Pooling and LRN, with Caffe's shape rules and edge cases.

Sources are BVLC Caffe 1.0's ``src/caffe/layers/{base_conv,conv,deconv,pooling,lrn}_layer.cpp``. Where
PyTorch's own operator disagrees with Caffe (pooling output sizes and the ceil overhang divisor, MAX's
``-FLT_MAX`` for empty windows) the layer pads explicitly and uses floor-mode torch pooling, so the
shapes are Caffe's by construction and the graph exports to ONNX as plain ``Pad`` + ``MaxPool``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from converter import caffe_pb2
from converter.layers.base import BlobSpec, Layer, Shape, register

FLT_MAX = float(np.finfo(np.float32).max)
"""Caffe initialises MAX pooling outputs to ``-FLT_MAX`` (also for double nets)."""

Pool = caffe_pb2.PoolingParameter
Norm = caffe_pb2.LRNParameter


# -- shared geometry helpers ---------------------------------------------------------------------

def spatial_param(layer: Layer, p, name: str, num_spatial: int, default: int | None,
                  hw: str | None = None) -> tuple[int, ...]:
    """One of Convolution's kernel/stride/pad/dilation per spatial axis (``base_conv_layer.cpp``).

    ``{hw}_h``/``{hw}_w`` (2-D only, and never together with the repeated field) win when either is
    set; otherwise the repeated ``name`` gives one value for all axes or one per axis. ``default`` is
    the C++ constant used when the repeated field is empty (kDefaultStride 1, kDefaultPad 0,
    kDefaultDilation 1; None for kernel_size, which must be given). Repeated fields have no schema
    default, so these constants are Caffe's C++, not a restated proto default.
    """
    values = list(getattr(p, name))
    h, w = f"{hw}_h", f"{hw}_w"
    if hw is not None and (p.HasField(h) or p.HasField(w)):
        layer.check(num_spatial == 2, f"{h} & {w} can only be used for 2D convolution")
        layer.check(not values, f"either {name} or {h}/{w} should be specified; not both")
        return (getattr(p, h), getattr(p, w))
    allowed = (1, num_spatial) if default is None else (0, 1, num_spatial)
    layer.check(len(values) in allowed,
                f"{name} must be specified once, or once per spatial dimension ({name} specified "
                f"{len(values)} times; {num_spatial} spatial dims)")
    if not values:
        return (default,) * num_spatial
    return tuple(values[0] if len(values) == 1 else values[i] for i in range(num_spatial))


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool, clip: bool) -> int:
    """Caffe's pooled extent (``PoolingLayer::Reshape``).

    ``ceil((size + 2*pad - kernel) / stride) + 1`` (``floor`` for round_mode FLOOR); then, only when the
    layer has any padding (``clip``: pad_h or pad_w non-zero, for both axes), the last window must start
    strictly inside the image: ``if ((pooled-1)*stride >= size + pad) --pooled``. Returns Caffe's value,
    which may be < 1; the caller rejects that.
    """
    span = size + 2 * pad - kernel
    pooled = (-(-span // stride) if ceil_mode else span // stride) + 1
    if clip and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def ave_pool_sizes(size: int, kernel: int, stride: int, pad: int, pooled: int) -> np.ndarray:
    """Caffe's AVE divisor along one axis: ``min(start + kernel, size + pad) - start``, ``start = i*stride - pad``.

    Zero padding counts, the ceil overhang beyond ``size + pad`` does not. The value is taken before
    clipping to the image, so a window that starts at ``size + pad`` (pad 0, stride > kernel) has 0
    and Caffe divides 0 by 0; one that starts beyond it has a negative size. Both are kept.
    """
    start = np.arange(pooled) * stride - pad
    return np.minimum(start + kernel, size + pad) - start


# -- Convolution / Deconvolution ---------------------------------------------------------------

class _ConvolutionBase(Layer):
    """Caffe's BaseConvolutionLayer: geometry, groups, blob shapes; one weight set for every bottom.

    Like Caffe, each bottom ``i`` (all of the same shape) gives top ``i``. Axes before ``axis`` are
    flattened into the batch. Only two spatial axes are supported (Caffe's N-d im2col path is not).
    """

    num_bottoms = (1, None)
    num_tops = (1, None)
    transposed = False

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.convolution_param
        self.check(len(lp.top) == len(lp.bottom),
                   f"takes as many tops as bottoms, got {len(lp.bottom)} bottoms and {len(lp.top)} tops")
        shape = self.bottom_shapes[0]
        self.check(all(s == shape for s in self.bottom_shapes), "All inputs must have the same shape.")
        self.axis = self.canonical_axis(p.axis)
        num_spatial = len(shape) - self.axis - 1
        self.check(num_spatial == 2,
                   f"only 2-D convolution is supported: the bottom has {num_spatial} spatial axes after "
                   f"channel axis {self.axis}")
        self.kernel = spatial_param(self, p, "kernel_size", 2, None, "kernel")
        self.stride = spatial_param(self, p, "stride", 2, 1, "stride")
        self.pad = spatial_param(self, p, "pad", 2, 0, "pad")
        self.dilation = spatial_param(self, p, "dilation", 2, 1)
        self.check(all(k > 0 for k in self.kernel), "Filter dimensions must be nonzero.")
        self.check(all(s > 0 for s in self.stride), "Stride dimensions must be nonzero.")
        self.check(all(d > 0 for d in self.dilation), "Dilation dimensions must be nonzero.")

        channels = shape[self.axis]
        self.num_output, self.group, self.bias_term = p.num_output, p.group, p.bias_term
        self.check(self.num_output > 0, "num_output must be > 0")
        self.check(self.group > 0, "group must be > 0")
        self.check(channels % self.group == 0,
                   f"channels ({channels}) must be divisible by group ({self.group})")
        self.check(self.num_output % self.group == 0,
                   f"Number of output should be multiples of group (num_output {self.num_output}, "
                   f"group {self.group})")
        # Deconvolution swaps the roles of input and output channels in the weight blob.
        conv_out, conv_in = (channels, self.num_output) if self.transposed else (self.num_output, channels)
        self.weight_shape = (conv_out, conv_in // self.group, *self.kernel)
        self.weight_filler, self.bias_filler = p.weight_filler, p.bias_filler

        extents = [d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel, strict=True)]
        spatial = []
        for i, ext in enumerate(extents):
            size, s, pad = shape[self.axis + 1 + i], self.stride[i], self.pad[i]
            out = self.output_size(size, ext, s, pad)
            self.check(out > 0, f"output size {out} on spatial axis {i} is not positive (input {size}, "
                                f"kernel extent {ext}, stride {s}, pad {pad})")
            spatial.append(out)
        top = (*shape[:self.axis], self.num_output, *spatial)
        self.top_shapes = [top] * len(lp.top)

    def output_size(self, size: int, extent: int, stride: int, pad: int) -> int:
        """``ConvolutionLayer::compute_output_shape``: C++ division of a non-negative span."""
        span = size + 2 * pad - extent
        return span // stride + 1 if span >= 0 else 0

    def blob_specs(self) -> list[BlobSpec]:
        specs = [BlobSpec(self.weight_shape, self.weight_filler)]
        if self.bias_term:
            specs.append(BlobSpec((self.num_output,), self.bias_filler))
        return specs

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.pad, self.dilation, self.group)

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        weight = blobs[0]
        bias = blobs[1] if self.bias_term else None
        tops = []
        for x in bottoms:
            if self.axis == 1:
                tops.append(self.convolve(x, weight, bias))
                continue
            lead = tuple(x.shape[:self.axis])
            y = self.convolve(x.reshape(-1, *x.shape[self.axis:]), weight, bias)
            tops.append(y.reshape(*lead, *y.shape[1:]))
        return tops


_NET_ENGINE = [caffe_pb2.ConvolutionParameter.DEFAULT]


def set_net_engine(name: str | None) -> None:
    """The engine of every Convolution whose prototxt leaves ``engine`` at DEFAULT (``--engine``): ``caffe``
    (im2col + GEMM), ``cudnn`` or ``default`` (torch's convolution); a layer's own setting wins, as in Caffe."""
    _NET_ENGINE[0] = caffe_pb2.ConvolutionParameter.Engine.Value((name or "default").upper())


def live_taps(size: int, kernel: int, stride: int, pad: int, dilation: int, out: int) -> range:
    """The kernel taps along one axis that reach the input (not the zero padding) at one of ``out`` outputs."""
    live = [t for t in range(kernel) if any(0 <= o * stride - pad + t * dilation < size for o in range(out))]
    return range(live[0], live[-1] + 1) if live else range(kernel)


@register("Convolution")
class Convolution(_ConvolutionBase):
    """Cross-correlation with Caffe's output size ``(in + 2*pad - (dilation*(k-1)+1)) / stride + 1``.

    Weight ``(num_output, C/group, kh, kw)``, bias ``(num_output,)``; missing fillers are the schema's
    constant 0. Caffe's backward is the exact gradient, so autograd reproduces it.

    Border taps that only ever meet zero padding are cut from the kernel (with the padding reduced to
    match) when the input has its build-time size: the thesis's conv2 (k5 p2 on a 2x2 map) then computes
    3x3 taps instead of 5x5. Those taps add exact zeros in Caffe, and their weight gradient is exactly
    zero both ways, so only the summation order changes.
    """

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        # engine: CAFFE is Caffe's own im2col + GEMM (im2col_conv below, on any device); DEFAULT and CUDNN
        # are torch's convolution (cuDNN on a GPU, oneDNN on a CPU). `--engine` sets the DEFAULT ones.
        engine = lp.convolution_param.engine or _NET_ENGINE[0]
        self.im2col = engine == caffe_pb2.ConvolutionParameter.CAFFE
        self.input_size = tuple(self.bottom_shapes[0][self.axis + 1:])
        out = self.top_shapes[0][self.axis + 1:]
        taps = [live_taps(self.input_size[i], self.kernel[i], self.stride[i], self.pad[i], self.dilation[i], out[i])
                for i in range(2)]
        pads = [self.pad[i] - taps[i].start * self.dilation[i] for i in range(2)]
        same_size = all(pads[i] >= 0 and self.output_size(self.input_size[i], self.dilation[i] * (len(taps[i]) - 1) + 1,
                                                          self.stride[i], pads[i]) == out[i] for i in range(2))
        trimmed = any(len(taps[i]) < self.kernel[i] for i in range(2))
        self.live_taps = (taps[0], taps[1], tuple(pads)) if trimmed and same_size else None

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        pad = self.pad
        if self.live_taps is not None and tuple(x.shape[2:]) == self.input_size:
            rows, cols, pad = self.live_taps
            weight = weight[:, :, rows.start:rows.stop, cols.start:cols.stop]
        if self.im2col:
            return im2col_conv(x, weight, bias, self.stride, pad, self.dilation, self.group)
        return F.conv2d(x, weight, bias, self.stride, pad, self.dilation, self.group)


def im2col_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                pad: tuple[int, int], dilation: tuple[int, int], group: int) -> torch.Tensor:
    """``ConvolutionLayer`` with ``engine: CAFFE``: every sample's columns (``im2col``) times the weight matrix
    (``caffe_cpu_gemm``/cuBLAS), the whole batch in one batched GEMM; autograd's backward is the same two
    GEMMs Caffe's ``weight_cpu_gemm``/``backward_cpu_gemm`` do (plus col2im as fold). No cuDNN algorithm
    choice: on a GPU the numbers are cuBLAS's float32 GEMM, as Caffe's own engine computes them."""
    n, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), dilation, pad, stride)  # (N, C*kh*kw, L), C-major as Caffe's im2col
    oh = (height + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (width + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    cols = cols.view(n, group, -1, oh * ow)
    y = torch.matmul(weight.reshape(group, out_channels // group, -1), cols)  # (N, g, O/g, L)
    y = y.reshape(n, out_channels, oh, ow)
    return y + bias.view(1, -1, 1, 1) if bias is not None else y


@register("Deconvolution")
class Deconvolution(_ConvolutionBase):
    """Caffe's DeconvolutionLayer: the data gradient of a convolution, i.e. ``conv_transpose2d``.

    Weight ``(C_in, num_output/group, kh, kw)`` (``deconv_layer.cpp`` via ``reverse_dimensions``), output
    size ``stride*(in-1) + dilation*(k-1)+1 - 2*pad``.
    """

    transposed = True

    def output_size(self, size: int, extent: int, stride: int, pad: int) -> int:
        return stride * (size - 1) + extent - 2 * pad

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv_transpose2d(x, weight, bias, self.stride, self.pad, 0, self.group, self.dilation)


# -- Pooling --------------------------------------------------------------------------------------

@register("Pooling")
class Pooling(Layer):
    """Caffe's PoolingLayer (MAX, AVE) with Caffe's output sizes, divisors and tie rule.

    * Output size: ceil rule (or round_mode FLOOR), clipped only when pad != 0 (:func:`pooled_size`).
    * MAX: a window clipped to the image, ``-FLT_MAX`` when empty, first maximum of a row-major scan
      wins (torch's kernels use the same strict ``>``), so the gradient goes to that element. A second
      top is the argmax as Caffe stores it: the flat index ``h*W + w`` in the channel plane, as float,
      -1 for an empty window; it gets no gradient.
    * AVE: ``sum / pool_size`` with :func:`ave_pool_sizes` (padding counted, ceil overhang not).

    When torch's floor-mode pooling with symmetric padding gives exactly Caffe's windows, it is used
    directly; otherwise the input is padded (``-inf`` for MAX, 0 for AVE) or cropped to exactly
    ``(pooled-1)*stride + kernel`` and pooled without padding, and AVE is rescaled by the divisor map.
    That explicit form is what a traced (ONNX) graph gets. Run eagerly, a layer whose count torch's
    ceil mode reproduces (its last-window rule is Caffe's padded-case clip, applied always; its windows
    and AVE divisors are Caffe's formulas) pools in ceil mode instead: no padded copy of the input, and
    smaller windows (the thesis MNIST net's 2x2 -> 1x1 pool2 costs half).
    STOCHASTIC pooling is refused (Caffe's CPU path is NOT_IMPLEMENTED).
    """

    num_tops = (1, 2)

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.pooling_param
        self.method = p.pool
        self.check(self.method != Pool.STOCHASTIC,
                   "STOCHASTIC pooling is not supported (Caffe implements it only on the GPU; its CPU "
                   "path is NOT_IMPLEMENTED)")
        self.check(len(lp.top) == 1 or self.method == Pool.MAX,
                   "only MAX pooling has a second top (the argmax mask)")
        shape = self.bottom_shapes[0]
        self.check(len(shape) == 4, "Input must have 4 axes, corresponding to (num, channels, height, width)")
        n, c, height, width = shape

        has = p.HasField
        if p.global_pooling:
            self.check(not (has("kernel_size") or has("kernel_h") or has("kernel_w")),
                       "With Global_pooling: true Filter size cannot specified")
            kernel = (height, width)
        else:
            self.check(has("kernel_size") or (has("kernel_h") and has("kernel_w")),
                       "needs kernel_size, or both kernel_h and kernel_w (non-square filters)")
            self.check(not (has("kernel_size") and has("kernel_h") and has("kernel_w")),
                       "Filter size is kernel_size OR kernel_h and kernel_w; not both")
            kernel = (p.kernel_size,) * 2 if has("kernel_size") else (p.kernel_h, p.kernel_w)
        self.check((not has("pad") and has("pad_h") and has("pad_w")) or not (has("pad_h") or has("pad_w")),
                   "pad is pad OR pad_h and pad_w are required.")
        self.check((not has("stride") and has("stride_h") and has("stride_w"))
                   or not (has("stride_h") or has("stride_w")),
                   "Stride is stride OR stride_h and stride_w are required.")
        pad = (p.pad_h, p.pad_w) if has("pad_h") else (p.pad, p.pad)
        stride = (p.stride_h, p.stride_w) if has("stride_h") else (p.stride, p.stride)
        if p.global_pooling:
            self.check(pad == (0, 0) and stride == (1, 1),
                       "With Global_pooling: true; only pad = 0 and stride = 1")
        self.check(min(kernel) > 0, "Filter dimensions cannot be zero.")
        self.check(min(stride) > 0, "Stride dimensions cannot be zero.")
        if any(pad):
            self.check(pad[0] < kernel[0] and pad[1] < kernel[1],
                       f"pad ({pad[0]}x{pad[1]}) must be smaller than the kernel ({kernel[0]}x{kernel[1]})")
        ceil_mode = not ("round_mode" in p.DESCRIPTOR.fields_by_name and p.round_mode == Pool.FLOOR)

        sizes = (height, width)
        pooled = tuple(pooled_size(sizes[i], kernel[i], stride[i], pad[i], ceil_mode, any(pad))
                       for i in range(2))
        self.check(min(pooled) > 0, f"pooled size {pooled[0]}x{pooled[1]} is not positive "
                                    f"(kernel {kernel[0]}x{kernel[1]} larger than the padded input)")
        if any(pad):  # Caffe's CHECK_LT after the clip
            self.check(all((pooled[i] - 1) * stride[i] < sizes[i] + pad[i] for i in range(2)),
                       "the last pooling window starts outside the padded input")
        self.kernel, self.stride, self.pad = kernel, stride, pad
        self.top_shapes = [(n, c, *pooled)] * len(lp.top)

        # torch's floor-mode pooling with symmetric padding has Caffe's windows (and divisors) exactly
        # when it gives the same count; it only accepts pad <= kernel/2.
        self.native = all(pad[i] <= kernel[i] // 2 and sizes[i] + 2 * pad[i] >= kernel[i]
                          and (sizes[i] + 2 * pad[i] - kernel[i]) // stride[i] + 1 == pooled[i]
                          for i in range(2))
        # torch's ceil mode (Pool.h: Caffe's ceil count, then the clip whether or not there is padding)
        # differs from Caffe only for an unpadded layer whose last window starts at or past the edge.
        self.ceil_native = not self.native and all(
            pad[i] <= kernel[i] // 2 and pooled_size(sizes[i], kernel[i], stride[i], pad[i], True, True) == pooled[i]
            for i in range(2))
        # Otherwise: explicit (top, bottom, left, right) padding; a negative amount crops.
        ends = [(pooled[i] - 1) * stride[i] + kernel[i] - sizes[i] - pad[i] for i in range(2)]
        self.padding = (pad[1], ends[1], pad[0], ends[0])  # F.pad order: W left/right, H top/bottom
        scale = None
        if self.method == Pool.AVE and not self.native:
            sizes_h = ave_pool_sizes(height, kernel[0], stride[0], pad[0], pooled[0])
            sizes_w = ave_pool_sizes(width, kernel[1], stride[1], pad[1], pooled[1])
            pool_size = np.outer(sizes_h, sizes_w).astype(np.float64)
            if np.any(pool_size != kernel[0] * kernel[1]):
                with np.errstate(divide="ignore"):  # 0 -> inf: 0 * inf is Caffe's 0/0 NaN
                    scale = torch.tensor((kernel[0] * kernel[1]) / pool_size, dtype=torch.float32)
        self.register_buffer("ave_scale", scale, persistent=False)

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = bottoms[0]
        tracing = torch.jit.is_tracing()  # ONNX export: ONNX Runtime's ceil_mode rules are not Caffe's
        ceil = self.ceil_native and not tracing
        direct = self.native or ceil
        if self.method == Pool.AVE:
            if direct:
                return [F.avg_pool2d(x, self.kernel, self.stride, self.pad, ceil, True)]
            y = F.avg_pool2d(F.pad(x, self.padding), self.kernel, self.stride)
            if self.ave_scale is not None:
                y = y * self.ave_scale.to(y.dtype)
            return [y]
        want_mask = len(self.top_shapes) == 2
        if direct:
            xp, pad = x, self.pad
        else:
            xp, pad = F.pad(x, self.padding, value=float("-inf")), (0, 0)
        if want_mask:
            raw, index = F.max_pool2d(xp, self.kernel, self.stride, pad, ceil_mode=ceil, return_indices=True)
        else:
            raw = F.max_pool2d(xp, self.kernel, self.stride, pad, ceil_mode=ceil)
        # Caffe's strict '>' against its -FLT_MAX start value: a window with nothing above -FLT_MAX gives
        # -FLT_MAX and no gradient. threshold is exactly that in one op (and one in backward); the
        # TorchScript ONNX exporter only knows threshold 0, so a traced graph gets compare and where.
        # On the CPU a read-only min first: when every window has something above -FLT_MAX (always, but
        # for -inf/-FLT_MAX inputs or empty windows) the rule changes nothing and costs no copy and no
        # backward pass (LeNet: 1.5% of a training step). On a GPU the check would be a sync; not done.
        # (A NaN in a window: torch's max propagates it, Caffe's '>' skips it; neither form is Caffe's.)
        if tracing:
            top = torch.where(raw > -FLT_MAX, raw, -FLT_MAX)
        elif not want_mask and raw.device.type == "cpu" and raw.numel() and float(raw.detach().min()) > -FLT_MAX:
            top = raw
        else:
            top = F.threshold(raw, -FLT_MAX, -FLT_MAX)
        if not want_mask:
            return [top]
        found = raw > -FLT_MAX
        if not direct:  # torch indexes the padded plane; Caffe the bottom's own plane
            width = xp.shape[-1]
            index = (index // width - self.padding[2]) * x.shape[-1] + index % width - self.padding[0]
        mask = torch.where(found, index, -1).to(x.dtype)
        return [top, mask]


# -- LRN ----------------------------------------------------------------------------------------

@register("LRN")
class LRN(Layer):
    """Caffe's LRNLayer (``lrn_layer.cpp``); ``local_size`` must be odd, the bottom 4-D.

    ACROSS_CHANNELS: ``y = x * (k + alpha/n * sum_{|c'-c| <= (n-1)/2} x[c']^2)^-beta``, channels outside
    ``[0, C)`` contribute nothing. WITHIN_CHANNEL is Caffe's sub-net Power(x^2) -> AVE Pooling(n, pad
    (n-1)/2, stride 1) -> Power(power -beta, scale alpha, shift 1) -> product:
    ``y = x * (1 + alpha * avgpool_{n x n}(x^2))^-beta`` with divisor n^2 everywhere (every window fits
    in ``H + pad``); ``k`` is ignored there. Both Caffe backwards are the exact gradients: autograd's for
    WITHIN_CHANNEL, Caffe's own formula for ACROSS_CHANNELS (:class:`AcrossChannels`).
    """

    def __init__(self, lp: caffe_pb2.LayerParameter, bottom_shapes: list[Shape], phase: int):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.lrn_param
        self.check(p.local_size % 2 == 1, f"LRN only supports odd values for local_size (got {p.local_size})")
        self.check(len(self.bottom_shapes[0]) == 4,
                   "Input must have 4 axes, corresponding to (num, channels, height, width)")
        self.size, self.alpha, self.beta, self.k = p.local_size, p.alpha, p.beta, p.k
        self.region = p.norm_region
        self.top_shapes = [self.bottom_shapes[0]]

    def forward(self, bottoms: list[torch.Tensor], blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = bottoms[0]
        n, pre_pad = self.size, (self.size - 1) // 2
        if self.region == Norm.WITHIN_CHANNEL:
            mean = F.avg_pool2d(x * x, n, 1, pre_pad, False, True)
            return [x * (1 + self.alpha * mean).pow(-self.beta)]
        if torch.onnx.is_in_onnx_export():
            # Traced for ONNX Runtime: the channel window as one average pool over the (C, H*W) plane and
            # the power as exp(-beta * log): 2.2 ms instead of 6.7 ms for the BCNN's norm1 at batch 16
            # (ORT's own LRN operator, the same formula, takes 15 ms there). Equal to ~1e-7 relative.
            batch, channels, height, width = x.shape
            planes = (x * x).reshape(batch, 1, channels, height * width)
            mean = F.avg_pool2d(planes, (n, 1), 1, (pre_pad, 0), False, True).reshape(x.shape)
            return [x * torch.exp(torch.log(self.k + self.alpha * mean) * -self.beta)]
        return [AcrossChannels.apply(x, n, self.alpha, self.beta, self.k)]


def channel_window_sum(t: torch.Tensor, size: int) -> torch.Tensor:
    """``sum_{|c'-c| <= (size-1)/2} t[:, c']`` with the channels outside ``[0, C)`` counting nothing (Caffe
    accepts fewer channels than local_size), summed in channel order: the same float32 values on every device.

    On the CPU, ``size`` shifted slices of the zero-padded tensor and cheap adds, where a 3-D average pool
    pays per-plane overhead on the small maps of the thesis's nets (6x slower). On a GPU, where each of those
    ``size + 1`` operators is a kernel launch (and launches, not arithmetic, set the pace of the thesis's
    step), one :func:`channel_window_sum_pooled` (which torch refuses for fewer channels than the window)."""
    if t.is_cuda and t.shape[1] >= size:
        return channel_window_sum_pooled(t, size)
    pre_pad = (size - 1) // 2
    channels = t.shape[1]
    padded = F.pad(t, (0, 0, 0, 0, pre_pad, pre_pad))
    window = padded[:, :channels]
    for shift in range(1, size):
        window = window + padded[:, shift:shift + channels]
    return window


def channel_window_sum_pooled(t: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`channel_window_sum` as one 3-D average pool over (channel, 1, 1) windows with divisor 1. torch's
    kernels start the sum at 0 and add the window's channels in order in float (``AveragePool3d.cu``), so the
    values are the adds' bit for bit (the padding's zeros change nothing)."""
    pre_pad = (size - 1) // 2
    return F.avg_pool3d(t.unsqueeze(1), (size, 1, 1), 1, (pre_pad, 0, 0), divisor_override=1).squeeze(1)


class AcrossChannels(torch.autograd.Function):
    """ACROSS_CHANNELS LRN with Caffe's own backward (``CrossChannelBackward``):
    ``dx = dy * scale^-beta - (2 alpha beta / n) * x * windowsum(dy * y / scale)``. It is the exact gradient
    as autograd's is, but Caffe's formula for it, and one more window sum (:func:`channel_window_sum`) where
    autograd's backward of the CPU's shifted slices zero-fills and copies a padded tensor per slice (twice
    the kernels of the forward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        scale = k + alpha * (channel_window_sum(x * x, size) / size)
        y = x * scale.pow(-beta)
        ctx.save_for_backward(x, y, scale)
        ctx.size, ctx.beta, ctx.ratio = size, beta, 2.0 * alpha * beta / size
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, y, scale = ctx.saved_tensors
        accum = channel_window_sum(dy * y / scale, ctx.size)
        return dy * scale.pow(-ctx.beta) - ctx.ratio * x * accum, None, None, None, None
