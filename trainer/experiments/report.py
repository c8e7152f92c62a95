"""docs/results.md of the digits experiment: tables (mean ± std over seeds) and plots from its results.json.

The hand-written reading of the numbers lives in `<docs>/results_discussion.md` and is included as it is, so that
rerunning the experiment refreshes every number without losing the analysis.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

METRICS = (("fid", "FID ↓", "{:.2f}"), ("accuracy", "accuracy ↑", "{:.1%}"), ("nn_distance", "NN dist.", "{:.3f}"))


def mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(float(np.mean(values)))} ± {fmt.format(float(np.std(values, ddof=1)))}"


def runs_table(results: dict) -> list[str]:
    plan = results["plan"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in results["runs"]:
        groups[(run["size"], run["steps"], run["method"])].append(run)
    header = "| images/class | steps | method | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [header, "|" + "---|" * (3 + len(METRICS))]
    for n in plan["sizes"]:
        for steps in plan["steps"]:
            for method in plan["methods"]:
                rows = groups[(n, steps, method)]
                cells = [mean_std([r[key] for r in rows], fmt) for key, _, fmt in METRICS]
                lines.append(f"| {n} | {steps} | {method} | " + " | ".join(cells) + " |")
    return lines


def replacement_table(results: dict) -> tuple[list[str], dict]:
    """FID and accuracy per hand-over share p (mean ± std over seeds), per size and method."""
    curves: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for entry in results["replacement"]:
        for row in entry["curve"]:
            curves[(entry["size"], entry["method"])][row["handover"]].append(row)
    shares = sorted({p for curve in curves.values() for p in curve})
    lines = ["| images/class | method | " + " | ".join(f"p = {p:.0%}" for p in shares) + " |",
             "|" + "---|" * (2 + len(shares))]  # fmt: skip
    for (n, method), curve in curves.items():
        cells = [mean_std([r["fid"] for r in curve[p]], "{:.2f}") + " / " +
                 mean_std([r["accuracy"] for r in curve[p]], "{:.0%}") for p in shares]  # fmt: skip
        lines.append(f"| {n} | {method} | " + " | ".join(cells) + " |")
    return lines, curves


def denoising_tables(results: dict) -> tuple[list[str], dict]:
    by: dict[tuple, list[list[float]]] = defaultdict(list)
    bands = results["denoising"][0]["bands"]
    for entry in results["denoising"]:
        for model, domains in entry["errors"].items():
            for domain, errors in domains.items():
                by[(entry["size"], domain, model)].append(errors)
    lines = []
    for domain, what in (("target", "held-out digits 5-9, own class"), ("bank", "held-out digits 0-4, null class")):
        lines += [
            "",
            f"ε-MSE on {what} (mean ± std over seeds):",
            "",
            "| images/class | model | " + " | ".join(bands) + " |",
            "|" + "---|" * (2 + len(bands)),
        ]
        for (n, d, model), values in by.items():
            if d == domain:
                columns = np.asarray(values).T.tolist()
                lines.append(f"| {n} | {model} | " + " | ".join(mean_std(c, "{:.4f}") for c in columns) + " |")
    return lines, by


def plot_all(results: dict, curves: dict, denoising: dict, docs: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, names = results["plan"], []
    figure, axes = plt.subplots(1, len(plan["sizes"]), figsize=(5 * len(plan["sizes"]), 3.5), squeeze=False)
    for axis, n in zip(axes[0], plan["sizes"]):
        for method in plan["methods"]:
            rows = [[r["fid"] for r in results["runs"] if (r["size"], r["method"], r["steps"]) == (n, method, s)]
                    for s in plan["steps"]]  # fmt: skip
            axis.errorbar(plan["steps"], [np.mean(r) for r in rows], [np.std(r) for r in rows], marker="o",
                          label=method, capsize=3)  # fmt: skip
        axis.set(title=f"{n} images per class", xlabel="fine-tuning steps", ylabel="FID (classifier features)")
        axis.legend()
    names.append(save(figure, docs / f"{prefix}_fid_by_steps.png"))
    figure, axes = plt.subplots(1, len(plan["sizes"]), figsize=(5 * len(plan["sizes"]), 3.5), squeeze=False)
    for axis, n in zip(axes[0], plan["sizes"]):
        for (size, method), curve in curves.items():
            if size == n:
                shares = sorted(curve)
                axis.errorbar([100 * p for p in shares], [np.mean([r["fid"] for r in curve[p]]) for p in shares],
                              [np.std([r["fid"] for r in curve[p]]) for p in shares], marker="o", label=method,
                              capsize=3)  # fmt: skip
        axis.set(title=f"replacement curve, {n} images per class", xlabel="last p% of steps by the pre-trained model",
                 ylabel="FID", yscale="log")  # fmt: skip
        axis.legend()
    names.append(save(figure, docs / f"{prefix}_replacement.png"))
    bands = results["denoising"][0]["bands"]
    figure, axes = plt.subplots(len(plan["sizes"]), 2, figsize=(10, 3.5 * len(plan["sizes"])), squeeze=False)
    for row, n in enumerate(plan["sizes"]):
        for column, domain in enumerate(("target", "bank")):
            axis = axes[row][column]
            for (size, d, model), values in denoising.items():
                if (size, d) == (n, domain):
                    axis.plot(bands, np.mean(values, axis=0), marker="o", label=model)
            where = "held-out 5-9" if domain == "target" else "held-out 0-4 (null class)"
            axis.set(title=f"{where}, {n} images per class", xlabel="timestep band", ylabel="ε-MSE", yscale="log")
            axis.tick_params(axis="x", labelsize=7)
            axis.legend(fontsize=7)
    names.append(save(figure, docs / f"{prefix}_denoising.png"))
    return names


def sample_grids(results: dict, docs: Path, prefix: str) -> list[str]:
    """The first seed's sample grids at the last step count (rows of classes in turn), copied beside the report."""
    plan, lines = results["plan"], []
    first = [r for r in results["runs"] if r["seed"] == plan["seeds"][0] and r["steps"] == plan["steps"][-1]]
    for n in plan["sizes"]:
        cells = []
        for run in (r for r in first if r["size"] == n):
            if Path(run["grid"]).is_file():
                name = f"{prefix}_grid_n{n}_{run['method']}.png"
                shutil.copyfile(run["grid"], docs / name)
                cells.append(f"{run['method']}<br>![{run['method']}]({name})")
        if cells:
            lines += [f"{n} images per class:", "", "| " + " | ".join(cells) + " |", "|" + "---|" * len(cells), ""]
    return lines


def save(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path.name


def write_report(results: dict, docs: Path, command: str, prefix: str = "digits") -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    plan = results["plan"]
    replacement, curves = replacement_table(results)
    denoising, by = denoising_tables(results)
    plots = plot_all(results, curves, by, docs, prefix)
    floors = defaultdict(list)
    for key, value in results["train_images_fid"].items():
        floors[int(key.split("_")[0])].append(value)
    pre = results["pretrained"]
    lines = [
        "# Results: the digits experiment",
        "",
        "A small pixel-space DiT pre-trained on scikit-learn's handwritten digits 0-4 is transferred to digits 5-9",
        "(a new label space, `model.class_init=fresh`) from few images per class, by plain fine-tuning and by",
        "Diff-Tuning, with the project's own jobs (`trainer/experiments/digits.py`).",
        "",
        f"Command: `{command}`  ",
        f"Seeds: {plan['seeds']} (training seed and the draw of the few target images); images per class: "
        f"{plan['sizes']}; step counts: {plan['steps']} (one run resumed from the first count to the next); "
        f"overrides: {plan['overrides'] or 'none'}.  ",
        f"Held-out images: {results['heldout']['target']} of digits 5-9 (the FID reference and the target "
        f"denoising set), {results['heldout']['source']} of digits 0-4. Run time (s): "
        + ", ".join(f"{k} {v}" for k, v in results["seconds"].items())
        + ".",
        "",
        "Methods (`key=value` overrides of `configs/digits.yaml`):",
        "",
        *[f"- `{m}`: `{' '.join(o)}`" for m, o in plan["methods"].items()],
        "",
        "## Samples against held-out digits 5-9",
        "",
        "FID in the features of the shipped digit classifier (`assets/digits/classifier.pt`); accuracy: the share",
        "of samples of class k that the classifier reads as digit 5 + k; NN dist.: mean RMS pixel distance of a",
        "sample to its nearest training image (small: copies of the few training images). Mean ± std over seeds.",
        "",
        *runs_table(results),
        "",
        f"For scale: the pre-trained model's samples (digits 0-4) give FID {pre['fid']:.2f}, accuracy "
        f"{pre['accuracy']:.1%}; the training images themselves give FID "
        + ", ".join(f"{np.mean(v):.2f} ({n} per class)" for n, v in floors.items())
        + " (the few-shot sets against the held-out digits, mean over seeds: what perfect memorisation scores).",
        "",
        f"![FID by steps]({plots[0]})",
        "",
        f"Samples (seed {plan['seeds'][0]}, {plan['steps'][-1]} steps; digit 5 + k in column k mod 5):",
        "",
        *sample_grids(results, docs, prefix),
        "## The replacement curve (chain of forgetting)",
        "",
        f"Models at {plan['steps'][-1]} steps; the last p% of the reverse steps are handed to the pre-trained",
        "model (null class). FID / accuracy, mean ± std over seeds.",
        "",
        *replacement,
        "",
        f"![replacement curve]({plots[1]})",
        "",
        "## Denoising error by noise level",
        f"Models at {plan['steps'][-1]} steps; every model sees the same noisy inputs.",
        *denoising,
        "",
        f"![denoising]({plots[2]})",
        "",
    ]
    discussion = docs / "results_discussion.md"
    if discussion.is_file():
        lines += [discussion.read_text().rstrip(), ""]
    path = docs / "results.md"
    path.write_text("\n".join(lines))
    # Paths relative to the checkout, so that the committed copy reads the same on every machine.
    text = json.dumps(results, indent=2).replace(str(Path(__file__).resolve().parents[2]) + "/", "")
    (docs / f"{prefix}_results.json").write_text(text + "\n")
    return path
