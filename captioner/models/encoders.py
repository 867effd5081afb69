"""The image encoder: a CNN backbone without its classifier, and how it is built.

:func:`create_encoder` makes the backbone (torchvision, timm, the builtin compact ResNet of
:mod:`captioner.models.small_resnet`, or for an untrained ResNet the torchvision-free copy of
:mod:`captioner.models.backbones`), removes its head, loads a local
weights file when one is given, resolves the preprocessing its weights were trained with, and
probes its feature size and, for attention, its spatial grid.

Shapes: B batch, F feature size, P grid positions (h x w).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.configs.model import EncoderConfig
from captioner.configs.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from captioner.errors import UserError, first_line
from captioner.models.backbones import RESNET_CROP, RESNET_WEIGHTS, RESNETS, resnet
from captioner.models.small_resnet import SMALL_RESNETS, small_resnet


class Encoder(nn.Module):
    """Backbone without its classifier: images [B, 3, H, W] -> pooled features [B, F], or with
    ``spatial`` its last feature map as a grid of positions [B, P, F] (adaptive-average-pooled to
    ``grid`` x ``grid`` when set). With ``flip_average`` the mean of the features of the images
    and of their mirror images (a mirrored grid is flipped back, so positions stay aligned)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        flip_average: bool = False,
        *,
        spatial: bool = False,
        grid: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.flip_average = flip_average
        self.spatial = spatial
        self.grid = grid
        self.grid_shape: tuple[int, int] | None = None  # (h, w) of the grid; set by the first call
        self.channels_last = False  # the backbone's map is [B, h, w, F] (Swin)

    def forward(self, images: Tensor) -> Tensor:
        if not self.spatial:
            features = self.backbone(images).flatten(1)
            if self.flip_average:
                features = (features + self.backbone(images.flip(-1)).flatten(1)) / 2
            return features
        maps = self._channels_first(self.feature_map(images))  # [B, F, h, w]
        if self.flip_average:  # the mirror image's map, mirrored back: positions stay aligned
            maps = (maps + self._channels_first(self.feature_map(images.flip(-1))).flip(-1)) / 2
        if self.grid is not None:
            maps = F.adaptive_avg_pool2d(maps, self.grid)
        self.grid_shape = (int(maps.shape[2]), int(maps.shape[3]))
        return maps.flatten(2).transpose(1, 2)  # [B, P, F]

    def _channels_first(self, maps: Tensor) -> Tensor:
        if self.channels_last:
            maps = maps.permute(0, 3, 1, 2)
        if maps.dim() != 4:
            raise UserError(
                "model.decoder.attention: the encoder gives no spatial grid to attend over (its "
                f"feature map has shape {tuple(maps.shape)})"
            )
        return maps

    def feature_map(self, images: Tensor) -> Tensor:
        """The backbone's last spatial feature map (before global pooling): [B, F, h, w], or
        [B, h, w, F] for a backbone with ``channels_last`` (Swin)."""
        b = self.backbone
        if hasattr(b, "forward_features"):  # timm
            return b.forward_features(images)
        if isinstance(getattr(b, "features", None), nn.Module):  # efficientnet, mobilenet, vgg...
            out = b.features(images)
            return F.relu(out) if type(b).__name__ == "DenseNet" else out
        if hasattr(b, "layer4"):  # resnet, resnext, wide resnet
            x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
            return b.layer4(b.layer3(b.layer2(b.layer1(x))))
        raise UserError(
            f"model.decoder.attention: no spatial feature map known for {type(b).__name__}"
        )

    def stages(self) -> list[nn.Module]:
        """Top-level blocks in forward order (a Sequential 'features'/'blocks'/'layers' is opened),
        used to fine-tune only the last K stages."""
        out: list[nn.Module] = []
        for name, child in self.backbone.named_children():
            if name in ("features", "blocks", "layers", "stages") and isinstance(
                child, nn.Sequential
            ):
                out.extend(child.children())
            elif any(True for _ in child.parameters()):
                out.append(child)
        return out


def _strip_torchvision_head(model: nn.Module) -> nn.Module:
    """Replace the classification head with the identity / pooling that precedes it."""
    name = type(model).__name__
    if name == "SqueezeNet":
        model.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    elif isinstance(getattr(model, "fc", None), nn.Linear):  # resnet, resnext, regnet, googlenet
        model.fc = nn.Identity()
    elif isinstance(getattr(model, "heads", None), nn.Module):  # vit
        model.heads = nn.Identity()
    elif isinstance(getattr(model, "head", None), nn.Linear):  # swin
        model.head = nn.Identity()
    elif isinstance(getattr(model, "classifier", None), nn.Sequential):
        # mobilenet / efficientnet / convnext / vgg / densenet-like: keep what precedes the
        # first Linear (dropout, LayerNorm2d, Flatten), then flatten
        keep = []
        for m in model.classifier:
            if isinstance(m, nn.Linear):
                break
            keep.append(m)
        model.classifier = nn.Sequential(*keep, nn.Flatten())
    elif isinstance(getattr(model, "classifier", None), nn.Linear):  # densenet
        model.classifier = nn.Identity()
    else:
        raise UserError(f"model.encoder.name: don't know how to remove the head of {name}")
    return model


def _load_state_file(path: str) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model.encoder.weights_file: {path} not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's
        raise UserError(
            f"model.encoder.weights_file: {path} is not a torch state_dict ({exc})"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"model.encoder.weights_file: {path} does not hold a state_dict")
    return state


def _load_weights_file(model: nn.Module, cfg: EncoderConfig) -> None:
    """``cfg.weights_file`` into ``model`` (whole: every key, every shape), or one error line."""
    try:
        model.load_state_dict(_load_state_file(cfg.weights_file))
    except RuntimeError as exc:
        raise UserError(
            f"model.encoder.weights_file: {cfg.weights_file} does not fit {cfg.name} "
            f"({first_line(exc)})"
        ) from exc


def _torchvision_backbone(cfg: EncoderConfig, pretrained: bool) -> tuple[nn.Module, Preprocessing]:
    """torchvision model ``cfg.name`` without its head, and the preprocessing of ``cfg.weights``'
    metadata (256/224 ImageNet without weights). With ``pretrained=False`` a ResNet-18..152 is
    built by :mod:`captioner.models.backbones`, torchvision's module for module, without importing
    torchvision (whose import doubles a one-image ``captioner caption``), with the same
    preprocessing. Rebuilding from a checkpoint or an exported folder ignores that preprocessing
    for the stored one; a run started ``init_from`` a checkpoint uses it."""
    if not pretrained and cfg.name in RESNETS:
        return _native_resnet(cfg)
    import torchvision

    try:
        weights_enum = torchvision.models.get_model_weights(cfg.name)
    except (ValueError, KeyError) as exc:
        raise UserError(f"model.encoder.name: unknown torchvision model {cfg.name!r}") from exc
    weights = None
    if cfg.weights is not None:
        try:
            weights = (
                weights_enum[cfg.weights] if cfg.weights != "DEFAULT" else weights_enum.DEFAULT
            )
        except KeyError as exc:
            names = ", ".join(["DEFAULT", *weights_enum.__members__])
            raise UserError(
                f"model.encoder.weights: {cfg.weights!r} is not a weight of {cfg.name} ({names})"
            ) from exc
    download = weights if pretrained and cfg.weights_file is None else None
    model = torchvision.models.get_model(cfg.name, weights=download)
    if pretrained and cfg.weights_file is not None:
        _load_weights_file(model, cfg)
    if weights is not None:
        tf = weights.transforms()
        pre = Preprocessing(
            resize=int(tf.resize_size[0]),
            crop=int(tf.crop_size[0]),
            mean=tuple(tf.mean),
            std=tuple(tf.std),
            interpolation=tf.interpolation.value,
        )
    else:
        pre = Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    return _strip_torchvision_head(model), pre


def _native_resnet(cfg: EncoderConfig) -> tuple[nn.Module, Preprocessing]:
    """torchvision's ResNet ``cfg.name`` without its head, built by :mod:`captioner.models.backbones`
    (no torchvision import), with the preprocessing torchvision's weights metadata gives: what
    :func:`_torchvision_backbone` returns for it with ``pretrained=False``."""
    table = RESNET_WEIGHTS[cfg.name]
    pre = Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    if cfg.weights is not None:
        if cfg.weights not in table:
            names = ", ".join(["DEFAULT", *table])
            raise UserError(
                f"model.encoder.weights: {cfg.weights!r} is not a weight of {cfg.name} ({names})"
            )
        pre = Preprocessing(table[cfg.weights], RESNET_CROP, IMAGENET_MEAN, IMAGENET_STD)
    return resnet(cfg.name), pre


def _builtin_backbone(cfg: EncoderConfig, pretrained: bool) -> tuple[nn.Module, Preprocessing]:
    """A compact ResNet of :mod:`captioner.models.small_resnet`: no pretrained weights exist
    (it trains from scratch, so ``model.encoder.weights`` must be null), but a local
    ``weights_file`` loads; preprocessing 64 px, mean and std 0.5 and 0.25 unless overridden."""
    if cfg.name not in SMALL_RESNETS:
        raise UserError(
            f"model.encoder.name: unknown builtin encoder {cfg.name!r} "
            f"(builtin: {', '.join(SMALL_RESNETS)})"
        )
    if cfg.weights is not None:
        raise UserError(
            f"model.encoder.weights: {cfg.name} has no pretrained weights (it trains from "
            f"scratch); set model.encoder.weights=null, got {cfg.weights!r}"
        )
    model = small_resnet(cfg.name)
    if pretrained and cfg.weights_file is not None:
        _load_weights_file(model, cfg)
    return model, Preprocessing(64, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _timm_backbone(cfg: EncoderConfig, pretrained: bool) -> tuple[nn.Module, Preprocessing]:
    try:
        import timm
        import timm.data
    except ImportError as exc:
        raise UserError(
            "model.encoder.source=timm needs the timm package: pip install 'captioner[timm]'"
        ) from exc
    kwargs: dict[str, Any] = {"num_classes": 0}
    want = pretrained and (cfg.weights is not None or cfg.weights_file is not None)
    if want and cfg.weights_file is not None:
        if not Path(cfg.weights_file).is_file():
            raise UserError(f"model.encoder.weights_file: {cfg.weights_file} not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(cfg.weights_file)}
    try:
        model = timm.create_model(cfg.name, pretrained=want, **kwargs)
    except RuntimeError as exc:
        raise UserError(f"model.encoder.name: timm cannot create {cfg.name!r} ({exc})") from exc
    dc = timm.data.resolve_data_config({}, model=model)
    crop = int(dc["input_size"][-1])
    pre = Preprocessing(
        resize=int(crop / dc.get("crop_pct", 0.875)),
        crop=crop,
        mean=tuple(dc["mean"]),
        std=tuple(dc["std"]),
        interpolation=dc.get("interpolation", "bilinear"),
    )
    return model, pre


def create_encoder(
    cfg: EncoderConfig, pretrained: bool = True, spatial: bool = False
) -> tuple[Encoder, Preprocessing]:
    """Build the encoder and resolve its preprocessing (weights metadata, then config overrides).

    ``pretrained=False`` builds the bare architecture (used when a checkpoint provides weights);
    ``spatial`` makes it give the image grid [B, P, F] that attention reads.
    """
    build = {"timm": _timm_backbone, "builtin": _builtin_backbone}.get(
        cfg.source, _torchvision_backbone
    )
    backbone, pre = build(cfg, pretrained)
    overrides = {
        k: v
        for k, v in {
            "resize": cfg.resize,
            "crop": cfg.crop,
            "mean": cfg.mean,
            "std": cfg.std,
        }.items()
        if v is not None
    }
    if overrides:
        merged = {**pre.to_dict(), **overrides}
        if "resize" in overrides and "crop" not in overrides:
            merged["crop"] = min(merged["crop"], merged["resize"])
        try:
            pre = Preprocessing.from_dict(merged)
        except UserError as exc:
            raise UserError(f"model.encoder: bad preprocessing override ({exc})") from exc
    pre = dataclasses.replace(pre, fast_decode=bool(cfg.fast_decode))
    backbone.eval()
    encoder = Encoder(backbone, 0, cfg.flip_average, spatial=spatial, grid=cfg.grid)
    zeros = torch.zeros(1, 3, pre.crop, pre.crop)
    with torch.no_grad():
        encoder.feature_dim = int(backbone(zeros).flatten(1).shape[1])
        if spatial:
            # a backbone whose pooled features are not one position's (the small ResNet pooled
            # by halves) says what a position holds
            encoder.feature_dim = getattr(backbone, "map_channels", encoder.feature_dim)
            maps = encoder.feature_map(zeros)
            if maps.dim() == 4 and maps.shape[1] != encoder.feature_dim:
                # Swin-style maps come channels last, [1, h, w, F]
                encoder.channels_last = maps.shape[-1] == encoder.feature_dim
                maps = maps.permute(0, 3, 1, 2)
            if maps.dim() != 4 or maps.shape[1] != encoder.feature_dim:
                raise UserError(
                    f"model.decoder.attention: {cfg.name} gives no spatial grid of its "
                    f"{encoder.feature_dim}-d features (its feature map has shape "
                    f"{tuple(maps.shape)})"
                )
            encoder.grid_shape = (cfg.grid, cfg.grid) if cfg.grid else tuple(maps.shape[2:])
    return encoder, pre
