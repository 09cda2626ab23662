"""``caffe.Classifier``: a Net that classifies images — resized to ``image_dims``, 10 crops (oversample) or
the centre crop, prepared by a Transformer, the output averaged over the crops (pycaffe's classifier.py)."""

from __future__ import annotations

import numpy as np

from runner.pycaffe import io
from runner.pycaffe._caffe import TEST, Net


class Classifier(Net):
    def __init__(self, model_file: str, pretrained_file: str, image_dims=None, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None):
        super().__init__(model_file, pretrained_file, TEST)
        in_ = self.inputs[0]
        self.transformer = io.image_transformer(self.blobs[in_].data.shape, in_, mean, input_scale, raw_scale,
                                                channel_swap)
        self.crop_dims = np.array(self.blobs[in_].data.shape[2:])
        self.image_dims = np.array(image_dims if image_dims is not None else self.crop_dims)

    def predict(self, inputs: list[np.ndarray], oversample: bool = True) -> np.ndarray:
        """Class scores for H×W×K images: the mean over the 10 crops, or of the centre crop."""
        input_ = np.zeros((len(inputs), self.image_dims[0], self.image_dims[1], inputs[0].shape[2]), np.float32)
        for ix, in_ in enumerate(inputs):
            input_[ix] = io.resize_image(in_, self.image_dims)
        if oversample:
            input_ = io.oversample(input_, self.crop_dims)
        else:
            center = np.array(self.image_dims) / 2.0
            crop = np.tile(center, (1, 2))[0] + np.concatenate([-self.crop_dims / 2.0, self.crop_dims / 2.0])
            crop = crop.astype(int)
            input_ = input_[:, crop[0]:crop[2], crop[1]:crop[3], :]
        in_ = self.inputs[0]
        caffe_in = np.zeros(np.array(input_.shape)[[0, 3, 1, 2]], dtype=np.float32)
        for ix, in_img in enumerate(input_):
            caffe_in[ix] = self.transformer.preprocess(in_, in_img)
        out = self.forward_all(**{in_: caffe_in})
        predictions = out[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions
