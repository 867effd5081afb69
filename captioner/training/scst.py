"""Self-critical sequence training (Rennie et al. 2017): REINFORCE on the CIDEr-D of the model's
own samples, with a baseline from the model itself.

Per image of a batch, K captions are sampled (multinomial, up to ``<end>`` or ``max_len``
tokens, through the same :func:`captioner.decoding.sample` that ``captioner caption`` uses).
Each sample's reward is its CIDEr-D against the image's references, with document frequencies
computed ONCE from the training split's references (:class:`captioner.evaluation.cider.CiderD`). The
baseline is the mean reward of the image's OTHER K-1 samples (Luo 2020, the "new self-critical":
never the sample itself, so the estimate stays unbiased) or the reward of its greedy caption
(the original paper). The loss is ``-(r - b) * sum_t log p(w_t)`` over the sample's tokens,
``<end>`` included (ending is a decision the policy makes), nothing after it.

How ``<end>`` enters the reward (``end_in_reward``, on by default): it is appended as a word to
every reference and to every sample that produced it, so "... on the grass <end>" earns the
n-grams that end a reference, and a fragment cut off by ``max_len`` or ending early
("a dog runs through the <end>") misses them. Without it CIDEr-D rewards fragments that stop
wherever the matched n-grams stop, and SCST learns to end captions on "a" and "the".

The log-probabilities are computed by one teacher-forced pass over the samples through the
model's ``forward`` (the same call teacher forcing makes, so DDP synchronises the gradients, the
encoder is trained when it is being fine-tuned, and any decoder with ``forward`` and ``step``
works), under the same masking of never-emitted tokens the sampler used. With ``dropout=false``
(the default) both passes run the decoder in eval mode: the samples and their log-probabilities
come from one distribution, the policy that is evaluated. ``dropout=true`` samples and scores
with dropout on, each pass with its own random masks, so the log-probability is of the sample
under another draw of the dropout noise: a regularised, no longer exact, policy gradient.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.checkpoint import unwrap
from captioner.configs.decode import DecodeConfig
from captioner.configs.training import SCSTConfig
from captioner.datasets.annotations import CaptionRecord
from captioner.datasets.captions import pad_captions
from captioner.decoding import Hypothesis, banned_ids, decode, mask_logits
from captioner.evaluation.cider import CiderD
from captioner.models.captioning import CaptionModel
from captioner.training.monitor import Monitor
from captioner.training.objectives import Objective, StepLoss
from captioner.vocab import Vocab, tokenize

log = logging.getLogger(__name__)

END_WORD = "<end>"


@contextlib.contextmanager
def training_mode(module: nn.Module, mode: bool) -> Iterator[None]:
    """``module.train(mode)`` inside the block, its previous mode after it."""
    before = module.training
    module.train(mode)
    try:
        yield
    finally:
        module.train(before)


def mean_of_others(rewards: Tensor) -> Tensor:
    """[B, K] rewards -> [B, K] baselines: for each sample the mean reward of the image's other
    K-1 samples (never the sample itself)."""
    K = rewards.size(1)
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)


def sequence_log_probs(logits: Tensor, captions: Tensor, banned: Tensor, pad_id: int) -> Tensor:
    """Teacher-forced logits [N, T-1, V] of captions [N, T] (``<start>`` w.. [``<end>``] pads)
    -> [N] summed log-probabilities of each caption's tokens after ``<start>``, under the
    distribution the sampler drew from (``banned`` ids at -inf); padding contributes nothing."""
    targets = captions[:, 1:]
    logp = F.log_softmax(mask_logits(logits, banned), dim=-1)
    token_logp = logp.gather(2, targets.unsqueeze(2)).squeeze(2)  # [N, T-1]
    return token_logp.masked_fill(targets == pad_id, 0.0).sum(dim=1)


class SelfCritical:
    """The SCST objective (an :class:`captioner.training.objectives.Objective`). Batches hold each image
    once (``index``: record indices into ``records``, the training split)."""

    def __init__(
        self,
        vocab: Vocab,
        records: Sequence[CaptionRecord],
        config: SCSTConfig,
        max_len: int,
    ):
        self.vocab, self.config = vocab, config
        # the sampler's settings; the log-prob pass masks the ids this config bans
        self.sampling = DecodeConfig(strategy="sample", max_len=max_len)
        self.greedy = DecodeConfig(strategy="greedy", max_len=max_len)
        end = [END_WORD] if config.end_in_reward else []
        self.references = [[tuple(tokenize(c) + end) for c in r.captions] for r in records]
        self.cider = CiderD(self.references)  # df from the training references, once

    # -- sampling and rewards -------------------------------------------------------------------
    def _decode(self, config: DecodeConfig, decoder: nn.Module, features: Tensor) -> list:
        v = self.vocab
        hyps = decode(
            decoder, features, config, start_id=v.start_id, end_id=v.end_id, pad_id=v.pad_id
        )
        return [h[0] for h in hyps]

    def words(self, hyp: Hypothesis) -> tuple[str, ...]:
        """A sample as the reward sees it: its words, and ``<end>`` if it produced one."""
        end = (END_WORD,) if self.config.end_in_reward and hyp.finished else ()
        return tuple(self.vocab.itos[t] for t in hyp.tokens) + end

    def rewards(self, hyps: Sequence[Hypothesis], images: Sequence[int]) -> Tensor:
        """CIDEr-D of each hypothesis against the references of its record (``images``); a
        caption repeated for the same image is scored once."""
        memo: dict[tuple[int, tuple[str, ...]], float] = {}
        out = []
        for hyp, image in zip(hyps, images, strict=True):
            key = (image, self.words(hyp))
            if key not in memo:
                memo[key] = self.cider.score(key[1], self.references[image])
            out.append(memo[key])
        return torch.tensor(out, dtype=torch.float32)

    def _captions(self, hyps: Sequence[Hypothesis]) -> tuple[Tensor, Tensor]:
        """Samples as a teacher-forcing batch: ``<start>`` tokens [``<end>``], padded; lengths."""
        v = self.vocab
        rows = [[v.start_id, *h.tokens, *([v.end_id] if h.finished else [])] for h in hyps]
        return pad_captions(rows, v.pad_id)

    @staticmethod
    def _encode_for_sampling(core: CaptionModel, images: Tensor) -> Tensor:
        """The images' features for the sampler, leaving the encoder as it was: a trainable
        encoder in train mode updates its BatchNorm statistics in the log-prob pass, once per
        step as under teacher forcing, not here too."""
        buffers = [b.clone() for b in core.encoder.buffers()]
        try:
            return core.encode(images)
        finally:
            for b, saved in zip(core.encoder.buffers(), buffers, strict=True):
                b.copy_(saved)

    # -- the objective --------------------------------------------------------------------------
    def __call__(self, model: nn.Module, batch: dict[str, Any], *, features: bool) -> StepLoss:
        core = unwrap(model)
        inputs, images = batch["inputs"], batch["index"].tolist()
        B, K, device = len(images), self.config.samples, inputs.device
        with training_mode(core.decoder, self.config.dropout):
            with torch.no_grad():
                feats = (inputs if features else self._encode_for_sampling(core, inputs)).float()
                # the seed comes from the global RNG, so that a resumed run draws the same samples
                seeded = replace(self.sampling, seed=int(torch.randint(0, 2**62, (1,))))
                hyps = self._decode(seeded, core.decoder, feats.repeat_interleave(K, 0))
            owners = [i for i in images for _ in range(K)]
            rewards = self.rewards(hyps, owners).view(B, K)
            logs: dict[str, float] = {}
            if self.config.baseline == "greedy":
                with torch.no_grad(), training_mode(core.decoder, False):
                    best = self._decode(self.greedy, core.decoder, feats)
                greedy_reward = self.rewards(best, images)
                baseline = greedy_reward[:, None].expand(B, K)
                logs["scst_greedy_reward"] = float(greedy_reward.mean())
            else:
                baseline = mean_of_others(rewards)

            captions, lengths = self._captions(hyps)
            captions = captions.to(device)
            image_of_caption = torch.arange(B, device=device).repeat_interleave(K)
            # a frozen encoder's features are those of the sampling pass: no second CNN pass
            frozen = features or core.encoder_frozen
            logits = model(
                feats if frozen else inputs,
                captions,
                lengths,
                image_of_caption,
                features=frozen,
            )
        v = self.vocab
        banned = banned_ids(self.sampling, v.start_id, v.end_id, None, v.pad_id, device)
        seq_logp = sequence_log_probs(logits, captions, banned, v.pad_id)  # [B*K]
        advantage = (rewards - baseline).reshape(-1).to(device)
        loss = -(advantage * seq_logp).mean()
        distinct = sum(len({tuple(h.tokens) for h in hyps[i * K : (i + 1) * K]}) for i in range(B))
        logs.update(
            scst_reward=float(rewards.mean()),
            scst_baseline=float(baseline.mean()),
            scst_distinct=distinct / (B * K),  # distinct samples per image, as a fraction of K
            scst_sample_len=float((lengths - 1).float().mean()),  # tokens, <end> included
        )
        return StepLoss(loss, B * K, logs)


class ScstSwitch:
    """Which objective trains an epoch: ``teacher_forcing`` until ``trainer.scst.start_epoch``,
    :class:`SelfCritical` from it on (never, when it is null), with batches of each image once.
    ``default_max_len`` (``trainer.val_decode.max_len``) bounds the samples unless
    ``trainer.scst.max_len`` does."""

    def __init__(
        self,
        config: SCSTConfig,
        teacher_forcing: Objective,
        vocab: Vocab,
        records: Sequence[CaptionRecord],
        default_max_len: int,
    ):
        self.config, self.teacher_forcing = config, teacher_forcing
        max_len = config.max_len if config.max_len is not None else default_max_len
        self.self_critical = (
            SelfCritical(vocab, records, config, max_len)
            if config.start_epoch is not None
            else None
        )

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) trains self-critically."""
        return self.config.active(epoch) and self.self_critical is not None

    def objective(self, epoch: int) -> Objective:
        return (
            self.self_critical
            if self.active(epoch) and self.self_critical
            else self.teacher_forcing
        )

    def lr_scale(self, epoch: int, batch_in_epoch: int) -> float:
        """The share of the rate the optimizer step of batch ``batch_in_epoch`` (0-based) of
        ``epoch`` takes: ``(b + 1) / trainer.scst.warmup_steps`` for the first SCST epoch's first
        steps, else 1. A function of the counters alone, so a resumed run continues it."""
        warmup = self.config.warmup_steps
        if epoch != self.config.start_epoch or batch_in_epoch >= warmup:
            return 1.0
        return (batch_in_epoch + 1) / warmup

    def loader_options(self, epoch: int) -> dict[str, Any]:
        """How :meth:`captioner.training.loaders.RunLoaders.train` batches ``epoch``."""
        if self.active(epoch):
            return {"per_image": True, "batch_size": self.config.batch_size}
        return {}

    def ahead(self, epoch: int) -> bool:
        """Whether the switch is still to come after ``epoch`` starts: early stopping never ends
        a run before its SCST epochs."""
        return (self.config.start_epoch or 0) > epoch

    def begin_epoch(
        self,
        epoch: int,
        batch_in_epoch: int,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        monitor: Monitor,
    ) -> None:
        """At the first batch of the first SCST epoch (a resumed run restores what this set):
        early stopping counts the new objective's epochs afresh, and ``trainer.scst.lr`` (when
        set) becomes every group's rate, from which the schedule continues."""
        if not self.active(epoch) or epoch != self.config.start_epoch or batch_in_epoch != 0:
            return
        log.info("epoch %d on: self-critical training", epoch + 1)
        monitor.restart()
        lr = self.config.lr
        if lr is None:
            return
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = lr
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr for _ in optimizer.param_groups]


__all__ = [
    "ScstSwitch",
    "SelfCritical",
    "mean_of_others",
    "sequence_log_probs",
    "training_mode",
]
