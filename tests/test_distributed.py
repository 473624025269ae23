"""torchrun: 2 CPU processes over gloo give the model that 1 process gives, and only process 0 writes.

One real ``torchrun --standalone --nproc-per-node 2`` runs this file as its worker (see the end):
every case is compressed there by both processes, through the API, streaming and the command line;
the tests compare what process 0 (and 1) got with one process in the test process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import rankdown
from rankdown.config import RunSettings
from rankdown import distributed, io
from rankdown.calib import CalibrationData
from rankdown.config import ConfigError
from rankdown.reference import reference_dir
from rankdown.stream import compress_folder

sys.path.insert(0, str(Path(__file__).parent))
from tiny import _COMMON, outputs, tiny_ids, tiny_model  # noqa: E402

IDS = tiny_ids(8, 32)


def _padded() -> CalibrationData:
    """Eight windows, some right-padded: padding rows must stay out of every process's sums."""
    mask = torch.ones_like(IDS)
    for i, keep in enumerate([32, 20, 32, 9, 27, 32, 14, 32]):
        mask[i, keep:] = 0
    return CalibrationData(IDS, mask, "tensor")


# name -> (method, settings, batch size per process under torchrun, batch size of the same model on 1 process)
CASES = {
    "svd-llm": ("svd-llm", {}, 2, 2),  # 10 windows: 3 batches on process 0, 2 on process 1
    "rom-global": ("rom", {"allocation": "global"}, 2, 2),  # a planning pass first; padded windows
    "modegpt": ("modegpt", {"allocation": "block-influence"}, 2, 2),  # block influence summed over processes
    "lillama": ("lillama", {"init": "rom", "epochs": 2}, 2, 4),  # each step averages 2 processes x 2 windows
}
CLI = ["--method", "svd-llm", "--ratio", "0.05", "--calib", "reference", "--nsamples", "4", "--seqlen", "64",
       "--batch-size", "1", "--seed", "1", "--no-stream", "--json", "-q"]  # in memory: rankdown.save


def _calibration(name: str):
    return {"svd-llm": tiny_ids(10, 32, seed=2), "rom-global": _padded()}.get(name, IDS)


def run_case(name: str, processes: int = 1, **run_settings):
    method, settings, per_process, single = CASES[name]
    config = rankdown.make_config(method, ratio=0.3, **settings)
    run = rankdown.RunSettings(batch_size=per_process if processes > 1 else single, **run_settings)
    model = tiny_model("llama")
    report = rankdown.compress(model, None, config, _calibration(name), run=run, progress=False)
    return model, report


# ----------------------------------------------------------------------------- the tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("dist")
    tiny_model("llama").save_pretrained(root / "src")
    torch.manual_seed(0)  # a tiny model that reads the reference tokenizer's ids, for the command line
    tf.LlamaForCausalLM(tf.LlamaConfig(**{**_COMMON, "vocab_size": 4096})).save_pretrained(root / "tok")
    tf.AutoTokenizer.from_pretrained(reference_dir()).save_pretrained(root / "tok")
    (root / "runs").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", distributed.TIMEOUT_ENV: "120"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, str(root)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root, proc


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_give_the_one_process_model(launched, name):
    root, _ = launched
    got = [torch.load(root / f"{name}.{r}.pt") for r in (0, 1)]
    assert torch.equal(got[0]["logits"], got[1]["logits"])  # every process ends with the same model
    model, report = run_case(name)
    assert got[0]["structure"] == report.structure and got[0]["params_after"] == report.params_after
    torch.testing.assert_close(got[0]["logits"], outputs(model, IDS), rtol=1e-5, atol=1e-5)


def test_a_statistics_cache_seen_by_process_0_alone_serves_every_process(launched):
    root, _ = launched
    expected = torch.load(root / "rom-global.0.pt")["logits"]
    for run in ("miss", "hit"):
        for r in (0, 1):
            assert torch.equal(torch.load(root / f"rom-cache-{run}.{r}.pt")["logits"], expected)
    files = sorted(p.suffix for p in (root / "cache0").iterdir())
    assert files == [".json", ".safetensors"] and not (root / "cache1").exists()  # process 1 wrote nothing
    assert torch.load(root / "rom-cache-hit.0.pt")["mtime"] == torch.load(root / "rom-cache-miss.0.pt")["mtime"]


def test_fewer_batches_than_processes_is_refused_on_every_process(launched):
    root, _ = launched
    for r in (0, 1):
        message = (root / f"few.{r}.txt").read_text()
        assert "1 batch for 2 processes" in message and "--batch-size" in message


def test_streaming_and_the_command_line_write_once(launched):
    root, proc = launched
    # streaming: process 0 wrote the folder, no process left a work folder or a second copy
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["cli", "streamed"]
    config = rankdown.make_config("svd-llm", ratio=0.3)
    model = tiny_model("llama")
    rankdown.compress(model, None, config, IDS, run=rankdown.RunSettings(batch_size=2), progress=False)
    torch.testing.assert_close(outputs(io.load(root / "runs" / "streamed"), IDS), outputs(model, IDS),
                               rtol=1e-5, atol=1e-5)
    # the command line: one table and one JSON line (process 0's); its folder holds one process's model
    printed = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["out"] == str(root / "runs" / "cli")
    from rankdown.cli import _method_config, _run_settings, build_parser

    model, tokenizer = rankdown.load(root / "tok"), rankdown.load_tokenizer(root / "tok")
    args = build_parser().parse_args(["compress", *CLI])
    rankdown.compress(model, tokenizer, _method_config(args), "reference", run=_run_settings(args), nsamples=4,
                      seqlen=64, progress=False)
    torch.testing.assert_close(outputs(rankdown.load(root / "runs" / "cli"), IDS), outputs(model, IDS),
                               rtol=1e-5, atol=1e-5)


def test_a_missing_process_is_an_error_not_a_hang(monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="could not join the group of 2 processes"):
        distributed.setup("cpu", timeout=0.5)
    assert distributed.world() == 1


def test_one_process_is_left_alone():
    assert distributed.setup("cpu") == torch.device("cpu") and distributed.world() == 1
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] and distributed.all_sum([2, 3]) == [2.0, 3.0]


def _layerwise_fisher(layerwise: bool = True) -> dict[str, torch.Tensor]:
    """The fisher allocation's D of every linear, taken layer by layer (as streamed; under torchrun
    each process on its share of the batches) or by the whole model's backward pass."""
    from rankdown.api import find_targets
    from rankdown.arch import spec_for
    from rankdown.engine import PlanContext
    from rankdown.sensitivity import output_fisher

    model = tiny_model("llama")
    spec = spec_for(model)
    return output_fisher(PlanContext(model, spec, _padded, 2, "cpu", False), find_targets(model, spec), 0,
                         layerwise=layerwise)


def test_two_processes_share_the_layerwise_fisher_batches(launched):
    root, _ = launched
    got = [torch.load(root / f"fisher.{r}.pt") for r in (0, 1)]
    whole = _layerwise_fisher(layerwise=False)
    for path, d in whole.items():
        assert torch.equal(got[0][path], got[1][path])
        torch.testing.assert_close(got[0][path], d, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- the worker (under torchrun)
def _worker(root: Path) -> None:
    from rankdown.cli import main

    distributed.setup("cpu")
    r = distributed.rank()
    for name in CASES:
        model, report = run_case(name, processes=2)
        torch.save({"logits": outputs(model, IDS), "structure": report.structure,
                    "params_after": report.params_after}, root / f"{name}.{r}.pt")
    for run in ("miss", "hit"):  # each process its own cache folder: only process 0's is ever used
        model, _ = run_case("rom-global", processes=2, stats_cache=str(root / f"cache{r}"))
        cached = list((root / "cache0").glob("*.safetensors"))
        torch.save({"logits": outputs(model, IDS), "mtime": [p.stat().st_mtime_ns for p in cached]},
                   root / f"rom-cache-{run}.{r}.pt")
    try:
        rankdown.compress(tiny_model("llama"), None, rankdown.make_config("svd", ratio=0.3), IDS,
                          progress=False, run=RunSettings(batch_size=8))  # data-free: no batch is needed
        rankdown.compress(tiny_model("llama"), None, rankdown.make_config("svd-llm", ratio=0.3), IDS,
                          progress=False, run=RunSettings(batch_size=8))
    except ConfigError as e:
        (root / f"few.{r}.txt").write_text(str(e))
    torch.save(_layerwise_fisher(), root / f"fisher.{r}.pt")
    compress_folder(root / "src", root / "runs" / "streamed", rankdown.make_config("svd-llm", ratio=0.3),
                    IDS, progress=False, run=RunSettings(batch_size=2))
    # last: the command line leaves the process group when it ends
    if main(["compress", str(root / "tok"), *CLI, "--out", str(root / "runs" / "cli")]) != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
