"""Hand-written PyTorch versions of the timing nets in ``shared/reference/timing/``.

These are the baseline the converted :class:`converter.net.CaffeNet` is timed against: the same layers
as each prototxt, written the way one would write them in plain PyTorch (``nn.Conv2d``,
``F.max_pool2d(ceil_mode=True)``, ``nn.LocalResponseNorm``, ``nn.Linear``, ``F.dropout``,
``F.cross_entropy``), siamese towers sharing weights by calling the same modules twice. Each module
takes the same input dict as the CaffeNet (labels as float blobs, as Caffe stores them) and returns its
training loss, i.e. Caffe's net loss (Σ of the SoftmaxWithLoss tops, each averaged over the batch).

:func:`copy_from_caffe` copies a CaffeNet's learnable blobs into one of these modules by layer name, so
both compute the same numbers (the dropout masks agree too when both run from the same torch seed:
``F.dropout`` on CPU draws ``bernoulli_(1 - p)`` on a tensor of the input's shape, as the Dropout layer
does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from converter.net import CaffeNet


class LeNet(nn.Module):
    """``lenet_b64``: conv(20,5) - maxpool(2,2) - conv(50,5) - maxpool(2,2) - fc500 - relu - fc10 - softmax loss."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.ip1 = nn.Linear(50 * 4 * 4, 500)
        self.ip2 = nn.Linear(500, 10)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(inputs["data"]), 2, 2, ceil_mode=True)
        x = F.max_pool2d(self.conv2(x), 2, 2, ceil_mode=True)
        x = self.ip2(F.relu(self.ip1(x.flatten(1))))
        return F.cross_entropy(x, inputs["label"].long())


class MnistTower(nn.Module):
    """One tower of ``thesis_mnist_egomotion_b125``: C96k11s4-relu-P3s2-LRN5-C256k5p2g2-relu-P3s2-LRN5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.norm = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.max_pool2d(F.relu(self.conv1(x)), 3, 2, ceil_mode=True))
        return self.norm(F.max_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=True))


class AlexTower(nn.Module):
    """One tower of ``thesis_kitti_egomotion_b16``: AlexNet conv1-conv5 with LRN after pool1 and pool2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.norm = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.max_pool2d(F.relu(self.conv1(x)), 3, 2, ceil_mode=True))
        x = self.norm(F.max_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=True))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        return F.relu(self.conv5(x))


class EgomotionHeads(nn.Module):
    """The three SoftmaxWithLoss heads (x, y, z) on a shared fully connected layer with dropout."""

    def __init__(self, fc: nn.Linear, classes: tuple[int, int, int]) -> None:
        super().__init__()
        self.fc = fc
        self.fcx = nn.Linear(fc.out_features, classes[0])
        self.fcy = nn.Linear(fc.out_features, classes[1])
        self.fcz = nn.Linear(fc.out_features, classes[2])

    def forward(self, features: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        h = F.dropout(F.relu(self.fc(features.flatten(1))), 0.5, self.training)
        return (F.cross_entropy(self.fcx(h), inputs["label_x"].long())
                + F.cross_entropy(self.fcy(h), inputs["label_y"].long())
                + F.cross_entropy(self.fcz(h), inputs["label_z"].long()))


class MnistEgomotion(nn.Module):
    """``thesis_mnist_egomotion_b125``: two weight-sharing towers, concat, fc1000, three heads."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = MnistTower()
        self.heads = EgomotionHeads(nn.Linear(2 * 256 * 1 * 1, 1000), (7, 7, 20))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        both = torch.cat([self.tower(inputs["data"]), self.tower(inputs["data_p"])], dim=1)
        return self.heads(both, inputs)


class KittiEgomotion(nn.Module):
    """``thesis_kitti_egomotion_b16``: two AlexNet towers, concat, conv6, conv7, fc500, three heads."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = AlexTower()
        self.conv6 = nn.Conv2d(512, 256, 3, stride=2)
        self.conv7 = nn.Conv2d(256, 128, 3, stride=2)
        self.heads = EgomotionHeads(nn.Linear(128 * 2 * 2, 500), (20, 20, 20))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([self.tower(inputs["data"]), self.tower(inputs["data_p"])], dim=1)
        x = F.relu(self.conv7(F.relu(self.conv6(x))))
        return self.heads(x, inputs)


# The CaffeNet layer that owns each module's weight and bias (the "_p" layers share them by name).
LAYER_MAP: dict[str, dict[str, str]] = {
    "lenet_b64": {"conv1": "conv1", "conv2": "conv2", "ip1": "ip1", "ip2": "ip2"},
    "thesis_mnist_egomotion_b125": {
        "tower.conv1": "conv1", "tower.conv2": "conv2", "heads.fc": "fc1000",
        "heads.fcx": "fcx", "heads.fcy": "fcy", "heads.fcz": "fcz"},
    "thesis_kitti_egomotion_b16": {
        **{f"tower.conv{i}": f"conv{i}" for i in range(1, 6)}, "conv6": "conv6", "conv7": "conv7",
        "heads.fc": "fc_ego", "heads.fcx": "fcx", "heads.fcy": "fcy", "heads.fcz": "fcz"},
}

MODELS: dict[str, type[nn.Module]] = {
    "lenet_b64": LeNet,
    "thesis_mnist_egomotion_b125": MnistEgomotion,
    "thesis_kitti_egomotion_b16": KittiEgomotion,
}


def build(name: str) -> nn.Module:
    """The hand-written module for the timing net ``name`` (the prototxt's ``name``)."""
    return MODELS[name]()


@torch.no_grad()
def copy_from_caffe(module: nn.Module, net: CaffeNet, name: str) -> None:
    """Copy ``net``'s weights and biases into ``module`` (built by :func:`build` for the same net)."""
    for path, layer in LAYER_MAP[name].items():
        target = module.get_submodule(path)
        weight, bias = net.layer_blobs(net.layer_by_name(layer))
        if target.weight.shape != weight.shape:
            raise ValueError(f"{path}: weight {tuple(target.weight.shape)} vs Caffe's {layer} {tuple(weight.shape)}")
        target.weight.copy_(weight)
        target.bias.copy_(bias)
