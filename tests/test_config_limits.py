"""Config validation at the edges: unknown keys at every depth (inside an inert offload
section too), bounded nesting, sane numeric ranges, finite floats, integers that reject 2.0
while the sizes DeepSpeed writes as 5e8 are accepted; one message each naming the key path,
the value and what is allowed."""

from __future__ import annotations

import json

import pytest

from zeroshard.config import ConfigError, load_config

MAX_DEPTH = 32  # zeroshard.config.MAX_DEPTH

BAD = [
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "none", "nvme_pathh": "/x"}}},
     "`zero_optimization.offload_param.nvme_pathh` is an unknown key; did you mean "
     "`zero_optimization.offload_param.nvme_path`?; allowed keys in "
     "`zero_optimization.offload_param`: device, nvme_path"),
    ({"zero_optimization": {"offload_optimizer": {"device": "none", "pin_memroy": True}}},
     "`zero_optimization.offload_optimizer.pin_memroy` is an unknown key; did you mean "
     "`zero_optimization.offload_optimizer.pin_memory`?"),
    ({"zero_optimization": {"reduce_bucket_size": 10**30}},
     "`zero_optimization.reduce_bucket_size` = 1000000000000000000000000000000: must be at "
     "most 1000000000000 (1e+12)"),
    ({"zero_optimization": {"reduce_bucket_size": 1e30}},
     "`zero_optimization.reduce_bucket_size` = 1e+30: must be at most 1000000000000 (1e+12)"),
    ({"zero_optimization": {"stage3_max_live_parameters": 2e12}},
     "`zero_optimization.stage3_max_live_parameters` = 2000000000000.0: must be at most "
     "1000000000000"),
    ({"gradient_clipping": float("inf")},
     "`gradient_clipping` = Infinity: must be a finite number"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": float("nan")}}},
     "`optimizer.params.lr` = NaN: must be a finite number"),
    ({"train_batch_size": 2**62},
     "`train_batch_size` = 4611686018427387904: must be at most 2147483647"),
    ({"zero_optimization": {"stage": 2.0}},
     "`zero_optimization.stage` = 2.0: must be an integer, not the float 2.0 (write 2)"),
    ({"fp16": {"enabled": True, "initial_scale_power": 16.0}},
     "`fp16.initial_scale_power` = 16.0: must be an integer, not the float 16.0 (write 16)"),
    ({"zero_optimization": {"allgather_bucket_size": 1e8 + 0.5}},
     "`zero_optimization.allgather_bucket_size` = 100000000.5: must be a whole number, got a "
     "fractional part"),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_value_one_clear_message(case):
    config, message = BAD[case]
    with pytest.raises(ConfigError) as info:
        load_config(config, world_size=1)
    assert len(info.value.problems) == 1, info.value.problems
    assert message in str(info.value), str(info.value)


def test_float_written_sizes_accepted():
    zo = load_config({"zero_optimization": {
        "stage": 3, "reduce_bucket_size": 1e8, "allgather_bucket_size": 5e8,
        "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5,
        "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e12,
        "offload_param": {"device": "none", "pin_memory": True, "buffer_size": 1e8}}},
    ).zero_optimization  # fmt: skip
    got = [zo.reduce_bucket_size, zo.allgather_bucket_size, zo.stage3_prefetch_bucket_size,
           zo.stage3_param_persistence_threshold, zo.stage3_max_live_parameters,
           zo.stage3_max_reuse_distance]  # fmt: skip
    assert got == [10**8, 5 * 10**8, 5 * 10**7, 10**5, 10**9, 10**12]
    assert all(type(v) is int for v in got)


def test_deep_nesting_bounded(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"zero_optimization": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(ConfigError, match=f"nested deeper than .* at most {MAX_DEPTH} levels"):
        load_config(path)
    path.write_text('{"optimizer": ' + "[" * 40 + "]" * 40 + "}")
    with pytest.raises(ConfigError, match=r"`optimizer\[0\]\[0\]\[0\]...` nests deeper than 32"):
        load_config(path)
    deep: dict = {}
    cur = deep
    for _ in range(5000):
        cur["x"] = {}
        cur = cur["x"]
    with pytest.raises(ConfigError, match=r"`x.x.x.x...` nests deeper than 32 levels"):
        load_config(deep)
    ok = json.loads('{"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}}')
    assert load_config(ok).optimizer.params.betas == (0.9, 0.95)
