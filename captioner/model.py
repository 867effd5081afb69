"""The captioning model: a pretrained CNN encoder and an LSTM decoder, built from a typed config.

Shapes: B batch, T caption length (with <start>/<end>), F encoder feature size, E embedding size,
H LSTM hidden size, L LSTM layers, V vocabulary size.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captioner.data import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from captioner.errors import UserError, first_line
from captioner.typed import from_dict

log = logging.getLogger(__name__)

State = tuple[Tensor, Tensor]  # LSTM (h, c), each [L, B, H]


# ---------------------------------------------------------------------------------------------
# typed config


@dataclass
class EncoderConfig:
    source: str = "torchvision"  # torchvision | timm
    name: str = "resnet50"
    weights: str | None = (
        "DEFAULT"  # torchvision: DEFAULT / enum name / null; timm: any -> pretrained
    )
    weights_file: str | None = None  # local state_dict instead of a download
    freeze: bool = True
    finetune_from_epoch: int | None = None  # 1-based: epochs >= N fine-tune the encoder
    finetune_last_stages: int | None = None  # only the last K stages (None: all)
    lr: float | None = None  # encoder learning rate when fine-tuned (None: optimizer lr)
    # preprocessing overrides; null takes the value from the weights' metadata
    resize: int | None = None
    crop: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    # features = mean over the image and its mirror image: a flip-invariant summary, for the
    # feature cache, evaluation and captioning alike (costs a second encoder pass)
    flip_average: bool = False

    def __post_init__(self) -> None:
        if self.source not in ("torchvision", "timm"):
            raise UserError(
                f"model.encoder.source must be 'torchvision' or 'timm', got {self.source!r}"
            )
        if self.finetune_from_epoch is not None and self.finetune_from_epoch < 1:
            raise UserError(
                "model.encoder.finetune_from_epoch is 1-based (the first epoch is 1), "
                f"got {self.finetune_from_epoch}"
            )
        if self.finetune_last_stages is not None and self.finetune_last_stages < 1:
            raise UserError(
                "model.encoder.finetune_last_stages must be >= 1 or null (all stages), "
                f"got {self.finetune_last_stages}"
            )
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"model.encoder.lr must be > 0 or null, got {self.lr}")

    def trainable_stages(self, epoch: int) -> int | None:
        """What of the encoder trains in 0-based ``epoch``: 0 nothing (frozen), None all of it,
        K its last K stages (``finetune_from_epoch`` counts from 1)."""
        if not self.freeze:
            return self.finetune_last_stages
        if self.finetune_from_epoch is not None and epoch + 1 >= self.finetune_from_epoch:
            return self.finetune_last_stages
        return 0


@dataclass
class DecoderConfig:
    embed_dim: int = 512
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    feature_mode: str = "init_state"  # init_state (h0/c0 from features) | first_input
    # the output layer reuses the word embeddings (Press & Wolf 2017): needs embed_dim == hidden_size
    tie_weights: bool = False

    def __post_init__(self) -> None:
        if self.feature_mode not in ("init_state", "first_input"):
            raise UserError(
                "model.decoder.feature_mode must be 'init_state' or 'first_input', "
                f"got {self.feature_mode!r}"
            )
        for key in ("embed_dim", "hidden_size", "num_layers"):
            if getattr(self, key) < 1:
                raise UserError(f"model.decoder.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.decoder.dropout must be in [0, 1), got {self.dropout}")
        if self.tie_weights and self.embed_dim != self.hidden_size:
            raise UserError(
                "model.decoder.tie_weights=true needs embed_dim == hidden_size, "
                f"got {self.embed_dim} and {self.hidden_size}"
            )


# the fields that decide which weights a model has (what ``init_from=`` must agree on); the
# others (dropout, preprocessing, the fine-tuning schedule) may differ between runs
ARCHITECTURE_FIELDS = {
    "encoder": ("source", "name"),
    "decoder": ("embed_dim", "hidden_size", "num_layers", "feature_mode", "tie_weights"),
}


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        data.pop("name", None)  # the Hydra option's label
        unknown = sorted(set(data) - {"encoder", "decoder"})
        if unknown:
            raise UserError(f"model.{unknown[0]}: unknown option")
        return cls(
            encoder=from_dict(EncoderConfig, data.get("encoder"), "model.encoder"),
            decoder=from_dict(DecoderConfig, data.get("decoder"), "model.decoder"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# encoder


class Encoder(nn.Module):
    """Backbone without its classifier: images [B, 3, H, W] -> pooled features [B, F]; with
    ``flip_average`` the mean of the features of the images and of their mirror images."""

    def __init__(self, backbone: nn.Module, feature_dim: int, flip_average: bool = False):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.flip_average = flip_average

    def forward(self, images: Tensor) -> Tensor:
        features = self.backbone(images).flatten(1)
        if self.flip_average:
            features = (features + self.backbone(images.flip(-1)).flatten(1)) / 2
        return features

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


def _torchvision_backbone(cfg: EncoderConfig, pretrained: bool) -> tuple[nn.Module, Preprocessing]:
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
        try:
            model.load_state_dict(_load_state_file(cfg.weights_file))
        except RuntimeError as exc:
            raise UserError(
                f"model.encoder.weights_file: {cfg.weights_file} does not fit {cfg.name} "
                f"({first_line(exc)})"
            ) from exc
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


def create_encoder(cfg: EncoderConfig, pretrained: bool = True) -> tuple[Encoder, Preprocessing]:
    """Build the encoder and resolve its preprocessing (weights metadata, then config overrides).

    ``pretrained=False`` builds the bare architecture (used when a checkpoint provides weights).
    """
    build = _timm_backbone if cfg.source == "timm" else _torchvision_backbone
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
        except ValueError as exc:
            raise UserError(f"model.encoder: bad preprocessing override ({exc})") from exc
    backbone.eval()
    with torch.no_grad():
        feature_dim = backbone(torch.zeros(1, 3, pre.crop, pre.crop)).flatten(1).shape[1]
    return Encoder(backbone, int(feature_dim), flip_average=cfg.flip_average), pre


# ---------------------------------------------------------------------------------------------
# decoder


class Decoder(nn.Module):
    """Word embedding -> LSTM -> vocabulary logits, its state initialised from image features.

    Implements the ``StepDecoder`` protocol of :mod:`captioner.decoding` (``init_state``/``step``).
    """

    def __init__(self, feature_dim: int, vocab_size: int, cfg: DecoderConfig, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        L, H, E = cfg.num_layers, cfg.hidden_size, cfg.embed_dim
        self.embed = nn.Embedding(vocab_size, E, padding_idx=pad_id)
        self.lstm = nn.LSTM(
            E, H, num_layers=L, batch_first=True, dropout=cfg.dropout if L > 1 else 0.0
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(H, vocab_size)
        if cfg.tie_weights:
            # one [V, E] matrix reads and writes words; N(0, 1) embeddings would make the initial
            # logits ~10x too large, so start it small as the PyTorch word-language-model does
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
            with torch.no_grad():
                self.embed.weight[pad_id].zero_()
            self.out.weight = self.embed.weight
        if cfg.feature_mode == "init_state":
            self.init_h = nn.Linear(feature_dim, L * H)
            self.init_c = nn.Linear(feature_dim, L * H)
        else:
            self.feature_embed = nn.Linear(feature_dim, E)

    def init_state(self, features: Tensor) -> State:
        """features [B, F] -> (h0, c0), each [L, B, H]."""
        B, L, H = features.shape[0], self.cfg.num_layers, self.cfg.hidden_size
        features = self.dropout(features)
        if self.cfg.feature_mode == "init_state":
            h = torch.tanh(self.init_h(features)).view(B, L, H).transpose(0, 1).contiguous()
            c = self.init_c(features).view(B, L, H).transpose(0, 1).contiguous()
            return h, c
        # first_input: the image is the LSTM's input at t = -1, from a zero state
        x = self.feature_embed(features).unsqueeze(1)  # [B, 1, E]
        _, state = self.lstm(x)
        return state

    def forward(self, features: Tensor, captions: Tensor, lengths: Tensor) -> Tensor:
        """Teacher forcing. features [B, F], captions [B, T] (<start> .. <end> <pad>..), lengths [B]
        (part of the decoder interface; this LSTM does not need them, see below)
        -> logits [B, T-1, V] predicting captions[:, 1:] (padded positions are meaningless)."""
        state = self.init_state(features)
        inputs = captions[:, :-1]  # [B, T-1]: <start> w1 .. wn (and pads)
        x = self.dropout(self.embed(inputs))  # [B, T-1, E]
        # The padded batch goes through the LSTM as it is, without pack_padded_sequence: the LSTM
        # runs forward in time and captions are padded at the end, so a real position never sees
        # a pad, and what the pads produce is masked out of the loss. Same outputs and gradients
        # as packing, and on a CPU about 1.3x faster a step (benchmarks/README.md).
        out, _ = self.lstm(x, state)  # [B, T-1, H]
        return self.out(self.dropout(out))  # [B, T-1, V]

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """One decoding step: tokens [B] -> logits [B, V] and the next state. The same function as
        one position of :meth:`forward`, dropout included in train mode (self-critical training
        samples this way); in eval mode dropout is the identity."""
        x = self.dropout(self.embed(tokens)).unsqueeze(1)  # [B, 1, E]
        out, state = self.lstm(x, state)  # [B, 1, H]
        return self.out(self.dropout(out.squeeze(1))), state


# ---------------------------------------------------------------------------------------------
# the captioner


class CaptionModel(nn.Module):
    """Encoder + decoder. ``forward`` takes images, or precomputed encoder features."""

    def __init__(self, encoder: Encoder, decoder: Decoder, config: ModelConfig):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.config = config
        self._frozen: list[nn.Module] = []
        self.set_encoder_trainable(0 if config.encoder.freeze else None)

    # -- freezing -----------------------------------------------------------------------------
    def set_encoder_trainable(self, last_stages: int | None) -> None:
        """0: frozen; None: whole encoder trainable; K: only its last K stages.

        Frozen parts get ``requires_grad=False`` and stay in eval mode even under ``train()``, so
        BatchNorm running statistics never drift.
        """
        self.encoder.requires_grad_(last_stages is None)
        if last_stages is None:
            self._frozen = []
        elif last_stages <= 0:
            self._frozen = [self.encoder]
        else:
            stages = self.encoder.stages()
            self._frozen = stages[: max(0, len(stages) - last_stages)]
            for m in stages[len(self._frozen) :]:
                m.requires_grad_(True)
        self.train(self.training)

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> CaptionModel:
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (as nanoGPT's ``configure_optimizers``): the decoder at the
        optimizer's rate, the encoder at ``model.encoder.lr`` when set. Frozen encoder parameters
        are included, so a run that unfreezes stages mid-way keeps one optimizer: they get no
        gradient, hence no update, while frozen."""
        encoder: dict[str, Any] = {"params": list(self.encoder.parameters()), "name": "encoder"}
        if self.config.encoder.lr is not None:
            encoder["lr"] = float(self.config.encoder.lr)
        return [{"params": list(self.decoder.parameters()), "name": "decoder"}, encoder]

    # -- forward ------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> features [B, F] (no graph when the encoder is frozen)."""
        if self.encoder_frozen:
            with torch.no_grad():
                return self.encoder(images)
        return self.encoder(images)

    def forward(
        self,
        inputs: Tensor,
        captions: Tensor,
        lengths: Tensor,
        image_of_caption: Tensor | None = None,
        features: bool = False,
    ) -> Tensor:
        """Teacher-forced logits [N, T-1, V] for captions [N, T].

        inputs: images [B, 3, H, W], or encoder features [B, F] when ``features``;
        image_of_caption [N] maps each caption to its row of inputs (None: row i is caption i).
        """
        feats = inputs if features else self.encode(inputs)  # [B, F]
        if image_of_caption is not None:
            feats = feats[image_of_caption]  # [N, F]
        return self.decoder(feats.float(), captions, lengths)


def build_model(
    config: ModelConfig, vocab_size: int, pretrained: bool = True
) -> tuple[CaptionModel, Preprocessing]:
    """Build the captioner from its typed config; ``pretrained=False`` skips weight loading."""
    encoder, pre = create_encoder(config.encoder, pretrained=pretrained)
    decoder = Decoder(encoder.feature_dim, vocab_size, config.decoder)
    return CaptionModel(encoder, decoder, config), pre
