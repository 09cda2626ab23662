"""``caffe.Detector``: a Net that classifies windows of images (R-CNN style, pycaffe's detector.py): each
window ``(ymin, xmin, ymax, xmax)`` is cropped — with ``context_pad`` pixels of context around it, the part
outside the image filled with the mean — warped to the net's input, prepared by a Transformer and scored."""

from __future__ import annotations

import numpy as np

from runner.pycaffe import io
from runner.pycaffe._caffe import TEST, Net


class Detector(Net):
    def __init__(self, model_file: str, pretrained_file: str, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None, context_pad=None):
        super().__init__(model_file, pretrained_file, TEST)
        in_ = self.inputs[0]
        self.transformer = io.image_transformer(self.blobs[in_].data.shape, in_, mean, input_scale, raw_scale,
                                                channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows: list[tuple[str, list]]) -> list[dict]:
        """``[(image file, [window, …]), …]`` → one ``{window, prediction, filename}`` per window, in order."""
        crops = [self.crop(io.load_image(name).astype(np.float32), np.asarray(w))
                 for name, windows in images_windows for w in windows]
        in_ = self.inputs[0]
        caffe_in = np.zeros((len(crops), *self.blobs[in_].data.shape[1:]), np.float32)
        for ix, window_in in enumerate(crops):
            caffe_in[ix] = self.transformer.preprocess(in_, window_in)
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        flat = [(name, w) for name, windows in images_windows for w in windows]
        return [{"window": w, "prediction": predictions[ix], "filename": name} for ix, (name, w) in enumerate(flat)]

    def detect_selective_search(self, image_fnames):
        raise NotImplementedError("selective search proposals need the selective_search_ijcv_with_python "
                                  "package; give the windows to detect_windows instead")

    def crop(self, im: np.ndarray, window: np.ndarray) -> np.ndarray:
        """The window's pixels, or with context padding: the box grown so that ``context_pad`` pixels of the
        net's input are context, out-of-image parts left at the mean, the rest warped into place."""
        window = np.asarray(window)
        if not self.context_pad:
            return im[window[0]:window[2], window[1]:window[3]]
        crop_size = self.blobs[self.inputs[0]].width  # square inputs, as pycaffe assumes
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        half_h = (window[2] - window[0] + 1) / 2.0
        half_w = (window[3] - window[1] + 1) / 2.0
        center = (window[0] + half_h, window[1] + half_w)
        box = np.round(np.tile(center, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h = crop_size / (box[2] - box[0] + 1)
        scale_w = crop_size / (box[3] - box[1] + 1)
        pad_y = round(max(0, -box[0]) * scale_h)
        pad_x = round(max(0, -box[1]) * scale_w)
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        crop_h = min(round((box[2] - box[0] + 1) * scale_h), crop_size - pad_y)
        crop_w = min(round((box[3] - box[1] + 1) * scale_w), crop_size - pad_x)
        context = im[int(box[0]):int(box[2]), int(box[1]):int(box[3])]
        out = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        out[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = io.resize_image(context, (crop_h, crop_w))
        return out

    def configure_crop(self, context_pad) -> None:
        """The crop's H×W×K shape and the mean that fills context outside the image (in image space)."""
        in_ = self.inputs[0]
        order = self.transformer.transpose[in_]
        inverse = [order[t] for t in order]
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inverse]
        self.context_pad = context_pad
        self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
        mean = self.transformer.mean.get(in_)
        if context_pad and mean is not None:
            crop_mean = np.broadcast_to(mean, self.blobs[in_].data.shape[1:]).transpose(inverse).copy()
            swap = self.transformer.channel_swap.get(in_)
            if swap is not None:
                crop_mean = crop_mean[:, :, [list(swap).index(i) for i in range(crop_mean.shape[2])]]
            raw_scale = self.transformer.raw_scale.get(in_)
            if raw_scale is not None:
                crop_mean = crop_mean / raw_scale
            self.crop_mean = crop_mean
