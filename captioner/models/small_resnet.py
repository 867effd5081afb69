"""A compact ResNet for small images, trained from scratch: the demo's encoder.

torchvision's ResNets open with a 7x7 stride-2 convolution and a max pool, made for 224 px
photos: on the demo's 64 px pictures they leave a 16 x 16 map after the stem, where a small
shape (about 13 px) is 3 cells wide, and a triangle, a circle and a square look alike. A
ResNet-18 at 64 px also does 0.15 GMACs an image, most of a demo epoch on a 2-core CPU.
The small-image ResNets (the CIFAR ResNets of He et al. 2016) open with a 3x3 convolution
instead; this one does too, with stride 2, and stacks one basic block per stage at a quarter of
ResNet-18's widths (32, 64, 128, 256): a 32 x 32 map after the stem, a 4 x 4 grid at the end,
about 0.06 GMACs and 1.2 M parameters at 64 px. It also reads two coordinate channels beside
the RGB ones (x and y from -1 to 1; CoordConv, Liu et al. 2018): an average-pooled CNN otherwise
forgets where things are, and half of the demo's captions say where, or which shape is left.
``small_resnet_halves`` (the demo's) pools the left and right halves of the last map separately
and gives both means side by side: a pair's shapes, one in each half, arrive apart, and the
decoder need not untangle which colour and shape is on which side from one mean (at ``seed=2``
it got the side of 65 of 174 test pairs wrong with the plain mean, 22 with the halves;
docs/results.md#the-demo).

``model.encoder.source=builtin`` with ``model.encoder.name`` one of :data:`SMALL_RESNETS`
(``model=demo`` uses ``small_resnet_halves``). Its stages are torchvision's ResNet stages
(:func:`captioner.models.backbones.residual_stage`, named ``layer1`` ... ``layer4``), so
fine-tuning the last K stages works as for a ResNet-18; ``forward_features`` gives the grid
attention reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captioner.models.backbones import BasicBlock, init_resnet, residual_stage

# name -> (width of the first stage, blocks per stage, pooled by halves)
SMALL_RESNETS: dict[str, tuple[int, tuple[int, int, int, int], bool]] = {
    "small_resnet": (32, (1, 1, 1, 1), False),
    "small_resnet_halves": (32, (1, 1, 1, 1), True),
}


class SmallResNet(nn.Module):
    """images [B, 3, H, W] -> pooled features [B, 8 * width] (``halves``: [B, 16 * width], each
    feature's mean over the left half, then over the right); the last map is
    [B, 8 * width, H/16, W/16]."""

    def __init__(self, width: int, layers: tuple[int, int, int, int], halves: bool = False):
        super().__init__()
        # the image's RGB and two coordinate channels (CoordConv, Liu et al. 2018)
        self.conv1 = nn.Conv2d(5, width, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = residual_stage(BasicBlock, width, width, layers[0])
        self.layer2 = residual_stage(BasicBlock, width, 2 * width, layers[1], stride=2)
        self.layer3 = residual_stage(BasicBlock, 2 * width, 4 * width, layers[2], stride=2)
        self.layer4 = residual_stage(BasicBlock, 4 * width, 8 * width, layers[3], stride=2)
        # the pooled features: the mean over the last map, or its left and right halves' means
        # side by side (twice as many features; the map attention reads is the same)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 2) if halves else (1, 1))
        self.fc = nn.Identity()
        self.map_channels = 8 * width  # what each position of forward_features holds
        init_resnet(self)

    def forward_features(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> the last feature map [B, 8w, H/16, W/16] (what attention reads;
        the name is timm's, which :meth:`captioner.models.encoders.Encoder.feature_map` asks for)."""
        x = self.relu(self.bn1(self.conv1(with_coordinates(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(images)), 1))


def with_coordinates(images: Tensor) -> Tensor:
    """images [B, 3, H, W] -> [B, 5, H, W]: x and y, each from -1 to 1, appended as channels."""
    B, _, H, W = images.shape
    ys = torch.linspace(-1.0, 1.0, H, dtype=images.dtype, device=images.device)
    xs = torch.linspace(-1.0, 1.0, W, dtype=images.dtype, device=images.device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # [2, H, W]: x, y
    return torch.cat([images, grid.expand(B, 2, H, W)], dim=1)


def small_resnet(name: str) -> SmallResNet:
    """The randomly initialised compact ResNet ``name`` (one of :data:`SMALL_RESNETS`)."""
    width, layers, halves = SMALL_RESNETS[name]
    return SmallResNet(width, layers, halves)
