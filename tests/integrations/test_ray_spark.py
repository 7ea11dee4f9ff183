"""The Ray Train and Spark TorchDistributor examples run (stage 3 under Ray, stage 2 under
Spark), match single-process AdamW, and resume exactly through each framework's own
checkpoint mechanism."""

import sys

import numpy as np

from tests.integrations.launch import ROOT, read_json, require, run


def _reference(steps: int) -> list[float]:
    sys.path.insert(0, str(ROOT / "examples"))
    import tiny_task

    return tiny_task.adamw_reference(steps)


def test_ray_train_example(tmp_path):
    require("ray.train.torch")
    out = tmp_path / "ray.json"
    run([sys.executable, "examples/ray_train.py", "--stage", "3", "--out", str(out),
         "--storage", str(tmp_path / "storage")], timeout=900)  # fmt: skip
    r = read_json(out)
    np.testing.assert_allclose(r["losses"], _reference(10), rtol=1e-5)
    assert r["resumed"] == r["losses"][5:]
    # one zeroshard checkpoint, merged by Ray from each worker's own folder
    assert r["checkpoint_files"] == ["ckpt/manifest.json", "ckpt/rank00000.safetensors",
                                     "ckpt/rank00001.safetensors", "latest"]  # fmt: skip


def test_spark_torch_distributor_example(tmp_path):
    require("pyspark")
    out = tmp_path / "spark.json"
    run([sys.executable, "examples/spark_train.py", "--stage", "2", "--out", str(out),
         "--save-dir", str(tmp_path / "ckpt")], timeout=900)  # fmt: skip
    r = read_json(out)
    np.testing.assert_allclose(r["losses"], _reference(10), rtol=1e-5)
    assert r["resumed"] == r["losses"][5:]
