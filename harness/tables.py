"""Comparison tables in the seed's style: one per task (and mode, data, batch size), a row
per framework, a column per device ("CPU (model, cores, threads)" or "GPU / CUDA / cuDNN"), each
cell the median with its spread. Written as Markdown and CSV."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.precision import PRECISIONS
from bench.result import Result, write_text_atomic
from bench.specs import CEILING, COMPILE_PROFILES, GEMM_CEILING, FRAMEWORK_SPECS, FRAMEWORKS, INFER, MULTILABEL, task_spec

from .rows import ResultRow, rows_of

GEMM_TASK = GEMM_CEILING.name

# A result is marked unstable when its median is not a number to compare at the precision the
# tables print: its 95% interval wider than the ±target_ci its calibrated timing asked for; for a
# result without one (full mode, results before schema 5), timings whose coefficient of
# variation is above UNSTABLE_CV.
UNSTABLE_CV = 0.05


@dataclass
class Table:
    name: str  # file stem
    title: str
    description: str
    display: pd.DataFrame  # framework x device, formatted text
    numbers: pd.DataFrame  # framework x device, the median (seconds) or NaN
    notes: list[str]
    q1: pd.DataFrame  # framework x device, the first and third quartiles (seconds) or NaN
    q3: pd.DataFrame
    unit: str  # what the numbers are: "seconds per step", "seconds per 1,000 images", ...
    higher_is_better: bool = False  # a rate (examples per joule) rather than a time

    def markdown(self) -> str:
        parts = [f"### {self.title}", "", self.description, "",
                 self.display.to_markdown(tablefmt="github"), ""]
        parts += [f"{note}  " for note in self.notes]
        return "\n".join(parts).rstrip() + "\n"


def _device_key(row: ResultRow) -> tuple[str, str, int, str]:
    """Where a result ran, as (device kind, device, devices, launcher): one column each."""
    where = "published" if row.published else (row.launcher or "?")
    device = row.device_label(threads=True)
    if row.cell.device == "gpu":
        device = f"{device}|{row.cell.cuda}"
    return (row.cell.device, device, row.cell.devices, where)


def _column_labels(rows: pd.DataFrame) -> dict[tuple[str, str, int, str], str]:
    """CPU columns read "CPU (model, N cores[, M threads])"; GPU columns "GPU / CUDA x / cuDNN y" when all
    frameworks in the column report the same versions, else "GPU / CUDA <asked>". Results of more
    than one launcher (docker images, local environments) get a column each, named so."""
    labels = {}
    measured_here = rows[rows["published_year"].isna()]
    several_launchers = measured_here["device_key"].map(lambda key: key[3]).nunique() > 1
    for key, group in rows.groupby("device_key", sort=False):
        kind, name, devices, launcher = key
        where = f", {launcher} backend" if several_launchers else ""
        if not pd.isna(group["published_year"].iloc[0]):
            where = f" (published {int(group['published_year'].iloc[0])}, {group['published_data'].iloc[0]} data)"
        if kind == "cpu":
            split = f" split in {devices} devices" if devices > 1 else ""
            labels[key] = f"{name}{split}{where}"
            continue
        gpu, asked = name.split("|", 1)
        count = f"{devices} × " if devices > 1 else ""
        versions = {(c, d) for c, d in zip(group["cuda"], group["cudnn"]) if c}
        if len(versions) == 1:
            cuda, cudnn = versions.pop()
            labels[key] = f"{count}{gpu} / CUDA {cuda} / cuDNN {cudnn}{where}"
        else:
            labels[key] = f"{count}{gpu} / CUDA {asked}{where}"
    return labels


def results_frame(results: list[Result]) -> pd.DataFrame:
    """One row per result with the numbers the tables need (times in seconds)."""
    rows = []
    for row in rows_of(results):
        result, cell, summary = row.result, row.cell, row.headline  # inference: seconds per 1,000 images
        metrics, model, settings = result.metrics, result.model, result.settings
        score = metrics and (metrics.test_accuracy or metrics.test_roc_auc)
        rows.append({
            "task": cell.task, "mode": cell.mode, "data": cell.data, "batch_size": cell.batch_size,
            "devices": cell.devices, "input_shape": "×".join(str(n) for n in cell.input_shape),
            "framework": cell.framework, "precision": cell.precision,
            "device_key": _device_key(row), "status": result.status, "error": result.error,
            "median_s": summary.median if summary else None, "q1_s": summary.q1 if summary else None,
            "q3_s": summary.q3 if summary else None, "min_s": summary.min if summary else None,
            "max_s": summary.max if summary else None, "samples": len(summary.values) if summary else 0,
            "ci95_low_s": summary.ci95[0] if summary and summary.ci95 else None,
            "ci95_high_s": summary.ci95[1] if summary and summary.ci95 else None,
            "cv": summary.cv if summary else None,
            "compile": cell.compile,
            **_timing(settings),
            **_fields(metrics, "time_to_first_step_s", "import_s", "build_s", "first_step_s"),
            "first_epoch_s": metrics.first_epoch_s.median if metrics and metrics.first_epoch_s else None,
            **_fields(metrics, "throughput_per_s", "tflops_per_s", "device_memory_peak_bytes",
                      "device_memory_source", "host_peak_rss_bytes", "energy_j_per_example"),
            **_fields(metrics and metrics.gpu_state, "sm_clock_mhz_median", "max_sm_clock_mhz", "power_w_median"),
            "examples_per_joule": row.examples_per_joule, "throttled": _throttled_text(row),
            **_fields(model, "parameters", "expected_parameters"),
            "parameter_note": model.note if model else None,
            **_fields(settings, "steps", "repeats", "warmup_steps", "epochs", "train_examples"),
            "math_modes": row.math_modes,
            "peak_tflops_per_s": row.peak_tflops_per_s,
            "score": score.median if score else None,
            "score_name": "acc" if metrics and metrics.test_accuracy else "ROC-AUC",
            "cuda": row.cuda, "cudnn": row.cudnn, "framework_version": row.framework_version,
            "launcher": row.launcher, "bench_hash": row.bench_hash, "cells_at_once": row.cells_at_once,
            "ptx_jit": row.ptx_jit,
            "host": row.host,
            "published_year": row.published.year if row.published else None,
            "published_data": cell.data,  # the data the numbers were published for
            "cell_id": cell.id,
            "finished_utc": row.finished_utc,
        })
    return with_ceilings(pd.DataFrame(rows)) if rows else pd.DataFrame(rows)


def _throttled_text(row: ResultRow) -> str:
    """The slowdowns seen in the timed blocks, each with the share of readings it held ("" for none)."""
    share = row.result.metrics.gpu_state.throttle_reasons if row.throttled else {}
    return ", ".join(f"{reason.replace('_', ' ')} in {share[reason]:.0%} of readings" for reason in row.throttled)


def _timing(settings: object | None) -> dict[str, object]:
    """Calibrated timing's target and what it reached (None each without it)."""
    timing = settings.timing if settings is not None else None
    return {"target_ci": timing.target_ci if timing else None,
            "ci_half_width": timing.ci_half_width if timing else None,
            "stopped_by": timing.stopped_by if timing else None,
            # One block has no interval to judge: like any single timing, not marked.
            "unstable_by_target": None if timing is None or timing.ci_half_width is None
            else not timing.target_reached}


def with_ceilings(frame: pd.DataFrame) -> pd.DataFrame:
    """Each result with the measured matrix-multiply ceiling of its device and precision (the
    ``gemm_ceiling`` cell of the same device column; bench/ceiling.py) in ``ceiling_tflops_per_s``:
    per device, times the devices of a data-parallel GPU cell (CPU devices split one CPU)."""
    ceilings = frame[(frame["task"] == GEMM_TASK) & (frame["status"] == "ok")]
    rate = {(_ceiling_key(row), row.precision): row.tflops_per_s for row in ceilings.itertuples()}
    return frame.assign(ceiling_tflops_per_s=[
        rate.get((_ceiling_key(row), row.precision), float("nan"))
        * (row.devices if row.device_key[0] == "gpu" else 1) for row in frame.itertuples()])


def _ceiling_key(row) -> tuple[str, str, str]:
    kind, device, _, launcher = row.device_key
    return (kind, device, launcher)


def _fields(part: object | None, *names: str) -> dict[str, object]:
    """The named fields of a result's part (metrics, model, settings); None each without it."""
    return {name: getattr(part, name) if part is not None else None for name in names}


def _work(row: pd.Series) -> str:
    """Achieved TFLOP/s, with the fractions of the measured matrix-multiply ceiling and, on a
    GPU whose datasheet peak is known, of that peak."""
    if pd.isna(row.tflops_per_s):
        return ""
    fractions = []
    if not pd.isna(row.ceiling_tflops_per_s):
        fractions.append(f"{row.tflops_per_s / row.ceiling_tflops_per_s:.0%} of measured ceiling")
    if not pd.isna(row.peak_tflops_per_s):
        fractions.append(f"{row.tflops_per_s / row.peak_tflops_per_s:.0%} of {row.precision} datasheet peak")
    return f", {row.tflops_per_s:.3g} TFLOP/s" + (f" ({', '.join(fractions)})" if fractions else "")


def _first_step(row: pd.Series) -> str:
    """The time to the first step (import, build, compile, first step); in full mode the first
    epoch too, which the training time includes."""
    if pd.isna(row.time_to_first_step_s):
        return ""
    text = f"; first step after {row.time_to_first_step_s:.1f} s"
    if not pd.isna(row.first_epoch_s):
        text += f", first epoch {row.first_epoch_s:.1f} s"
    return text


def _energy(row: pd.Series, item: str) -> str:
    """Examples per joule, the energy of one, and a GPU's median power in the timed blocks."""
    text = f"{_rate(row.examples_per_joule)} {item}/J, {row.energy_j_per_example * 1e3:.3g} mJ each"
    return text + (f", {row.power_w_median:.0f} W median" if not pd.isna(row.power_w_median) else "")


def _unit(task: str, mode: str) -> str:
    spec = task_spec(task)
    if spec.kind == CEILING:
        return "seconds per matrix product"
    if spec.kind == INFER:
        return f"seconds per 1,000 {spec.item}"
    return "seconds per training step" if mode == "throughput" else "seconds of training"


def _rate(per_second: float) -> str:
    """Three significant figures at most, but never fewer than the integer part."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def _format(row: pd.Series, item: str) -> str:
    if row.status != "ok":
        return row.status
    if row.task == GEMM_TASK:
        text = f"{row.tflops_per_s:.3g} TFLOP/s"
        if not pd.isna(row.peak_tflops_per_s):
            text += f" ({row.tflops_per_s / row.peak_tflops_per_s:.0%} of {row.precision} datasheet peak)"
        return text
    if task_spec(row.task).kind == INFER:
        text = (f"{row.median_s:.2f} s [{row.q1_s:.2f}–{row.q3_s:.2f}], "
                f"{_rate(row.throughput_per_s)} {item}/s")
    elif row["mode"] == "throughput":
        text = (f"{row.median_s * 1e3:.1f} ms [{row.q1_s * 1e3:.1f}–{row.q3_s * 1e3:.1f}], "
                f"{_rate(row.throughput_per_s)} {item}/s")
    else:
        spread = f" [{row.q1_s:.1f}–{row.q3_s:.1f}]" if row.samples > 1 else ""
        text = f"{row.median_s:.1f} s{spread}"
        if not pd.isna(row.score):
            text += f", {row.score_name} {row.score:.3f}"
    return text + _work(row) + _first_step(row)


def _describe(task: str, mode: str, data: str, batch_size: int, input_shape: str,
              group: pd.DataFrame) -> str:
    def values(column: str) -> str:
        present = sorted(int(v) for v in group[column].dropna().unique())
        if len(present) > 2:
            return f"{present[0]}–{present[-1]}"
        return "/".join(str(v) for v in present) or "?"

    spec = task_spec(task)
    if spec.kind == CEILING:
        return (f"The measured ceiling: the fastest dense matrix multiply of the framework named, over square "
                f"matrices up to {input_shape} (bench/ceiling.py), in TFLOP/s; the other tables give each cell's "
                f"TFLOP/s as a fraction of it.")
    if spec.kind == INFER and mode == "throughput":
        what = (f"Seconds per 1,000 {spec.item} (the seed's unit), median [interquartile range] over "
                f"{values('repeats')} timed blocks of {values('steps')} batches after "
                f"{values('warmup_steps')} warm-up batches, and {spec.item} per second")
    elif spec.kind == INFER:
        what = (f"Seconds per 1,000 {spec.item} over {spec.timed_batches} batches after one untimed "
                f"batch (the seed's protocol), median [interquartile range] over {values('repeats')} runs")
    elif mode == "throughput":
        what = (f"Median time per training step [interquartile range] over {values('repeats')} timed blocks "
                f"of {values('steps')} steps after {values('warmup_steps')} warm-up steps, "
                f"and {spec.item} per second at the median")
    else:
        score = "test accuracy with dropout off" if spec.kind != MULTILABEL else "mean test ROC-AUC"
        what = (f"Training time for {values('epochs')} epochs, median [interquartile range] over "
                f"{values('repeats')} runs, then {score}")
    per_device = " per device" if spec.data_parallel else ""
    return (f"{what}; batch {batch_size}{per_device}; inputs {input_shape}; {data} data. The time to the first "
            f"step counts the framework's import, the model's build and the first step (compiling included).")


def build_tables(results: list[Result], mixed_bench: bool = False,
                 reference: Sequence[Result] = ()) -> tuple[list[Table], list[str]]:
    """Tables, plus notes about results that were left out: duplicates, and results measured
    by other bench code than the newest result's (compared only when ``mixed_bench``).
    ``reference`` results (published numbers) join the tables of the same task, mode, batch
    and input that fresh results make, a column per published device. The steps: filter,
    join, then per table annotate and pivot."""
    frame, dropped = comparable(results_frame(results), mixed_bench)
    if frame.empty:
        return [], dropped
    if reference:
        frame = with_published(frame, results_frame(list(reference)))
    labels = _column_labels(frame)
    tables = []
    for (task, mode, data, batch_size, input_shape), group in frame.groupby(
            ["task", "mode", "data", "batch_size", "input_shape"], sort=True):
        spec = task_spec(task)
        group = group.assign(row=_row_labels(group))
        display, notes = annotate(group, labels, spec.item)
        shown, numbers, q1, q3 = pivot(group.assign(display=display), labels)
        title = f"{task}: {spec.title} ({mode} mode)" if spec.kind != CEILING else f"{task}: {spec.title}"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{task}-{mode}-{data}-batch{batch_size}-{input_shape.replace('×', 'x')}")
        tables.append(Table(name, title, _describe(task, mode, data, batch_size, input_shape, group),
                            shown.fillna("–"), numbers, notes, q1, q3, _unit(task, mode)))
        measured = group[group["examples_per_joule"].notna()]
        if not measured.empty:
            title = f"{task}: {spec.item} per joule ({spec.item}/s per W), {mode} mode"
            tables.append(energy_table(measured, labels, name, title, spec.item))
    return tables, dropped


def energy_table(group: pd.DataFrame, labels: dict, name: str, title: str, item: str) -> Table:
    """The examples per joule (examples/s per W) of the results of table ``name`` whose GPUs'
    energy was read, in a table of its own (higher is better). One figure per result: no quartiles."""
    shown, numbers = pivot(group.assign(display=group.apply(lambda row: _energy(row, item), axis=1)), labels,
                           ("display", "examples_per_joule"))
    description = (f"{item.capitalize()} per joule of the GPUs' energy over the timed blocks, that is {item} per "
                   f"second per watt (higher is better): their energy counters read at each block's start and end, "
                   f"the pauses between blocks left out; then the energy of one, and a GPU's median power draw.")
    no_spread = numbers * float("nan")
    return Table(f"{name}-energy", title, description, shown.fillna("–"), numbers, [], no_spread, no_spread,
                 f"{item} per joule ({item}/s per W)", higher_is_better=True)


def comparable(frame: pd.DataFrame, mixed_bench: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Filter: the results to compare, newest first wins, and why each other one was left out:
    measured by other bench code than the newest result's (kept when ``mixed_bench``), or an
    older result of the same framework and precision on the same device."""
    if frame.empty:
        return frame, []
    dropped = []
    frame = frame.sort_values("finished_utc")
    measured = frame[frame["status"] == "ok"]
    if not mixed_bench and not measured.empty:
        newest_bench = measured["bench_hash"].iloc[-1]
        other = (frame["status"] == "ok") & (frame["bench_hash"] != newest_bench)
        dropped += [f"{row.cell_id}: measured by other bench code (hash {str(row.bench_hash)[:12]}, the newest "
                    f"result's is {str(newest_bench)[:12]}), not compared; pass --mixed-bench to compare anyway"
                    for row in frame[other].itertuples()]
        frame = frame[~other]
    place = ["task", "mode", "data", "batch_size", "input_shape", "framework", "precision", "compile", "device_key"]
    duplicated = frame.duplicated(place, keep="last")
    dropped += [f"{row.cell_id}: an older duplicate, not shown" for row in frame[duplicated].itertuples()]
    return frame[~duplicated], dropped


def with_published(fresh: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Join: the fresh rows and, for each table they make, the published rows of the same task,
    mode, batch and input and the same work (epochs over as many training examples). Where
    numbers were published for the table's kind of data they are used, else those of real data
    (held in memory, as synthetic data is); each keeps its own data in its column's label."""
    chosen = []
    keys = ["task", "mode", "data", "batch_size", "input_shape", "epochs", "train_examples"]
    # None (inference has no training examples) must equal None.
    matching, candidates = (frame.assign(train_examples=frame["train_examples"].fillna(-1))
                            for frame in (fresh, published))
    for key in matching[matching["status"] == "ok"][keys].drop_duplicates().itertuples(index=False):
        same = published[(candidates["task"] == key.task) & (candidates["mode"] == key.mode)
                         & (candidates["batch_size"] == key.batch_size)
                         & (candidates["input_shape"] == key.input_shape) & (candidates["epochs"] == key.epochs)
                         & (candidates["train_examples"] == key.train_examples)]
        same_data = same[same["data"] == key.data]
        rows = same_data if not same_data.empty else same[same["data"] == "real"]
        chosen.append(rows.assign(data=key.data))
    return pd.concat([fresh, *chosen], ignore_index=True)


def annotate(group: pd.DataFrame, labels: dict, item: str) -> tuple[pd.Series, list[str]]:
    """Annotate: each row's text (median, spread, rate) with its marks, and the table's notes:
    cells that did not run, † a parameter count other than the task's, ⚠ unstable timings,
    ‡ a host shared with other cells, § GPU code compiled from PTX by the driver, ♨ a GPU
    throttled while the blocks were timed, and the hosts when results come from several."""
    notes: list[str] = []
    display = group.apply(lambda row: _format(row, item), axis=1)
    for index, row in group.iterrows():
        where = labels[row.device_key]
        if row.status != "ok":
            notes.append(f"{row.row}, {where}: {row.status}: {str(row.error).splitlines()[0]}")
            continue
        if not pd.isna(row.parameters) and row.parameters != row.expected_parameters:
            reason = f": {row.parameter_note}" if row.parameter_note else ""
            notes.append(f"† {row.row}: {int(row.parameters):,} trainable parameters, "
                         f"the task specifies {int(row.expected_parameters):,}{reason}")
            display[index] += " †"
        if is_unstable(row):
            interval = (f"95% interval of the median {row.ci95_low_s / row.median_s - 1:+.1%} to "
                        f"{row.ci95_high_s / row.median_s - 1:+.1%}")
            if row.unstable_by_target is None:
                why = (f"the {int(row.samples)} timings vary by {row.cv:.0%} (coefficient of variation; above "
                       f"{UNSTABLE_CV:.0%}), {interval}")
            else:
                why = (f"{interval} after {int(row.samples)} timed blocks ({row.stopped_by.replace('_', ' ')} "
                       f"reached), wider than the ±{row.target_ci:.0%} asked; the timings vary by {row.cv:.0%}")
            notes.append(f"⚠ {row.row}, {where}: unstable: {why}")
            display[index] += " ⚠"
        if row.cells_at_once > 1:
            notes.append(f"‡ {row.row}, {where}: ran with up to {int(row.cells_at_once)} cells at once on its "
                         f"host, one per GPU, sharing its CPUs (--serial runs one at a time)")
            display[index] += " ‡"
        if row.ptx_jit:
            notes.append(f"§ {row.row}, {where}: its image has no native code for this GPU; the driver "
                         f"compiled the build's PTX when the cell started (in its time to the first step)")
            display[index] += " §"
        if row.throttled:
            clock = (f"; SM clock median {row.sm_clock_mhz_median:,.0f} of {row.max_sm_clock_mhz:,.0f} MHz"
                     if not pd.isna(row.sm_clock_mhz_median) and not pd.isna(row.max_sm_clock_mhz) else "")
            notes.append(f"♨ {row.row}, {where}: throttled while timed: {row.throttled}{clock}")
            display[index] += " ♨"
    ran = group[(group["status"] == "ok") & group["host"].notna()]
    if ran["host"].nunique() > 1:  # results of a cluster's nodes, or of several hosts merged
        notes.append("ran on " + "; ".join(f"{labels[key]}: {', '.join(sorted(set(hosts)))}"
                                           for key, hosts in ran.groupby("device_key", sort=False)["host"]))
    return display, notes


def is_unstable(row: pd.Series) -> bool:
    """Whether a successful result's median is too uncertain to compare (see UNSTABLE_CV); a
    ceiling is the fastest of its calls, not a median."""
    if row.task == GEMM_TASK:
        return False
    if row.unstable_by_target is not None and not pd.isna(row.unstable_by_target):
        return bool(row.unstable_by_target)
    return row.cv is not None and not pd.isna(row.cv) and row.cv > UNSTABLE_CV


def pivot(group: pd.DataFrame, labels: dict, values: tuple[str, ...] = ("display", "median_s", "q1_s", "q3_s"),
          ) -> tuple[pd.DataFrame, ...]:
    """Pivot: framework rows by device columns, of the ``values`` columns: the ``display`` text and
    the median, first and third quartile (seconds). Rows in the order frameworks and precisions are
    listed in the specs, not alphabetically; columns in the order the results came."""
    columns = [labels[key] for key in dict.fromkeys(group["device_key"])]
    layout = group.assign(column=group["device_key"].map(labels))
    ordered = group.assign(order=group["framework"].map(_framework_order),
                           precision_order=group["precision"].map(PRECISIONS.index),
                           compile_order=group["compile"].map(COMPILE_PROFILES.index))
    rows = list(dict.fromkeys(ordered.sort_values(["order", "framework", "precision_order", "compile_order"])["row"]))
    frames = tuple(layout.pivot(index="row", columns="column", values=value).reindex(index=rows, columns=columns)
                   for value in values)
    for frame in frames:
        frame.index.name, frame.columns.name = "framework", None
    return frames


def _framework_order(framework: str) -> int:
    return FRAMEWORKS.index(framework) if framework in FRAMEWORKS else len(FRAMEWORKS)


def _row_labels(group: pd.DataFrame) -> pd.Series:
    """A row per framework; per framework and precision ("pytorch, bf16") once a table holds
    another precision than fp32; per compile profile ("pytorch, compiled") once it holds
    compiled cells, where a framework whose default compiles is labelled so ("jax, compiled
    by default") rather than run twice."""
    labels = group["framework"]
    if set(group["precision"]) != {"fp32"}:
        labels = labels + ", " + group["precision"]
    if "compiled" in set(group["compile"]):
        by_default = group["framework"].map(lambda name: name in FRAMEWORK_SPECS and
                                            FRAMEWORK_SPECS[name].compiles_by_default)
        labels = labels + group["compile"].where(~by_default, "compiled by default").map(
            lambda profile: f", {profile}")
    return labels


def write_tables(tables: list[Table], results: list[Result], folder: Path) -> Path:
    """tables/<name>.md and .csv per table, all cells in cells.csv, everything in README.md."""
    folder.mkdir(parents=True, exist_ok=True)
    for table in tables:
        write_text_atomic(folder / f"{table.name}.md", table.markdown())
        write_text_atomic(folder / f"{table.name}.csv", table.numbers.to_csv())
    write_text_atomic(folder / "cells.csv", results_frame(results).drop(columns=["device_key"]).to_csv(index=False))
    summary = folder / "README.md"
    write_text_atomic(summary, "\n".join(table.markdown() for table in tables) or "No results.\n")
    return summary
