"""COCO scale on one machine: every stage of the data pipeline timed at N train images.

Makes a COCO-shaped dataset (``--root``, outside the checkout): N train images (+ ``--val``
val images) with five captions each, drawn from a real captions file (``--captions``) with rare
words added so the vocabulary grows as COCO's does, and tiny PNG images. Then it times each stage
at every N in its own process (so peak RSS is the stage's), and prints a table of seconds,
seconds per image and its ratio to the first N, and peak RSS; the loader workers' unique memory
(USS: the ``Private_*`` lines of ``/proc/PID/smaps_rollup``, pages that are the worker's alone)
after ``--worker-batches`` batches of the image path.

    nice -n 10 python benchmarks/scale.py --sizes 6000 30000 118287 --json scale.json
    python benchmarks/scale.py --help

Progress goes to stderr, the table to stdout. See benchmarks/README.md ("scale.py").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scale_data import log, make_dataset

HERE = Path(__file__).resolve().parent
DEFAULT_CAPTIONS = HERE.parent.parent / "shared/data/flickr8k/annotations/captions_train.json"
DEFAULT_PHOTOS = HERE.parent.parent / "shared/data/flickr8k"  # the report stages' photos
STAGES = (
    *("annotations", "vocab", "encode", "cider_df", "cache", "startup", "workers", "batches"),
    *("validate", "epoch", "evaluate", "scst", "report", "report_maps"),
)
# stages of benchmarks/scale_eval.py, and those whose cost does not depend on N (run at the
# first N only)
EVAL_STAGES = ("evaluate", "scst", "report", "report_maps")
N_FREE = ("report", "report_maps")


# ---------------------------------------------------------------------------------------------
# the stages, each in its own process: -> a dict of figures


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, float]:
    """``fn()`` and its time: the least of ``repeat`` runs (the machine is shared)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def timed_cpu(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall time and this process's CPU time over it: on a shared machine the
    wall time of a long stage includes the time the process waited for a core."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def uss_mb(pid: int) -> float:
    """The unique set size of ``pid``: its private pages, clean or dirty (not shared ones)."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    kb = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Private_"))
    return kb / 1024


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``: unlike ``ru_maxrss``, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def split_paths(root: Path, n: int) -> tuple[Path, Path, Path]:
    return root / f"captions_train_{n}.json", root / "captions_val.json", root / "images"


def load(root: Path, n: int) -> Any:
    from captioner.datasets.annotations import load_coco_captions

    ann, _, images = split_paths(root, n)
    return load_coco_captions(ann, images)


def vocab_of(records: Any, min_freq: int = 5, max_vocab: int | None = None) -> Any:
    from captioner.vocab import Vocab

    return Vocab.build((c for r in records for c in r.captions), min_freq, max_size=max_vocab)


def held_vocab(args: argparse.Namespace) -> tuple[dict[int, int], int]:
    """``--hold-vocab``: per N, the largest ``data.min_freq`` that keeps at least as many words
    as the first N's at ``--min-freq``, and that word count as ``data.max_vocab`` at every N (the
    most frequent kept): the same vocabulary size, so the same output layer, at every N. (Sizes
    merely close are not enough: the output layer's step at 2,719 words takes 1.3x its time at
    2,720, the matrix kernels' tail when a size is not a multiple of 8.)"""
    from collections import Counter

    from captioner.vocab import SPECIALS, tokenize

    out: dict[int, int] = {}
    target = None
    for n in args.sizes:
        counts = Counter(t for r in load(args.root, n) for c in r.captions for t in tokenize(c))
        for special in SPECIALS:
            counts.pop(special, None)
        freqs = np.sort(np.fromiter(counts.values(), dtype=np.int64))

        def words(m: int, freqs: np.ndarray = freqs) -> int:  # words occurring >= m times
            return len(freqs) - int(np.searchsorted(freqs, m))

        if target is None:
            target = words(args.min_freq)
        out[n] = max(m for m in range(1, int(freqs[-1]) + 1) if words(m) >= target)
        log(f"N={n}: min_freq {out[n]}, {words(out[n])} words, the {target} most frequent kept")
    assert target is not None
    return out, target


def stage_annotations(args: argparse.Namespace) -> dict[str, Any]:
    records, sec = timed(lambda: load(args.root, args.n), args.repeat)
    return {"s": sec, "captions": sum(len(r.captions) for r in records)}


def stage_vocab(args: argparse.Namespace) -> dict[str, Any]:
    records = load(args.root, args.n)
    vocab, sec = timed(lambda: vocab_of(records, args.min_freq, args.max_vocab), args.repeat)
    return {"s": sec, "vocab": len(vocab)}


def stage_encode(args: argparse.Namespace) -> dict[str, Any]:
    from captioner.datasets.captions import CaptionTrainDataset

    records = load(args.root, args.n)
    vocab = vocab_of(records, args.min_freq, args.max_vocab)
    dataset, sec = timed(lambda: CaptionTrainDataset(records, vocab, 20, None), args.repeat)
    return {"s": sec, "items": len(dataset)}


def stage_cider_df(args: argparse.Namespace) -> dict[str, Any]:
    from captioner.evaluation.cider import CiderD
    from captioner.vocab import tokenize

    records = load(args.root, args.n)

    def build() -> Any:
        refs = [[(*tokenize(c), "<end>") for c in r.captions] for r in records]
        return CiderD(refs)

    _, sec = timed(build, args.repeat)
    return {"s": sec}


def fake_cache(paths: list[Path], root: Path, fingerprint: str, pre: Any, dim: int) -> None:
    """A complete feature cache entry for ``paths`` (zeros), as ``build_feature_cache`` writes
    one: the CNN pass it saves is linear by construction and not what is measured here."""
    from captioner.features import CACHE_VERSION, cache_key

    key = cache_key(fingerprint, pre, paths)
    directory = root / key[:20]
    directory.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(
        directory / "features.npy", mode="w+", dtype=np.float16, shape=(len(paths), dim)
    ).flush()
    np.save(directory / "valid.npy", np.ones(len(paths), dtype=bool))
    meta = {"key": key, "version": CACHE_VERSION, "encoder_fingerprint": fingerprint}
    (directory / "meta.json").write_text(json.dumps({**meta, "preprocessing": pre.to_dict()}))


def stage_cache(args: argparse.Namespace) -> dict[str, Any]:
    """The cache's bookkeeping on a hit: the key over N paths, the entry opened."""
    from captioner.configs.preprocessing import Preprocessing
    from captioner.features import build_feature_cache

    paths = [r.path for r in load(args.root, args.n)]
    pre = Preprocessing(resize=32, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    folder = args.root / f"features_{args.n}"
    fake_cache(paths, folder, "bench", pre, 512)
    cache, sec = timed(
        lambda: build_feature_cache(None, pre, paths, folder, fingerprint="bench"), args.repeat
    )  # type: ignore[arg-type]
    _, read = timed(lambda: [cache[i] for i in range(0, len(cache), max(1, len(cache) // 1000))])
    return {"s": sec, "read_1000_s": read}


def overrides(args: argparse.Namespace, **extra: Any) -> list[str]:
    ann, val, images = split_paths(args.root, args.n)
    base = {
        "data.root": args.root,
        "data.train_annotations": ann.name,
        "data.train_images": images,
        "data.val_annotations": val.name,
        "data.val_images": images,
        "data.test_annotations": "null",
        "data.test_images": "null",
        "data.captions_per_image": "null",
        "data.min_freq": args.min_freq,
        "data.max_vocab": "null" if args.max_vocab is None else args.max_vocab,
        "data.max_caption_len": 20,
        "data.batch_size": 128,
        "data.num_workers": 0,
        "model.encoder.freeze": "true",
        "model.encoder.resize": 32,
        "model.encoder.crop": 32,
        "model.decoder.embed_dim": 16,
        "model.decoder.hidden_size": 32,
        "trainer.max_epochs": 1,
        "trainer.cache_dir": args.root / f"features_{args.n}",
        "device": "cpu",
    }
    base.update(extra)
    return ["data=coco", "model=demo", *(f"{k}={v}" for k, v in base.items())]


def make_trainer(args: argparse.Namespace, **extra: Any) -> Any:
    from captioner.configs.hydra import compose
    from captioner.configs.training import parse_train_config
    from captioner.runtime import setup_runtime
    from captioner.training.trainer import Trainer

    config = parse_train_config(compose("train", overrides(args, **extra)))
    return Trainer(config, args.root / f"run_{args.n}", setup_runtime("cpu"))


def prefill(trainer: Any) -> None:
    """Complete (zero) feature caches for both splits of ``trainer``'s run."""
    from captioner.features import encoder_fingerprint

    loaders = trainer.loaders
    fingerprint = encoder_fingerprint(trainer.model.encoder)
    dim = trainer.model.encoder.feature_dim
    for split in ("train", "val"):
        paths = [r.path for r in loaders.records[split]]
        fake_cache(
            paths, loaders.trainer.feature_cache_dir, fingerprint, trainer.preprocessing, dim
        )


def stage_startup(args: argparse.Namespace) -> dict[str, Any]:
    """Construction of the Trainer, then its first epoch's loader and first step (the feature
    cache pre-filled between the two, untimed)."""
    trainer, init = timed(lambda: make_trainer(args))
    prefill(trainer)

    def first_step() -> None:
        module, loader, cached = trainer.start_epoch(0)
        assert cached, "the benchmark's run reads the feature cache"
        trainer.train_batch(module, next(iter(loader)), cached)

    _, first = timed(first_step)
    return {"s": init + first, "init_s": init, "first_step_s": first, "vocab": len(trainer.vocab)}


def stage_epoch(args: argparse.Namespace) -> dict[str, Any]:
    from captioner.runtime import StopSignal

    trainer = make_trainer(args)
    prefill(trainer)
    _, sec, cpu = timed_cpu(lambda: trainer.train_epoch(0, StopSignal()))
    out = {"s": sec, "cpu_s": cpu, "batches": trainer.progress.batch_in_epoch}
    return {**out, "vocab": len(trainer.vocab)}


def stage_batches(args: argparse.Namespace) -> dict[str, Any]:
    """The epoch's batches from the cache, without the steps: the data pipeline's share of an
    epoch (a step's cost grows with the vocabulary, a property of the model, not of the data)."""
    trainer = make_trainer(args)
    prefill(trainer)
    loader, cached = trainer.loaders.train(0)
    assert cached

    def fetch() -> int:
        return sum(1 for _ in loader)

    count, sec = timed(fetch)
    return {"s": sec, "batches": count}


def stage_validate(args: argparse.Namespace) -> dict[str, Any]:
    """``Trainer.validate``: val loss and BLEU over the val images with beam 3, from the cache
    (the untrained tiny model: its captions run to ``max_len``, the costliest case)."""
    trainer = make_trainer(args, **{"trainer.val_decode.strategy": "beam"})
    prefill(trainer)
    _, sec, cpu = timed_cpu(lambda: trainer.validate(0))
    return {"s": sec, "cpu_s": cpu, "images": len(trainer.val_records), "vocab": len(trainer.vocab)}


def stage_workers(args: argparse.Namespace) -> dict[str, Any]:
    """The image path's train loader with ``--workers`` workers: USS after K batches."""
    trainer = make_trainer(args, **{"trainer.cache_features": "false"})
    trainer.loaders.data.num_workers = args.workers
    loader, cached = trainer.loaders.train(0)
    assert not cached
    batches, count = iter(loader), min(args.worker_batches, len(loader))
    main_before = uss_mb(os.getpid())

    def fetch() -> None:
        for _ in range(count):
            next(batches)

    _, sec = timed(fetch)
    workers = [uss_mb(w.pid) for w in getattr(batches, "_workers", [])]
    out = {"s": sec, "main_uss_mb": uss_mb(os.getpid()), "main_uss_before_mb": main_before}
    out.update(worker_uss_mb=workers, batches=count, epoch_fraction=count / len(loader))
    return out


def run_stage(args: argparse.Namespace) -> None:
    if args.stage in EVAL_STAGES:
        import scale_eval  # it imports this file's helpers: only in a stage's own process

        out = getattr(scale_eval, f"stage_{args.stage}")(args)
    else:
        out = globals()[f"stage_{args.stage}"](args)
    out["peak_rss_mb"] = peak_rss_mb()
    out["min_freq"] = args.min_freq
    out["max_vocab"] = args.max_vocab
    out["load_1min"] = os.getloadavg()[0]  # the machine is shared: how busy it was
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------
# the parent: the dataset, one process per (stage, N), the table


def measure(
    args: argparse.Namespace,
    stage: str,
    n: int,
    workers: int = 0,
    min_freq: int = 5,
    max_vocab: int | None = None,
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--root", str(args.root), "--stage", stage, "--n", str(n)]
    cmd += ["--min-freq", str(min_freq)] + (
        [] if max_vocab is None else ["--max-vocab", str(max_vocab)]
    )
    cmd += ["--workers", str(workers), "--worker-batches", str(args.worker_batches)]
    cmd += ["--repeat", str(args.repeat), "--photos", str(args.photos), "--val", str(args.val)]
    log(f"{stage} at N={n}" + (f", {workers} workers" if stage == "workers" else ""))
    # one torch thread: on a shared 2-core machine, two spinning OpenMP threads made the tiny
    # model's steps ten times slower, and that, not the data, is what the epoch timed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if done.returncode:
        raise SystemExit(f"{stage} at N={n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, Any], sizes: list[int]) -> str:
    first = sizes[0]
    head = "| stage | " + " | ".join(f"N={n}: s, per image (vs N={first}), peak RSS" for n in sizes)
    head += " |"
    lines = [head, "|---|" + "---:|" * len(sizes)]
    for stage, per_n in results.items():
        if stage.startswith("workers"):
            continue
        base = per_n.get(str(first))
        cells = []
        for n in sizes:
            r = per_n.get(str(n))
            if r is None:
                cells.append("not run")
                continue
            # per image of the stage's own images (validation: the val images, the same at any N)
            each, base_each = r["s"] / r.get("images", n), None
            if base and base["s"] > 0:
                base_each = base["s"] / base.get("images", first)
            ratio = each / base_each if base_each else float("nan")
            per = f"{1e6 * each:.0f} us/img ({ratio:.2f}x)"
            words = f", {r['vocab']} words" if "vocab" in r else ""
            cells.append(f"{r['s']:.2f} s, {per}, {r['peak_rss_mb']:.0f} MB{words}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "| loader workers | " + " | ".join(f"N={n}: USS MB" for n in sizes) + " |"]
    lines.append("|---|" + "---:|" * len(sizes))
    for key in sorted(k for k in results if k.startswith("workers")):
        cells = []
        for n in sizes:
            r = results[key].get(str(n))
            if r is None:
                cells.append("not run")
                continue
            ws = ", ".join(f"{u:.0f}" for u in r["worker_uss_mb"]) or "-"
            share = f"{100 * r['epoch_fraction']:.0f}% of an epoch"
            cells.append(f"main {r['main_uss_mb']:.0f}; workers {ws} ({share})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("/tmp/scale"), help="the dataset's folder")
    p.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS, help="COCO captions file")
    p.add_argument("--sizes", type=int, nargs="+", default=[6000, 30000, 118287])
    p.add_argument("--val", type=int, default=5000, help="val images")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 2, 4], dest="worker_counts")
    p.add_argument(
        "--worker-batches", type=int, default=10**6, help="batches before USS is read (<= epoch)"
    )
    p.add_argument("--epoch-max-n", type=int, default=30000, help="epoch stage only up to this N")
    p.add_argument("--rare-fraction", type=float, default=0.2, help="captions given a rare word")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="runs of a cheap stage (least kept)")
    p.add_argument("--min-freq", type=int, default=5, help="data.min_freq (at the first N)")
    p.add_argument(
        "--hold-vocab",
        action="store_true",
        help="at every N, the first N's vocabulary size exactly (data.min_freq and "
        "data.max_vocab): the output layer held the same (use another --json: figures are "
        "keyed by N)",
    )
    p.add_argument("--max-vocab", type=int, help=argparse.SUPPRESS)  # a child: data.max_vocab
    p.add_argument("--timeout", type=float, default=1800, help="seconds per stage process")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="report: real photos")
    p.add_argument("--json", type=Path, help="every figure, written as measured; resumed from")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a child process
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.root = args.root.resolve()
    if args.stage:
        run_stage(args)
        return 0
    args.sizes = sorted(args.sizes)
    make_dataset(args)
    saved = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    results: dict[str, Any] = saved.get("results", {})  # what an earlier run measured: kept
    min_freqs, max_vocab = dict.fromkeys(args.sizes, args.min_freq), None
    if args.hold_vocab:
        min_freqs, max_vocab = held_vocab(args)
    for stage in args.stages:
        for n in args.sizes:
            if stage == "epoch" and n > args.epoch_max_n or stage in N_FREE and n != args.sizes[0]:
                continue
            for w in args.worker_counts if stage == "workers" else [0]:
                key = f"workers={w}" if stage == "workers" else stage
                kept = results.get(key, {}).get(str(n))
                wanted = (min_freqs[n], max_vocab)  # a figure measured otherwise is redone
                if kept is not None and (kept.get("min_freq", 5), kept.get("max_vocab")) == wanted:
                    continue
                results.setdefault(key, {})[str(n)] = measure(
                    args, stage, n, w, min_freqs[n], max_vocab
                )
                log(f"  {results[key][str(n)]}")
                if args.json:  # after every figure: an interrupted run keeps what it measured
                    args.json.write_text(json.dumps({"results": results}, indent=1))
    print(table(results, args.sizes))
    if any(stage in results for stage in EVAL_STAGES):
        from scale_eval import table as eval_table

        print("\n" + "\n".join(eval_table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
