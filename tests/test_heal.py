"""Healing (rankdown/heal.py): the reference model compressed with svd at a high ratio, then distilled
towards the dense model on the calibration windows; measured on held-out text it never trained on."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rankdown
from rankdown import cli
from rankdown.allocate import count_params
from rankdown.calib import calibration_data
from rankdown.calib.sampling import source_text, tokenize_text
from rankdown.heal import HealConfig, heal, teacher_targets, trainable_parameters

SEQLEN = 128


@pytest.fixture(scope="module")
def healed(reference):
    """(dense, compressed, healed, report, heal record, teacher) with svd removing half the parameters."""
    dense, tok = reference
    data = calibration_data(tok, "reference", nsamples=16, seqlen=SEQLEN, seed=0)
    config = HealConfig(lr=3e-4, steps=16, eval_every=4)
    teacher = teacher_targets(dense, data, config)
    compressed = copy.deepcopy(dense)
    report = rankdown.compress(compressed, tok, rankdown.make_config("svd", ratio=0.5), data, progress=False)
    model = copy.deepcopy(compressed)
    record = heal(model, teacher, config, list(report.modules), seed=0)
    return dense, compressed, model, report, record, teacher


def _heldout(tok, windows: int = 12) -> torch.Tensor:
    ids = tokenize_text(tok, source_text(tok, "reference-heldout", split="test"))
    return ids[: windows * SEQLEN].view(windows, SEQLEN)


def _kl_and_ppl(model, dense, ids: torch.Tensor) -> tuple[float, float]:
    """Exact KL(dense || model) over the whole vocabulary per token, and the perplexity, on ``ids``."""
    with torch.inference_mode():
        lp = torch.log_softmax(dense(ids).logits.float(), -1)
        lq = torch.log_softmax(model(ids).logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    nll = -lq[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    return float(kl), float(nll.exp())


def test_heal_lowers_the_kl_to_the_dense_model_and_the_perplexity_on_heldout_text(healed, reference):
    dense, compressed, model, _, record, _ = healed
    ids = _heldout(reference[1])
    kl_before, ppl_before = _kl_and_ppl(compressed, dense, ids)
    kl_after, ppl_after = _kl_and_ppl(model, dense, ids)
    _, ppl_dense = _kl_and_ppl(dense, dense, ids)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    assert ppl_after < ppl_before - 0.25 * (ppl_before - ppl_dense), (ppl_dense, ppl_before, ppl_after)
    # its own measure on the held-out calibration windows agrees
    assert record["kl_after"] < 0.8 * record["kl_before"] and record["best_step"] > 0
    # 4 epochs of 14 windows (batches 4, 4, 4, 2)
    assert record["steps"] == 16 and record["tokens"] == 4 * 14 * SEQLEN and record["train_windows"] == 14


def test_only_what_compression_made_is_trained(healed):
    _, compressed, model, report, record, _ = healed
    assert count_params(model) == count_params(compressed) == report.params_after
    before, after = compressed.state_dict(), model.state_dict()
    assert list(before) == list(after)
    trained = {n for n in trainable_parameters(model, report.modules)}
    assert trained and sum(p.numel() for n, p in model.named_parameters() if n in trained) == record["trainable_params"]
    assert all(n.endswith((".A.weight", ".B.weight", ".B.bias")) for n in trained)
    for name, tensor in after.items():
        if name in trained:
            assert not torch.equal(tensor, before[name]), name
        else:  # frozen: bit for bit
            assert torch.equal(tensor, before[name]), name
    assert all(p.requires_grad for p in model.parameters())  # the flags are given back


def test_saved_healed_model_reloads_with_the_same_logits(healed, reference, tmp_path):
    _, _, model, report, record, _ = healed
    report = copy.deepcopy(report)
    report.heal = record
    out = rankdown.save(model, reference[1], tmp_path / "healed", report)
    loaded = rankdown.load(out)
    ids = _heldout(reference[1], 2)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    rec = json.loads((out / "config.json").read_text())["rankdown"]
    assert rec["heal"]["steps"] == 16 and rec["passes"][-1]["heal"]["kl_after"] == record["kl_after"]


def test_heal_is_deterministic_with_its_seed(healed):
    _, compressed, _, report, _, teacher = healed
    config = HealConfig(lr=3e-4, steps=3, eval_every=3, patience=0)
    runs = []
    for seed in (5, 5, 6):
        m = copy.deepcopy(compressed)
        heal(m, teacher, config, list(report.modules), seed=seed)
        runs.append(m.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # another seed: another window order


def test_heal_never_leaves_the_heldout_kl_worse(healed):
    """A learning rate far too high: every measurement is worse, so the state compression left is kept."""
    _, compressed, _, report, _, teacher = healed
    m = copy.deepcopy(compressed)
    rec = heal(m, teacher, HealConfig(lr=0.5, steps=6, eval_every=2, patience=2), list(report.modules), seed=0)
    assert rec["best_step"] == 0 and rec["kl_after"] == rec["kl_before"]
    assert rec["stopped_early"] and rec["steps"] == 4
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), compressed.state_dict().values()))


def test_compress_heal_on_the_command_line_records_the_pass(tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.main(["compress", "--method", "svd", "--ratio", "0.4", "--calib", "reference", "--nsamples", "4",
                   "--seqlen", "64", "--heal", "--heal-steps", "2", "--heal-lr", "1e-4", "--out", str(out), "-q"])
    assert rc == 0
    assert "healed: held-out KL" in capsys.readouterr().out
    rec = json.loads((out / "config.json").read_text())["rankdown"]
    assert rec["heal"]["steps"] <= 2 and rec["heal"]["config"]["lr"] == 1e-4 and rec["heal"]["heldout_windows"] == 1
    assert rec["heal"]["kl_after"] <= rec["heal"]["kl_before"] and rec["passes"][-1]["heal"] == rec["heal"]


@pytest.mark.parametrize("args, words", [
    (["--heal-lr", "1e-4"], "add --heal"),
    (["--heal", "--heal-lr", "5"], "heal lr must be in (0, 1)"),
    (["--heal", "--heal-schedule", "linear"], "choose cosine or constant"),
    (["--heal", "--stream"], "drop --stream"),
    (["--heal", "--nsamples", "1"], "at least 2 calibration windows"),
])
def test_bad_heal_settings_are_one_clear_error(args, words, tmp_path, capsys):
    rc = cli.main(["compress", "--method", "svd", "--ratio", "0.4", "--calib", "reference", "--seqlen", "64",
                   "--out", str(tmp_path / "o"), "-q", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rankdown ")]
    assert rc == 2 and len(err) == 1 and words in err[0], err
    assert list(tmp_path.iterdir()) == []
