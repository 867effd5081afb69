"""The captioning model: a pretrained CNN encoder (:mod:`captioner.models.encoders`) and a
recurrent decoder (:mod:`captioner.models.decoders`), joined and built from a typed config.

The decoder's cell is an LSTM, a GRU or a vanilla (tanh) RNN (``model.decoder.cell``); the image
initialises its state. With ``model.decoder.attention=soft`` ("Show, Attend and Tell", Xu et al.
2015) or ``topdown`` (Anderson et al. 2018) the encoder keeps its spatial grid and every step
attends over it.

Shapes: B batch, N captions, T caption length (with <start>/<end>), F encoder feature size,
P grid positions (h x w), V vocabulary size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from captioner.configs.model import ModelConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.errors import UserError
from captioner.models.decoders import DECODERS, Decoder, build_decoder
from captioner.models.encoders import Encoder, create_encoder


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
        BatchNorm running statistics never drift; with ``model.encoder.frozen_batchnorm`` so do
        the BatchNorm layers of the trainable stages (their weights still train).
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
        if self.config.encoder.frozen_batchnorm:  # statistics kept, scale and shift trained
            for m in self.encoder.modules():
                if isinstance(m, _BatchNorm):
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
        state: tuple[Tensor, ...] | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """Teacher-forced logits [N, T-1, V] for captions [N, T]; with ``return_attention``
        (logits, attention weights [N, T-1, P] or None); ``state`` / ``return_state`` go on
        from / return the decoder's state, chunk by chunk; see
        :meth:`~captioner.models.decoders.Decoder.forward`.

        inputs: images [B, 3, H, W], or encoder features ([B, F] / [B, P, F]) when ``features``;
        image_of_caption [N] maps each caption to its row of inputs (None: row i is caption i).
        """
        feats = inputs if features else self.encode(inputs)  # [B, F] or [B, P, F]
        if image_of_caption is not None:
            feats = feats[image_of_caption]  # [N, ...]
        return self.decoder(
            feats.float(),
            captions,
            lengths,
            return_attention=return_attention,
            state=state,
            return_state=return_state,
        )

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
    spatial = DECODERS[config.decoder.attention].attends
    encoder, pre = create_encoder(config.encoder, pretrained=pretrained, spatial=spatial)
    decoder = build_decoder(config.decoder, encoder.feature_dim, vocab_size)
    return CaptionModel(encoder, decoder, config), pre
