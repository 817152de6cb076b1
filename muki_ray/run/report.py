"""The run report: RUN_DIR/report.md, RUN_DIR/training.png and, with gold labels on the pool,
RUN_DIR/uncertainty.png."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.data

from muki_ray.stages.combiner import teacher_arrays
from muki_ray.core.console import run_log_path
from muki_ray.data.sources import io_read
from muki_ray.method.integrate import entropy_scores
from muki_ray.config.labels import LabelSpace
from muki_ray.core.manifest import read_manifest
from muki_ray.core.stage import column

FIGURE_ROWS = 20_000  # the uncertainty figure is drawn from a seeded sample of at most this many texts


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else (f"{x:.4f}" if isinstance(x, float) else str(x))


def growth_lines(metrics: dict) -> list[str]:
    """report.md's growth section of a warm-started student: its old labels' accuracy before (the
    previous run's metrics) and after, and the new labels'; empty when it did not grow."""
    grown = metrics.get("growth")
    if not grown:
        return []
    before = grown["before"].get("test_accuracy_per_teacher", {})
    after = metrics.get("test_accuracy_per_teacher") or {}
    lines = ["", f"## Growth (warm start from `{grown['from']}`)", "",
             f"Old labels: {', '.join(grown['old_labels'])}. New labels: {', '.join(grown['new_labels']) or 'none'}. "
             "Before: the previous run's own test figures (its test split).", "",
             "| labels | before | after |", "|---|---|---|",
             f"| old labels | {_fmt(grown['before'].get('test_accuracy'))} | {_fmt(grown['old_labels_accuracy'])} |",
             f"| new labels | - | {_fmt(grown['new_labels_accuracy'])} |"]
    lines += [f"| {t}'s labels (old teacher) | {_fmt(before.get(t))} | {_fmt(after.get(t))} |"
              for t in grown["old_teachers"]]
    lines += [f"| {t}'s labels (new teacher) | - | {_fmt(after.get(t))} |" for t in grown["new_teachers"]]
    probe = metrics.get("head_probe")
    if probe:  # head_probe.probe_report of the copied head (before) and the fitted one (after)
        b, a = probe["before"], probe["after"]
        lines += ["", f"Head probe on {probe['rows']} target rows ({b['new_label_rows']} whose target is a new "
                  f"label): those predicted as a new label {_fmt(b['new_rows_on_new'])} with the copied head, "
                  f"{_fmt(a['new_rows_on_new'])} with the fitted one; row norms old/new "
                  f"{_fmt(a['row_norm_old'])}/{_fmt(a['row_norm_new'])}."]
    return lines


def stage_headline(stage: str, info: dict, cfg) -> str:
    """The figure that matters of a finished stage (its manifest `info`), for its console line;
    empty when the manifest does not hold it."""
    def acc(x):
        return "-" if x is None or x != x else f"{x:.3f}"

    m = info.get("metrics") or {}
    if stage == "pool" and "rows" in info:
        return f"{info['rows']} texts"
    if stage == "prepare" and info.get("teachers"):
        return "own-part test accuracy " + ", ".join(
            f"{n} {acc(t.get('own_test_accuracy'))}" for n, t in info["teachers"].items())
    if stage == "predictions" and "computed" in info:
        k = sorted({t.mc.samples for t in cfg.teachers})
        return (f"{len(info.get('teachers', []))} teachers x {info['rows']} texts, K={'/'.join(map(str, k))}; "
                f"computed {', '.join(info['computed']) or 'none'}"
                + (f", reused {', '.join(info['reused'])}" if info.get("reused") else ""))
    if stage == "targets" and "rows" in info:
        sup = info.get("supervision")
        recalls = {t: v["recall"] for t, v in ((sup or {}).get("per_teacher") or {}).items() if v["recall"] is not None}
        weakest = min(recalls, key=recalls.get) if recalls else None
        return (f"{info['rows']} targets, {cfg.integration.strategy}" +
                (f"; selection accuracy {acc(sup['selection_accuracy'])}, target accuracy "
                 f"{acc(sup['target_accuracy'])}" if sup else "") +
                (f"; weakest recall {weakest} {acc(recalls[weakest])}" if weakest and len(recalls) > 1 else ""))
    if stage == "train" and "dev_accuracy" in m:
        return f"dev accuracy {acc(m['dev_accuracy'])} (best epoch {m.get('best_epoch')})"
    if stage == "evaluate" and m:
        return f"test accuracy {acc(m.get('test_accuracy'))}" + (
            " (" + ", ".join(f"{t} {acc(v)}" for t, v in m["test_accuracy_per_teacher"].items()) + ")"
            if m.get("test_accuracy_per_teacher") else "")
    return ""


def uncertainty_figure(preds_table, space: LabelSpace, out: Path) -> dict:
    """The paper's Figure 2: normalized uncertainty of the correct vs the wrong teacher, entropy vs MC.

    Normalized uncertainty u/log C = 1 - s. The "correct" teacher owns the gold label; every other
    teacher is "wrong". Returns the histogram inputs' summary (means, and the share of rows where
    the correct teacher is the least uncertain).
    """
    import matplotlib  # lazily: matplotlib costs a second at start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = {c: preds_table.column(c).to_numpy(zero_copy_only=False) for c in preds_table.column_names}
    arrays = teacher_arrays(batch, space)
    gold = space.encode(batch["label"])
    keep = gold >= 0
    owns = space.owner_mask()[:, np.clip(gold, 0, None)].T[keep]  # (B, N)
    u = {"entropy": 1 - np.stack([entropy_scores(p) for p in arrays["probs"]], 1)[keep],
         "MC-Dropout": 1 - np.stack(arrays["mc_score"], 1)[keep]}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    summary = {}
    for ax, (name, values) in zip(axes, u.items()):
        right, wrong = values[owns], values[~owns]
        bins = np.linspace(0, 1, 26)
        ax.hist(right, bins=bins, alpha=0.6, density=True, label=f"correct teacher (n={len(right)})", color="tab:green")
        ax.hist(wrong, bins=bins, alpha=0.6, density=True, label=f"wrong teacher (n={len(wrong)})", color="tab:red")
        ax.set_title(f"{name}: normalized uncertainty")
        ax.set_xlabel("uncertainty / log|Y_i|  (0 = certain, 1 = uniform)")
        ax.legend(fontsize=8)
        best = np.where(owns, values, np.inf).min(1) < np.where(~owns, values, np.inf).min(1)
        summary[name] = {"mean_correct": float(right.mean()), "mean_wrong": float(wrong.mean()),
                         "correct_least_uncertain": float(best.mean())}
    axes[0].set_ylabel("density")
    fig.suptitle("Correct vs wrong teacher on the pool (paper Fig. 2)")
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return summary


def training_figure(records: list[dict], out: Path) -> dict:
    """The student's training curves: train loss per logged step and dev accuracy per epoch.

    `records`: one Ray Train run's lines of train_log.jsonl (step lines carry `loss`, epoch lines
    `event: epoch` with `dev_accuracy`). Returns what is drawn (points per curve, the last values).
    """
    import matplotlib  # lazily: matplotlib costs a second at start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r and "event" not in r]
    epochs = [r for r in records if r.get("event") == "epoch"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["global_step"] for r in steps], [r["loss"] for r in steps], marker=".", color="tab:blue",
           label="train loss (mean of the last 10 steps)")
    a.plot([r["global_step"] for r in epochs], [r["train_loss"] for r in epochs], "o", color="tab:orange",
           label="epoch mean")
    a.set_xlabel("optimizer micro-step")
    a.set_ylabel("loss")
    a.set_title("student: training loss")
    a.legend(fontsize=8)
    b.plot([r["epoch"] + 1 for r in epochs], [r["dev_accuracy"] for r in epochs], marker="o", color="tab:green",
           label="dev accuracy (union)")
    for key in sorted({k for r in epochs for k in r if k.startswith("dev_accuracy/")}):
        b.plot([r["epoch"] + 1 for r in epochs], [r.get(key) for r in epochs], marker=".", linestyle="--",
               label=f"dev accuracy, {key.split('/', 1)[1]}'s labels")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.set_ylim(0, 1.02)
    b.set_xticks([r["epoch"] + 1 for r in epochs])
    b.set_title("student: dev accuracy per epoch")
    b.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return {"steps": len(steps), "epochs": len(epochs), "last_loss": steps[-1]["loss"] if steps else None,
            "dev_accuracy": [r["dev_accuracy"] for r in epochs]}


def predictions_sample(preds_dir: Path, rows: int, space: LabelSpace) -> pa.Table:
    """At most FIGURE_ROWS rows of the predictions (label and the columns the figure reads), seeded."""
    cols = ["label"] + [column(t, f) for t in space.teachers for f in ("logits", "probs", "mc_probs", "mc_score")]
    ds = ray.data.read_parquet(str(preds_dir), columns=cols, **io_read())
    if rows > FIGURE_ROWS:
        ds = ds.random_sample(FIGURE_ROWS / rows, seed=0)
    return pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))


def write_report(cfg, space: LabelSpace, run_dir: Path) -> dict:
    """Markdown summary of every stage; returns a manifest-like dict with the results table."""
    started = time.time()
    run_dir = Path(run_dir)
    m = {s: read_manifest(run_dir / s) for s in ("pool", "prepare", "predictions", "targets", "train", "evaluate")}
    lines = ["# muki-ray run report", "", f"Run directory: `{run_dir}`", ""]

    lines += ["## Teachers", "", "| teacher | labels | own-part test accuracy |", "|---|---|---|"]
    prepared = (m["prepare"] or {}).get("teachers", {})
    for name, labels in zip(space.teachers, space.teacher_labels):
        acc = prepared.get(name, {}).get("own_test_accuracy")
        lines.append(f"| {name} | {', '.join(labels)} | {_fmt(acc)} |")

    lines += ["", "## Union label space", "", "| index | label | owner(s) |", "|---|---|---|"]
    for i, n in enumerate(space.names):
        lines.append(f"| {i} | {n} | {', '.join(space.owners[n])} |")

    targets = m["targets"] or {}
    sup, estimated = targets.get("supervision"), targets.get("estimated_shares")
    if estimated:
        per = (sup or {}).get("per_teacher") or {}
        source = ("the owners' model (calibration: share)" if targets.get("shares_from") == "owners"
                  else "its share of the selections")
        lines += ["", f"## Teachers' shares of the pool (estimated from {source})", "",
                  "| teacher | estimated share | true share (gold) | selection recall | selection precision |",
                  "|---|---|---|---|---|"]
        for t in space.teachers:
            g = per.get(t, {})
            lines.append(f"| {t} | {_fmt(estimated.get(t))} | {_fmt(g.get('true_share'))} | {_fmt(g.get('recall'))} "
                         f"| {_fmt(g.get('precision'))} |")
    figure = None
    if sup:
        lines += ["", f"## Supervision quality (strategy `{sup['strategy']}`, {sup['rows']} pool texts with gold)", "",
                  "| scores | target accuracy | selection accuracy | margin on correct | margin on wrong |",
                  "|---|---|---|---|---|",
                  f"| this run's targets | {_fmt(sup['target_accuracy'])} | {_fmt(sup['selection_accuracy'])} | | |"]
        for k in ("mc", "entropy"):
            q = sup[k]
            lines.append(f"| hard selection, {'MC-Dropout' if k == 'mc' else 'plain entropy'} | "
                         f"{_fmt(q['target_accuracy'])} | {_fmt(q['selection_accuracy'])} | "
                         f"{_fmt(q['mean_margin_correct'])} | {_fmt(q['mean_margin_wrong'])} |")
        if cfg.data.pool_gold_labels:
            preds = predictions_sample(run_dir / "predictions" / "data", m["predictions"]["rows"], space)
            figure = uncertainty_figure(preds, space, run_dir / "uncertainty.png")
            lines += ["", "![uncertainty](uncertainty.png)", "",
                      "Share of texts where the correct teacher is the least uncertain: "
                      f"entropy {_fmt(figure['entropy']['correct_least_uncertain'])}, "
                      f"MC-Dropout {_fmt(figure['MC-Dropout']['correct_least_uncertain'])}."]

    metrics = (m["evaluate"] or {}).get("metrics", {})
    rows = [("metric", "value")]
    if metrics:
        rows += [("test accuracy (union)", _fmt(metrics.get("test_accuracy"))),
                 ("dev accuracy (best epoch)", _fmt(metrics.get("dev_accuracy")))]
        rows += [(f"test accuracy, {t}'s labels", _fmt(v))
                 for t, v in (metrics.get("test_accuracy_per_teacher") or {}).items()]
        rows += [("best epoch", _fmt(metrics.get("best_epoch"))), ("strategy", metrics.get("strategy"))]
        rows += [("teacher selection", cfg.integration.selection())]
    lines += ["", "## Student", ""] + [f"| {a} | {b} |" for a, b in rows[:1]] + ["|---|---|"] + \
             [f"| {a} | {b} |" for a, b in rows[1:]]
    lines += growth_lines(metrics)
    curves = None
    train_run = ((m["train"] or {}).get("metrics") or {}).get("train_run")
    if train_run and (run_dir / "train_log.jsonl").exists():
        records = [r for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
                   if r.get("run") == train_run]
        if any(r.get("event") == "epoch" for r in records):
            curves = training_figure(records, run_dir / "training.png")
            lines += ["", "![training curves](training.png)"]

    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    for s, mm in m.items():
        if mm:
            lines.append(f"| {s} | {mm['wall_time_s']:.1f} |")
    log_path = run_log_path()
    if log_path is not None:
        rel = os.path.relpath(log_path, run_dir)
        lines += ["", f"Full log of this run (Ray's and the libraries' lines included): [{rel}]({rel})"]
    text = "\n".join(lines) + "\n"
    tmp = run_dir / "report.md.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "report.md")
    return {"wall_time_s": round(time.time() - started, 2), "results": rows, "figure": figure, "curves": curves}
