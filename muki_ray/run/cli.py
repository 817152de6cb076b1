"""The `muki-ray` command. Bad input exits 2 with one line per error and no traceback.

Each command imports the stages it runs inside its function, not at the top: `muki-ray --help`,
`validate`, `schema` and `diff` must start without loading Ray, torch or DeepSpeed (start-up time).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from muki_ray.config.schema import ConfigError, RunConfig
from muki_ray.config.config_file import load_config, teacher_model_path
from muki_ray.config.labels import LabelSpace, label_space

EXIT_BAD_INPUT = 2
log = logging.getLogger("muki_ray.run.cli")


class UsageError(Exception):
    """A one-line user-facing error (bad input, missing file, unreachable cluster)."""


def connected(args) -> tuple[RunConfig, LabelSpace]:
    """Load and validate the config, check models and the output directory, join or start Ray,
    then check every labeled source (Ray Data scans) and the cluster's resources."""
    import ray

    from muki_ray.core.cluster import cluster_nodes, connect
    from muki_ray.core.console import capture_ray_output, open_run_log
    from muki_ray.config.preflight import check_data, check_models, check_output_dir, check_resources, load_checked

    cfg = load_checked(args.config, args.set)
    check_models(cfg)
    check_output_dir(Path(cfg.output_dir))
    connect(cfg.ray)
    capture_ray_output()
    space = label_space(cfg)
    check_data(cfg, space)
    check_resources(cfg, ray.cluster_resources(), cluster_nodes(cfg.ray.autoscaling))
    # Checks passed: from here the run directory may be written, starting with the run log.
    path = open_run_log(Path(cfg.output_dir))
    log.info("muki-ray %s %s: %d teachers, %d union labels -> %s (full log: %s)", args.command, args.config,
             len(cfg.teachers), len(space.names), cfg.output_dir, path)
    return cfg, space


def cmd_validate(args) -> int:
    from muki_ray.config.preflight import load_checked  # here, not at the top: it loads Ray (start-up time)

    cfg = load_checked(args.config, args.set)
    space = label_space(cfg)
    print(f"config OK: {args.config}")
    print(f"output_dir: {cfg.output_dir}")
    print(f"strategy: {cfg.integration.strategy} (tau={cfg.integration.temperature}, "
          f"reweight={cfg.integration.reweight}, normalize={cfg.integration.reweight_normalize})")
    print(f"selection: {cfg.integration.selection()}")
    if cfg.integration.ignored:
        print(f"note: {cfg.integration.strategy} ignores integration.{', integration.'.join(cfg.integration.ignored)}")
    print(f"teachers: {len(cfg.teachers)}")
    for t, labels in zip(cfg.teachers, space.teacher_labels):
        src = "prepare" if cfg.prepare is not None and t.model is None else "model"
        p = "model's own" if t.mc.dropout is None else t.mc.dropout
        print(f"  {t.name}: {len(labels)} labels, K={t.mc.samples}, dropout={p}, "
              f"{src}={teacher_model_path(cfg, t)}")
    print(space.describe())
    print(f"student: {cfg.student.model} (ZeRO-{cfg.student.zero_stage}, {cfg.student.num_workers} workers)")
    return 0


def cmd_predict(args) -> int:
    from muki_ray.run.pipeline import predict_stage

    cfg, space = connected(args)
    info = predict_stage(cfg, space, Path(cfg.output_dir))
    print(f"predictions: {info['rows']} rows x {len(cfg.teachers)} teachers -> "
          f"{Path(cfg.output_dir) / 'predictions'} ({info['wall_time_s']:.1f} s)")
    return 0


def cmd_combine(args) -> int:
    from muki_ray.run.pipeline import combine_stage

    cfg, space = connected(args)
    info = combine_stage(cfg, space, Path(cfg.output_dir))
    print(f"targets: {info['rows']} rows, strategy {cfg.integration.strategy}, mean weight "
          f"{info['mean_weight']:.3f} -> {Path(cfg.output_dir) / 'targets'}")
    if info.get("supervision"):
        s = info["supervision"]
        print(f"supervision: target accuracy {s['target_accuracy']:.3f}, selection accuracy "
              f"{s['selection_accuracy']:.3f} (MC {s['mc']['selection_accuracy']:.3f}, "
              f"entropy {s['entropy']['selection_accuracy']:.3f})")
    return 0


def cmd_train(args) -> int:
    from muki_ray.run.pipeline import evaluate_stage, train_stage

    cfg, space = connected(args)
    train_stage(cfg, space, Path(cfg.output_dir))
    m = evaluate_stage(cfg, space, Path(cfg.output_dir))["metrics"]
    print(f"student -> {Path(cfg.output_dir) / 'student'}: dev accuracy {m['dev_accuracy']:.4f} "
          f"(epoch {m['best_epoch']}), test accuracy {m.get('test_accuracy', float('nan')):.4f}, "
          f"{m['train_time_s']:.0f} s")
    return 0


def cmd_prepare(args) -> int:
    from muki_ray.run.pipeline import prepare_stage
    from muki_ray.config.preflight import load_checked

    if load_checked(args.config, args.set).prepare is None:
        raise UsageError(f"{args.config}: no `prepare` section")
    cfg, space = connected(args)
    info = prepare_stage(cfg, space, Path(cfg.output_dir))
    for name, t in info["teachers"].items():
        print(f"teacher {name}: {t['train_rows']} texts, own-part test accuracy "
              f"{t.get('own_test_accuracy', float('nan')):.4f} -> {Path(cfg.output_dir) / 'prepare' / name}")
    return 0


def cmd_run(args) -> int:
    from muki_ray.stages.cache import STAGES
    from muki_ray.run.pipeline import run

    bad = [f for f in args.force if f not in STAGES]
    if bad:
        raise UsageError(f"--force: unknown stage {bad[0]!r}; stages: {', '.join(STAGES)}")
    from muki_ray.core.console import run_log_path

    cfg, space = connected(args)
    started = time.time()
    done = run(cfg, space, Path(cfg.output_dir), force=tuple(args.force))
    rows = done["report"]["results"]
    width = max(len(a) for a, _ in rows)
    ran = [s for s, info in done.items() if s != "report" and not info.get("skipped")]
    print(f"\nmuki-ray run: {len(ran)} stages ran ({', '.join(ran) or 'none'}), "
          f"{len(done) - 1 - len(ran)} up to date, {time.time() - started:.0f} s\n")
    for a, b in rows:
        print(f"  {a:<{width}}  {b}")
    out = Path(cfg.output_dir)
    print(f"\nreport:  {out / 'report.md'}\nstudent: {out / 'student'}\nlog:     {run_log_path()}")
    return 0


def cmd_classify(args) -> int:
    import json

    from muki_ray.student.evaluate import predict_proba
    from muki_ray.core.hf_folder import check_folder

    check_folder(Path(args.model), what="student")
    texts = list(args.text)
    if args.input:
        for n, line in enumerate(Path(args.input).read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise UsageError(f"{args.input}: line {n}: expected a JSON object with a 'text' field") from None
    if not texts:
        raise UsageError("classify: give TEXT arguments or --input FILE.jsonl")
    probs, names = predict_proba(args.model, texts, max_length=args.max_length)
    out = open(args.output, "w") if args.output else None
    for text, p in zip(texts, probs):
        k = int(p.argmax())
        if out:
            out.write(json.dumps({"text": text, "label": names[k], "score": float(p[k])}) + "\n")
        else:
            print(f"{names[k]}\t{p[k]:.3f}\t{text[:80]}")
    if out:
        out.close()
    return 0


def cmd_diff(args) -> int:
    from muki_ray.stages.cache import plan_changes
    from muki_ray.config.preflight import load_checked

    a = load_config(args.config_a)
    b = load_checked(args.config_b, args.set)
    for line in plan_changes(a, label_space(a), b, label_space(b)):
        print(line)
    return 0


def cmd_datasets(args) -> int:
    from muki_ray.data.sources import describe_builtins, format_builtins

    print(format_builtins(describe_builtins()))
    return 0


def cmd_schema(args) -> int:
    import re

    from muki_ray.config.schema_doc import schema_markdown

    md = schema_markdown()
    if args.update:
        path = Path(args.update)
        text = path.read_text()
        new, n = re.subn(r"(<!-- schema:start -->\n).*?(<!-- schema:end -->)",
                         lambda m: m.group(1) + md + "\n" + m.group(2), text, flags=re.S)
        if n != 1:
            raise UsageError(f"{path}: no <!-- schema:start --> ... <!-- schema:end --> block")
        path.write_text(new)
        print(f"updated the schema in {path}")
    else:
        print(md)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="muki-ray", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("config", help="run config YAML")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. integration.strategy=muki_hard (repeatable)")
        sp.set_defaults(fn=fn)
        return sp

    with_config("validate", cmd_validate, "validate a config and print the teachers and union label space")
    with_config("predict-teachers", cmd_predict, "run every teacher's MC-Dropout predictions over the pool")
    with_config("combine", cmd_combine, "integrate the teachers' predictions into targets")
    with_config("train-student", cmd_train, "train the student on the targets with Ray Train + DeepSpeed")
    with_config("prepare-teachers", cmd_prepare, "fine-tune each teacher on its label subset (prepare section)")
    sp = with_config("run", cmd_run, "run every stage, skipping those that are up to date")
    sp.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun this stage (repeatable)")
    sp = sub.add_parser("diff", help="say which stages and teachers a config change recomputes (runs nothing)")
    sp.add_argument("config_a", help="the config of the existing run")
    sp.add_argument("config_b", help="the changed config")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of CONFIG_B")
    sp.set_defaults(fn=cmd_diff)
    sp = sub.add_parser("classify", help="classify texts with an exported student folder")
    sp.add_argument("text", nargs="*", help="texts to classify")
    sp.add_argument("--model", required=True, help="a from_pretrained folder, e.g. RUN_DIR/student")
    sp.add_argument("--input", help="JSONL with a 'text' field per line")
    sp.add_argument("--output", help="write JSONL {text, label, score} here instead of printing")
    sp.add_argument("--max-length", type=int, default=128)
    sp.set_defaults(fn=cmd_classify)
    sub.add_parser("datasets", help="list the built-in datasets").set_defaults(fn=cmd_datasets)
    sp = sub.add_parser("schema", help="print the config schema as Markdown")
    sp.add_argument("--update", metavar="FILE", help="rewrite the schema block of this Markdown file")
    sp.set_defaults(fn=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from muki_ray.core.console import configure, discard_run_log

    configure(args.verbose)
    from muki_ray.core.cluster import ClusterError
    from muki_ray.data.sources import DataError
    from muki_ray.core.hf_folder import ModelLoadError
    from muki_ray.config.preflight import OutputError
    from muki_ray.stages.schedule import TeacherFailed

    try:
        return args.fn(args)
    except TeacherFailed as e:
        return _failed(e, str(e))
    except ConfigError as e:
        discard_run_log()
        for line in e.errors:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (DataError, UsageError, ModelLoadError, ClusterError, OutputError, FileNotFoundError) as e:
        discard_run_log()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # mid-run: a full disk, a vanished mount; name the path, skip the traceback
        print(f"error: {e.filename or 'I/O'}: {e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # a stage that failed: one line here, the traceback in the run log
        return _failed(e, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")


def _failed(e: Exception, line: str) -> int:
    """Print a failure's one line and where its full traceback is (the run log, or here without one)."""
    from muki_ray.core.console import run_log_path

    where = run_log_path()
    log.debug("failed", exc_info=e)  # into the run log (and on the console with --verbose)
    if where is None:
        traceback.print_exception(e, file=sys.stderr)
    print(f"error: {line}" + (f" (full traceback in {where})" if where else ""), file=sys.stderr)
    return 1


def entry() -> int:
    """The `muki-ray` command (and `python -m muki_ray.run.cli`): `main` in a process of its own, whose
    native stderr (Ray's C++ logs) goes to the run log."""
    from muki_ray.core.console import capture_native_output

    capture_native_output()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
