"""The captioning model: a pretrained CNN encoder and a recurrent decoder, built from a typed
config.

The decoder's cell is an LSTM, a GRU or a vanilla (tanh) RNN (``model.decoder.cell``); the image
initialises its state. With ``model.decoder.attention=soft`` ("Show, Attend and Tell", Xu et al.
2015) the encoder keeps its spatial grid and every step attends over it.

Shapes: B batch, T caption length (with <start>/<end>), F encoder feature size, P grid positions
(h x w), A attention size, E embedding size, H hidden size, L layers, V vocabulary size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.configs.model import DecoderConfig, EncoderConfig, ModelConfig
from captioner.configs.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from captioner.errors import UserError, first_line
from captioner.models.backbones import RESNET_CROP, RESNET_WEIGHTS, RESNETS, resnet

log = logging.getLogger(__name__)

# the decoder's state, every tensor with the batch in dim 1 (what beam search reorders): the
# cell's (h, c) for an LSTM or (h,) for a GRU / RNN, each [L, B, H]; with attention then also
# the image grid [P, B, F] and its attention projection [P, B, A]
State = tuple[Tensor, ...]


# ---------------------------------------------------------------------------------------------
# typed config


# ---------------------------------------------------------------------------------------------
# encoder


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
                "model.decoder.attention=soft: the encoder gives no spatial grid (its feature "
                f"map has shape {tuple(maps.shape)})"
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
            f"model.decoder.attention=soft: no spatial feature map known for {type(b).__name__}"
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
    encoder = Encoder(backbone, 0, cfg.flip_average, spatial=spatial, grid=cfg.grid)
    zeros = torch.zeros(1, 3, pre.crop, pre.crop)
    with torch.no_grad():
        encoder.feature_dim = int(backbone(zeros).flatten(1).shape[1])
        if spatial:
            maps = encoder.feature_map(zeros)
            if maps.dim() == 4 and maps.shape[1] != encoder.feature_dim:
                # Swin-style maps come channels last, [1, h, w, F]
                encoder.channels_last = maps.shape[-1] == encoder.feature_dim
                maps = maps.permute(0, 3, 1, 2)
            if maps.dim() != 4 or maps.shape[1] != encoder.feature_dim:
                raise UserError(
                    f"model.decoder.attention=soft: {cfg.name} gives no spatial grid of its "
                    f"{encoder.feature_dim}-d features (its feature map has shape "
                    f"{tuple(maps.shape)})"
                )
            encoder.grid_shape = (cfg.grid, cfg.grid) if cfg.grid else tuple(maps.shape[2:])
    return encoder, pre


# ---------------------------------------------------------------------------------------------
# decoder


def rename_legacy_keys(state: dict[str, Any], prefix: str = "decoder.") -> dict[str, Any]:
    """Checkpoints from before the cell was configurable name the decoder's LSTM ``lstm``, now
    ``rnn``: rename ``{prefix}lstm.*`` keys in place (model weights and weight averages alike)."""
    for key in [k for k in state if k.startswith(prefix + "lstm.")]:
        state[prefix + "rnn." + key[len(prefix) + 5 :]] = state.pop(key)
    return state


class SoftAttention(nn.Module):
    """Additive attention over the image grid (Bahdanau; Xu et al. 2015, eq. 4-5):
    e_p = w . tanh(W_f f_p + W_h h), alpha = softmax_p(e), context = sum_p alpha_p f_p."""

    def __init__(self, feature_dim: int, hidden_size: int, attention_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_size, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, grid: Tensor, projected: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """grid [P, B, F], projected = feature_proj(grid) [P, B, A] (computed once per image),
        query [B, H] -> context [B, F], weights alpha [B, P] (summing to 1 over positions)."""
        scores = self.score(torch.tanh(projected + self.hidden_proj(query))).squeeze(-1)  # [P, B]
        alpha = scores.softmax(dim=0, dtype=torch.float32).to(grid.dtype)  # float32 under autocast
        return torch.einsum("pb,pbf->bf", alpha, grid), alpha.t()


class Decoder(nn.Module):
    """Word embedding -> recurrent cell (LSTM, GRU or vanilla RNN) -> vocabulary logits, its
    state initialised from image features (pooled [B, F], or the grid [B, P, F] with attention,
    whose mean initialises the state as the pooled features do).

    With soft attention each step's input is [embedding of the previous word; beta * context],
    the context attended over the grid from the top layer's previous hidden state, gated by the
    scalar beta = sigmoid(W_beta h) (Xu et al. 2015, section 4.2.1).

    Implements the ``StepDecoder`` protocol of :mod:`captioner.decoding` (``init_state``/``step``).
    """

    def __init__(self, feature_dim: int, vocab_size: int, cfg: DecoderConfig, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        L, H, E = cfg.num_layers, cfg.hidden_size, cfg.embed_dim
        self.attends = cfg.attention == "soft"
        self.cell_tensors = 2 if cfg.cell == "lstm" else 1  # (h, c) or (h,)
        self.embed = nn.Embedding(vocab_size, E, padding_idx=pad_id)
        rnn_kwargs: dict[str, Any] = {"nonlinearity": "tanh"} if cfg.cell == "rnn" else {}
        self.rnn: nn.RNNBase = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cfg.cell](
            E + (feature_dim if self.attends else 0),
            H,
            num_layers=L,
            batch_first=True,
            dropout=cfg.dropout if L > 1 else 0.0,
            **rnn_kwargs,
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
            if cfg.cell == "lstm":
                self.init_c = nn.Linear(feature_dim, L * H)
        else:
            self.feature_embed = nn.Linear(feature_dim, E)
        if self.attends:
            self.attention = SoftAttention(feature_dim, H, cfg.attention_dim)
            self.gate = nn.Linear(H, 1)  # beta

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        rename_legacy_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- state ----------------------------------------------------------------------------------
    def _cell_state(self, state: State) -> Tensor | tuple[Tensor, Tensor]:
        """What ``self.rnn`` takes: (h, c) for an LSTM, h for a GRU / RNN."""
        return (state[0], state[1]) if self.cell_tensors == 2 else state[0]

    def _with_cell(self, state: State, cell: Tensor | tuple[Tensor, ...]) -> State:
        cell = cell if isinstance(cell, tuple) else (cell,)
        return (*cell, *state[self.cell_tensors :])

    def init_state(self, features: Tensor) -> State:
        """features [B, F] (or the grid [B, P, F] with attention) -> the initial state."""
        B, L, H = features.shape[0], self.cfg.num_layers, self.cfg.hidden_size
        memory: tuple[Tensor, ...] = ()
        pooled = features
        if self.attends:
            grid = features.transpose(0, 1)  # [P, B, F]: the batch in dim 1, as beams reorder it
            memory = (grid, self.attention.feature_proj(grid))  # [P, B, F], [P, B, A]
            pooled = features.mean(dim=1)  # [B, F]
        pooled = self.dropout(pooled)
        if self.cfg.feature_mode == "init_state":
            h = torch.tanh(self.init_h(pooled)).view(B, L, H).transpose(0, 1).contiguous()
            if self.cell_tensors == 1:
                return (h, *memory)
            c = self.init_c(pooled).view(B, L, H).transpose(0, 1).contiguous()
            return (h, c, *memory)
        # first_input: the image is the cell's input at t = -1, from a zero state
        zeros = pooled.new_zeros(L, B, H)
        state = ((zeros,) * self.cell_tensors) + memory
        _, state, _ = self._advance(self.feature_embed(pooled), state)
        return state

    # -- one step -------------------------------------------------------------------------------
    def _advance(self, x: Tensor, state: State) -> tuple[Tensor, State, Tensor | None]:
        """One time step: input x [B, E] -> (top hidden state [B, H], new state, attention
        weights [B, P] or None). The one step function of both teacher forcing and decoding."""
        alpha = None
        if self.attends:
            query = state[0][-1]  # the top layer's h_{t-1} [B, H]
            context, alpha = self.attention(state[-2], state[-1], query)  # [B, F], [B, P]
            x = torch.cat([x, torch.sigmoid(self.gate(query)) * context], dim=-1)
        out, cell = self.rnn(x.unsqueeze(1), self._cell_state(state))  # [B, 1, H]
        return out.squeeze(1), self._with_cell(state, cell), alpha

    def forward(
        self,
        features: Tensor,
        captions: Tensor,
        lengths: Tensor,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Teacher forcing. features [B, F] (grid [B, P, F] with attention), captions [B, T]
        (<start> .. <end> <pad>..), lengths [B] -> logits [B, T-1, V] predicting captions[:, 1:]
        (padded positions are meaningless). ``return_attention``: (logits, alpha [B, T-1, P]
        with the weights of padded steps zeroed; None without attention)."""
        state = self.init_state(features)
        inputs = captions[:, :-1]  # [B, T-1]: <start> w1 .. wn (and pads)
        x = self.dropout(self.embed(inputs))  # [B, T-1, E]
        alpha = None
        if not self.attends:
            # The padded batch goes through the cell as it is, without pack_padded_sequence: the
            # cell runs forward in time and captions are padded at the end, so a real position
            # never sees a pad, and what the pads produce is masked out of the loss. Same outputs
            # and gradients as packing, and on a CPU about 1.3x faster a step
            # (benchmarks/README.md).
            out, _ = self.rnn(x, self._cell_state(state))  # [B, T-1, H]
        else:  # the input of each step depends on the previous one's state: step by step
            outs, alphas = [], []
            for t in range(x.shape[1]):
                o, state, a = self._advance(x[:, t], state)
                outs.append(o)
                alphas.append(a)
            out = torch.stack(outs, dim=1)  # [B, T-1, H]
            if return_attention:
                steps = torch.arange(x.shape[1], device=x.device)
                real = steps[None, :] < (lengths.to(x.device)[:, None] - 1)  # [B, T-1]
                alpha = torch.stack(alphas, dim=1) * real[:, :, None]  # [B, T-1, P]
        logits = self.out(self.dropout(out))  # [B, T-1, V]
        return (logits, alpha) if return_attention else logits

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """One decoding step: tokens [B] -> logits [B, V] and the next state. The same function as
        one position of :meth:`forward`, dropout included in train mode (self-critical training
        samples this way); in eval mode dropout is the identity."""
        out, state, _ = self._advance(self.dropout(self.embed(tokens)), state)
        return self.out(self.dropout(out)), state


def attention_penalty(alpha: Tensor) -> Tensor:
    """The doubly stochastic regulariser of Xu et al. (2015, eq. 14) per caption, averaged over
    the batch: sum_p (1 - sum_t alpha_tp)^2, for alpha [B, T, P] whose padded steps are zero."""
    return ((1.0 - alpha.sum(dim=1)) ** 2).sum(dim=1).mean()


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
    @property
    def attends(self) -> bool:
        return self.decoder.attends

    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> features [B, F], or the grid [B, P, F] when the decoder
        attends (no graph when the encoder is frozen)."""
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
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Teacher-forced logits [N, T-1, V] for captions [N, T]; with ``return_attention``
        (logits, attention weights [N, T-1, P] or None), see :meth:`Decoder.forward`.

        inputs: images [B, 3, H, W], or encoder features ([B, F] / [B, P, F]) when ``features``;
        image_of_caption [N] maps each caption to its row of inputs (None: row i is caption i).
        """
        feats = inputs if features else self.encode(inputs)  # [B, F] or [B, P, F]
        if image_of_caption is not None:
            feats = feats[image_of_caption]  # [N, ...]
        return self.decoder(feats.float(), captions, lengths, return_attention=return_attention)

    @torch.no_grad()
    def attention_maps(self, features: Tensor, captions: Tensor, lengths: Tensor) -> list[Tensor]:
        """Where the decoder looked for each word of given captions: features [B, P, F],
        captions [B, T] (<start> w1 .. wn <end> <pad>..) -> per caption [n, h, w], the weights
        of the step that predicted each of its n words. Decoding is deterministic in eval mode,
        so for a decoded caption these are the weights the decoding steps used."""
        if not self.attends:
            raise UserError("this model has no attention (model.decoder.attention=none)")
        if self.encoder.grid_shape is None:
            raise ValueError("the encoder's grid shape is unknown: encode an image first")
        h, w = self.encoder.grid_shape
        _, alpha = self.decoder(features.float(), captions, lengths, return_attention=True)
        assert alpha is not None
        return [alpha[i, : int(n) - 2].reshape(-1, h, w).cpu() for i, n in enumerate(lengths)]


def build_model(
    config: ModelConfig, vocab_size: int, pretrained: bool = True
) -> tuple[CaptionModel, Preprocessing]:
    """Build the captioner from its typed config; ``pretrained=False`` skips weight loading."""
    spatial = config.decoder.attention == "soft"
    encoder, pre = create_encoder(config.encoder, pretrained=pretrained, spatial=spatial)
    decoder = Decoder(encoder.feature_dim, vocab_size, config.decoder)
    return CaptionModel(encoder, decoder, config), pre
