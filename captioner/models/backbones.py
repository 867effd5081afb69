"""torchvision's ResNet-18/34/50/101/152, rebuilt without importing torchvision.

Why not just use the library: rebuilding a checkpoint's encoder (``captioner caption``,
``Captioner.from_checkpoint``/``from_pretrained``) needs only the architecture, whose weights the
checkpoint provides, but ``import torchvision`` imports ``torchvision.ops``, which imports
``torch._dynamo``. Measured with ``python -X importtime`` on the 2-core development machine
(2026-12-01): torchvision took 1.06 s on top of torch's own 1.1-1.3 s, and the cold start of
``captioner caption`` on one image was 2.1x a bare ``python -c "import torch"``
(``benchmarks/cold_start.py``). So :func:`captioner.models.encoders._torchvision_backbone` builds these
five architectures from here when a checkpoint provides the weights (``pretrained=False``), and
uses torchvision for everything else (pretrained or local weights, every other model, the
training augmentation). A deliberate, measured exception to "use the library".

The modules are torchvision's own, module for module (``torchvision/models/resnet.py``, 0.29):
same class names (``ResNet``, ``BasicBlock``, ``Bottleneck``: the feature cache's fingerprint
reads the class name), same attribute names and order, hence the same ``state_dict`` keys and
shapes as torchvision's model with its classifier replaced by ``nn.Identity`` (what
:func:`captioner.models.encoders._strip_torchvision_head` does), the same forward, and the same random
initialisation: the modules are created and initialised in torchvision's order, the 1000-way
classifier included before it is dropped, so under one seed the parameters are identical.
``tests/test_backbones.py`` checks all of it against torchvision, and
:data:`RESNET_WEIGHTS` against torchvision's weights metadata.

Shapes: B batch, C channels, H x W the input, h x w = H/32 x W/32 the last feature map.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# name -> (block, blocks per stage), as torchvision's resnetNN() builders
RESNETS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}

# torchvision's weights enums of these models, as far as preprocessing goes: weight name ->
# resize (ImageClassification's resize_size); all are 224 px crops, bilinear, ImageNet mean/std.
# "DEFAULT" is the enum's alias of the recommended weights; the key order is the enum's
# ``__members__`` order (the "is not a weight of" error lists them).
RESNET_WEIGHTS: dict[str, dict[str, int]] = {
    "resnet18": {"IMAGENET1K_V1": 256, "DEFAULT": 256},
    "resnet34": {"IMAGENET1K_V1": 256, "DEFAULT": 256},
    "resnet50": {"IMAGENET1K_V1": 256, "IMAGENET1K_V2": 232, "DEFAULT": 232},
    "resnet101": {"IMAGENET1K_V1": 256, "IMAGENET1K_V2": 232, "DEFAULT": 232},
    "resnet152": {"IMAGENET1K_V1": 256, "IMAGENET1K_V2": 232, "DEFAULT": 232},
}
RESNET_CROP = 224


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and the shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 down, 3x3 (carrying the stride: ResNet v1.5, as torchvision), 1x1 up, the shortcut
    (ResNet-50/101/152)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def residual_stage(
    block: type[BasicBlock | Bottleneck], inplanes: int, planes: int, blocks: int, stride: int = 1
) -> nn.Sequential:
    """A ResNet stage: ``blocks`` blocks taking ``inplanes`` channels to ``planes * expansion``,
    the first with ``stride`` and, where the shape changes, a 1x1 projection on its shortcut
    (modules created in torchvision's ``_make_layer`` order)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            conv1x1(inplanes, planes * block.expansion, stride),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_resnet(model: nn.Module) -> None:
    """torchvision's ResNet initialisation, in module order: He-normal convolutions (fan out),
    BatchNorm scale 1 and shift 0 (the linear layers keep PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` (groups 1, width 64, no dilation) with ``fc`` the identity:
    images [B, 3, H, W] -> pooled features [B, C] (C = 512, or 2048 with bottlenecks)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int]):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        # torchvision's 1000-way classifier is created (its init draws from the RNG, so the
        # convolutions below get the values torchvision's would), then replaced, as
        # _strip_torchvision_head replaces it
        self.fc: nn.Module = nn.Linear(512 * block.expansion, 1000)
        init_resnet(self)
        self.fc = nn.Identity()

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        stage = residual_stage(block, self.inplanes, planes, blocks, stride)
        self.inplanes = planes * block.expansion
        return stage

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, 64, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, C, h, w]
        x = torch.flatten(self.avgpool(x), 1)  # [B, C]
        return self.fc(x)


def resnet(name: str) -> ResNet:
    """The headless ResNet ``name`` (one of :data:`RESNETS`), randomly initialised as
    torchvision initialises it."""
    kind, layers = RESNETS[name]
    return ResNet(BasicBlock if kind == "basic" else Bottleneck, layers)
