"""Lillama (docs/METHODS.md §4): allocation, loss, distillation on the reference model, the disk cache,
token-budget and chat calibration, loss curves beside the model, the progress bar."""

import copy
import json
import logging
import math

import pytest
import torch
import transformers as tf

import rankdown
from rankdown.config import RunSettings, split_settings
from rankdown.allocate import count_params
from rankdown.api import compress, find_targets
from rankdown.arch import spec_for
from rankdown.calib import calibration_data
from rankdown.config import ConfigError
from rankdown.eval.perplexity import perplexity
from rankdown.methods import make_config
from rankdown.methods.lillama import edge_ranks, token_loss
from rankdown.nn import LowRankLinear
from test_calib import TEMPLATE, make_tokenizer, random_text, write, write_jsonl
from tiny import _COMMON, outputs, tiny_ids

IDS = tiny_ids(8, 32)
SEQLEN = 256


def _deep_llama(layers=4, seed=0):
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**_COMMON, "num_hidden_layers": layers})).eval()


def _layers_of(ranks):
    return sorted({int(p.split(".")[2]) for p in ranks})


# ----------------------------------------------------------------------------- allocation and loss
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.45])
def test_bottom_and_top_meet_the_ratio_from_their_end_at_min_rank(ratio):
    model = _deep_llama(6)
    targets, total = find_targets(model, spec_for(model)), count_params(model)
    for from_top in (False, True):
        ranks = edge_ranks(targets, total, ratio, min_rank=16, step=4, from_top=from_top)
        removed = sum(t.dense - t.cost(ranks[t.path]) for t in targets if t.path in ranks)
        assert abs(removed / total - ratio) <= 0.01
        layers = _layers_of(ranks)
        assert layers == (list(range(6 - len(layers), 6)) if from_top else list(range(len(layers))))
        assert sum(r != 16 for r in ranks.values()) <= 1  # only the last matrix may land in between
        assert all(r >= 16 and (r - 16) % 4 == 0 for r in ranks.values())
    with pytest.raises(ConfigError, match="lower --min-rank"):
        edge_ranks(targets, total, 0.45, min_rank=28, step=4)


def test_end_to_end_ratio_for_every_strategy_and_init():
    for strategy in ("bottom", "top", "uniform"):
        for init in ("svd", "rom"):
            model = _deep_llama(4)
            rep = compress(model, None, make_config("lillama", ratio=0.3, strategy=strategy, init=init,
                                                       allocation="strategy"),
                           IDS, progress=False, run=RunSettings(batch_size=4))
            assert abs(rep.ratio_achieved - 0.3) <= 0.01 and rep.params_after == count_params(model)
            layers = _layers_of(rep.modules)
            if strategy == "bottom":
                assert layers[0] == 0 and layers[-1] < 3
            elif strategy == "top":
                assert layers[-1] == 3 and layers[0] > 0
            else:
                assert layers == [0, 1, 2, 3]


def test_token_loss_is_the_spec_formula_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 8, generator=g)
    a = y + 0.1 * torch.randn(2, 5, 8, generator=g)
    per = (a - y).abs().mean(-1) - torch.nn.functional.logsigmoid(torch.cosine_similarity(a, y, dim=-1))
    assert token_loss(a, y) == pytest.approx(per.mean().item(), rel=1e-6)
    assert token_loss(y, y) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)  # -log σ(1): its floor
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    garbage = a.clone()
    garbage[1, 3:] = 1e4
    assert token_loss(garbage, y, mask) == pytest.approx(per[mask].mean().item(), rel=1e-6)


def test_settings_are_checked():
    for bad, match in ((dict(strategy="middle", allocation="strategy"), "strategy"), (dict(init="pca"), "init"), (dict(loss="kl"), "loss"),
                       (dict(lr=0.0), "lr"), (dict(epochs=-1), "epochs"), (dict(calib_tokens=0), "calib_tokens"),
                       (dict(strategy="uniform", min_rank=8, allocation="strategy"), "min_rank"),
                       (dict(strategy="top"), "allocation strategy")):
        with pytest.raises(ConfigError, match=match):
            make_config("lillama", **bad).validate()


# ----------------------------------------------------------------------------- distillation
def test_epochs_that_make_a_layer_worse_are_not_kept():
    """With a learning rate of 1 every epoch makes every layer worse (losses of 10^4-10^8 against
    0.66-0.73 at the start, measured): the model must be the one of the initial factors, bit for bit,
    as with epochs=0, not the last epoch's."""
    trained, initial = _deep_llama(4), _deep_llama(4)
    rep = compress(trained, None, make_config("lillama", ratio=0.3, epochs=2, lr=1.0), IDS,
                   progress=False, run=RunSettings(batch_size=2))
    curves = rep.artifacts["lillama_losses.json"]
    assert curves and all(c["best_epoch"] == 0 and min(c["eval"][1:]) > c["eval"][0] for c in curves.values())
    compress(initial, None, make_config("lillama", ratio=0.3, epochs=0), IDS, progress=False, run=RunSettings(batch_size=2))
    a, b = dict(trained.named_parameters()), dict(initial.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("loss", ["teacher", "student", "teacher+student"])
def test_only_the_factors_train_and_the_best_checkpoint_is_kept(loss):
    model = _deep_llama(4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = compress(model, None, make_config("lillama", ratio=0.3, epochs=3, loss=loss, init="svd",
                                                          allocation="strategy", lr=1e-3), IDS,
                   progress=False, run=RunSettings(batch_size=2))
    curves = rep.artifacts["lillama_losses.json"]
    assert set(curves) == {f"model.layers.{i}" for i in _layers_of(rep.modules)}
    for c in curves.values():
        assert len(c["eval"]) == 4 and len(c["train"]) == 3 * 4  # initial + 3 epochs; 4 batches an epoch
        assert c["eval"][c["best_epoch"]] == min(c["eval"])
    assert min(c["eval"][c["best_epoch"]] < c["eval"][0] for c in curves.values())  # every layer improved
    for n, p in model.named_parameters():  # everything but the factors is as it was
        if ".A." not in n and ".B." not in n:
            assert torch.equal(p, frozen[n]), n
        assert p.requires_grad and p.grad is None  # the method leaves no state behind


@pytest.fixture(scope="module")
def reference_runs(reference):
    """Held-out perplexity and report at 30% on the reference: svd; lillama (svd init) without and
    with training; lillama with the rom init."""
    model, tok = reference
    torch.set_num_threads(2)
    calib = calibration_data(tok, "reference", nsamples=32, seqlen=SEQLEN, seed=0)
    runs = {}
    old = {"allocation": "strategy", "lr": 1e-3, "epochs": 1}  # the settings these figures were measured with
    for name, method, settings in (("svd", "svd", {}), ("init", "lillama", {**old, "init": "svd", "epochs": 0}),
                                   ("lillama", "lillama", {**old, "batch_size": 2, "init": "svd"}),
                                   ("lillama-rom", "lillama", {**old, "batch_size": 2, "init": "rom"})):
        m = copy.deepcopy(model)
        own, run = split_settings(settings)
        rep = compress(m, tok, make_config(method, ratio=0.3, **own), calib, run=RunSettings(**run), progress=False)
        ppl = perplexity(m, tok, "reference-heldout", seqlen=SEQLEN, max_windows=60).ppl
        runs[name] = (ppl, rep)
    return runs


@pytest.mark.slow
def test_distillation_lowers_the_layer_loss_and_the_perplexity_of_its_initialisation(reference_runs):
    init, lil = reference_runs["init"][0], reference_runs["lillama"][0]
    rep = reference_runs["lillama"][1]
    assert abs(rep.ratio_achieved - 0.3) <= 0.01
    curves = rep.artifacts["lillama_losses.json"]
    drops = [1 - c["eval"][-1] / c["eval"][0] for c in curves.values()]
    assert min(drops) > 0 and sum(drops) / len(drops) > 0.02  # measured: 2.4% to 10% per layer
    assert lil < init - 0.05  # measured on 120 windows: 14.61 -> 14.43


@pytest.mark.slow
def test_lillama_beats_svd_at_30_percent(reference_runs):
    svd, rom_init = reference_runs["svd"][0], reference_runs["lillama-rom"][0]
    assert abs(reference_runs["lillama-rom"][1].ratio_achieved - 0.3) <= 0.01
    # measured on 120 windows: svd 14.45, lillama (rom init) 14.27; the svd init only ties svd (14.43) on
    # this little calibration: bottom allocation puts whole layers at rank hidden/4
    assert rom_init < svd - 0.05
    assert reference_runs["lillama"][0] < svd * 1.01


# ----------------------------------------------------------------------------- disk cache
def test_the_disk_cache_gives_the_same_factors(caplog):
    states = []
    for max_memory in (None, "0"):
        model = _deep_llama(4)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rankdown.api"):
            compress(model, None, make_config("lillama", ratio=0.35, epochs=2, allocation="strategy"), IDS, progress=False, run=RunSettings(batch_size=2, seed=3, max_memory=max_memory))
        spilled = "went to disk" in caplog.text
        assert spilled == (max_memory is not None)
        states.append(model.state_dict())
        assert len(_layers_of([n for n, m in model.named_modules() if isinstance(m, LowRankLinear)])) >= 2
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


# ----------------------------------------------------------------------------- calibration
def test_a_token_budget_sets_the_windows_of_a_text_and_the_records_of_a_chat(tmp_path):
    tok = make_tokenizer(TEMPLATE)
    text = write(tmp_path / "t.txt", random_text(2000, 0))
    data = calibration_data(tok, text, nsamples=3, seqlen=32, tokens=100)
    assert data.nsamples == 4 and data.tokens == 128  # ceil(100 / 32) windows
    chats = [{"messages": [{"role": "user", "content": f"w{i} w{i + 1}"}, {"role": "assistant", "content": "w9"}]}
             for i in range(20)]
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    data = calibration_data(tok, path, nsamples=1, seqlen=32, tokens=40)
    # each chat renders as "user: wi wi+1 <eos>\nassistant: w9 <eos>": 7 tokens, the template's own
    assert data.attention_mask.sum(1).tolist() == [7] * 6  # 6 records reach 40 tokens, 5 do not
    row = data.input_ids[0, :7].tolist()
    assert row[0] == tok.convert_tokens_to_ids("user:") and row[3] == tok.eos_token_id
    # through compress: the config's budget replaces nsamples
    model = _deep_llama(2)
    vocab_tok = make_tokenizer(TEMPLATE)
    rep = compress(model, vocab_tok, make_config("lillama", ratio=0.2, calib_tokens=40), path,
                   nsamples=1, seqlen=32, progress=False, run=RunSettings(batch_size=4))
    assert rep.calibration["nsamples"] == 6 and rep.calibration["tokens"] == 42


# ----------------------------------------------------------------------------- outputs
def test_loss_curves_are_saved_beside_the_model_and_the_bar_shows_layer_and_loss(tmp_path, capsys):
    model = _deep_llama(2)
    before = outputs(model, IDS)
    rep = compress(model, None, make_config("lillama", ratio=0.2, epochs=2, allocation="strategy"), IDS,
                   progress=True, run=RunSettings(batch_size=4))
    err = capsys.readouterr().err
    assert "layer=0" in err and "loss=" in err
    tok = make_tokenizer()
    out = rankdown.save(model, tok, tmp_path / "small", rep)
    saved = json.loads((out / "lillama_losses.json").read_text())
    assert saved == json.loads(json.dumps(rep.artifacts["lillama_losses.json"]))
    assert saved["model.layers.0"]["best_epoch"] in (0, 1, 2) and len(saved["model.layers.0"]["eval"]) == 3
    again = rankdown.load(out)
    assert torch.equal(outputs(again, IDS), outputs(model, IDS))
    assert not torch.allclose(outputs(model, IDS), before)
