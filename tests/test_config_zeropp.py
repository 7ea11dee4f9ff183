"""ZeRO++ keys in the config: accepted at stage 3 with DeepSpeed's names, types and defaults;
refused at stages 0-2, in the combinations DeepSpeed refuses, and for hostile values; the
node rules worded the same by the runtime's check and by `zeroshard check-config`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from zeroshard.config.honoured import check_zeropp_topology
from zeroshard.config.schema import ConfigError, load_config
from zeroshard.config.zeropp import ZeroPPConfig

ROOT = Path(__file__).resolve().parent.parent
BOOLS = ("zero_quantized_weights", "zero_quantized_nontrainable_weights",
         "zero_quantized_gradients")  # fmt: skip
HPZ = "zero_hpz_partition_size"


def _zo(world_size: int = 4, **keys) -> object:
    return load_config({"zero_optimization": keys}, world_size=world_size).zero_optimization


def _problems(zo: dict, **extra) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config({"zero_optimization": zo, **extra}, world_size=4)
    return e.value.problems


def test_defaults_are_deepspeeds_and_off() -> None:
    for stage in (0, 1, 2, 3):
        zo = _zo(stage=stage)
        assert [getattr(zo, k) for k in (*BOOLS, HPZ)] == [False, False, False, 1]
        assert zo.zeropp == ZeroPPConfig(False, False, False, 1) and not zo.zeropp.enabled


@pytest.mark.parametrize("key", BOOLS)
def test_each_switch_is_honoured_at_stage_3(key: str) -> None:
    zo = _zo(stage=3, **{key: True})
    assert getattr(zo, key) is True
    pp = zo.zeropp
    assert pp.enabled and pp.hpz_partition_size == 1
    assert [pp.quantized_weights, pp.quantized_nontrainable_weights,
            pp.quantized_gradients] == [k == key for k in BOOLS]  # fmt: skip


def test_all_on_and_read_only() -> None:
    zo = _zo(stage=3, **dict.fromkeys(BOOLS, True), zero_hpz_partition_size=2)
    assert zo.zeropp == ZeroPPConfig(True, True, True, 2) and zo.zeropp.enabled
    assert ZeroPPConfig(hpz_partition_size=2).enabled
    with pytest.raises(dataclasses.FrozenInstanceError):
        zo.zeropp.hpz_partition_size = 4  # type: ignore[misc]


def test_hpz_zero_is_deepspeeds_off() -> None:
    # DeepSpeed's field is `ge=0` and only a size > 1 builds the secondary partition
    assert _zo(stage=3, zero_hpz_partition_size=0).zeropp == ZeroPPConfig()
    assert _zo(stage=2, zero_hpz_partition_size=0).zero_hpz_partition_size == 1


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("key,value", [*((k, True) for k in BOOLS), (HPZ, 2)])
def test_on_below_stage_3_is_refused_naming_key_and_stage(stage: int, key: str, value) -> None:
    (problem,) = _problems({"stage": stage, key: value})
    shown = json.dumps(value)
    assert problem.startswith(f"`zero_optimization.{key}` = {shown} is a stage-3 option "
                              f"(stage is {stage}): ")  # fmt: skip
    assert problem.endswith("; use stage 3 or remove the key")


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_off_values_are_accepted_below_stage_3(stage: int) -> None:
    zo = _zo(stage=stage, **dict.fromkeys(BOOLS, False), zero_hpz_partition_size=1)
    assert not zo.zeropp.enabled


def test_qgz_at_stage_2_is_one_clear_error() -> None:
    assert _problems({"stage": 2, "zero_quantized_gradients": True}) == [
        "`zero_optimization.zero_quantized_gradients` = true is a stage-3 option (stage is 2): "
        "qgZ replaces stage 3's per-unit gradient reduce-scatter (DeepSpeed builds it in its "
        "stage-3 optimizer only and ignores it below); use stage 3 or remove the key"
    ]


def test_combinations_deepspeed_refuses() -> None:
    # runtime/zero/stage3.py: all-to-all reduce (qgZ) asserts reduce_scatter == True
    assert _problems({"stage": 3, "zero_quantized_gradients": True, "reduce_scatter": False}) == [
        "`zero_optimization.zero_quantized_gradients` = true needs "
        "`zero_optimization.reduce_scatter` = true: qgZ is a quantized reduce-scatter; "
        "remove one of the two keys"
    ]
    # runtime/torch_autocast.py: torch autocast with quantized weights (zeroshard refuses
    # torch_autocast itself by name)
    assert _problems({"stage": 3, "zero_quantized_weights": True},
                     torch_autocast={"enabled": True}) == [
        "`torch_autocast` is a DeepSpeed option not supported by zeroshard yet"
    ]  # fmt: skip
    # runtime/config.py: MiCS and LoCo-ZeRO++ were removed from DeepSpeed; refused by name
    for key, value in (("mics_shard_size", 2), ("zeropp_loco_param", {"err_beta": 0.8})):
        assert _problems({"stage": 3, HPZ: 2, "zero_quantized_gradients": True, key: value}) == [
            f"`zero_optimization.{key}` is a DeepSpeed option not supported by zeroshard yet"
        ]
    # hpZ that does not divide the world: groups.py's _ensure_divisibility (below)


@pytest.mark.parametrize("key", BOOLS)
@pytest.mark.parametrize("value,kind", [
    ("yes", 'the string "yes"'), ("true", 'the string "true"'), (1, "the number 1"),
    (0, "the number 0"), (None, "null"), ("auto", 'the string "auto"'), ([True], "a JSON list"),
])  # fmt: skip
def test_hostile_switch_values(key: str, value, kind: str) -> None:
    assert _problems({"stage": 3, key: value}) == [
        f"`zero_optimization.{key}` = {json.dumps(value)}: must be true or false, not {kind}"
    ]


@pytest.mark.parametrize("value,why", [
    ("yes", 'must be a whole number of ranks (1 = off), not the string "yes"'),
    ("2", 'must be a whole number of ranks (1 = off), not the string "2"'),
    (-2, "must be a number of ranks from 1 to 1048576 (1 = off, as is DeepSpeed's 0)"),
    (10**30, "must be a number of ranks from 1 to 1048576 (1 = off, as is DeepSpeed's 0)"),
    (2**20 + 1, "must be a number of ranks from 1 to 1048576 (1 = off, as is DeepSpeed's 0)"),
    (2.5, "must be an integer, not the float 2.5"),
    (2.0, "must be an integer, not the float 2.0 (write 2)"),
    (True, "must be a number, not a boolean"),
    (None, "must be a whole number of ranks (1 = off), not null"),
])  # fmt: skip
def test_hostile_partition_sizes(value, why: str) -> None:
    assert _problems({"stage": 3, HPZ: value}) == [
        f"`zero_optimization.{HPZ}` = {json.dumps(value)}: {why}"
    ]


def test_largest_partition_size_parses() -> None:
    assert _zo(stage=3, zero_hpz_partition_size=2**20).zero_hpz_partition_size == 2**20


# -- nodes: what only the runtime knows -----------------------------------------------------------
def _hpz(size: int, **more) -> object:
    return _zo(stage=3, zero_hpz_partition_size=size, **more)


@pytest.mark.parametrize("world,local,size", [
    (4, 2, 2), (8, 4, 2), (8, 4, 4), (8, 8, 8), (4, 4, 1), (6, 3, 3),
    (2, 8, 2),  # a node size above the world is the world, as the runtime reads it
    (1, 1, 8),  # one rank: nothing travels
])  # fmt: skip
def test_topology_accepts_sizes_dividing_the_node(world: int, local: int, size: int) -> None:
    check_zeropp_topology(_hpz(size, zero_quantized_gradients=True), world, local)


def test_topology_refuses_a_size_not_dividing_the_node() -> None:
    with pytest.raises(ValueError) as e:  # ConfigError is a ValueError
        check_zeropp_topology(_hpz(3), 8, 4)
    assert isinstance(e.value, ConfigError)
    assert e.value.problems == [
        "`zero_optimization.zero_hpz_partition_size` = 3 does not divide the 4 ranks of a node "
        "(LOCAL_WORLD_SIZE=4, world size 8): hpZ keeps each secondary partition within one "
        "node; use one of 1, 2, 4"
    ]
    # a size spanning nodes (DeepSpeed accepts it: it divides the world size)
    with pytest.raises(ConfigError, match=r"= 4 does not divide the 2 ranks of a node "
                       r"\(LOCAL_WORLD_SIZE=2, world size 8\).*use one of 1, 2$"):  # fmt: skip
        check_zeropp_topology(_hpz(4), 8, 2)
    # DeepSpeed reads a size above the world as the world size; zeroshard names it
    with pytest.raises(ConfigError, match=r"= 8 does not divide the 4 ranks"):
        check_zeropp_topology(_hpz(8), 4, 4)


def test_topology_refuses_uneven_nodes_for_hpz_and_qgz() -> None:
    with pytest.raises(ConfigError) as e:
        check_zeropp_topology(_zo(stage=3, zero_quantized_gradients=True), 6, 4)
    assert e.value.problems == [
        "`zero_optimization.zero_quantized_gradients` = true need every node to run the same "
        "number of ranks, but LOCAL_WORLD_SIZE=4 does not divide the world size 6 (torchrun "
        "--nproc-per-node sets the ranks per node)"
    ]
    # qwZ alone does not depend on nodes; neither does a config without ZeRO++
    check_zeropp_topology(_zo(stage=3, zero_quantized_weights=True), 6, 4)
    check_zeropp_topology(_zo(stage=3), 6, 4)


@pytest.mark.parametrize("world,local", [(0, 1), (4, 0), (4, -1), (True, 1), (4, 2.0)])
def test_topology_refuses_bad_arguments(world, local) -> None:
    with pytest.raises(ValueError, match="must be a positive int"):
        check_zeropp_topology(_hpz(2), world, local)


# -- check-config agrees with the runtime ---------------------------------------------------------
def _check_config(capsys, path: Path, *argv: str) -> tuple[int, list[str]]:
    from zeroshard.cli.main import main

    rc = main(["check-config", str(path), *argv])
    return rc, capsys.readouterr().out.splitlines()


def _runtime_message(cfg: dict, world: int, local: int) -> str:
    zo = load_config(cfg, world_size=world).zero_optimization
    with pytest.raises(ConfigError) as e:
        check_zeropp_topology(zo, world, local)
    (problem,) = e.value.problems
    return problem


@pytest.mark.parametrize("zo,world,local", [
    ({HPZ: 3}, 8, 4),
    ({HPZ: 2, "zero_quantized_gradients": True}, 6, 4),
])  # fmt: skip
def test_check_config_words_topology_as_the_runtime(capsys, tmp_path, monkeypatch, zo, world,
                                                    local) -> None:  # fmt: skip
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, **zo}}
    path = tmp_path / "zpp.json"
    path.write_text(json.dumps(cfg))
    want = _runtime_message(cfg, world, local)
    rc, lines = _check_config(capsys, path, "--world-size", str(world),
                              "--local-world-size", str(local))  # fmt: skip
    refused = [ln for ln in lines if ln.startswith("refused")]
    assert rc == 1 and len(refused) == 1 and refused[0].endswith("  " + want), lines
    assert lines[-1] == (f"{path}: NOT usable: 1 problem (world size {world}, "
                         f"{local} per node)")  # fmt: skip
    # torchrun's variable is the default node size, as at run time
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    rc, lines2 = _check_config(capsys, path, "--world-size", str(world))
    assert rc == 1 and lines2 == lines
    # `zeroshard run`'s check (config_problems) finds the same problem for the same nodes
    from zeroshard.cli.check_config import config_problems

    assert config_problems(str(path), world, local) == [want]


def test_check_config_one_node_by_default(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    path = tmp_path / "zpp.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, HPZ: 4}}))
    rc, lines = _check_config(capsys, path, "--world-size", "8")  # one node of 8: 4 divides it
    assert rc == 0 and lines[-1] == f"{path}: usable (world size 8)", lines
    rc, lines = _check_config(capsys, path, "--world-size", "8", "--local-world-size", "2")
    assert rc == 1 and "= 4 does not divide the 2 ranks of a node" in lines[-2], lines
    from zeroshard.cli.main import main

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    assert main(["check-config", str(path), "--world-size", "8"]) == 2
    assert capsys.readouterr().err == ("zeroshard check-config: error: LOCAL_WORLD_SIZE must be "
                                       "a positive number of ranks per node, got 'two'\n")


def test_check_config_stage_errors_and_off_values(capsys, tmp_path) -> None:
    path = tmp_path / "s2.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "zero_quantized_weights": False,
                                                      "zero_quantized_gradients": True}}))
    rc, lines = _check_config(capsys, path)
    rows = {ln[14:].split()[0]: ln for ln in lines[:-1]}
    assert rc == 1
    assert rows["zero_optimization.zero_quantized_gradients"].startswith("refused")
    assert "is a stage-3 option (stage is 2)" in rows["zero_optimization.zero_quantized_gradients"]
    assert rows["zero_optimization.zero_quantized_weights"].startswith("no effect")


def test_shipped_zeropp_config(capsys, monkeypatch) -> None:
    path = ROOT / "configs" / "zero3_zeropp.json"
    cfg = load_config(path, world_size=4)
    assert cfg.zero_optimization.stage == 3
    assert cfg.zero_optimization.zeropp == ZeroPPConfig(True, False, True, 2)
    check_zeropp_topology(cfg.zero_optimization, 4, 2)  # 2 nodes of 2: how tests simulate nodes
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    rc, lines = _check_config(capsys, path, "--world-size", "4", "--local-world-size", "2")
    assert rc == 0 and lines[-1] == f"{path}: usable (world size 4, 2 per node)", lines
