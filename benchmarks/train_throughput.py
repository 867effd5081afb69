#!/usr/bin/env python
"""Training throughput with a frozen CNN: encoder in the loop vs the feature cache.

For the same image-caption pairs, encoder, decoder, optimizer and batch size, this measures
training throughput (pairs per second) two ways, in alternating rounds to cancel machine noise:

* in-loop: each step decodes and preprocesses its images, runs the frozen encoder (eval,
  no_grad), then the decoder forward/backward and an Adam step;
* cached: the feature cache is built once (its build time is reported on its own), then the
  same training steps read pooled features from it.

It prints the median pairs/s of each path, their ratio, the cache build rate and after how many
epochs building the cache has paid for itself. Results go to stdout, progress to stderr.

    python benchmarks/train_throughput.py                      # embedded demo data
    python benchmarks/train_throughput.py \\
        --coco-annotations ../shared/data/flickr8k/annotations/captions_train.json \\
        --images ../shared/data/flickr8k/images                # any COCO captions file
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from captioner.data import (
    CaptionRecord,
    CaptionTrainDataset,
    ImageDataset,
    build_transform,
    collate_captions,
    load_coco_captions,
)
from captioner.features import build_feature_cache
from captioner.model import (
    CaptionModel,
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    build_model,
    caption_loss,
)
from captioner.vocab import Vocab

log = logging.getLogger("train_throughput")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Training throughput (image-caption pairs/s) of a frozen-CNN captioner with the CNN "
            "in the loop vs from the feature cache, on the same data, encoder and decoder."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data (default: the embedded demo dataset)")
    data.add_argument(
        "--coco-annotations",
        type=Path,
        metavar="FILE",
        help="a COCO captions file (captions_*.json); needs --images",
    )
    data.add_argument(
        "--images", type=Path, metavar="DIR", help="the image folder of --coco-annotations"
    )
    data.add_argument(
        "--demo-root",
        type=Path,
        metavar="DIR",
        help="demo dataset folder (generated if missing, e.g. data/demo); "
        "default: only the subset needed, in a temporary folder",
    )
    data.add_argument(
        "--num-images",
        type=int,
        default=256,
        help="use the first N images of the file, with all their captions",
    )
    data.add_argument(
        "--min-freq",
        type=int,
        default=5,
        help="vocabulary: words occurring >= N times in ALL captions of the file",
    )
    data.add_argument("--max-caption-len", type=int, default=20, help="ids incl. <start>/<end>")

    model = p.add_argument_group("model")
    model.add_argument("--encoder", default="resnet50", help="encoder architecture (frozen)")
    model.add_argument("--source", default="torchvision", choices=("torchvision", "timm"))
    model.add_argument(
        "--weights-file",
        type=Path,
        metavar="FILE",
        help="encoder state_dict; default: random init (same architecture and "
        "FLOPs, so the same speed)",
    )
    model.add_argument("--embed-dim", type=int, default=512)
    model.add_argument("--hidden-size", type=int, default=512)

    run = p.add_argument_group("measurement")
    run.add_argument("--batch-size", type=int, default=32, help="image-caption pairs per step")
    run.add_argument("--rounds", type=int, default=5, help="alternating in-loop/cached rounds")
    run.add_argument("--steps-in-loop", type=int, default=3, help="timed steps per in-loop round")
    run.add_argument("--steps-cached", type=int, default=30, help="timed steps per cached round")
    run.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed in-loop steps before the first round (cached: 5x this)",
    )
    run.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    run.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    run.add_argument("--grad-clip", type=float, default=5.0, help="max grad norm (0: off)")
    run.add_argument("--device", default="cpu", help="torch device")
    run.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if (args.coco_annotations is None) != (args.images is None):
        p.error("--coco-annotations and --images go together")
    if args.coco_annotations is not None and args.demo_root is not None:
        p.error("--demo-root is for the demo dataset; not with --coco-annotations")
    for name in ("num_images", "batch_size", "rounds", "steps_in_loop", "steps_cached", "min_freq"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.num_workers < 0:
        p.error("--warmup and --num-workers must be >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# set-up


def load_data(
    args: argparse.Namespace, workdir: Path
) -> tuple[list[CaptionRecord], list[CaptionRecord], str]:
    """(all records of the file, the first --num-images of them, a description of the source)."""
    if args.coco_annotations is not None:
        records = load_coco_captions(args.coco_annotations, args.images, check_images=False)
        source = f"{args.coco_annotations} (images {args.images})"
    else:
        from captioner.synthetic import ensure_demo_dataset

        if args.demo_root is not None:  # the product's default demo dataset (conf/data/demo.yaml)
            root = ensure_demo_dataset(args.demo_root)
        else:
            root = ensure_demo_dataset(workdir / "demo", splits={"train": args.num_images})
        records = load_coco_captions(
            root / "annotations" / "captions_train.json", root / "images" / "train"
        )
        source = "embedded demo dataset (64x64 PNG shapes)"
    subset = records[: args.num_images]
    missing = [r.path for r in subset if not r.path.is_file()]
    if missing:
        raise SystemExit(f"error: image {missing[0]} is missing ({len(missing)} of the subset)")
    if len(subset) < args.num_images:
        log.warning("the file has only %d captioned images", len(subset))
    return records, subset, source


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_model(args: argparse.Namespace, vocab_size: int) -> tuple[CaptionModel, Any]:
    encoder = EncoderConfig(
        source=args.source,
        name=args.encoder,
        weights="DEFAULT" if args.weights_file else None,
        weights_file=str(args.weights_file) if args.weights_file else None,
        freeze=True,
    )
    decoder = DecoderConfig(embed_dim=args.embed_dim, hidden_size=args.hidden_size)
    model, pre = build_model(ModelConfig(encoder=encoder, decoder=decoder), vocab_size)
    return model.to(args.device), pre


def endless(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """Batches of ``loader``, epoch after epoch (reshuffled each time)."""
    while True:
        yield from loader


# ---------------------------------------------------------------------------------------------
# measurement


class Stepper:
    """One training step exactly as the trainer does it (frozen encoder stays in eval)."""

    def __init__(self, model: CaptionModel, args: argparse.Namespace, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = torch.device(args.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=args.lr)
        self.clip = args.grad_clip

    def step(self, batch: dict[str, Any], cached: bool) -> int:
        if not len(batch["lengths"]):
            return 0
        captions = batch["captions"].to(self.device)
        logits = self.model(
            batch["inputs"].to(self.device),
            captions,
            batch["lengths"],
            batch["image_of_caption"].to(self.device),
            features=cached,
        )
        loss = caption_loss(logits, captions, self.pad_id)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return len(batch["lengths"])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, batches: Iterator[dict[str, Any]], steps: int, cached: bool) -> dict[str, Any]:
        """``steps`` timed steps; each step's time includes loading its batch."""
        self.model.train()
        assert not self.model.encoder.training, "a frozen encoder must stay in eval mode"
        pairs, times = 0, []
        for _ in range(steps):
            self._sync()
            start = time.perf_counter()
            pairs += self.step(next(batches), cached)
            self._sync()
            times.append(time.perf_counter() - start)
        seconds = sum(times)
        return {
            "pairs": pairs,
            "seconds": seconds,
            "pairs_per_s": pairs / seconds,
            "step_seconds": times,
        }


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    load_before = os.getloadavg()[0]
    if load_before >= (os.cpu_count() or 1):
        log.warning(
            "load average %.1f on %d CPUs: other processes will distort the figures",
            load_before,
            os.cpu_count(),
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    all_records, records, source = load_data(args, workdir)
    vocab = Vocab.build((c for r in all_records for c in r.captions), min_freq=args.min_freq)
    model, pre = make_model(args, len(vocab))
    assert model.encoder_frozen
    paths = [r.path for r in records]
    log.info(
        "%s: %d images, %d pairs; vocabulary %d words; preprocessing %s",
        source,
        len(records),
        sum(len(r.captions) for r in records),
        len(vocab),
        pre,
    )

    # the one-off cache build, into a fresh folder so it is really computed
    start = time.perf_counter()
    cache = build_feature_cache(
        model.encoder,
        pre,
        paths,
        workdir / "features",
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        desc="benchmark images",
    )
    build_s = time.perf_counter() - start

    def loader(images: Any, cached: bool) -> Iterator[dict[str, Any]]:
        # captions_per_image=None: one item per (image, caption) pair, the classic epoch
        dataset = CaptionTrainDataset(
            records, vocab, args.max_caption_len, images, captions_per_image=None
        )
        workers = 0 if cached else args.num_workers  # as the trainer: no workers on the cache
        return endless(
            DataLoader(
                dataset,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=workers,
                collate_fn=partial(collate_captions, pad_id=vocab.pad_id),
                drop_last=True,
                persistent_workers=workers > 0,
                generator=torch.Generator().manual_seed(args.seed),
            )
        )

    num_pairs = sum(len(r.captions) for r in records)
    if num_pairs < args.batch_size:
        raise SystemExit(f"error: {num_pairs} pairs are fewer than one batch of {args.batch_size}")
    transform = build_transform(pre, train=True, augment=False)  # as the trainer, no augmentation
    in_loop_batches = loader(ImageDataset(paths, transform), False)
    cached_batches = loader(cache, True)

    stepper = Stepper(model, args, vocab.pad_id)
    log.info("warm-up: %d in-loop and %d cached steps", args.warmup, 5 * args.warmup)
    stepper.run(in_loop_batches, args.warmup, cached=False)
    stepper.run(cached_batches, 5 * args.warmup, cached=True)
    rounds: dict[str, list[dict[str, Any]]] = {"in_loop": [], "cached": []}
    for r in range(args.rounds):
        # alternate which path goes first, so a drift in machine load hits both alike
        order = ("in_loop", "cached") if r % 2 == 0 else ("cached", "in_loop")
        for path in order:
            if path == "in_loop":
                res = stepper.run(in_loop_batches, args.steps_in_loop, cached=False)
            else:
                res = stepper.run(cached_batches, args.steps_cached, cached=True)
            rounds[path].append(res)
            log.info(
                "round %d/%d %-7s: %.1f pairs/s (%d pairs in %.2f s)",
                r + 1,
                args.rounds,
                path,
                res["pairs_per_s"],
                res["pairs"],
                res["seconds"],
            )

    in_loop = statistics.median(x["pairs_per_s"] for x in rounds["in_loop"])
    cached = statistics.median(x["pairs_per_s"] for x in rounds["cached"])
    epoch_saving_s = num_pairs / in_loop - num_pairs / cached  # per epoch over these pairs
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "source": source,
        "encoder": f"{args.source} {args.encoder}",
        "encoder_weights": str(args.weights_file) if args.weights_file else "random init",
        "feature_dim": model.encoder.feature_dim,
        "preprocessing": pre.to_dict(),
        "vocab_size": len(vocab),
        "decoder": f"LSTM embed {args.embed_dim} hidden {args.hidden_size}",
        "images": len(records),
        "pairs": num_pairs,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "rounds": rounds,
        "in_loop_pairs_per_s": in_loop,
        "cached_pairs_per_s": cached,
        "ratio": cached / in_loop,
        "round_ratios": [  # cached / in-loop within each round
            c["pairs_per_s"] / i["pairs_per_s"]
            for i, c in zip(rounds["in_loop"], rounds["cached"], strict=True)
        ],
        "cache_build_s": build_s,
        "cache_build_images_per_s": len(records) / build_s,
        "break_even_epochs": build_s / epoch_saving_s if epoch_saving_s > 0 else float("inf"),
    }


def report(res: dict[str, Any]) -> str:
    pre = res["preprocessing"]
    per_round = {
        k: " ".join(f"{x['pairs_per_s']:.1f}" for x in v) for k, v in res["rounds"].items()
    }
    best = {k: max(x["pairs_per_s"] for x in v) for k, v in res["rounds"].items()}
    lines = [
        "captioner training throughput: frozen CNN in the loop vs feature cache",
        f"  date      {res['date']}",
        f"  machine   {res['machine']}; torch {res['torch']}, {res['torch_threads']} threads, "
        f"device {res['device']}",
        "            1-min load average {} at start, {} at end".format(*res["load_average_1min"]),
        f"  data      {res['source']}",
        f"            first {res['images']} images, {res['pairs']} image-caption pairs, "
        f"vocabulary {res['vocab_size']} words",
        f"  encoder   {res['encoder']} ({res['encoder_weights']}; frozen, eval), "
        f"{pre['resize']}/{pre['crop']} px, {res['feature_dim']}-d features",
        f"  decoder   {res['decoder']}; Adam; batch {res['batch_size']} pairs; "
        f"{res['num_workers']} loader workers",
    ]
    if res["encoder_weights"] == "random init":
        lines.append(
            "            (random weights: the architecture and FLOPs of the pretrained "
            "model, so the same speed)"
        )
    lines += [
        "",
        f"  {'path':<28}{'pairs/s (median)':>18}{'best round':>12}   every round",
        f"  {'in-loop (CNN every step)':<28}{res['in_loop_pairs_per_s']:>18.1f}"
        f"{best['in_loop']:>12.1f}   " + per_round["in_loop"],
        f"  {'cached features':<28}{res['cached_pairs_per_s']:>18.1f}"
        f"{best['cached']:>12.1f}   " + per_round["cached"],
        f"  {'ratio cached / in-loop':<28}{res['ratio']:>17.1f}x"
        f"{best['cached'] / best['in_loop']:>11.1f}x   "
        + " ".join(f"{x:.1f}x" for x in res["round_ratios"]),
        "",
        f"  cache build (one-off)       {res['cache_build_images_per_s']:.1f} images/s "
        f"({res['images']} images in {res['cache_build_s']:.1f} s)",
        f"  break-even                  {res['break_even_epochs']:.2f} epochs "
        "(cache build time / time saved per epoch)",
    ]
    if max(res["load_average_1min"]) >= os.cpu_count():
        lines += [
            "",
            "  WARNING: the machine was busy (load average >= its CPU count); other processes",
            "  slow the many small ops of the cached path most, so the ratio is understated.",
            "  Rerun on an idle machine.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        res = measure(args, Path(tmp))
    print(report(res), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
