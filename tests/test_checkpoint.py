"""csfm.model.checkpoint: file modes that follow the umask, and a clear error (file + what was
expected) for every bad checkpoint path, config, weights file and state dict."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from csfm.files import atomic_write
from csfm.model.checkpoint import (CONFIG, STATE, WEIGHTS, latest_checkpoint, load_pretrained,
                             load_state_dict_checked, load_train_state, load_weights, read_config, save_checkpoint)
from csfm.model.config import preset
from csfm.model.encoder import CSFMEncoder

SMALL = preset("demo", depth=2)


@pytest.fixture(scope="module")
def encoder() -> CSFMEncoder:
    return CSFMEncoder(SMALL)


@pytest.fixture
def umask():
    """Sets a umask for the test (os.umask(mask)) and restores the previous one after it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ----------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_checkpoint_files_get_0666_less_the_umask(tmp_path, encoder, umask, mask):
    umask(mask)
    save_checkpoint(tmp_path / "ckpt", encoder, SMALL, train_state={"step": 3})
    for name in (WEIGHTS, CONFIG, STATE):
        assert _mode(tmp_path / "ckpt" / name) == 0o666 & ~mask, name
    assert _mode(tmp_path / "ckpt") == 0o777 & ~mask
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([WEIGHTS, CONFIG, STATE])  # no temp left


def test_atomic_write_replaces_with_the_umask_mode_and_cleans_up_on_failure(tmp_path, umask):
    target = tmp_path / "out.json"
    target.write_text("old")
    os.chmod(target, 0o600)
    umask(0o022)
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and _mode(target) == 0o644

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


# ----------------------------------------------------------------------------- bad checkpoint paths


def test_nonexistent_checkpoint_path_is_named(tmp_path):
    missing = tmp_path / "no_such_run"
    for load in (read_config, load_weights, load_train_state):
        with pytest.raises(FileNotFoundError, match=rf"checkpoint {missing} does not exist: expected a csfm "
                                                    r"checkpoint directory \(model.safetensors \+ config.json\)"):
            load(missing)
    with pytest.raises(FileNotFoundError, match=rf"checkpoint {missing}\.pth does not exist: expected a \.pth file"):
        load_pretrained(tmp_path / "no_such_run.pth", SMALL)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a csfm checkpoint directory"):
        read_config(tmp_path / "file")


def test_directory_without_config_weights_or_state(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json: no config\.json"):
        read_config(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty/model\.safetensors: no weights file"):
        load_weights(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty/train_state\.pt: no training state"):
        load_train_state(tmp_path / "empty")


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", r"expected a JSON object with a \"model\" entry, got a list"),
    ('{"steps": 3}', r"expected \"model\" to be a JSON object of ModelConfig fields, got no \"model\" entry"),
    ('{"model": [768, 6]}', r"expected \"model\" .*, got a list"),
    ('{"model": {"dim": 64, "width": 3}}', r"\"model\" is not a valid ModelConfig: unknown ModelConfig fields"),
    ('{"model": {"dim": "big"}}', r"\"model\" is not a valid ModelConfig: ModelConfig.dim must be a positive int"),
    ('{"model": ', "not valid JSON"),
])
def test_bad_config_json_is_named_with_what_was_expected(tmp_path, content, match):
    (tmp_path / CONFIG).write_text(content)
    with pytest.raises(ValueError, match=rf"{tmp_path}/config\.json: {match}"):
        read_config(tmp_path)


def test_good_config_reads(tmp_path, encoder):
    save_checkpoint(tmp_path, encoder, SMALL, extra_config={"run": "x"})
    assert read_config(tmp_path) == {"model": SMALL.to_dict(), "run": "x"}


def test_train_state_that_is_not_a_dict(tmp_path):
    torch.save([1, 2], tmp_path / STATE)
    with pytest.raises(ValueError, match=r"train_state\.pt: expected a dict of training state, got a list"):
        load_train_state(tmp_path)


def test_latest_pointer_to_a_deleted_checkpoint_is_named(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")
    with pytest.raises(FileNotFoundError, match=r"checkpoints/latest points to checkpoint 'step_00000004'"):
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "step_00000004").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000004"


# ----------------------------------------------------------------------------- bad state dicts


@pytest.mark.parametrize("key, value, match", [
    ("encoder.cls_token", [0.0] * 4, r"entry 'cls_token' holds a list, expected a tensor"),
    ("encoder.cls_token", {"nested": torch.zeros(1)}, r"entry 'cls_token' holds a dict"),
    (7, torch.zeros(1), r"entry 7 holds a Tensor, expected a tensor under a string key"),
])
def test_pth_with_a_non_tensor_value_names_the_key_and_type(tmp_path, encoder, key, value, match):
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state[key] = value
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=rf"odd\.pth: {match}"):
        load_pretrained(tmp_path / "odd.pth", SMALL)


def test_state_dict_of_another_preset_gives_a_short_report(encoder):
    """Resuming after changing the preset: torch's error is ~70 lines; ours is one per kind."""
    other = CSFMEncoder(preset("demo", depth=3, dim=64, dim_head=16, heads=4))
    with pytest.raises(ValueError) as info:
        load_state_dict_checked(encoder, other.state_dict(), "runs/x/checkpoints/step_00000004")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("runs/x/checkpoints/step_00000004 does not match the model (tensors: 0 missing, "
                               "11 unexpected, ")
    assert "another preset" in lines[0]
    assert lines[1] == "  unexpected: transformer.layers.2.*"  # the extra layer, as one block
    assert lines[2].startswith("  shape mismatch: cls_token [1, 1, 64] in the checkpoint, [1, 1, 128] in the model; ")
    assert lines[2].endswith("in all)") and len(lines) == 3 and len(str(info.value)) < 1000
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())  # nothing was loaded


def test_missing_blocks_are_grouped_and_ignore_prefixes_apply(encoder):
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("transformer.layers.1.")}
    state["mlp_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"\(tensors: 11 missing, 0 unexpected, 0 of another shape;(.|\n)*"
                                         r"  missing: transformer\.layers\.1\.\*$"):
        load_state_dict_checked(encoder, state, "x.pth", ignore_prefixes=("mlp_head",))
    load_state_dict_checked(encoder, dict(encoder.state_dict(), **{"mlp_head.weight": torch.zeros(3)}), "ok.pth",
                            ignore_prefixes=("mlp_head",))


def test_checkpoint_round_trip_still_loads(tmp_path, encoder):
    save_checkpoint(tmp_path / "ours", encoder, SMALL)
    loaded = load_pretrained(tmp_path / "ours", SMALL)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in encoder.state_dict().items())
    assert json.loads((tmp_path / "ours" / CONFIG).read_text())["model"] == SMALL.to_dict()
