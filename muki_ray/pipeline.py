"""The run's stages, each a thin function over the pure modules:

    prepare -> predictions -> targets -> train -> evaluate -> report

Every stage writes under RUN_DIR/<stage>/ (outputs into a temporary folder, then renamed) and
writes its manifest last. `run()` skips a stage whose manifest records the same config-section
hash and the same upstream outputs, so changing only `integration` reruns combine and after.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from muki_ray.config import RunConfig
from muki_ray.labels import LabelSpace
from muki_ray.manifest import (begin_stage, finish_stage, fingerprint, folder_fingerprint, is_current,
                               read_manifest, stage_output, write_json_atomic)

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



STAGES = ("prepare", "predictions", "targets", "train", "evaluate", "report")


def upstream(run_dir: Path, stage: str) -> str:
    """The output id of a completed upstream stage (FileNotFoundError when it is missing)."""
    m = read_manifest(Path(run_dir) / stage)
    if m is None:
        raise FileNotFoundError(f"{Path(run_dir) / stage}: stage {stage!r} has not completed")
    return m["output_id"]


def stage_keys(cfg: RunConfig, space: LabelSpace, run_dir: Path, stage: str) -> tuple[str, dict]:
    """(config-section hash, upstream inputs) that decide whether `stage` must rerun."""
    from muki_ray.config import teacher_model_path

    if stage == "prepare":
        return fingerprint([cfg.prepare.model_dump(), space.teacher_labels, space.teachers,
                            cfg.data.dev.model_dump() if cfg.data.dev else None, cfg.data.seed]), {}
    if stage == "predictions":
        models = {}
        for t in cfg.teachers:
            path = teacher_model_path(cfg, t)
            models[t.name] = upstream(run_dir, "prepare") if (cfg.prepare and t.model is None) \
                else folder_fingerprint(path)
        section = [t.model_dump(exclude={"model", "resources"}) for t in cfg.teachers]
        return fingerprint([section, space.teacher_labels, cfg.data.pool.model_dump(), cfg.data.seed,
                            cfg.data.on_bad_row, cfg.data.pool_gold_labels]), {"models": models}
    if stage == "targets":
        inputs = {"predictions": upstream(run_dir, "predictions")}
        # Options left off are left out of the key, so runs from before they existed stay cached.
        integ = cfg.integration
        exclude = {"calibration": True} if integ.calibration == "none" else {}
        exclude["prototypes"] = True if integ.prototypes is None else {"resources"}
        exclude["refine"] = True if integ.refine is None else {"resources", "batch_size"}
        key = [integ.model_dump(exclude=exclude)]
        if integ.prototypes is not None:
            key.append(folder_fingerprint(prototypes_model(cfg)))
        if integ.refine is not None:  # the first students are trained like the student, on data.dev
            key += [cfg.student.model_dump(exclude={"init_from"}), cfg.data.dev.model_dump() if cfg.data.dev else None]
        return fingerprint(key if len(key) > 1 else key[0]), inputs
    if stage == "train":
        return fingerprint([cfg.student.model_dump(), cfg.integration.strategy, cfg.integration.kd_temperature,
                            space.names, cfg.data.dev.model_dump() if cfg.data.dev else None]), \
            {"targets": upstream(run_dir, "targets")}
    if stage == "evaluate":
        return fingerprint(cfg.data.test.model_dump() if cfg.data.test else None), \
            {"train": upstream(run_dir, "train")}
    raise ValueError(stage)


def pool_fingerprint(table) -> str:
    """Content hash of the pool: its ids and texts, in id order."""
    import hashlib

    h = hashlib.sha256()
    for rid, text in sorted(zip(table.column("id").to_pylist(), table.column("text").to_pylist())):
        h.update(rid.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def predict_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """RUN_DIR/predictions/data/*.parquet: one row per pool text with every teacher's columns.

    Each teacher's columns are also kept alone in RUN_DIR/cache/teachers/<name>-<fingerprint>/, so a
    rerun recomputes only teachers whose model, labels, MC settings or pool changed (or that are new).
    """
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from muki_ray.data import to_ray_dataset
    from muki_ray.teachers import COLUMNS, chain_teachers, column, teacher_fingerprint, teacher_specs

    started = time.time()
    run_dir = Path(run_dir)
    config_hash, inputs = stage_keys(cfg, space, run_dir, "predictions")
    stage_dir = begin_stage(run_dir / "predictions")
    table = load_pool(cfg, space)
    specs = teacher_specs(cfg, space)
    pool_fp = pool_fingerprint(table)
    caches = {s.name: run_dir / "cache" / "teachers" / f"{s.name}-{teacher_fingerprint(s, pool_fp)}" for s in specs}
    reused = {n: str(d / "data") for n, d in caches.items() if read_manifest(d) is not None}
    for s in specs:
        log.info("predict: teacher %s %s", s.name, "reused from its cache" if s.name in reused
                 else f"computed (K={s.samples})")
    block = max(16, min(1024, table.num_rows // 8 or 1))  # several blocks, so replicas share the stream
    ds = chain_teachers(to_ray_dataset(table, block), cfg, specs, cached=reused)
    with stage_output(stage_dir, "data") as tmp:
        ds.write_parquet(str(tmp))
        written = pads.dataset(str(tmp), format="parquet").to_table(columns=["id"])
        ids = written.column("id").to_pylist()
        if len(ids) != table.num_rows or len(set(ids)) != len(ids):
            raise RuntimeError(f"predict: wrote {len(ids)} rows ({len(set(ids))} unique) for "
                               f"{table.num_rows} pool texts")
    computed = [s.name for s in specs if s.name not in reused]
    for name in computed:
        cols = ["id"] + [column(name, f) for f in COLUMNS]
        with stage_output(caches[name], "data") as tmp:
            pq.write_table(pq.read_table(stage_dir / "data", columns=cols), tmp / "part-0.parquet")
        finish_stage(caches[name], config_hash=caches[name].name, inputs={"pool": pool_fp}, rows=len(ids),
                     started=started)
    return finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=len(ids), started=started,
                        extra={"teachers": [s.name for s in specs], "computed": computed,
                               "reused": sorted(reused)})


def combine_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """RUN_DIR/targets/data/*.parquet from the predictions; RUN_DIR/supervision.json with gold labels."""
    import pyarrow.parquet as pq
    import ray.data

    from muki_ray.combiner import combine, select_table, supervision_report

    started = time.time()
    run_dir = Path(run_dir)
    preds_dir = run_dir / "predictions"
    preds_manifest = read_manifest(preds_dir)
    if preds_manifest is None:
        raise FileNotFoundError(f"{preds_dir}: no complete predictions (run predict-teachers first)")
    config_hash, inputs = stage_keys(cfg, space, run_dir, "targets")
    stage_dir = begin_stage(run_dir / "targets")
    ds = ray.data.read_parquet(str(preds_dir / "data"))
    integ, rounds = cfg.integration, []
    if integ.calibration != "none" or integ.prototypes is not None or integ.refine is not None:
        protos = integ.prototypes is not None
        table = select_table(ds, space, integ, embedding_stage(cfg) if protos else None)
        log.info("targets: teachers selected by %s scores%s", integ.calibration,
                 f", then label prototypes ({prototypes_model(cfg)})" if protos else "")
        if integ.refine is not None:
            table, rounds = self_train(cfg, space, run_dir, stage_dir, table, name=fingerprint([config_hash, inputs]))
        ds = ray.data.from_arrow(table)
    ds = combine(ds, space, integ)
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
    return finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=targets.num_rows,
                        started=started, extra={"mean_weight": float(weights.mean()), "supervision": report,
                                                **({"refine": rounds} if rounds else {})})


def self_train(cfg: RunConfig, space: LabelSpace, run_dir: Path, stage_dir: Path, table, name: str):
    """`integration.refine`: a table with `select_scores` -> the same table with refined scores.

    Each round trains a first student (the student's model and settings) on the high-margin rows'
    targets, exports it to TARGETS/refine/round<r>/, and runs it over the low-margin rest in an actor
    stage; `refine.refine_scores` mixes its teacher masses into those rows' scores.
    Returns (table, per-round stats); the stats' selection accuracies need pool gold labels.
    """
    import numpy as np
    import pyarrow as pa
    import ray.data

    from muki_ray.combiner import Combiner, table_arrays, teacher_arrays, with_select_scores
    from muki_ray.config import resolve_model_path
    from muki_ray.hardware import cluster_has_gpus
    from muki_ray.integrate import normalize_weights, selection_quality
    from muki_ray.refine import high_margin, refine_scores, teacher_mass
    from muki_ray.student import LOSS_FOR_STRATEGY, tokenize
    from muki_ray.teachers import TeacherSpec, TeacherStage, column, stage_class, stage_options

    integ, r_cfg, s = cfg.integration, cfg.integration.refine, cfg.student
    hyper = s.model_copy(update={"epochs": r_cfg.epochs}) if r_cfg.epochs else s
    model_path = str(resolve_model_path(s.model))
    dev = labeled_table(cfg, cfg.data.dev, space.names, "data.dev")
    combiner = Combiner(space, integ.strategy, integ.temperature, integ.kd_temperature, integ.reweight,
                        integ.target_probs)
    batch = table_arrays(table)
    gold = space.encode(batch["label"]) if "label" in batch else None
    probs = teacher_arrays(batch, space)["probs"]
    scores = np.stack(batch["select_scores"]).astype(np.float64)
    stats = []
    for r in range(1, r_cfg.rounds + 1):
        train = high_margin(scores, r_cfg.fraction)
        judged = ~train
        if not judged.any():
            break
        out = combiner({**batch, "select_scores": scores})
        rows = np.flatnonzero(train)
        train_ds = ray.data.from_arrow(pa.table({
            "text": pa.array(batch["text"][rows].tolist(), type=pa.string()),
            "target": pa.array([list(out["target"][i]) for i in rows], type=pa.list_(pa.float32())),
            "weight": pa.array(normalize_weights(out["weight"][rows].astype(np.float64)), type=pa.float32())}))
        first = stage_dir / "refine" / f"round{r}"
        metrics = train_classifier(
            hyper, model_path=model_path, labels=list(space.names), loss=LOSS_FOR_STRATEGY[integ.strategy],
            train_ds=tokenize(train_ds, model_path, s.max_length, s.trust_remote_code), dev_table=dev,
            rows=len(rows), run_dir=run_dir, name=f"refine{r}-{name}", out_dir=first,
            parts={t: p.tolist() for t, p in zip(space.teachers, space.positions)},
            trust_remote_code=s.trust_remote_code, allow_pickle=s.allow_pickle, storage_path=cfg.ray.storage_path,
            kd_temperature=integ.kd_temperature)
        spec = TeacherSpec(name="first_student", model_path=str(first), labels=tuple(space.names), samples=1,
                           max_length=s.max_length, threads=r_cfg.resources.actor_threads, precision="auto")
        ids = batch["id"][judged]
        judge = ray.data.from_arrow(pa.table({"id": pa.array(ids.tolist(), type=pa.string()),
                                              "text": pa.array(batch["text"][judged].tolist(), type=pa.string())}))
        judge = judge.map_batches(stage_class("first_student"), fn_constructor_kwargs={"spec": spec},
                                  batch_size=r_cfg.batch_size, batch_format="numpy",
                                  **stage_options(r_cfg.resources, 1.0 if cluster_has_gpus() else 0.0))
        by_id = {}
        for b in judge.iter_batches(batch_format="numpy", batch_size=None):
            by_id.update(zip(b["id"], b[column("first_student", "probs")]))
        mass = teacher_mass(np.stack([by_id[i] for i in ids]), space.positions)
        refined = refine_scores(scores, mass, judged, temperature=integ.temperature,
                                student_weight=r_cfg.student_weight)
        stat = {"round": r, "trained_rows": int(train.sum()), "judged_rows": int(judged.sum()),
                "changed": int((refined.argmax(1) != scores.argmax(1))[judged].sum()),
                "first_student_dev_accuracy": metrics["dev_accuracy"]}
        if gold is not None:  # analysis only: how often the judged rows get their owning teacher
            sub = [p[judged] for p in probs]
            for key, sc in (("before", scores), ("after", refined)):
                stat[f"judged_selection_accuracy_{key}"] = selection_quality(
                    sc[judged], sub, list(space.positions), len(space), gold[judged])["selection_accuracy"]
        log.info("refine round %d: first student on %d texts (dev acc %.3f) judged %d, %d changed teacher%s", r,
                 stat["trained_rows"], metrics["dev_accuracy"] or float("nan"), stat["judged_rows"], stat["changed"],
                 "" if gold is None else f"; judged selection acc {stat['judged_selection_accuracy_before']:.3f} -> "
                 f"{stat['judged_selection_accuracy_after']:.3f}")
        stats.append(stat)
        scores = refined
    return with_select_scores(table, scores), stats


def prototypes_model(cfg: RunConfig) -> Path:
    """The encoder of `integration.prototypes` (default: the student's base model)."""
    from muki_ray.config import resolve_model_path

    return resolve_model_path(cfg.integration.prototypes.model or cfg.student.model)


def embedding_stage(cfg: RunConfig) -> tuple:
    """(EmbeddingSpec, map_batches options) of the prototypes' embedding pass."""
    from muki_ray.embedding import EmbeddingSpec
    from muki_ray.hardware import cluster_has_gpus
    from muki_ray.teachers import stage_options

    p = cfg.integration.prototypes
    trusted = cfg.student if p.model is None else None  # the student's own model: its load settings apply
    spec = EmbeddingSpec(model_path=str(prototypes_model(cfg)), max_length=p.max_length,
                         threads=p.resources.actor_threads,
                         trust_remote_code=bool(trusted and trusted.trust_remote_code),
                         allow_pickle=bool(trusted and trusted.allow_pickle))
    return spec, stage_options(p.resources, 1.0 if cluster_has_gpus() else 0.0)


def labeled_table(cfg: RunConfig, source, labels, where: str):
    """A labeled split {id, text, label} whose labels are all in `labels`."""
    from muki_ray.data import check_labels, read_source

    table = read_source(source, on_bad_row=cfg.data.on_bad_row, seed=cfg.data.seed, require_label=True)
    check_labels(table, list(labels), where)
    return table


def with_gold(table, names) -> "pa.Table":
    """Replace the label name by `gold`, its index in `names` (-1 when absent)."""
    import pyarrow as pa

    index = {n: i for i, n in enumerate(names)}
    gold = [index.get(x, -1) for x in table.column("label").to_pylist()]
    return table.append_column("gold", pa.array(gold, type=pa.int64())).drop(["label"])


def train_classifier(hyper, *, model_path: str, labels: list[str], loss: str, train_ds, dev_table, rows: int,
                     run_dir: Path, name: str, out_dir: Path, parts: dict, trust_remote_code=False,
                     allow_pickle=False, storage_path=None, **job_extra) -> dict:
    """Ray Train + DeepSpeed fit of a classifier over `labels`, exported to `out_dir` (HF folder).

    Shared by the student (KD losses) and the prepared teachers (cross-entropy on gold labels).
    """
    import json as _json

    from muki_ray.data import to_ray_dataset
    from muki_ray.student import TrainJob, consolidate, deepspeed_config, export, fit, steps_per_epoch, tokenize

    per_epoch = steps_per_epoch(rows, hyper.num_workers, hyper.batch_size)
    total_opt_steps = -(-per_epoch // hyper.grad_accum) * hyper.epochs
    bf16 = hyper.precision == "bf16" or (hyper.precision == "auto" and hyper.use_gpu)
    user_ds = _json.loads(Path(hyper.deepspeed_config).read_text()) if hyper.deepspeed_config else None
    job = TrainJob(
        model_path=model_path, labels=list(labels), loss=loss, hyper=hyper.model_dump(),
        ds_config=deepspeed_config(hyper, use_gpu=hyper.use_gpu, bf16=bf16, total_steps=total_opt_steps,
                                   user=user_ds),
        steps_per_epoch=per_epoch, log_path=str(Path(run_dir) / "train_log.jsonl"), part_labels=parts,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        fault_step=os.environ.get("MUKI_FAULT_TRAIN_STEP"), **job_extra)
    dev_ds = tokenize(to_ray_dataset(with_gold(dev_table, labels).select(["text", "gold"])), model_path,
                      hyper.max_length, trust_remote_code)
    log.info("train %s: %d rows, %d workers x batch %d, %d steps/epoch, %d epochs, ZeRO-%d, loss %s", name,
             rows, hyper.num_workers, hyper.batch_size, per_epoch, hyper.epochs, hyper.zero_stage, loss)
    # Tokenize once, before training: a streamed map would re-run every epoch and compete with the
    # training workers for CPU.
    train_ds, dev_ds = train_ds.materialize(), dev_ds.materialize()
    t0 = time.time()
    result = fit(job, train_ds, dev_ds, run_dir=Path(run_dir), name=name, num_rows=rows,
                 scaling={"num_workers": hyper.num_workers, "use_gpu": hyper.use_gpu,
                          "resources_per_worker": dict(hyper.resources_per_worker)},
                 max_failures=hyper.max_failures, storage_path=storage_path)
    train_time = time.time() - t0
    export(job, consolidate(result["checkpoint"], hyper.zero_stage), out_dir)  # tmp + rename
    m = result["metrics"]
    return {"dev_accuracy": m.get("dev_accuracy"),
            "dev_accuracy_per_teacher": {p: m.get(f"dev_accuracy/{p}") for p in parts},
            "best_epoch": m.get("epoch"), "global_step": result["last_metrics"].get("global_step"),
            "train_time_s": round(train_time, 2)}


def train_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """Train the student on RUN_DIR/targets and export RUN_DIR/student/ (best dev epoch)."""
    import ray.data

    from muki_ray.config import resolve_model_path
    from muki_ray.student import LOSS_FOR_STRATEGY, tokenize
    from muki_ray.teachers import column

    started = time.time()
    run_dir = Path(run_dir).resolve()
    targets_manifest = read_manifest(run_dir / "targets")
    if targets_manifest is None:
        raise FileNotFoundError(f"{run_dir / 'targets'}: no complete targets (run combine first)")
    if cfg.data.dev is None:
        raise FileNotFoundError("data.dev: a labeled dev split is needed to choose the student's best epoch")
    config_hash, inputs = stage_keys(cfg, space, run_dir, "train")
    stage_dir = begin_stage(run_dir / "train")
    s = cfg.student
    loss = LOSS_FOR_STRATEGY[cfg.integration.strategy]
    model_path = str(resolve_model_path(s.model))
    keep = ["text", "target", "weight"]
    keep += [column(t, "probs") for t in space.teachers] if loss == "uhc" else []
    keep += ["gold"] if loss == "cross_entropy" else []
    train_ds = tokenize(ray.data.read_parquet(str(run_dir / "targets" / "data"), columns=keep), model_path,
                        s.max_length, s.trust_remote_code)
    init_state = None
    if s.init_from:
        from muki_ray.student import warm_start_state

        init_state = str(warm_start_state(s.init_from, model_path, list(space.names), s.seed,
                                          stage_dir / "init_state.pt", trust_remote_code=s.trust_remote_code))
    metrics = train_classifier(
        s, model_path=model_path, labels=list(space.names), loss=loss, train_ds=train_ds,
        dev_table=labeled_table(cfg, cfg.data.dev, space.names, "data.dev"), rows=targets_manifest["rows"],
        run_dir=run_dir, out_dir=run_dir / "student", storage_path=cfg.ray.storage_path,
        # The Ray Train run name pins config and inputs: an identical rerun resumes its checkpoints.
        name=f"student-{fingerprint([config_hash, inputs])}",
        parts={t: p.tolist() for t, p in zip(space.teachers, space.positions)},
        trust_remote_code=s.trust_remote_code, allow_pickle=s.allow_pickle,
        kd_temperature=cfg.integration.kd_temperature, uhc_positions=[p.tolist() for p in space.positions],
        uhc_columns=[column(t, "probs") for t in space.teachers], init_state=init_state)
    metrics["strategy"] = cfg.integration.strategy
    log.info("student: dev accuracy %.4f (epoch %s)", metrics["dev_accuracy"], metrics["best_epoch"])
    return finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=targets_manifest["rows"],
                        started=started, extra={"metrics": metrics})


def evaluate_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """RUN_DIR/metrics.json: the exported student's test accuracy (union and per teacher) + dev figures."""
    from muki_ray.evaluate import evaluate_folder

    started = time.time()
    run_dir = Path(run_dir).resolve()
    config_hash, inputs = stage_keys(cfg, space, run_dir, "evaluate")
    stage_dir = begin_stage(run_dir / "evaluate")
    metrics = dict(read_manifest(run_dir / "train")["metrics"])
    if cfg.data.test is not None:
        test = labeled_table(cfg, cfg.data.test, space.names, "data.test")
        metrics.update(evaluate_folder(run_dir / "student", test.column("text").to_pylist(),
                                       test.column("label").to_pylist(), space, max_length=cfg.student.max_length))
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.info("student: test accuracy %s", metrics.get("test_accuracy"))
    return finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=None, started=started,
                        extra={"metrics": metrics})


def prepare_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """Fine-tune each teacher on its own label subset (cross-entropy); RUN_DIR/prepare/<teacher>/."""
    from muki_ray.config import resolve_model_path
    from muki_ray.data import to_ray_dataset
    from muki_ray.evaluate import evaluate_folder
    from muki_ray.labels import LabelSpace as _Space
    from muki_ray.student import tokenize

    import pyarrow.compute as pc

    started = time.time()
    run_dir = Path(run_dir).resolve()
    config_hash, inputs = stage_keys(cfg, space, run_dir, "prepare")
    stage_dir = begin_stage(run_dir / "prepare")
    p = cfg.prepare
    model_path = str(resolve_model_path(p.model))
    data = labeled_table(cfg, p.data, space.names, "prepare.data")
    dev = labeled_table(cfg, cfg.data.dev, space.names, "data.dev") if cfg.data.dev else None
    test = labeled_table(cfg, p.test, space.names, "prepare.test") if p.test else None
    teachers = {}
    for t, labels in zip(cfg.teachers, space.teacher_labels):
        if t.model is not None:
            continue  # a teacher with its own model folder is used as it is
        labels = list(labels)
        mine = data.filter(pc.is_in(data.column("label"), value_set=pa_strings(labels)))
        train_ds = tokenize(to_ray_dataset(with_gold(mine, labels).select(["text", "gold"])), model_path,
                            p.max_length)
        own_dev = (dev if dev is not None else mine)
        own_dev = own_dev.filter(pc.is_in(own_dev.column("label"), value_set=pa_strings(labels)))
        info = train_classifier(p, model_path=model_path, labels=labels, loss="cross_entropy", train_ds=train_ds,
                                dev_table=own_dev, rows=mine.num_rows, run_dir=run_dir,
                                name=f"prepare-{t.name}-{fingerprint([config_hash, labels])}",
                                out_dir=stage_dir / t.name, parts={t.name: list(range(len(labels)))},
                                storage_path=cfg.ray.storage_path)
        if test is not None:
            own = test.filter(pc.is_in(test.column("label"), value_set=pa_strings(labels)))
            info.update(evaluate_folder(stage_dir / t.name, own.column("text").to_pylist(),
                                        own.column("label").to_pylist(), _Space.from_teachers({t.name: labels}),
                                        max_length=p.max_length, prefix="own_test_"))
        info["train_rows"] = mine.num_rows
        teachers[t.name] = info
        log.info("teacher %s (%s): %d texts, own-part test accuracy %s", t.name, ", ".join(labels),
                 mine.num_rows, info.get("own_test_accuracy"))
    return finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=data.num_rows, started=started,
                        extra={"teachers": teachers})


def pa_strings(values):
    import pyarrow as pa

    return pa.array(list(values), type=pa.string())


STAGE_FUNCTIONS = {"prepare": prepare_stage, "predictions": predict_stage, "targets": combine_stage,
                   "train": train_stage, "evaluate": evaluate_stage}


def run(cfg: RunConfig, space: LabelSpace, run_dir: Path, force: tuple[str, ...] = ()) -> dict:
    """Chain the stages, skipping each one whose config section and inputs are unchanged."""
    from muki_ray.report import write_report

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    done = {}
    for stage in STAGES[:-1]:
        if stage == "prepare" and cfg.prepare is None:
            continue
        config_hash, inputs = stage_keys(cfg, space, run_dir, stage)
        if stage not in force and is_current(run_dir / stage, config_hash, inputs):
            log.info("stage %s: up to date, skipped", stage)
            done[stage] = {"skipped": True, **read_manifest(run_dir / stage)}
            continue
        log.info("stage %s: running", stage)
        done[stage] = {"skipped": False, **STAGE_FUNCTIONS[stage](cfg, space, run_dir)}
        log.info("stage %s: done in %.1f s", stage, done[stage]["wall_time_s"])
    done["report"] = {"skipped": False, **write_report(cfg, space, run_dir)}
    return done


def teacher_keys(cfg: RunConfig, space: LabelSpace) -> dict[str, str]:
    """Per-teacher prediction fingerprints (the cache keys), without running anything."""
    from muki_ray.config import teacher_model_path
    from muki_ray.teachers import teacher_fingerprint, teacher_specs

    pool_fp = pool_fingerprint(load_pool(cfg, space))
    keys = {}
    for t, spec in zip(cfg.teachers, teacher_specs(cfg, space)):
        if cfg.prepare is not None and t.model is None:
            # A prepared teacher's model is the prepare stage's output: key it by what makes it.
            keys[t.name] = fingerprint([stage_keys(cfg, space, Path(cfg.output_dir), "prepare")[0], t.name,
                                        {k: v for k, v in spec.__dict__.items() if k not in ("model_path", "threads")},
                                        pool_fp])
        else:
            keys[t.name] = teacher_fingerprint(spec, pool_fp) if teacher_model_path(cfg, t).exists() else "missing"
    return keys


def plan_changes(a: RunConfig, space_a: LabelSpace, b: RunConfig, space_b: LabelSpace) -> list[str]:
    """What running config B after config A recomputes, stage by stage and teacher by teacher."""
    lines = []
    rerun = False
    if b.prepare is not None:
        same = a.prepare is not None and stage_keys(a, space_a, Path(a.output_dir), "prepare")[0] == \
            stage_keys(b, space_b, Path(b.output_dir), "prepare")[0]
        lines.append(f"prepare: {'reuse' if same else 'rerun (prepare section, teacher labels or dev changed)'}")
    ka, kb = teacher_keys(a, space_a), teacher_keys(b, space_b)
    computed = {n: ("new" if n not in ka else "changed") for n in kb if ka.get(n) != kb[n]}
    removed = [n for n in ka if n not in kb]
    reused = [n for n in kb if n not in computed]
    rerun = bool(computed or removed)
    detail = "; ".join(filter(None, [
        "compute " + ", ".join(f"{n} ({why})" for n, why in computed.items()) if computed else "",
        "reuse " + ", ".join(reused) if reused else "",
        "drop " + ", ".join(removed) if removed else ""]))
    lines.append(f"predictions: {'rerun' if rerun else 'reuse'} - {detail}")
    if space_a.names != space_b.names:
        grown = [n for n in space_b.names if n not in space_a.names]
        gone = [n for n in space_a.names if n not in space_b.names]
        lines.append(f"union labels: {len(space_a)} -> {len(space_b)}"
                     + (f" (+{', '.join(grown)})" if grown else "") + (f" (-{', '.join(gone)})" if gone else ""))
    for stage, section in (("targets", lambda c: c.integration.model_dump()),
                           ("train", lambda c: [c.student.model_dump(), c.data.dev.model_dump() if c.data.dev else None]),
                           ("evaluate", lambda c: c.data.test.model_dump() if c.data.test else None)):
        changed = fingerprint(section(a)) != fingerprint(section(b))
        rerun = rerun or changed or (stage == "targets" and space_a.names != space_b.names)
        why = "its section changed" if changed else "an upstream stage reruns"
        lines.append(f"{stage}: {'rerun (' + why + ')' if rerun else 'reuse'}")
    return lines
