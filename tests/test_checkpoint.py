"""Checkpoints are data, not code: what save_checkpoint writes loads with weights_only=True, format-1
files still load (and resume exactly), and every bad file -- missing, a directory, empty, truncated,
random bytes, a foreign torch file, another backbone or class count, a newer format, a pickle that
runs code -- gives a CheckpointError naming the file, never a traceback and never the payload."""
import os
import pickle
import random
import sys

import numpy as np
import pytest
import torch

from ksl_ops.cli import main as ksl_main
from ksl_ops.engine import checkpoint as ckpt
from ksl_ops.engine.checkpoint import CheckpointError


def _model(out=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, out))


def _trained(out=3):
    model = _model(out)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(6, 4)).logsumexp(1).mean().backward()
    opt.step()
    return model, opt


def _save(path, model=None, opt=None, **kw):
    if model is None:
        model, opt = _trained()
    kw.setdefault("config", {"backbone": "cmsnet", "losses": "ksl", "height": 64, "width": 32, "epochs": 4,
                             "dataset": "synthetic"})
    return ckpt.save_checkpoint(path, model=model, optimizer=opt, epoch=kw.pop("epoch", 2), **kw)


def _v1_state(model, opt):
    """A checkpoint exactly as ksl-ops 0.1.0 (format 1) wrote it: RNG states as tuples and a NumPy array."""
    return {
        "format": "ksl_ops.checkpoint/1",
        "epoch": 2,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": None,
        "config": {"backbone": "cmsnet", "losses": "ksl", "height": 64, "width": 32},
        "metrics": {"history": [{"epoch": 1, "loss": {"total": 1.5}}]},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "num_classes": 3,
        "backend": "reference",
    }


# ---------------------------------------------------------------------------------------------
# what is written
# ---------------------------------------------------------------------------------------------

def test_saved_checkpoint_is_plain_data(tmp_path):
    path = _save(tmp_path / "c.ckpt", metrics={"history": [{"loss": np.float32(0.5), "n": np.int64(3),
                                                             "cmc": np.array([0.25, 0.5])}]},
                 extra={"num_classes": 3, "where": tmp_path})
    # No allow-list, no stand-ins: the bare weights-only loader reads it.
    state = torch.load(path, weights_only=True)
    assert state["format"] == f"ksl_ops.checkpoint/{ckpt.FORMAT_VERSION}" and ckpt.FORMAT_VERSION == 2
    rng = state["rng"]
    assert isinstance(rng["python"], list) and len(rng["python"][1]) == 625
    assert isinstance(rng["numpy"], dict) and len(rng["numpy"]["key"]) == 624
    assert all(type(v) is int for v in rng["numpy"]["key"])
    assert isinstance(rng["torch"], torch.Tensor)
    rec = state["metrics"]["history"][0]
    assert type(rec["loss"]) is float and rec["loss"] == 0.5 and type(rec["n"]) is int
    assert rec["cmc"] == [0.25, 0.5] and state["where"] == str(tmp_path)
    # The module state_dict keeps its per-module versions (BatchNorm's, here).
    assert state["model"]._metadata["1"]["version"] == 2


def test_save_refuses_objects_that_would_need_code_to_load(tmp_path):
    class Thing:
        pass

    with pytest.raises(TypeError, match=r"checkpoint\['metrics'\]\['bad'\].*only tensors, numbers, strings"):
        _save(tmp_path / "c.ckpt", metrics={"bad": Thing()})
    with pytest.raises(TypeError, match="keys are strings or integers"):
        _save(tmp_path / "c.ckpt", metrics={(1, 2): 3})
    assert not (tmp_path / "c.ckpt").exists()


def test_rng_state_round_trip_is_exact():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in the legacy NumPy state
    random.gauss(0, 1)
    state = ckpt.rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.set_rng_state(state)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])
    torch.testing.assert_close(got[3], expected[3], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# format 1
# ---------------------------------------------------------------------------------------------

def test_format1_checkpoint_loads_and_restores_rng(tmp_path):
    model, opt = _trained()
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    torch.save(_v1_state(model, opt), tmp_path / "v1.ckpt")
    expected = (random.random(), np.random.rand(4), torch.rand(2))

    model2 = _model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    random.seed(0)
    np.random.seed(0)
    state = ckpt.load_checkpoint(tmp_path / "v1.ckpt", model2, opt2, restore_rng=True, backbone="cmsnet",
                                 num_classes=3)
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.rand(4), expected[1])
    torch.testing.assert_close(torch.rand(2), expected[2], rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[k], v, rtol=0, atol=0)
    assert opt2.state_dict()["state"][0]["momentum_buffer"].abs().sum() > 0
    # Loaded, it is format 2: plain data only, the NumPy key as a list of ints.
    assert state["format"] == "ksl_ops.checkpoint/2" and isinstance(state["rng"]["numpy"]["key"], list)
    assert state["upgraded_from"] == "ksl_ops.checkpoint/1"
    assert ckpt.describe_checkpoint(state) == ("cmsnet, losses ksl, 3 classes, epoch 2, input 64x32 "
                                               "(format 1, upgraded on load)")
    assert state["metrics"]["history"][0]["loss"]["total"] == 1.5
    # Re-saving it writes a file the bare weights-only loader reads.
    ckpt.atomic_save(state, tmp_path / "v2.ckpt")
    assert torch.load(tmp_path / "v2.ckpt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("payload", [
    np.zeros(3),                              # another dtype than the RNG key's uint32
    np.zeros((2, 2), dtype=np.uint32),        # another shape
    np.array(["a", "b"], dtype=object),       # object arrays
    np.float64(1.0),                          # NumPy scalars (a different global)
])
def test_format1_allow_list_admits_only_the_rng_key(tmp_path, payload):
    model, opt = _trained()
    state = _v1_state(model, opt)
    state["metrics"] = {"x": payload}
    torch.save(state, tmp_path / "v1.ckpt")
    with pytest.raises(CheckpointError, match=r"v1.ckpt holds pickled code or objects .*nothing in it was run"):
        ckpt.read_checkpoint(tmp_path / "v1.ckpt")


def test_format1_key_array_elsewhere_is_refused(tmp_path):
    # The uint32 key array is the one NumPy object format 1 had, and only under rng/numpy.
    model, opt = _trained()
    state = _v1_state(model, opt)
    state["metrics"] = {"x": np.arange(4, dtype=np.uint32)}
    torch.save(state, tmp_path / "v1.ckpt")
    with pytest.raises(CheckpointError, match=r"\['metrics'\]\['x'\] holds a NumPy object"):
        ckpt.read_checkpoint(tmp_path / "v1.ckpt")
    state = torch.load(_save(tmp_path / "v2.ckpt"), weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()  # format 2 has no array even there
    torch.save(state, tmp_path / "v2.ckpt")
    with pytest.raises(CheckpointError, match=r"\['rng'\]\['numpy'\]\[1\] holds a NumPy object"):
        ckpt.read_checkpoint(tmp_path / "v2.ckpt")


# ---------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------

def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*missing.ckpt") as e:
        ckpt.read_checkpoint(tmp_path / "missing.ckpt")
    assert isinstance(e.value, FileNotFoundError)  # for callers that catch that


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file$"):
        ckpt.read_checkpoint(tmp_path)
    _save(tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file; did you mean .*last.ckpt\?"):
        ckpt.read_checkpoint(tmp_path)


def test_empty_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"empty.ckpt is empty \(0 bytes\)"):
        ckpt.read_checkpoint(_write(tmp_path / "empty.ckpt", b""))


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, keep):
    data = _save(tmp_path / "full.ckpt").read_bytes()
    path = _write(tmp_path / "cut.ckpt", data[: max(4, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match=r"cut.ckpt is a damaged torch file \(\d+ bytes; truncated or corrupt"):
        ckpt.read_checkpoint(path)


@pytest.mark.parametrize("data", [os.urandom(1000), b"hello world\n" * 10, b"\x80\x02" + os.urandom(500),
                                  bytes(range(256)) * 4], ids=["random", "text", "pickle-header", "bytes"])
def test_random_bytes(tmp_path, data):
    with pytest.raises(CheckpointError, match=r"junk.ckpt is not a torch checkpoint \(\d+ bytes that torch.load"):
        ckpt.read_checkpoint(_write(tmp_path / "junk.ckpt", data))


@pytest.mark.parametrize("obj, what", [
    ({"weight": torch.ones(2), "bias": torch.zeros(2)}, "a bare state_dict"),
    ({"weights": 1, "epoch": 3}, "keys 'weights', 'epoch'"),
    ({"format": "someone-else/1", "model": {}}, "format 'someone-else/1'"),
    ([torch.ones(2)], None),
    (torch.ones(3), None),
])
def test_torch_file_that_is_not_a_ksl_checkpoint(tmp_path, obj, what):
    torch.save(obj, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt is a torch file (but not|holding a \w+, not) a ksl_ops") as e:
        ckpt.read_checkpoint(tmp_path / "other.pt")
    if what is not None:
        assert what in str(e.value)


def test_newer_format_version(tmp_path):
    state = torch.load(_save(tmp_path / "c.ckpt"), weights_only=True)
    state["format"] = "ksl_ops.checkpoint/3"
    torch.save(state, tmp_path / "future.ckpt")
    with pytest.raises(CheckpointError, match=r"future.ckpt is a ksl_ops checkpoint of format version 3, newer "
                                              r"than this ksl-ops \(.*\) reads \(up to 2\); upgrade ksl-ops"):
        ckpt.read_checkpoint(tmp_path / "future.ckpt")
    state["format"] = "ksl_ops.checkpoint/0"
    torch.save(state, tmp_path / "zero.ckpt")
    with pytest.raises(CheckpointError, match="format version 0, which never existed"):
        ckpt.read_checkpoint(tmp_path / "zero.ckpt")


@pytest.mark.parametrize("drop, msg", [("model", "'model' is missing or not a dict"),
                                       ("epoch", "'epoch' is missing or not an integer"),
                                       ("config", "'config' is missing or not a dict")])
def test_incomplete_checkpoint(tmp_path, drop, msg):
    state = torch.load(_save(tmp_path / "c.ckpt"), weights_only=True)
    del state[drop]
    torch.save(state, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match=f"c.ckpt is an incomplete ksl_ops checkpoint: {msg}"):
        ckpt.read_checkpoint(tmp_path / "c.ckpt")


def test_other_backbone_or_class_count(tmp_path):
    path = _save(tmp_path / "c.ckpt", extra={"num_classes": 3})
    model, opt = _trained()
    with pytest.raises(CheckpointError, match=r"c.ckpt is a cmsnet checkpoint, not mobilenetv2"):
        ckpt.load_checkpoint(path, model, opt, backbone="mobilenetv2")
    with pytest.raises(CheckpointError, match=r"c.ckpt was trained on 3 classes \(identities\), not the 10 asked"):
        ckpt.load_checkpoint(path, model, opt, backbone="cmsnet", num_classes=10)
    # Without the checks asked for, the model itself says what does not fit -- and stays untouched.
    other = _model(out=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"does not fit this Sequential: 2 shape mismatches, checkpoint vs "
                                              r"model \(e.g. 2.weight \[3, 8\] vs \[5, 8\]"):
        ckpt.load_checkpoint(path, other)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(CheckpointError,
                       match=r"does not fit this Linear: 2 missing entries \(e.g. weight, bias\); 9 unexpected"):
        ckpt.load_checkpoint(path, torch.nn.Linear(2, 2))
    assert ckpt.load_checkpoint(path, model, opt, backbone="cmsnet", num_classes=3)["epoch"] == 2


def test_no_optimizer_state(tmp_path):
    model, _ = _trained()
    path = ckpt.save_checkpoint(tmp_path / "c.ckpt", model=model, epoch=1)
    with pytest.raises(CheckpointError, match="c.ckpt has no optimizer state to resume from"):
        ckpt.load_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_damaged_rng_or_scheduler_state(tmp_path):
    from ksl_ops.engine.trainer import WarmupCosineLR

    model, opt = _trained()
    state = torch.load(_save(tmp_path / "c.ckpt", model, opt, scheduler=WarmupCosineLR(opt, 4)), weights_only=True)
    del state["rng"]["numpy"]["pos"]
    del state["scheduler"]["last_epoch"]
    torch.save(state, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match=r"c.ckpt: its scheduler state cannot be restored: KeyError\('last_epoch"):
        ckpt.load_checkpoint(tmp_path / "c.ckpt", scheduler=WarmupCosineLR(opt, 4))
    with pytest.raises(CheckpointError, match=r"c.ckpt: its RNG state cannot be restored: KeyError\('pos'\)"):
        ckpt.load_checkpoint(tmp_path / "c.ckpt", restore_rng=True)


def test_describe_checkpoint(tmp_path):
    state = ckpt.read_checkpoint(_save(tmp_path / "c.ckpt", extra={"num_classes": 3}))
    assert ckpt.describe_checkpoint(state) == ("cmsnet, losses ksl, 3 classes, epoch 2/4, input 64x32, "
                                               "trained on synthetic (format 2)")


def test_trainer_resume_refuses_another_backbone_or_loss_preset(tmp_path):
    from ksl_ops.data import render_synthetic
    from ksl_ops.engine import TrainConfig, Trainer

    root = render_synthetic(tmp_path / "synthetic", height=32, width=16, num_train_ids=4, num_test_ids=2,
                            num_cams=2, images_per_cam=2)

    def trainer(**kw):
        cfg = TrainConfig.from_preset("cpu", data_root=str(root), height=32, width=16, batch_size=4, num_instances=2,
                                      epochs=2, workers=0, backend="reference", output_dir=str(tmp_path / "run"),
                                      progress="off", **kw)
        return Trainer(cfg, log=lambda s: None)

    trainer(backbone="shufflenetv2", losses="baseline").save(1)
    path = tmp_path / "run" / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"last.ckpt is a shufflenetv2 checkpoint, not mobilenetv2"):
        trainer(backbone="mobilenetv2", losses="baseline").resume(path)
    with pytest.raises(CheckpointError, match=r"last.ckpt does not fit this IsomorphicNet: \d+ missing entries"):
        trainer(backbone="shufflenetv2", losses="ksl").resume(path)
    assert trainer(backbone="shufflenetv2", losses="baseline").resume(path) == 1


# ---------------------------------------------------------------------------------------------
# pickles that run code
# ---------------------------------------------------------------------------------------------

class _Exec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _malicious(kind, path, marker, tmp_path):
    payload = (_Exec if kind != "system" else _System)(marker)
    if kind == "raw-pickle":  # a .ckpt that is a bare pickle, as in the issue
        path.write_bytes(pickle.dumps({"model": payload}, protocol=2))
    elif kind == "legacy-torch":
        torch.save({"model": payload}, path, _use_new_zipfile_serialization=False)
    elif kind == "inside-valid":  # a real checkpoint, the payload tucked into its config
        state = torch.load(_save(tmp_path / "ok.ckpt"), weights_only=True)
        state["config"]["backbone"] = payload
        torch.save(state, path)
    else:
        torch.save({"format": "ksl_ops.checkpoint/2", "model": payload}, path)
    return path


KINDS = ["zip", "raw-pickle", "legacy-torch", "inside-valid"] + (["system"] if os.name == "posix" else [])


def test_the_payload_is_live(tmp_path):
    # Guard for the test below: unpickled without restriction, the payload does write its marker.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Exec(marker)))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("kind", KINDS)
def test_malicious_pickle_is_refused_and_not_run(tmp_path, kind):
    marker = tmp_path / "PAYLOAD_RAN"
    path = _malicious(kind, tmp_path / "evil.ckpt", marker, tmp_path)
    with pytest.raises(CheckpointError, match=r"evil.ckpt holds pickled code or objects \((exec|posix.system)\) "
                                              r"that a ksl_ops checkpoint never contains; .*nothing in it was run"):
        ckpt.read_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        ckpt.load_checkpoint(path, _model(), restore_rng=True)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# the command line: a message, exit status 2, no traceback, no payload
# ---------------------------------------------------------------------------------------------

def _bad_files(tmp_path):
    torch.save({"weight": torch.ones(2)}, tmp_path / "state_dict.pt")
    future = torch.load(_save(tmp_path / "c.ckpt"), weights_only=True)
    future["format"] = "ksl_ops.checkpoint/7"
    torch.save(future, tmp_path / "future.ckpt")
    good = _save(tmp_path / "good.ckpt").read_bytes()
    return {
        "missing": (tmp_path / "nope.ckpt", "checkpoint not found"),
        "directory": (tmp_path, "is a directory"),
        "empty": (_write(tmp_path / "empty.ckpt", b""), "is empty"),
        "truncated": (_write(tmp_path / "cut.ckpt", good[: len(good) // 2]), "is a damaged torch file"),
        "random": (_write(tmp_path / "rand.ckpt", os.urandom(1000)), "is not a torch checkpoint"),
        "foreign": (tmp_path / "state_dict.pt", "not a ksl_ops checkpoint"),
        "future": (tmp_path / "future.ckpt", "format version 7, newer"),
        "malicious": (_malicious("zip", tmp_path / "evil.ckpt", tmp_path / "PAYLOAD_RAN", tmp_path),
                      "nothing in it was run"),
    }


def test_cli_eval_and_resume_report_bad_files_without_traceback(tmp_path, capsys):
    for name, (path, msg) in _bad_files(tmp_path).items():
        for argv in (["eval", "--checkpoint", str(path), "--workers", "0"],
                     ["train", "--resume", str(path), "--workers", "0", "--progress", "off"]):
            assert ksl_main(argv) == 2, (name, argv)
            err = capsys.readouterr().err
            assert err.startswith("error: ") and msg in err and str(path) in err, (name, argv, err)
            assert "Traceback" not in err
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_cli_bad_file_in_a_fresh_process(tmp_path):
    # The installed entry point, as a user runs it: one line on stderr, exit status 2.
    import subprocess

    path = _malicious("zip", tmp_path / "evil.ckpt", tmp_path / "PAYLOAD_RAN", tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "ksl_ops.cli", "eval", "--checkpoint", str(path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"error: {path} holds pickled code") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "PAYLOAD_RAN").exists()
