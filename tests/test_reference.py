"""The published reference numbers: a result set marked as published, shown beside fresh
results of the same protocol and never mistaken for a measurement made here."""
from __future__ import annotations

import pytest

from bench.result import Result
from conftest import result_payload
from harness.matrix import MatrixError, load_yaml
from harness.reference import ReferenceSet, published_results
from harness.tables import build_tables


def test_the_seed_tables_are_all_there_in_the_seeds_units():
    published = {(r.cell.task, r.cell.framework, r.cell.gpu, r.cell.devices, r.cell.data): r
                 for r in published_results()}
    cnn = published[("cnn_cifar10", "pytorch", "Tesla P100", 1, "real")]
    assert cnn.metrics.train_time_s.median == 51 and cnn.cell.mode == "full" and cnn.env["published"]["year"] == 2018
    resnet = published[("resnet50_inference", "tensorflow", "Tesla K80", 1, "real")]
    assert resnet.metrics.seconds_per_1000.median == 6.5 and resnet.cell.batch_size == 32
    densenet = published[("densenet121_xray", "chainer", "Tesla V100", 4, "synthetic")]
    assert densenet.metrics.train_time_s.median == 7 * 60 and densenet.env["cuda"] == "9.0"
    assert ("resnet50_inference", "mxnet", "Tesla K80", 1, "real") not in published  # "–" in the seed
    assert len(published) == 12 + 11 + 8 + 20


def fresh_full_cnn(framework="pytorch", epochs=10, train_examples=50_000):
    payload = result_payload(framework, device="gpu", gpu_name="NVIDIA H200", cuda="13.0", cudnn="9",
                             mode="full", step_times=(25.7,))
    payload["settings"].update(epochs=epochs, train_examples=train_examples)
    return Result.from_dict(payload)


def test_published_columns_join_the_tables_of_their_protocol_only():
    throughput = Result.from_dict(result_payload("pytorch"))
    tables, dropped = build_tables([fresh_full_cnn(), throughput], reference=published_results())
    by_mode = {table.title.split("(")[-1]: table for table in tables}
    full, fast = by_mode["full mode)"], by_mode["throughput mode)"]
    assert list(full.display.columns) == [
        "NVIDIA H200 / CUDA 13.0 / cuDNN 9", "Tesla K80 / CUDA 8.0 / cuDNN 6 (published 2018, real data)",
        "Tesla P100 / CUDA 8.0 / cuDNN 6 (published 2018, real data)"]
    assert full.display.loc["pytorch", "Tesla P100 / CUDA 8.0 / cuDNN 6 (published 2018, real data)"] == "51.0 s"
    assert full.display.loc["cntk", "Tesla K80 / CUDA 8.0 / cuDNN 6 (published 2018, real data)"] == "163.0 s"
    assert len(fast.display.columns) == 1 and not dropped  # published results are not "other bench code"
    assert len(tables) == 2  # no table of published numbers alone


def test_published_numbers_stay_out_of_tables_of_other_work():
    # The parity check's 5 epochs over 1,437 digits is full mode too, but not the seed's run.
    (table,), _ = build_tables([fresh_full_cnn(epochs=5, train_examples=1_437)], reference=published_results())
    assert list(table.display.columns) == ["NVIDIA H200 / CUDA 13.0 / cuDNN 9"]


def test_a_reference_file_naming_an_unknown_device_says_so(tmp_path):
    bad = tmp_path / "ref.yml"
    bad.write_text("source: x\nyear: 2020\ndevices:\n  a100: {gpu: A100, cuda: '11.0', cudnn: '8'}\n"
                   "timings:\n  - task: cnn_cifar10\n    unit: s\n    values:\n      pytorch: {v100: 20}\n")
    with pytest.raises(MatrixError, match="no device named v100 under devices"):
        load_yaml(bad, ReferenceSet)
