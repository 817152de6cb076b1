"""The run's stages, one function each, in data-flow order:

    pool -> prepare -> predictions -> targets -> train -> evaluate -> report

Every stage writes under RUN_DIR/<stage>/ (outputs into a temporary folder, then renamed) and
writes its manifest last. `run()` skips a stage whose manifest records the same key and inputs
(`cache.stage_keys`), so changing only `integration` reruns combine and after. No stage holds the
pool on the driver: data moves through Ray Data, and the driver folds per-block counts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from muki_ray.stages.cache import STAGES, TeacherCache, pool_settings, prototypes_model, stage_keys
from muki_ray.student.checkpoint import growth, warm_start_folder
from muki_ray.core.cluster import Demand, cluster_nodes, refuse_oversized
from muki_ray.stages.combiner import Combiner, select_scores, selected_shares, supervision
from muki_ray.config.schema import RunConfig, prepared_settings
from muki_ray.data.sources import (DataError, SourceInfo, appendable, appended_tail, check_labels, file_state, fold,
                                   hashed_sample, io_map, io_read, io_write, read_source, scan_source, source_signature)
from muki_ray.stages.embedding import EmbeddingSpec
from muki_ray.student.evaluate import evaluate_dataset
from muki_ray.core.hardware import gpu_default
from muki_ray.core.hf_folder import label_names, resolve_model_path
from muki_ray.config.labels import LabelSpace
from muki_ray.core.manifest import begin_stage, finish_stage, fingerprint, is_current, read_manifest, set_aside, \
    stage_output, write_json_atomic
from muki_ray.data.pool import add_keys, join_bucket, link_all, over_buckets, pool_summary, write_bucketed
from muki_ray.stages.refine_stage import self_train
from muki_ray.core.progress import counted, track
from muki_ray.run.report import stage_headline, write_report
from muki_ray.stages.schedule import Job, TeacherFailed, describe_request, run_within, settled_free
from muki_ray.method.stats import add
from muki_ray.method.strategies import STRATEGIES
from muki_ray.student.training import tokenize, train_classifier, training_request, with_gold
from muki_ray.core.stage import actor_resources, column, stage_options
from muki_ray.stages.teachers import cache_columns, predict_teacher, teacher_specs
from muki_ray.student.warm_start import probe_warm_head

log = logging.getLogger("muki_ray.run.pipeline")


def actor_options(cfg: RunConfig, resources) -> dict:
    """map_batches options of an actor pool (evaluation, embedding, probe) from its `resources` section;
    GPUs by default where the cluster has or can add them (decided once per run)."""
    return stage_options(resources, gpu_default(cfg.ray.autoscaling))


def labeled(cfg: RunConfig, source, names, where: str):
    """A labeled split as a Ray Dataset {id, text, label}; every label must be a union label."""
    d = cfg.data
    check_labels(scan_source(source, on_bad_row=d.on_bad_row, seed=d.seed, require_label=True), list(names), where)
    return read_source(source, on_bad_row=d.on_bad_row, seed=d.seed, require_label=True)


def only_labels(ds, labels):
    """The rows of a labeled dataset whose label is one of `labels`."""
    value_set = pa.array(list(labels), type=pa.string())
    return ds.map_batches(lambda b: b.filter(pc.is_in(b.column("label"), value_set=value_set)),
                          batch_format="pyarrow", **io_map())


def parquet_rows(folder: Path) -> int:
    """Rows of a written parquet folder, from the files' footers."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in Path(folder).rglob("*.parquet"))


# ------------------------------------------------------------------ pool
def pool_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """RUN_DIR/pool/data/bucket=B/*.parquet: the checked pool {id, text, [label], text_hash}.

    A bad row fails here, before any other stage works, and leaves no pool folder behind. A JSONL
    pool that only grew at its end since the last pool stage (its earlier bytes the same, by their
    SHA-256: `sources.appended_tail`) reads, checks and writes only its new lines, and hard-links
    the earlier pool's files: its cost follows the new rows, not the pool.
    """
    started = time.time()
    d, run_dir = cfg.data, Path(run_dir)
    config_hash, inputs = stage_keys(cfg, space, run_dir, "pool")
    settings = fingerprint(pool_settings(cfg))
    previous = set_aside(run_dir / "pool", settings, key="settings_hash")
    before = read_manifest(previous) if previous else None
    signature = source_signature(d.pool)
    tail, state = appended_tail(d.pool, (before or {}).get("source_file")) or (None, None)
    with ThreadPoolExecutor(1) as beside:
        # The file's size, hash and line counts, for the next run to tell an appended file: read
        # beside the scan (a full read only; an appended one has them already).
        later = beside.submit(file_state, Path(d.pool.source)) if tail is None and appendable(d.pool) else None
        new_lines = tail is None or state["size"] > tail.offset
        info = scan_source(d.pool, on_bad_row=d.on_bad_row, seed=d.seed, require_label=d.pool_gold_labels,
                           tail=tail) if new_lines else SourceInfo(rows=0)
        if d.pool_gold_labels:
            check_labels(info, space.names, "data.pool")
        stage_dir = begin_stage(run_dir / "pool")
        try:
            with stage_output(stage_dir, "data") as tmp:
                if new_lines:
                    ds = read_source(d.pool, on_bad_row=d.on_bad_row, seed=d.seed, require_label=d.pool_gold_labels,
                                     drop_label=not d.pool_gold_labels, tail=tail)
                    write_bucketed(ds.map_batches(add_keys, fn_kwargs={"buckets": d.buckets}, batch_format="pyarrow",
                                                  **io_map()), tmp)
                if tail is not None:
                    link_all(previous / "data", tmp)
                summary = pool_summary(tmp, d.buckets, d.pool_gold_labels, where=d.pool.source)
        except DataError:
            shutil.rmtree(stage_dir, ignore_errors=True)
            raise
        state = state if later is None else later.result()
    if source_signature(d.pool) != signature:  # written to while read: the next run reads it whole
        state = None
    kept = before["rows"] if tail is not None else 0
    log.debug("pool: %d texts in %d buckets (fingerprint %s; %d kept from the earlier pool)", summary["rows"],
              d.buckets, summary["fingerprint"], kept)
    done = finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=summary["rows"], started=started,
                        extra={"fingerprint": summary["fingerprint"], "labels": summary["labels"],
                               "bad_rows_skipped": info.skipped + (before["bad_rows_skipped"] if tail else 0),
                               "bucket_rows": summary["bucket_rows"], "settings_hash": settings,
                               "source_file": state, "rows_kept": kept})
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return done


def ensure_pool(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """The pool stage's manifest, running the stage first when it is missing or out of date."""
    config_hash, inputs = stage_keys(cfg, space, run_dir, "pool")
    if is_current(Path(run_dir) / "pool", config_hash, inputs):
        return read_manifest(Path(run_dir) / "pool")
    return pool_stage(cfg, space, run_dir)


# ------------------------------------------------------------------ prepare
def prepare_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """Fine-tune each teacher on its own label subset (cross-entropy); RUN_DIR/prepare/<teacher>/."""
    started = time.time()
    run_dir = Path(run_dir).resolve()
    config_hash, inputs = stage_keys(cfg, space, run_dir, "prepare")
    stage_dir = begin_stage(run_dir / "prepare")
    p, d = cfg.prepare, cfg.data
    counts = scan_source(p.data, on_bad_row=d.on_bad_row, seed=d.seed, require_label=True).labels
    # Texts of labels no teacher owns train nobody: skipped, and counted.
    unowned = {lab: n for lab, n in counts.items() if lab not in space.index}
    if unowned:
        log.info("prepare: %d texts of labels no teacher owns are skipped (%s)", sum(unowned.values()),
                 ", ".join(f"{lab}: {n}" for lab, n in sorted(unowned.items())))
    data = read_source(p.data, on_bad_row=d.on_bad_row, seed=d.seed, require_label=True)
    dev = labeled(cfg, cfg.data.dev, space.names, "data.dev") if cfg.data.dev else None
    test = labeled(cfg, p.test, space.names, "prepare.test") if p.test else None

    def prepare_teacher(t, labels, settings, _actors: int) -> dict:  # _actors: its grant (1 run)
        model_path = str(resolve_model_path(settings.model))
        rows = sum(counts.get(lab, 0) for lab in labels)
        own = only_labels(data, labels)
        if t.prepare is not None and t.prepare.texts is not None and t.prepare.texts < rows:
            own, rows = hashed_sample(own, t.prepare.texts, salt=f"{d.seed}:{t.name}"), t.prepare.texts
        train_ds = tokenize(with_gold(own, labels).select_columns(["text", "gold"]), model_path, settings.max_length)
        info = train_classifier(settings, model_path=model_path, labels=labels, loss="SupervisedCELoss",
                                train_ds=train_ds, dev_ds=only_labels(dev if dev is not None else data, labels),
                                rows=rows, run_dir=run_dir,
                                name=f"prepare-{t.name}-{fingerprint([config_hash, labels])}",
                                progress=f"prepare {t.name}: train",
                                out_dir=stage_dir / t.name, parts={t.name: list(range(len(labels)))},
                                storage_path=cfg.ray.storage_path)
        if test is not None:
            info.update(evaluate_dataset(stage_dir / t.name, only_labels(test, labels),
                                         LabelSpace.from_teachers({t.name: labels}), max_length=settings.max_length,
                                         prefix="own_test_", options=actor_options(cfg, p.eval_resources),
                                         threads=p.eval_resources.actor_threads, label=f"prepare {t.name}: test"))
        info.update(train_rows=rows, base_model=settings.model, epochs=settings.epochs, lr=settings.lr)
        log.debug("teacher %s (%s): %d texts, own-part test accuracy %s", t.name, ", ".join(labels), rows,
                  info.get("own_test_accuracy"))
        return info

    # The teachers train side by side, as many at once as the cluster's free resources hold (a
    # training run's workers are one grant; Ray Train itself asks an autoscaler for its nodes).
    jobs = []
    for t, labels in zip(cfg.teachers, space.teacher_labels):
        if t.model is None:  # a teacher with its own model folder is used as it is
            settings = prepared_settings(cfg, t)
            jobs.append(Job(t.name, training_request(settings), 1,
                            functools.partial(prepare_teacher, t, list(labels), settings)))
    try:
        results, timeline = run_within(jobs, settled_free(ray.available_resources, ray.cluster_resources()),
                                       total=ray.cluster_resources, stage="prepare")
    except TeacherFailed as e:  # the first failure as it was raised: a bad input keeps its exit code and line
        raise next(iter(e.failures.values()))
    teachers = {t.name: results[t.name] for t in cfg.teachers if t.name in results}
    return finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=sum(counts.values()),
                        started=started, extra={"teachers": teachers, "skipped_unowned": unowned,
                                                "schedule": timeline})


# ------------------------------------------------------------------ predictions
def predict_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """RUN_DIR/predictions/data/*.parquet: one row per pool text with every teacher's columns.

    Each teacher runs as its own pipeline into its own cache (`cache.TeacherCache`), scheduled
    within the cluster's free resources (`schedule.run_within`), computing only the pool rows its
    cache lacks. Then the caches are joined with the pool bucket by bucket (`pool.join_bucket`).
    """
    started = time.time()
    run_dir = Path(run_dir)
    pool = ensure_pool(cfg, space, run_dir)
    config_hash, inputs = stage_keys(cfg, space, run_dir, "predictions")
    # The same teachers' predictions of an earlier pool: its rows that the pool still holds are kept.
    previous = set_aside(run_dir / "predictions", config_hash)
    stage_dir = begin_stage(run_dir / "predictions")
    pool_root, buckets = run_dir / "pool" / "data", cfg.data.buckets
    specs = teacher_specs(cfg, space)
    caches = [TeacherCache.of(cfg, space, i) for i in range(len(specs))]
    gpus = gpu_default(cfg.ray.autoscaling)
    # Progress counts pool rows per teacher to compute (a grown pool computes fewer: the line then ends early).
    to_compute = sum(not cache.covers(pool["fingerprint"]) for cache in caches)
    with track("predictions", pool["rows"] * to_compute, "rows") as counter:
        specs = [dataclasses.replace(s, progress=counter) for s in specs]
        jobs = [Job(s.name, actor_resources(t.resources, gpus), t.resources.replicas,
                    functools.partial(predict_teacher, s, t, cache, pool_root, pool["fingerprint"], buckets,
                                      gpu_default=gpus),
                    # A teacher whose rows stop coming for its placement timeout lost its actors (a lost
                    # node, nothing left that can hold them): it fails instead of waiting forever.
                    progress=functools.partial(counted, counter, s.name), stall_s=t.resources.placement_timeout_s,
                    stall_hint=f" (teachers[].resources.placement_timeout_s): its actors could not be placed "
                               f"or restarted; each asks for {describe_request(actor_resources(t.resources, gpus))}")
                for s, t, cache in zip(specs, cfg.teachers, caches)]
        nodes = cluster_nodes(cfg.ray.autoscaling)  # None: an autoscaler that publishes no node types
        if nodes is not None:
            refuse_oversized({f"teachers[{i}].resources.{{res}}": j.per_actor for i, j in enumerate(jobs)}, nodes)
        free = settled_free(ray.available_resources, ray.cluster_resources())
        log.debug("predict: %d teachers within %s", len(jobs),
                  ", ".join(f"{free.get(k, 0):g} {k}" for k in ("CPU", "GPU") if free.get(k)))
        demand = Demand(f"muki-ray {run_dir.name} teachers") if cfg.ray.autoscaling else None
        results, timeline = run_within(jobs, free, total=ray.cluster_resources, demand=demand)
    for s in specs:
        n = results[s.name]["computed"]
        log.debug("predict: teacher %s %s", s.name, f"computed {n} rows (K={s.samples})" if n else "reused its cache")
    teachers = [(s.name, cache.parts(), cache_columns(s.name)) for s, cache in zip(specs, caches)]
    nodes, kept = {s.name: {} for s in specs}, 0
    with stage_output(stage_dir, "data") as tmp:
        for b in over_buckets(join_bucket, buckets, pool_root=str(pool_root), teachers=teachers, out_dir=str(tmp),
                              labeled=cfg.data.pool_gold_labels, previous=previous and str(previous / "data")
                              ).iter_batches(batch_format="pyarrow", batch_size=None):
            for rec in b.to_pylist():
                if rec["missing"]:
                    raise RuntimeError(f"predict: {rec['missing']}")
                kept += rec["kept"]
                for name, by_node in json.loads(rec["nodes"]).items():
                    for node, n in by_node.items():
                        nodes[name][node] = nodes[name].get(node, 0) + n
        rows = parquet_rows(tmp)
    if rows != pool["rows"]:
        raise RuntimeError(f"predict: wrote {rows} rows for {pool['rows']} pool texts")
    computed = {s.name: results[s.name]["computed"] for s in specs}
    done = finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=rows, started=started, extra={
        "teachers": [s.name for s in specs], "computed": [n for n, c in computed.items() if c],
        "reused": sorted(n for n, c in computed.items() if not c), "rows_computed": computed,
        "rows_reused": {n: rows - c for n, c in computed.items()}, "rows_kept": kept, "schedule": timeline,
        "busy_s": {s.name: results[s.name]["busy_s"] for s in specs}, "nodes": nodes})
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return done


# ------------------------------------------------------------------ targets
def combine_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """RUN_DIR/targets/data/*.parquet from the predictions; RUN_DIR/supervision.json with gold labels."""
    started = time.time()
    run_dir = Path(run_dir)
    preds_dir = run_dir / "predictions"
    preds_manifest = read_manifest(preds_dir)
    if preds_manifest is None:
        raise FileNotFoundError(f"{preds_dir}: no complete predictions (run predict-teachers first)")
    config_hash, inputs = stage_keys(cfg, space, run_dir, "targets")
    stage_dir = begin_stage(run_dir / "targets")
    ds = ray.data.read_parquet(str(preds_dir / "data"), **io_read())
    integ, rounds, shares = cfg.integration, [], None
    if integ.calibration != "none" or integ.prototypes is not None or integ.refine is not None:
        protos = integ.prototypes is not None
        ds, shares = select_scores(ds, space, integ, embedding_stage(cfg) if protos else None)
        log.debug("targets: teachers selected by %s%s", integ.selection(),
                 f" (prototypes embed with {prototypes_model(cfg)})" if protos else "")
        if integ.refine is not None:
            ds, rounds = self_train(cfg, space, run_dir, stage_dir, ds.materialize(),
                                    labeled(cfg, cfg.data.dev, space.names, "data.dev"),
                                    name=fingerprint([config_hash, inputs]))
    combiner = Combiner.of(space, integ)
    counts = fold(ds, combiner.counts, add)
    mean = counts["weight"] / counts["rows"] if integ.reweight and integ.reweight_normalize else None
    with stage_output(stage_dir, "data") as tmp:
        ds.map_batches(combiner, fn_kwargs={"mean": mean}, batch_format="numpy", **io_map()) \
            .write_parquet(str(tmp), **io_write())
        rows = parquet_rows(tmp)
        if rows != preds_manifest["rows"]:
            raise RuntimeError(f"combine: wrote {rows} rows for {preds_manifest['rows']} predictions")
    # Each teacher's estimated share of the pool: the owners' model's, else its share of the selections.
    estimated = dict(zip(space.teachers, map(float, shares))) if shares is not None else \
        selected_shares(counts, space.teachers)
    report = supervision(counts, space.teachers)
    if report is not None:
        report = {"strategy": cfg.integration.strategy, **report}
        for t, v in report["per_teacher"].items():
            v["estimated_share"] = estimated[t]
        write_json_atomic(run_dir / "supervision.json", report)
        log.debug("supervision: target acc %.3f, selection acc %.3f (MC %.3f vs entropy %.3f)",
                 report["target_accuracy"], report["selection_accuracy"], report["mc"]["selection_accuracy"],
                 report["entropy"]["selection_accuracy"])
    mean_weight = 1.0 if mean else counts["weight"] / max(counts["rows"], 1)
    return finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=rows, started=started,
                        extra={"mean_weight": mean_weight, "supervision": report, "estimated_shares": estimated,
                               "shares_from": "owners" if shares is not None else "selections",
                               **({"refine": rounds} if rounds else {})})


def embedding_stage(cfg: RunConfig) -> tuple:
    """(EmbeddingSpec, map_batches options) of the prototypes' embedding pass."""
    p = cfg.integration.prototypes
    trusted = cfg.student if p.model is None else None  # the student's own model: its load settings apply
    spec = EmbeddingSpec(model_path=str(prototypes_model(cfg)), max_length=p.max_length,
                         threads=p.resources.actor_threads,
                         trust_remote_code=bool(trusted and trusted.trust_remote_code),
                         allow_pickle=bool(trusted and trusted.allow_pickle))
    return spec, actor_options(cfg, p.resources)


# ------------------------------------------------------------------ student
def train_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """Train the student on RUN_DIR/targets and export RUN_DIR/student/ (best dev epoch)."""
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
    strategy = STRATEGIES[cfg.integration.strategy]
    model_path = str(resolve_model_path(s.model))
    probs = [column(t, "probs") for t in space.teachers]
    keep = ["id", "text", "target", "weight"]  # id: not trained on (the test-only row trace reads it)
    keep += probs if "teacher_probs" in strategy.columns else []
    keep += ["gold"] if "gold" in strategy.columns else []
    train_ds = tokenize(ray.data.read_parquet(str(run_dir / "targets" / "data"), columns=keep, **io_read()),
                        model_path, s.max_length, s.trust_remote_code)
    init_from = warm_start_folder(s.init_from, space.names) if s.init_from else None
    init_head, probe = None, None
    if init_from and s.head_probe_rows and set(space.names) - set(label_names(init_from)):
        init_head = stage_dir / "warm_head.safetensors"
        probe = probe_warm_head(ray.data.read_parquet(str(run_dir / "targets" / "data"), **io_read()),
                                init_from=init_from, labels=list(space.names),
                                rows=min(s.head_probe_rows, targets_manifest["rows"]),
                                out_path=init_head, options=actor_options(cfg, s.eval_resources),
                                max_length=s.max_length, threads=s.eval_resources.actor_threads,
                                trust_remote_code=s.trust_remote_code)
    metrics = train_classifier(
        s, model_path=model_path, labels=list(space.names), loss=strategy.loss, train_ds=train_ds,
        dev_ds=labeled(cfg, cfg.data.dev, space.names, "data.dev"), rows=targets_manifest["rows"],
        run_dir=run_dir, out_dir=run_dir / "student", storage_path=cfg.ray.storage_path,
        # The Ray Train run name pins config and inputs: an identical rerun resumes its checkpoints.
        name=f"student-{fingerprint([config_hash, inputs])}", progress="train",
        parts={t: p.tolist() for t, p in zip(space.teachers, space.positions)},
        trust_remote_code=s.trust_remote_code, allow_pickle=s.allow_pickle,
        loss_context={"kd_temperature": cfg.integration.kd_temperature,
                      "positions": [p.tolist() for p in space.positions], "prob_columns": probs},
        init_from=init_from, init_head=str(init_head) if init_head else None)
    metrics["strategy"] = cfg.integration.strategy
    if probe:
        metrics["head_probe"] = probe
    log.debug("student: dev accuracy %.4f (epoch %s)", metrics["dev_accuracy"], metrics["best_epoch"])
    return finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=targets_manifest["rows"],
                        started=started, extra={"metrics": metrics})


def evaluate_stage(cfg: RunConfig, space: LabelSpace, run_dir: Path) -> dict:
    """RUN_DIR/metrics.json: the exported student's test accuracy (union and per teacher) + dev figures."""
    started = time.time()
    run_dir = Path(run_dir).resolve()
    config_hash, inputs = stage_keys(cfg, space, run_dir, "evaluate")
    stage_dir = begin_stage(run_dir / "evaluate")
    metrics = dict(read_manifest(run_dir / "train")["metrics"])
    s = cfg.student
    grown = growth(s.init_from, space) if s.init_from else None
    groups = {g: [space.index[n] for n in grown[f"{g}_labels"]] for g in ("old", "new")} if grown else None
    if cfg.data.test is not None:
        metrics.update(evaluate_dataset(run_dir / "student", labeled(cfg, cfg.data.test, space.names, "data.test"),
                                        space, max_length=s.max_length, options=actor_options(cfg, s.eval_resources),
                                        threads=s.eval_resources.actor_threads,
                                        trust_remote_code=s.trust_remote_code, groups=groups))
    if grown:  # forgetting: the old labels before (the previous run) and after, and the new labels
        per_group = metrics.pop("test_accuracy_per_group", {})
        metrics["growth"] = {**grown, "old_labels_accuracy": per_group.get("old"),
                             "new_labels_accuracy": per_group.get("new")}
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.debug("student: test accuracy %s", metrics.get("test_accuracy"))
    return finish_stage(stage_dir, config_hash=config_hash, inputs=inputs, rows=None, started=started,
                        extra={"metrics": metrics})


STAGE_FUNCTIONS = {"pool": pool_stage, "prepare": prepare_stage, "predictions": predict_stage,
                   "targets": combine_stage, "train": train_stage, "evaluate": evaluate_stage}


def run(cfg: RunConfig, space: LabelSpace, run_dir: Path, force: tuple[str, ...] = ()) -> dict:
    """Chain the stages, skipping each one whose config section and inputs are unchanged."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    done = {}
    if cfg.integration.ignored:
        log.info("integration: %s ignores %s (they re-select teachers by score: score-based strategies only)",
                 cfg.integration.strategy, ", ".join(cfg.integration.ignored))
    for stage in STAGES[:-1]:
        if stage == "prepare" and cfg.prepare is None:
            continue
        config_hash, inputs = stage_keys(cfg, space, run_dir, stage)
        if stage not in force and is_current(run_dir / stage, config_hash, inputs):
            log.info("%-12s up to date (skipped)", stage)
            done[stage] = {"skipped": True, **read_manifest(run_dir / stage)}
            continue
        log.info("%-12s started", stage)
        done[stage] = {"skipped": False, **STAGE_FUNCTIONS[stage](cfg, space, run_dir)}
        log.info("%-12s done in %.0f s: %s", stage, done[stage]["wall_time_s"],
                 stage_headline(stage, done[stage], cfg))
    done["report"] = {"skipped": False, **write_report(cfg, space, run_dir)}
    return done
