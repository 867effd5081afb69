"""Decoding the photos users have: the loader's images/s per core on large JPEGs, decoded in full
vs at a reduced DCT scale (``Preprocessing.fast_decode``), and how much that moves the features.

    python benchmarks/decode.py --weights-file ../shared/weights/efficientnet_lite2.imagenet.timm.pth

COCO's photos are about 640 x 480 and phone photos several times that, while the encoders read
224-260 px. The benchmark makes such photos from real ones (``--source``: the shared Flickr8k
photos, 224 px, upscaled with a bicubic filter and saved as JPEG quality 90: the upscale blurs
them, the JPEG coding and the decoder's work are a real photo's), then, for each preprocessing
(``--presets`` RESIZE:CROP) and photo size, on one thread:

- **speed**: ``load_image`` + the eval transform (the loader's work per image in training, the
  feature cache, evaluation, ``caption`` and ``serve``), full decode and draft alternating image
  by image so the machine's load falls on both alike; the process's CPU time, so images/s per
  core. The decode alone is timed too.
- **agreement**: the pooled features of a pretrained encoder (``--encoder``, timm, its weights
  from ``--weights-file``) for every photo, both ways: their cosine similarity, and the inputs'
  mean absolute difference in 8-bit levels.

It prints a Markdown table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from common import cpu_name

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared" / "data" / "flickr8k" / "images"


def make_photos(source: Path, out: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """The first ``n`` JPEGs of ``source`` (sorted by name) upscaled to ``size``, quality 90."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if len(names) < n:
        raise SystemExit(f"{source}: {len(names)} JPEGs, --n asks for {n}")
    paths = []
    for name in names[:n]:
        dst = out / name
        if not dst.is_file():
            with Image.open(source / name) as img:
                big = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            big.save(dst, format="JPEG", quality=90)
        paths.append(dst)
    return paths


def time_loading(paths: list[Path], pre_full, pre_draft, rounds: int) -> dict[str, float]:
    """CPU seconds per image of decode and decode + transform, both ways, alternating."""
    from captioner.datasets.images import EvalTransform, load_image

    ways = {"full": pre_full, "draft": pre_draft}
    transforms = {k: EvalTransform(p) for k, p in ways.items()}
    cpu = {f"{k}_{part}": [] for k in ways for part in ("decode", "load")}
    for _ in range(rounds):
        for path in paths:
            for k, pre in ways.items():
                t0 = time.process_time()
                img = load_image(path, pre.draft_to)
                t1 = time.process_time()
                transforms[k](img)
                t2 = time.process_time()
                cpu[f"{k}_decode"].append(t1 - t0)
                cpu[f"{k}_load"].append(t2 - t0)
    return {k: statistics.fmean(v) for k, v in cpu.items()}


def agreement(paths: list[Path], encoder, pre_full, pre_draft, batch: int) -> dict[str, float]:
    """Cosine similarity of the pooled features, full decode vs draft, per photo; and the
    inputs' mean absolute difference in 8-bit levels."""
    import torch

    from captioner.datasets.images import EvalTransform, load_image

    full_tf, draft_tf = EvalTransform(pre_full), EvalTransform(pre_draft)
    std = torch.tensor(pre_full.std).view(1, 3, 1, 1)
    cosines, levels = [], []
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            a = torch.stack([full_tf(load_image(p)) for p in chunk])
            b = torch.stack([draft_tf(load_image(p, pre_draft.draft_to)) for p in chunk])
            levels += ((a - b).abs() * std * 255).mean(dim=(1, 2, 3)).tolist()
            fa, fb = encoder(a), encoder(b)
            cosines += torch.nn.functional.cosine_similarity(fa, fb, dim=1).tolist()
    cosines.sort()
    return {
        "cosine_mean": statistics.fmean(cosines),
        "cosine_min": cosines[0],
        "cosine_p01": cosines[len(cosines) // 100],
        "levels_mean": statistics.fmean(levels),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="photos to upscale")
    p.add_argument("--work", type=Path, default=Path("/tmp/decode_bench"), help="photos go here")
    p.add_argument("--n", type=int, default=1000, help="photos per size (agreement)")
    p.add_argument("--timing-n", type=int, default=300, help="photos timed per round")
    p.add_argument("--rounds", type=int, default=2, help="timing passes over them")
    p.add_argument("--sizes", nargs="+", default=["640x480", "1600x1200"], help="WxH photos")
    p.add_argument(
        "--presets",
        nargs="+",
        default=["232:224:bilinear", "256:224:bilinear", "292:260:bicubic"],
        help="RESIZE:CROP[:INTERPOLATION] (default: the encoder's)",
    )
    p.add_argument("--encoder", default="tf_efficientnet_lite2", help="a timm model")
    p.add_argument("--weights-file", type=Path, help="its weights (none: agreement skipped)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--json", type=Path, default=Path("decode.json"))
    args = p.parse_args()

    import torch

    from captioner.configs.model import EncoderConfig
    from captioner.models.encoders import create_encoder

    torch.set_num_threads(1)
    rows = []
    for size_text in args.sizes:
        w, h = (int(v) for v in size_text.split("x"))
        print(f"making {args.n} photos of {w}x{h} in {args.work}", flush=True)
        paths = make_photos(args.source, args.work / size_text, args.n, (w, h))
        for preset in args.presets:
            resize, crop, *interpolation = preset.split(":")
            resize, crop = int(resize), int(crop)
            cfg = EncoderConfig(
                source="timm",
                name=args.encoder,
                weights_file=str(args.weights_file) if args.weights_file else None,
                weights="pretrained" if args.weights_file else None,
                resize=resize,
                crop=crop,
            )
            encoder, pre = create_encoder(cfg, pretrained=args.weights_file is not None)
            if interpolation:
                pre = dataclasses.replace(pre, interpolation=interpolation[0])
            pre_full = dataclasses.replace(pre, fast_decode=False)
            pre_draft = dataclasses.replace(pre, fast_decode=True)
            row = {"photo": size_text, "resize": resize, "crop": crop}
            row["interpolation"] = pre.interpolation
            row |= time_loading(paths[: args.timing_n], pre_full, pre_draft, args.rounds)
            if args.weights_file:
                row |= agreement(paths, encoder.eval(), pre_full, pre_draft, args.batch)
            print(json.dumps(row), flush=True)
            rows.append(row)

    print(f"\n{cpu_name()}, torch {torch.__version__}, one thread\n")
    print(
        "| photo | resize / crop | exact path: ms (images/s per core) | fast_decode "
        "| speed-up (decode alone) | feature cosine: mean / 1st pct / min | input change |"
    )
    print("|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        full, draft = r["full_load"], r["draft_load"]
        cos = (
            f"{r['cosine_mean']:.5f} / {r['cosine_p01']:.5f} / {r['cosine_min']:.5f}"
            if "cosine_mean" in r
            else "not measured"
        )
        lv = f"{r['levels_mean']:.2f} levels" if "levels_mean" in r else ""
        print(
            f"| {r['photo']} | {r['resize']} / {r['crop']}, {r['interpolation']} | {full * 1e3:.2f} ({1 / full:.0f}) "
            f"| {draft * 1e3:.2f} ({1 / draft:.0f}) | **{full / draft:.2f}x** "
            f"({r['full_decode'] / r['draft_decode']:.2f}x) | {cos} | {lv} |"
        )
    args.json.write_text(
        json.dumps({"cpu": cpu_name(), "torch": torch.__version__, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
