"""The embedded demo (launch/demo.py): transfer the shipped source model to a shifted target domain with the real
jobs, then compare plain fine-tuning and Diff-Tuning on the target domain and on what each kept of the source."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from data import procedural
from models.feature_net import frechet_distance, load_feature_net, nhwc_to_nchw
from trainer.evaluation.folder import denoising_error, sample_folder
from trainer.metrics import image_grid

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets" / "demo"
METHODS = {"finetune": ["method.bank_ratio=0", "method.tau=0"], "difftune": []}
BANDS = [(0, 100), (100, 300), (300, 600), (600, 1000)]  # timestep bands of the denoising-error table


def job(script: str, *args: str) -> None:
    """Runs one of our entry points as a user would; stops the demo if it fails."""
    command = [sys.executable, str(ROOT / "launch" / script), "--config", "demo", *args]
    if subprocess.run(command, cwd=ROOT).returncode:
        sys.exit(f"demo: {script} failed")


def dark_share(images: torch.Tensor) -> float:
    return round(float(procedural.has_dark_background(images.permute(0, 2, 3, 1).numpy()).mean()), 4)


def run_demo(args: argparse.Namespace) -> None:
    """Every job of the demo into `args.out` (replaced), then the table; `args` as launch/demo.py parses them."""
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    timings, started = {}, time.perf_counter()

    def stage(name: str, begin: float) -> None:
        timings[name] = round(time.perf_counter() - begin, 1)
        print(f"demo: {name} done in {timings[name]} s", flush=True)

    t = time.perf_counter()
    procedural.write_image_folder("target", out / "target_images", args.images_per_class, seed=0, size=16)
    job("prepare_data.py", f"prepare.images={out / 'target_images'}", f"data.target={out / 'target'}")
    stage("prepare", t)
    t = time.perf_counter()
    bank_size = [f"bank.num_samples={args.bank_samples}"] if args.bank_samples else []
    job("generate_bank.py", f"data.bank={out / 'bank'}", *bank_size)
    stage("bank", t)
    data = [f"data.target={out / 'target'}", f"data.bank={out / 'bank'}"]
    for method, overrides in METHODS.items():
        t = time.perf_counter()
        # The method's own overrides come last: `--overrides method.bank_ratio=0.2` changes Diff-Tuning only.
        job("train.py", *data, f"run.dir={out / method}", *args.overrides, *overrides)
        stage(f"train_{method}", t)

    t = time.perf_counter()
    real, _ = procedural.make_images("target", args.eval_images, seed=12345, size=16)  # unseen target images
    real = nhwc_to_nchw(real)
    source = nhwc_to_nchw(procedural.make_images("source", args.eval_images, seed=54321, size=16)[0])
    labels = torch.arange(args.eval_images) % procedural.NUM_CLASSES
    net = load_feature_net(ASSETS / "feature_net.pt")
    models = {"pre-trained": ASSETS / "source_model", **{m: out / m / "export" / "ema" for m in METHODS}}
    fids, errors, leaks = {}, {}, {"target (real)": dark_share(real)}
    for name, folder in models.items():
        fake = sample_folder(str(folder), labels, num_steps=20, guidance_scale=1.5, seed=0)
        fids[name] = round(frechet_distance(net, real, fake), 2)
        leaks[name] = dark_share(fake)
        grid = Image.fromarray(image_grid(fake[:32].float() / 127.5 - 1, columns=8))
        # 16 px samples are unreadable at 1:1: nearest-upscaled 4x, so that a person can see them.
        grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(out / f"grid_{name}.png")
        # Source images with the null class (what retention keeps), target images with their own class.
        errors[name] = {
            domain: [round(e, 4) for e in denoising_error(str(folder), x.float() / 127.5 - 1, y, BANDS, seed=0)]
            for domain, x, y in (("source", source, None), ("target", real, labels))
        }
    stage("evaluate", t)
    timings["total"] = round(time.perf_counter() - started, 1)

    bands = [f"t {low}-{high}" for low, high in BANDS]
    results = {
        "fid_target": fids,
        "dark_background_share": leaks,
        "denoising_error": {"bands": bands, **errors},
        "eval_images": args.eval_images,
    }
    (out / "results.json").write_text(json.dumps({**results, "seconds": timings}, indent=2))
    # Dark backgrounds are source-only style: their share in a model's samples is source leaking into the target.
    print(f"\n{'model':13} {'FID (target)':>12} {'dark bg.':>12}")
    for name, share in leaks.items():
        fid = f"{fids[name]:12.2f}" if name in fids else f"{'-':>12}"  # real images are the reference
        print(f"{name:13} {fid} {share:12.1%}")
    for domain, condition in (("source", "null class"), ("target", "own class")):
        print(f"\nε-MSE on unseen {domain} images ({condition}), by noise level")
        print(f"{'model':12}" + "".join(f"{band:>12}" for band in bands))
        for name in models:
            print(f"{name:12}" + "".join(f"{e:12.4f}" for e in errors[name][domain]))
    print(f"\nresults in {out} (results.json, grid_*.png, TensorBoard logs in finetune/ and difftune/)")
