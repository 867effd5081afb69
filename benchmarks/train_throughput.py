#!/usr/bin/env python
"""Training throughput at the presets users run: the product vs a bare PyTorch loop vs the CNN in
the loop.

For each preset (``data=coco``: batch 128, frozen ResNet-50, Adam, grad clip 5;
``experiment=flickr8k``: batch 64, frozen EfficientNet-Lite2 with flip-averaged features, tied
512/512 LSTM, AdamW, EMA 0.999) on the same image-caption pairs, this measures pairs per second
three ways, in alternating rounds to cancel machine noise:

* product: the product's own training code, ``captioner.training.trainer.Trainer`` built from the
  composed Hydra config, fed by its own loader from its feature cache: ``Trainer.start_epoch``
  then ``Trainer.train_batch`` per batch (what ``Trainer.train_epoch`` does with each batch, minus
  the progress bar);
* bare: a plain PyTorch loop over the same batches (pre-collated from the product's loader) and
  the same in-memory features: two Linear layers to (h0, c0), Embedding, LSTM on the padded
  batch, Linear, cross-entropy, the same optimizer class and settings; nothing else (the limit).
  By default a second bare loop packs the batch for the LSTM as the product does, which tells
  the cost of packing apart from the rest of the product;
* in-loop: the product again, with ``trainer.cache_features=false`` (the frozen CNN runs every
  step), for a few steps.

The target: bare / product <= 1.1 at every preset. Results go to stdout, progress to stderr.

    python benchmarks/train_throughput.py                        # both presets, 600 images
    python benchmarks/train_throughput.py --preset coco --json coco.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import cpu_name
from omegaconf import OmegaConf
from torch import Tensor, nn

from captioner.configs.hydra import compose
from captioner.configs.training import TrainConfig, parse_train_config
from captioner.runtime import autocast, setup_runtime
from captioner.training.trainer import Trainer

log = logging.getLogger("train_throughput")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FLICKR8K = SHARED / "data" / "flickr8k"
LITE2_WEIGHTS = SHARED / "weights" / "efficientnet_lite2.imagenet.timm.pth"

# --preset -> (label, the Hydra overrides that select it)
PRESETS = {
    "coco": ("data=coco", ["data=coco"]),
    "flickr8k": ("experiment=flickr8k", ["experiment=flickr8k"]),
}
LABELS = {  # the paths, in the order of the first round
    "product": "product (feature cache)",
    "bare": "bare PyTorch loop",
    "bare_packed": "bare loop, packed LSTM",
    "in_loop": "product, CNN in the loop",
}
TARGET = 1.1  # bare / product must not exceed this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Training throughput (image-caption pairs/s) of the product's Trainer from the "
            "feature cache vs a bare PyTorch loop over the same batches vs the product with the "
            "CNN in the loop, at the batch sizes and settings of the presets."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=("coco", "flickr8k", "both"),
        default="both",
        help="coco: data=coco; flickr8k: experiment=flickr8k",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--coco-annotations",
        type=Path,
        default=FLICKR8K / "annotations" / "captions_train.json",
        metavar="FILE",
        help="a COCO captions file; its first --num-images captioned images are the train split",
    )
    data.add_argument(
        "--images", type=Path, default=FLICKR8K / "images", metavar="DIR", help="its image folder"
    )
    data.add_argument("--num-images", type=int, default=600, help="images of the train split")
    data.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="data.num_workers (image loading for the cache build and the in-loop path)",
    )
    model = p.add_argument_group("encoder weights (the speed does not depend on them)")
    model.add_argument(
        "--weights-file",
        type=Path,
        metavar="FILE",
        help="coco preset: a torchvision resnet50 state_dict; default: random init "
        "(model.encoder.weights=null: the same architecture and FLOPs)",
    )
    model.add_argument(
        "--timm-weights-file",
        type=Path,
        default=LITE2_WEIGHTS,
        metavar="FILE",
        help="flickr8k preset: the tf_efficientnet_lite2 timm state_dict; random init if missing",
    )
    run = p.add_argument_group("measurement")
    run.add_argument("--rounds", type=int, default=5, help="alternating rounds of all paths")
    run.add_argument("--steps", type=int, default=20, help="timed steps per round: product, bare")
    run.add_argument(
        "--steps-in-loop",
        type=int,
        default=2,
        help="timed steps per round: in-loop (0: leave the in-loop path out)",
    )
    run.add_argument("--warmup", type=int, default=3, help="untimed steps first: product, bare")
    run.add_argument("--warmup-in-loop", type=int, default=1, help="untimed steps first: in-loop")
    run.add_argument(
        "--bare-lstm",
        choices=("padded", "packed", "both"),
        default="both",
        help="the bare loop's LSTM runs on the padded batch, or packs it as the product does; "
        "both: the padded loop is 'bare' (the limit), the packed one a row of its own",
    )
    run.add_argument("--device", default="cpu", help="torch device (device=...)")
    run.add_argument("--threads", type=int, help="torch.set_num_threads (unset: torch's default)")
    run.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override for every preset (repeatable), e.g. trainer.ema_decay=null",
    )
    run.add_argument("--json", type=Path, metavar="FILE", help="also write every number as JSON")
    run.add_argument("-v", "--verbose", action="store_true", help="the product's INFO logs too")
    args = p.parse_args(argv)
    for name in ("num_images", "rounds", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("steps_in_loop", "warmup", "warmup_in_loop", "num_workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if not args.coco_annotations.is_file():
        p.error(f"--coco-annotations: {args.coco_annotations} not found")
    if not args.images.is_dir():
        p.error(f"--images: {args.images} is not a folder")
    return args


# ---------------------------------------------------------------------------------------------
# set-up: a COCO-format subset and the product's config for a preset


def write_subset(args: argparse.Namespace, root: Path, num_val: int = 5) -> dict[str, Any]:
    """``root/captions_{train,val}.json``: the first ``--num-images`` captioned images of the file
    (train) and the next few (val: the Trainer loads one; the benchmark never validates)."""
    data = json.loads(args.coco_annotations.read_text(encoding="utf-8"))
    captioned = {a["image_id"] for a in data["annotations"]}
    images = [img for img in data["images"] if img["id"] in captioned]
    train = images[: args.num_images]
    val = images[args.num_images : args.num_images + num_val] or train[-num_val:]
    if len(train) < args.num_images:
        log.warning("%s has only %d captioned images", args.coco_annotations, len(train))
    for name, subset in (("train", train), ("val", val)):
        ids = {img["id"] for img in subset}
        out = {
            **{k: v for k, v in data.items() if k not in ("images", "annotations")},
            "images": subset,
            "annotations": [a for a in data["annotations"] if a["image_id"] in ids],
        }
        (root / f"captions_{name}.json").write_text(json.dumps(out), encoding="utf-8")
    pairs = sum(1 for a in data["annotations"] if a["image_id"] in {i["id"] for i in train})
    return {"source": str(args.coco_annotations), "images": len(train), "pairs": pairs}


def preset_overrides(args: argparse.Namespace, preset: str, workdir: Path) -> list[str]:
    """The preset, pointed at the subset; everything else stays the preset's."""
    overrides = [
        *PRESETS[preset][1],
        f"data.root={workdir}",
        "data.train_annotations=captions_train.json",
        f"data.train_images={args.images.resolve()}",
        "data.val_annotations=captions_val.json",
        f"data.val_images={args.images.resolve()}",
        "data.test_annotations=null",
        "data.test_images=null",
        f"data.num_workers={args.num_workers}",
        f"trainer.cache_dir={workdir / 'features'}",
        f"device={args.device}",
    ]
    if preset == "coco":
        if args.weights_file is not None:
            overrides.append(f"model.encoder.weights_file={args.weights_file.resolve()}")
        else:
            overrides.append("model.encoder.weights=null")
    elif args.timm_weights_file is not None and args.timm_weights_file.is_file():
        overrides.append(f"model.encoder.weights_file={args.timm_weights_file.resolve()}")
    else:
        log.warning("no %s: tf_efficientnet_lite2 with random weights", args.timm_weights_file)
        overrides.append("model.encoder.weights=null")
    return overrides + list(args.override)


def make_trainer(overrides: list[str], out_dir: Path) -> Trainer:
    config = parse_train_config(compose("train", overrides))
    return Trainer(config, out_dir, setup_runtime(config.device))


# ---------------------------------------------------------------------------------------------
# the three paths: each one ``step()`` -> pairs trained, timed from fetching the batch on


class ProductPath:
    """The product's loop (``Trainer.train_epoch`` without its progress bar): batches from the
    trainer's own loader, ``Trainer.train_batch`` on each (the step and the epoch's counters),
    and a new epoch (``Trainer.start_epoch``) when the loader runs out. The first ``start_epoch`` (the feature
    cache build, when cached) is timed on its own."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        start = time.perf_counter()
        self.module, loader, self.cached = trainer.start_epoch(trainer.progress.epoch)
        self.first_epoch_start_s = time.perf_counter() - start
        self.batches = iter(loader)
        self.fetch_s = 0.0  # of the timed steps: getting batches, epoch starts included
        self.epoch_starts: list[float] = []

    def _next_batch(self) -> dict[str, Any]:
        try:
            return next(self.batches)
        except StopIteration:
            start = time.perf_counter()
            self.trainer.progress.next_epoch()
            self.module, loader, self.cached = self.trainer.start_epoch(self.trainer.progress.epoch)
            self.batches = iter(loader)
            self.epoch_starts.append(time.perf_counter() - start)
            return next(self.batches)

    def step(self) -> int:
        start = time.perf_counter()
        batch = self._next_batch()
        self.fetch_s += time.perf_counter() - start
        self.trainer.train_batch(self.module, batch, self.cached)
        return len(batch["lengths"])


class BareDecoder(nn.Module):
    """Show and Tell in plain PyTorch: features -> (h0, c0), Embedding -> LSTM -> Linear."""

    def __init__(self, config: TrainConfig, feature_dim: int, vocab_size: int, pad_id: int):
        super().__init__()
        d = config.model.decoder
        if d.feature_mode != "init_state":
            raise SystemExit("the bare loop feeds features as the initial state only")
        self.L, self.H = d.num_layers, d.hidden_size
        self.init_h = nn.Linear(feature_dim, self.L * self.H)
        self.init_c = nn.Linear(feature_dim, self.L * self.H)
        self.embed = nn.Embedding(vocab_size, d.embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(
            d.embed_dim,
            self.H,
            num_layers=self.L,
            batch_first=True,
            dropout=d.dropout if self.L > 1 else 0.0,
        )
        self.drop = nn.Dropout(d.dropout)
        self.out = nn.Linear(self.H, vocab_size)
        if d.tie_weights:
            self.out.weight = self.embed.weight

    def forward(self, feats: Tensor, captions: Tensor, lengths: Tensor, packed: bool) -> Tensor:
        """feats [N, F], captions [N, T], lengths [N] (CPU) -> logits [N, T-1, V]."""
        N, feats = feats.shape[0], self.drop(feats)
        h0 = torch.tanh(self.init_h(feats)).view(N, self.L, self.H).transpose(0, 1).contiguous()
        c0 = self.init_c(feats).view(N, self.L, self.H).transpose(0, 1).contiguous()
        x = self.drop(self.embed(captions[:, :-1]))  # [N, T-1, E]
        if packed:
            seq = nn.utils.rnn.pack_padded_sequence(
                x, lengths - 1, batch_first=True, enforce_sorted=False
            )
            out, _ = self.lstm(seq, (h0, c0))
            out, _ = nn.utils.rnn.pad_packed_sequence(
                out, batch_first=True, total_length=x.shape[1]
            )
        else:
            out, _ = self.lstm(x, (h0, c0))  # [N, T-1, H]
        return self.out(self.drop(out))


def optimizer_for(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """The configured optimizer class with the configured arguments (lr, weight decay ...)."""
    optim = OmegaConf.to_container(config.optim, resolve=True)
    assert isinstance(optim, dict)
    module, name = str(optim.pop("_target_")).rsplit(".", 1)
    kwargs = {k: v for k, v in optim.items() if not str(k).startswith("_")}
    return getattr(importlib.import_module(module), name)(params, **kwargs)


class BarePath:
    """A plain training loop over the product's batches: the features of the whole subset as one
    float32 tensor [N, F] (read from the product's cache), the captions of each batch exactly as
    the product's loader pads them (pre-collated an epoch at a time, untimed), and per step:
    gather the batch's features, forward, ``F.cross_entropy(ignore_index=pad)``, backward,
    ``optimizer.step()``, ``zero_grad()``, under the product's autocast dtype (none on a CPU;
    bf16 on a GPU that has it; fp16 with a gradient scaler). No clipping, no EMA, no counters."""

    def __init__(self, trainer: Trainer, packed: bool, seed: int):
        self.trainer, self.packed = trainer, packed
        self.device = trainer.rt.device
        cache = trainer.loaders.cache("train")  # built by the product path already
        self.features = torch.from_numpy(np.asarray(cache.array, dtype=np.float32)).to(self.device)
        self.pad_id = trainer.vocab.pad_id
        self.label_smoothing = trainer.tcfg.label_smoothing
        torch.manual_seed(seed)
        self.model = BareDecoder(
            trainer.config, self.features.shape[1], len(trainer.vocab), self.pad_id
        ).to(self.device)
        self.model.train()
        self.optimizer = optimizer_for(trainer.config, self.model.parameters())
        self.dtype = trainer.autocast_dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.epoch, self.queue = 0, []
        self.precollate_s = 0.0

    def refill(self) -> None:
        """The product's batches of the next epoch: (feature rows, captions, lengths)."""
        start = time.perf_counter()
        loader, cached = self.trainer.loaders.train(self.epoch)
        assert cached
        for b in loader:
            rows = b["index"][b["image_of_caption"]]  # [N] feature row of each caption
            self.queue.append((rows.to(self.device), b["captions"], b["lengths"]))
        self.queue.reverse()
        self.epoch += 1
        self.precollate_s += time.perf_counter() - start

    def refill_if_empty(self) -> None:
        if not self.queue:
            self.refill()

    def step(self) -> int:
        rows, captions, lengths = self.queue.pop()
        captions = captions.to(self.device)
        with autocast(self.device, self.dtype):
            logits = self.model(self.features[rows], captions, lengths, self.packed)
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            captions[:, 1:].reshape(-1),
            ignore_index=self.pad_id,
            label_smoothing=self.label_smoothing,
        )
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        return captions.shape[0]


def run_steps(
    step: Callable[[], int],
    steps: int,
    device: torch.device,
    before: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """``steps`` timed calls of ``step``; ``before`` (untimed) runs ahead of each one."""
    pairs, times = 0, []
    for _ in range(steps):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        pairs += step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = sum(times)
    return {"pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds, "step_s": times}


# ---------------------------------------------------------------------------------------------
# one preset


def describe(config: TrainConfig, trainer: Trainer, weights: str) -> dict[str, Any]:
    e, d, t = config.model.encoder, config.model.decoder, config.trainer
    optim = OmegaConf.to_container(config.optim, resolve=True)
    assert isinstance(optim, dict)
    return {
        "batch_size": config.data.batch_size,
        "encoder": f"{e.source} {e.name}" + (", flip-averaged" if e.flip_average else ""),
        "encoder_weights": weights,
        "feature_dim": trainer.model.encoder.feature_dim,
        "preprocessing": trainer.preprocessing.to_dict(),
        "decoder": f"LSTM {d.embed_dim}/{d.hidden_size}, {d.num_layers} layer(s), "
        f"dropout {d.dropout}, {'tied' if d.tie_weights else 'untied'} output",
        "vocab_size": len(trainer.vocab),
        "max_caption_len": config.data.max_caption_len,
        "optimizer": ", ".join(f"{k}={v}" for k, v in optim.items()).replace("_target_=", ""),
        "grad_clip": t.grad_clip,
        "ema_decay": t.ema_decay,
        "precision": str(trainer.autocast_dtype or "fp32").replace("torch.", ""),
    }


def measure_preset(args: argparse.Namespace, preset: str, workdir: Path) -> dict[str, Any]:
    label = PRESETS[preset][0]
    overrides = preset_overrides(args, preset, workdir)
    log.info("%s: building the product's trainers (%s)", label, " ".join(overrides))
    trainer = make_trainer(overrides, workdir / "run-product")
    weights = next((o.split("=", 1)[1] for o in overrides if "weights_file=" in o), "random init")
    info = describe(trainer.config, trainer, weights)

    log.info("%s: the product's first epoch start (builds the feature cache)", label)
    product = ProductPath(trainer)
    if not product.cached:
        raise SystemExit(f"{label}: the product does not train from the feature cache")
    bare = BarePath(trainer, args.bare_lstm == "packed", trainer.config.seed)

    device = trainer.rt.device
    calls: dict[str, tuple[Callable[[], int], Callable[[], None] | None]] = {
        "product": (product.step, None),
        "bare": (bare.step, bare.refill_if_empty),
    }
    if args.bare_lstm == "both":
        packed = BarePath(trainer, True, trainer.config.seed)
        calls["bare_packed"] = (packed.step, packed.refill_if_empty)
    if args.steps_in_loop:
        log.info("%s: the in-loop trainer (trainer.cache_features=false)", label)
        in_loop_trainer = make_trainer(
            [*overrides, "trainer.cache_features=false"], workdir / "run-in-loop"
        )
        in_loop = ProductPath(in_loop_trainer)
        assert not in_loop.cached
        calls["in_loop"] = (in_loop.step, None)
    paths = list(calls)

    def run(path: str, n: int) -> dict[str, Any]:
        step, before = calls[path]
        return run_steps(step, n, device, before)

    steps = {path: args.steps_in_loop if path == "in_loop" else args.steps for path in paths}
    warmup = {path: args.warmup_in_loop if path == "in_loop" else args.warmup for path in paths}
    for path in paths:
        if warmup[path]:
            log.info("%s: warm-up, %d %s steps", label, warmup[path], path)
            run(path, warmup[path])
    product.fetch_s, product.epoch_starts = 0.0, []

    rounds: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    for r in range(args.rounds):
        # alternate the order, so that a drift in machine load hits every path alike
        for path in paths if r % 2 == 0 else paths[::-1]:
            res = run(path, steps[path])
            rounds[path].append(res)
            log.info(
                "%s round %d/%d %-11s %7.1f pairs/s (%d pairs in %.2f s)",
                label,
                r + 1,
                args.rounds,
                path,
                res["pairs_per_s"],
                res["pairs"],
                res["seconds"],
            )
    median = {path: statistics.median(x["pairs_per_s"] for x in rounds[path]) for path in paths}
    product_s = sum(x["seconds"] for x in rounds["product"])
    result = {
        "preset": label,
        "overrides": overrides,
        **info,
        "train_pairs": len(trainer.loaders.train(0)[0].dataset),
        "cache_build_s": product.first_epoch_start_s,
        "cache_build_images_per_s": len(trainer.train_records) / product.first_epoch_start_s,
        "product_fetch_share": product.fetch_s / product_s,
        "product_epoch_starts_s": product.epoch_starts,
        "bare_lstm": "packed" if args.bare_lstm == "packed" else "padded",
        "rounds": rounds,
        "pairs_per_s": median,
        "bare_over_product": median["bare"] / median["product"],
        "product_over_in_loop": median["product"] / median["in_loop"]
        if "in_loop" in median
        else None,
        "round_bare_over_product": [
            b["pairs_per_s"] / p["pairs_per_s"]
            for b, p in zip(rounds["bare"], rounds["product"], strict=True)
        ],
    }
    if "bare_packed" in median:
        result["bare_packed_over_product"] = median["bare_packed"] / median["product"]
    result["within_target"] = result["bare_over_product"] <= TARGET
    return result


# ---------------------------------------------------------------------------------------------
# report


def fmt(x: float | None, unit: str = "", width: int = 0) -> str:
    """``x`` with one decimal (and ``unit``), right-aligned in ``width``; '-' for None."""
    return f"{x:.1f}{unit}".rjust(width + len(unit)) if x is not None else "-".rjust(width)


def busy(load: float) -> bool:
    return load >= (os.cpu_count() or 1)


def report_preset(res: dict[str, Any]) -> list[str]:
    pre = res["preprocessing"]
    ema = f"EMA {res['ema_decay']}" if res["ema_decay"] is not None else "no EMA"
    clip = f"grad clip {res['grad_clip']}" if res["grad_clip"] else "no clipping"
    lines = [
        f"{res['preset']}: batch {res['batch_size']} pairs, {res['train_pairs']} pairs per epoch",
        f"  encoder   {res['encoder']} (frozen; {res['encoder_weights']}), "
        f"{pre['resize']}/{pre['crop']} px, {res['feature_dim']}-d features",
        f"  decoder   {res['decoder']}; vocabulary {res['vocab_size']}; "
        f"captions <= {res['max_caption_len']} ids",
        f"  training  {res['optimizer']}; {clip}; {ema}; {res['precision']}",
        "",
        f"  {'path':<28}{'pairs/s (median)':>18}{'best round':>12}   every round",
    ]
    for path in res["rounds"]:
        rates = [x["pairs_per_s"] for x in res["rounds"][path]]
        label = LABELS[path] + (f" ({res['bare_lstm']})" if path == "bare" else "")
        lines.append(
            f"  {label:<28}{res['pairs_per_s'][path]:>18.1f}{max(rates):>12.1f}   "
            + " ".join(f"{x:.1f}" for x in rates)
        )
    verdict = "met" if res["within_target"] else "MISSED"
    lines.append(
        f"  {'bare / product':<28}{res['bare_over_product']:>17.2f}x{'':>12}   "
        + " ".join(f"{x:.2f}x" for x in res["round_bare_over_product"])
        + f"   (target <= {TARGET}x: {verdict})"
    )
    if "bare_packed_over_product" in res:
        lines.append(f"  {'bare packed / product':<28}{res['bare_packed_over_product']:>17.2f}x")
    lines += [
        f"  {'product / in-loop':<28}{fmt(res['product_over_in_loop'], 'x', 17)}",
        "",
        f"  feature cache build   {res['cache_build_images_per_s']:.1f} images/s "
        f"({res['cache_build_s']:.1f} s, the first epoch start)",
        f"  product steps         {100 * res['product_fetch_share']:.1f}% of their time fetching "
        f"batches ({len(res['product_epoch_starts_s'])} epoch starts, "
        f"{1000 * statistics.mean(res['product_epoch_starts_s'] or [0.0]):.0f} ms each)",
        f"  wall time             {res['wall_s']:.0f} s for this preset",
    ]
    return lines


def report(res: dict[str, Any]) -> str:
    load = res["load_average_1min"]
    lines = [
        "captioner training throughput: product vs bare PyTorch loop vs CNN in the loop",
        f"  date      {res['date']}",
        f"  machine   {res['machine']}; torch {res['torch']}, {res['torch_threads']} threads, "
        f"device {res['device']}",
        f"            1-min load average {load[0]} at start, {load[1]} at end",
        f"  data      {res['data']['source']}: first {res['data']['images']} images, "
        f"{res['data']['pairs']} image-caption pairs",
        f"  rounds    {res['rounds']} alternating; per round {res['steps']} product and bare "
        f"steps, {res['steps_in_loop']} in-loop steps",
        "",
    ]
    for preset in res["presets"]:
        lines += report_preset(preset) + [""]
    lines += [
        "| preset | batch | vocabulary | product pairs/s | bare pairs/s | bare packed pairs/s "
        "| in-loop pairs/s | bare / product | product / in-loop |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in res["presets"]:
        r = p["pairs_per_s"]
        packed = fmt(r.get("bare_packed"))
        lines.append(
            f"| `{p['preset']}` | {p['batch_size']} | {p['vocab_size']} | {r['product']:.1f} "
            f"| {r['bare']:.1f} | {packed} | {fmt(r.get('in_loop'))} "
            f"| **{p['bare_over_product']:.2f}x** | {fmt(p['product_over_in_loop'], 'x')} |"
        )
    if any(busy(x) for x in load):
        lines += [
            "",
            "WARNING: the machine was busy (load average >= its CPU count): other processes slow",
            "the many small ops of the cached paths most. Rerun on an idle machine (where none",
            "is to be had, --threads 1 gives steadier, if not representative, figures).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("captioner").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    if busy(load_start):
        log.warning(
            "load average %.1f on %d CPUs: other processes will distort the figures",
            load_start,
            os.cpu_count(),
        )
    presets = ["coco", "flickr8k"] if args.preset == "both" else [args.preset]
    results = []
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        root = Path(tmp)
        data = write_subset(args, root)
        log.info("%s: %d images, %d pairs", data["source"], data["images"], data["pairs"])
        for preset in presets:
            workdir = root / preset
            workdir.mkdir()
            for name in ("captions_train.json", "captions_val.json"):
                (workdir / name).symlink_to(root / name)
            start = time.perf_counter()
            results.append(measure_preset(args, preset, workdir))
            results[-1]["wall_s"] = time.perf_counter() - start
            gc.collect()  # the preset's trainers and models
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "load_average_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "data": data,
        "rounds": args.rounds,
        "steps": args.steps,
        "steps_in_loop": args.steps_in_loop,
        "presets": results,
    }
    print(report(res), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
