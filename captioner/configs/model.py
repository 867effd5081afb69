"""``model.*``: the encoder and decoder settings of a captioning model (torch-free).

The models themselves are built from these in :mod:`captioner.models`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from captioner.configs.checks import at_least, one_of
from captioner.errors import UserError
from captioner.typed import from_dict

CELLS = ("lstm", "gru", "rnn")


ATTENTION = ("none", "soft", "topdown")
FEATURE_MODES = ("init_state", "first_input", "zeros")


@dataclass
class EncoderConfig:
    # torchvision | timm | builtin (captioner.models.small_resnet: a compact ResNet for small
    # images, trained from scratch; the demo's)
    source: str = "torchvision"
    name: str = "resnet50"
    weights: str | None = (
        "DEFAULT"  # torchvision: DEFAULT / enum name / null; timm: any -> pretrained
    )
    weights_file: str | None = None  # local state_dict instead of a download
    freeze: bool = True
    finetune_from_epoch: int | None = None  # 1-based: epochs >= N fine-tune the encoder
    finetune_last_stages: int | None = None  # only the last K stages (None: all)
    lr: float | None = None  # encoder learning rate when fine-tuned (None: optimizer lr)
    # fine-tuned stages normalise by their BatchNorm running statistics (kept as loaded: the
    # pretrained weights', or init_from's; the norms' scale and shift still train), not by each
    # batch's: for batches of a few images, whose statistics are noisy (false: batch statistics,
    # as torchvision trains)
    frozen_batchnorm: bool = False
    # preprocessing overrides; null takes the value from the weights' metadata
    resize: int | None = None
    crop: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    # the fast path from a JPEG to the tensor (captioner.configs.preprocessing.Preprocessing's
    # fast_decode: a reduced DCT scale when the photo is at least twice the resize, PyTorch's
    # vectorised resize): 2.3x the images/s on COCO's 640 x 480 photos, features within a cosine
    # of 0.99 of the exact path's (benchmarks/decode.py). Stored in the checkpoint's preprocessing.
    fast_decode: bool = True
    # features = mean over the image and its mirror image: a flip-invariant summary, for the
    # feature cache, evaluation and captioning alike (costs a second encoder pass)
    flip_average: bool = False
    # with a decoder that attends (model.decoder.attention=soft|topdown): adaptive-average-pool
    # the CNN's spatial grid to grid x grid positions (null: the grid the CNN gives, e.g. 9 x 9
    # at 260 px)
    grid: int | None = None

    def __post_init__(self) -> None:
        if self.grid is not None and self.grid < 1:
            raise UserError(f"model.encoder.grid must be >= 1 or null, got {self.grid}")
        if self.source not in ("torchvision", "timm", "builtin"):
            raise UserError(
                "model.encoder.source must be 'torchvision', 'timm' or 'builtin', "
                f"got {self.source!r}"
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
    # init_state (h0, and an LSTM's c0, from the features) | first_input (the features as the
    # input of a step before <start>) | zeros (a zero start: the paper's top-down decoder; the
    # image is read through attention, and top-down's attention cell also reads the grid's
    # mean at every step; needs attention)
    feature_mode: str = "init_state"
    # the output layer reuses the word embeddings (Press & Wolf 2017): needs embed_dim == hidden_size
    tie_weights: bool = False
    cell: str = "lstm"  # lstm | gru | rnn (vanilla tanh RNN); GRU and RNN have no c0
    # none (pooled features) | soft (attend over the image grid) | topdown (an attention cell's
    # h attends over the grid, a language cell reads the context and predicts the word)
    attention: str = "none"
    attention_dim: int = 512  # A: size of the additive attention's hidden layer
    # lambda of the doubly stochastic regulariser, lambda * sum_p (1 - sum_t alpha_tp)^2
    attention_penalty: float = 1.0

    def __post_init__(self) -> None:
        one_of(self, "model.decoder", cell=CELLS, attention=ATTENTION)
        at_least(self, "model.decoder", attention_dim=1)
        if not self.attention_penalty >= 0:
            raise UserError(
                f"model.decoder.attention_penalty must be >= 0, got {self.attention_penalty}"
            )
        one_of(self, "model.decoder", feature_mode=FEATURE_MODES)
        if self.feature_mode == "zeros" and self.attention == "none":
            raise UserError(
                "model.decoder.feature_mode=zeros starts from a zero state and reads the image "
                "through attention: it needs model.decoder.attention=soft or topdown"
            )
        at_least(self, "model.decoder", embed_dim=1, hidden_size=1, num_layers=1)
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
    "decoder": (
        "cell",
        "attention",
        "attention_dim",
        "embed_dim",
        "hidden_size",
        "num_layers",
        "feature_mode",
        "tie_weights",
    ),
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
