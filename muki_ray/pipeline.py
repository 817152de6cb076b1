"""The run's stages, each a thin function over the pure modules: predict, combine, train, evaluate.

Every stage reads validated config, writes under RUN_DIR/<stage>/ through `stage_output`, and
writes its manifest last (see manifest.py).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from muki_ray.config import RunConfig
from muki_ray.labels import LabelSpace
from muki_ray.manifest import begin_stage, finish_stage, fingerprint, stage_output

log = logging.getLogger("muki_ray.pipeline")


def load_pool(cfg: RunConfig, space: LabelSpace):
    """The pool as an Arrow table {id, text[, label]}; gold labels only with pool_gold_labels."""
    from muki_ray.data import check_labels, read_source

    table = read_source(cfg.data.pool, on_bad_row=cfg.data.on_bad_row, seed=cfg.data.seed,
                        require_label=cfg.data.pool_gold_labels)
    if not cfg.data.pool_gold_labels and "label" in table.column_names:
        table = table.drop(["label"])
    if cfg.data.pool_gold_labels:
        check_labels(table, space.names, "data.pool")
    return table


def predict_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """RUN_DIR/predictions/data/*.parquet: one row per pool text with every teacher's columns."""
    import pyarrow.dataset as pads

    from muki_ray.data import to_ray_dataset
    from muki_ray.teachers import chain_teachers, teacher_specs

    started = time.time()
    stage_dir = Path(run_dir) / "predictions"
    table = load_pool(cfg, space)
    specs = teacher_specs(cfg, space)
    log.info("predict: %d pool texts through %d teachers (%s)", table.num_rows, len(specs),
             ", ".join(f"{s.name} K={s.samples}" for s in specs))
    block = max(16, min(1024, table.num_rows // 8 or 1))  # several blocks, so replicas share the stream
    ds = chain_teachers(to_ray_dataset(table, block), cfg, specs)
    with stage_output(stage_dir, "data") as tmp:
        ds.write_parquet(str(tmp))
        written = pads.dataset(str(tmp), format="parquet").to_table(columns=["id"])
        ids = written.column("id").to_pylist()
        if len(ids) != table.num_rows or len(set(ids)) != len(ids):
            raise RuntimeError(f"predict: wrote {len(ids)} rows ({len(set(ids))} unique) for "
                               f"{table.num_rows} pool texts")
    return finish_stage(stage_dir, config_hash=fingerprint([s.__dict__ for s in specs]),
                        inputs={"pool": fingerprint(table.column("id").to_pylist())},
                        rows=len(ids), started=started,
                        extra={"teachers": [s.name for s in specs]})


def combine_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """RUN_DIR/targets/data/*.parquet from the predictions; RUN_DIR/supervision.json with gold labels."""
    import pyarrow.parquet as pq
    import ray.data

    from muki_ray.combiner import combine, supervision_report
    from muki_ray.manifest import read_manifest, write_json_atomic

    started = time.time()
    run_dir = Path(run_dir)
    preds_dir = run_dir / "predictions"
    preds_manifest = read_manifest(preds_dir)
    if preds_manifest is None:
        raise FileNotFoundError(f"{preds_dir}: no complete predictions (run predict-teachers first)")
    stage_dir = run_dir / "targets"
    ds = combine(ray.data.read_parquet(str(preds_dir / "data")), space, cfg.integration)
    with stage_output(stage_dir, "data") as tmp:
        ds.write_parquet(str(tmp))
        targets = pq.read_table(str(tmp))
        if targets.num_rows != preds_manifest["rows"]:
            raise RuntimeError(f"combine: wrote {targets.num_rows} rows for {preds_manifest['rows']} predictions")
    report = supervision_report(pq.read_table(str(preds_dir / "data")), targets, space)
    if report is not None:
        report = {"strategy": cfg.integration.strategy, **report}
        write_json_atomic(run_dir / "supervision.json", report)
        log.info("supervision: target acc %.3f, selection acc %.3f (MC %.3f vs entropy %.3f)",
                 report["target_accuracy"], report["selection_accuracy"], report["mc"]["selection_accuracy"],
                 report["entropy"]["selection_accuracy"])
    weights = targets.column("weight").to_numpy()
    return finish_stage(stage_dir, config_hash=fingerprint(cfg.integration.model_dump()),
                        inputs={"predictions": preds_manifest["config_hash"] + preds_manifest["finished_at"]},
                        rows=targets.num_rows, started=started,
                        extra={"mean_weight": float(weights.mean()), "supervision": report})


def labeled_table(cfg: RunConfig, source, space: LabelSpace, where: str):
    """A labeled split {id, text, label} whose labels are all in the union."""
    from muki_ray.data import check_labels, read_source

    table = read_source(source, on_bad_row=cfg.data.on_bad_row, seed=cfg.data.seed, require_label=True)
    check_labels(table, space.names, where)
    return table


def with_gold(table, space: LabelSpace):
    """Add `gold` (union index) to a labeled table, drop the label name."""
    import pyarrow as pa

    return table.append_column("gold", pa.array(space.encode(table.column("label").to_pylist()))).drop(["label"])


def train_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """Train the student on RUN_DIR/targets; export RUN_DIR/student/ and write RUN_DIR/metrics.json."""
    import json as _json

    import ray.data

    from muki_ray.config import resolve_model_path
    from muki_ray.data import to_ray_dataset
    from muki_ray.evaluate import evaluate_folder
    from muki_ray.manifest import read_manifest, write_json_atomic
    from muki_ray.student import (LOSS_FOR_STRATEGY, TrainJob, consolidate, deepspeed_config, export, fit,
                                  steps_per_epoch, tokenize)
    from muki_ray.teachers import column

    started = time.time()
    run_dir = Path(run_dir).resolve()
    targets_manifest = read_manifest(run_dir / "targets")
    if targets_manifest is None:
        raise FileNotFoundError(f"{run_dir / 'targets'}: no complete targets (run combine first)")
    s = cfg.student
    strategy = cfg.integration.strategy
    loss = LOSS_FOR_STRATEGY[strategy]
    model_path = str(resolve_model_path(s.model))

    keep = ["text", "target", "weight"]
    if loss == "uhc":
        keep += [column(t, "probs") for t in space.teachers]
    if loss == "cross_entropy":
        keep += ["gold"]
    train_ds = tokenize(ray.data.read_parquet(str(run_dir / "targets" / "data"), columns=keep), model_path,
                        s.max_length, s.trust_remote_code)
    dev_table = labeled_table(cfg, cfg.data.dev, space, "data.dev")
    dev_ds = tokenize(to_ray_dataset(with_gold(dev_table, space).drop(["id"])), model_path, s.max_length,
                      s.trust_remote_code)

    rows = targets_manifest["rows"]
    per_epoch = steps_per_epoch(rows, s.num_workers, s.batch_size)
    total_opt_steps = -(-per_epoch // s.grad_accum) * s.epochs
    bf16 = s.precision == "bf16" or (s.precision == "auto" and s.use_gpu)
    user_ds = _json.loads(Path(s.deepspeed_config).read_text()) if s.deepspeed_config else None
    ds_cfg = deepspeed_config(s, use_gpu=s.use_gpu, bf16=bf16, total_steps=total_opt_steps, user=user_ds)
    job = TrainJob(
        model_path=model_path, labels=list(space.names), loss=loss, hyper=s.model_dump(), ds_config=ds_cfg,
        steps_per_epoch=per_epoch, log_path=str(run_dir / "train_log.jsonl"),
        kd_temperature=cfg.integration.kd_temperature,
        uhc_positions=[p.tolist() for p in space.positions],
        uhc_columns=[column(t, "probs") for t in space.teachers],
        part_labels={t: p.tolist() for t, p in zip(space.teachers, space.positions)},
        trust_remote_code=s.trust_remote_code, allow_pickle=s.allow_pickle,
        fault_step=os.environ.get("MUKI_FAULT_TRAIN_STEP"))
    config_hash = fingerprint({"student": s.model_dump(), "strategy": strategy, "labels": space.names,
                               "kd": cfg.integration.kd_temperature})
    inputs = {"targets": targets_manifest["config_hash"] + targets_manifest["finished_at"]}
    # The Ray Train run name pins config and inputs: an identical rerun resumes its checkpoints,
    # a changed one starts fresh.
    name = f"student-{fingerprint([config_hash, inputs])}"
    log.info("train: %d rows, %d workers x batch %d, %d steps/epoch, %d epochs, ZeRO-%d, loss %s",
             rows, s.num_workers, s.batch_size, per_epoch, s.epochs, s.zero_stage, loss)
    stage_dir = begin_stage(run_dir / "train")
    t_fit = time.time()
    result = fit(job, train_ds, dev_ds, run_dir=run_dir, name=name, num_rows=rows,
                 scaling={"num_workers": s.num_workers, "use_gpu": s.use_gpu,
                          "resources_per_worker": dict(s.resources_per_worker)},
                 max_failures=s.max_failures)
    train_time = time.time() - t_fit

    export(job, consolidate(result["checkpoint"], s.zero_stage), run_dir / "student")  # tmp + rename
    metrics = {"dev_accuracy": result["metrics"].get("dev_accuracy"),
               "dev_accuracy_per_teacher": {t: result["metrics"].get(f"dev_accuracy/{t}") for t in space.teachers},
               "best_epoch": result["metrics"].get("epoch"), "global_step": result["last_metrics"].get("global_step"),
               "train_time_s": round(train_time, 2), "strategy": strategy}
    if cfg.data.test is not None:
        test = labeled_table(cfg, cfg.data.test, space, "data.test")
        metrics.update(evaluate_folder(run_dir / "student", test.column("text").to_pylist(),
                                       test.column("label").to_pylist(), space, max_length=s.max_length))
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.info("student: dev %.4f (epoch %s), test %s", metrics["dev_accuracy"] or float("nan"),
             metrics["best_epoch"], metrics.get("test_accuracy"))
    return finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=rows, started=started,
                        extra={"metrics": metrics})
