"""Issue 32: a compression's seconds per stage, and as multiples of one dense forward."""

from __future__ import annotations

import copy
import json

import pytest

import rankdown
from rankdown.methods import make_config
from rankdown.timing import Stages, cost_table


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stages_count_time_exclusively_and_pause():
    clock = FakeClock()
    t = Stages(clock)
    with t.stage("other"):
        clock.now += 1
        with t.stage("decompositions"):
            clock.now += 2
            with t.stage("statistics"):
                clock.now += 4
            clock.now += 8
            with t.paused():
                clock.now += 100  # counted nowhere
        clock.now += 16
    assert t.seconds == {"other": 17, "decompositions": 10, "statistics": 4}
    assert t.total == 31
    table = cost_table(t.seconds, 2.0)
    assert list(table) == ["statistics", "decompositions", "other", "total"]
    assert table["total"] == {"seconds": 31, "forwards": 15.5}
    assert cost_table(t.seconds, None)["other"]["forwards"] is None


STAGES = {  # method -> stages it must report (beside calibration, forward, other), and those it must not
    "svd-llm": ({"statistics", "decompositions"}, {"distillation"}),
    "rom": ({"statistics", "decompositions", "allocation"}, {"distillation"}),
    "modegpt": ({"statistics", "decompositions", "allocation"}, {"distillation"}),
    "lillama": ({"distillation", "decompositions", "statistics"}, set()),  # its default init is ROM's
}


@pytest.fixture(scope="module")
def reports(reference):
    model, tok = reference
    out = {}
    for method in STAGES:
        settings = {"epochs": 1} if method == "lillama" else {}
        cfg = make_config(method, ratio=0.3, **settings)
        out[method] = rankdown.compress(copy.deepcopy(model), tok, cfg, "reference", nsamples=8, seqlen=128,
                                        progress=False, cost=True)
    return out


@pytest.mark.parametrize("method", list(STAGES))
def test_stages_sum_to_the_total_and_name_what_the_method_does(reports, method):
    rep = reports[method]
    total = sum(rep.stages.values())
    assert abs(total - rep.seconds) <= 0.03 * rep.seconds + 0.02, (rep.stages, rep.seconds)
    must, must_not = STAGES[method]
    assert must | {"calibration", "forward", "other"} <= set(rep.stages), rep.stages
    assert not must_not & set(rep.stages), rep.stages
    assert all(s >= 0 for s in rep.stages.values())
    assert rep.stages["other"] < 0.2 * total, rep.stages  # the named stages hold the time


@pytest.mark.parametrize("method", list(STAGES))
def test_multiples_are_seconds_over_one_dense_forward(reports, method):
    rep = reports[method]
    cost = rep.cost()
    unit = cost["forward_seconds"]
    assert unit > 0 and cost["forward"] == "model forward (in memory)"
    for name, row in cost["stages"].items():
        assert row["forwards"] == pytest.approx(row["seconds"] / unit, rel=1e-2, abs=2e-3), name
    assert cost["stages"]["total"]["seconds"] == pytest.approx(sum(rep.stages.values()), abs=1e-3)
    assert rep.record()["cost"] == cost  # saved with the model


def test_a_data_free_method_has_no_statistics_and_no_unit_without_calibration(reference):
    model, tok = reference
    rep = rankdown.compress(copy.deepcopy(model), tok, make_config("svd", ratio=0.3), None, progress=False, cost=True)
    assert "statistics" not in rep.stages and "forward" not in rep.stages and "decompositions" in rep.stages
    assert rep.forward_seconds is None and rep.cost()["stages"]["total"]["forwards"] is None


def test_compress_json_carries_the_cost(tmp_path, capsys):
    from rankdown import cli

    rc = cli.main(["compress", "--method", "svd-llm", "--ratio", "0.3", "--calib", "reference", "--nsamples", "8",
                   "--seqlen", "64", "--out", str(tmp_path / "out"), "-q", "--cost", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    cost = json.loads(out.strip().splitlines()[-1])["cost"]
    assert cost["forward_seconds"] > 0
    assert {"calibration", "forward", "statistics", "decompositions", "save", "total"} <= set(cost["stages"])
    assert "x forward" in out and "save" in out  # the printed table
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["rankdown"]
    assert saved["cost"]["forward_seconds"] == cost["forward_seconds"]


def test_a_streamed_run_measures_the_layer_by_layer_pass(tmp_path, capsys):
    from pathlib import Path

    from rankdown import cli
    from rankdown.reference import __file__ as where

    folder = Path(where).parent / "reference"  # the reference model's own folder of safetensors
    rc = cli.main(["compress", str(folder), "--method", "svd-llm", "--ratio", "0.3", "--calib", "reference",
                   "--nsamples", "8", "--seqlen", "64", "--out", str(tmp_path / "out"), "-q", "--stream", "--cost",
                   "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and result["streamed"]
    cost = result["cost"]
    assert cost["forward"] == "layer-by-layer pass (streamed)" and cost["forward_seconds"] > 0
    assert {"statistics", "decompositions", "other"} <= set(cost["stages"]) and "save" not in cost["stages"]
    assert abs(cost["stages"]["total"]["seconds"] - result["seconds"]) <= 0.03 * result["seconds"] + 0.02
