"""Hostile or careless input to the command line, checkpoints and datasets ends in one clear error that
names the argument or file, found before any training, with nothing lost and nothing written outside
the run's folder (issue: "A checkpoint is data, and so are its settings", "Work lost or found late").

Cases that could take the process down (deep nesting, huge sizes, SIGKILL) run in a subprocess."""
import contextlib
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ksl_ops.cli import main as ksl_main
from ksl_ops.data import build_dataset
from ksl_ops.engine import TrainConfig, Trainer
from ksl_ops.engine import checkpoint as ckpt
from ksl_ops.engine.checkpoint import CheckpointError

from _helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(synth_root, tmp_path_factory):
    """A finished 1-epoch run's folder (last.ckpt of a shufflenetv2 / ksl-h model)."""
    out = tmp_path_factory.mktemp("run") / "run"
    Trainer(_config(synth_root, out), log=lambda s: None).fit()
    return out


def _config(root, out, **kw):
    return tiny_config(root, out, **{"epochs": 1, "max_iters_per_epoch": 1, "backend": "reference", "losses": "ksl-h",
                                     **kw})


def _train_argv(root, out, *extra):
    return ["train", "--data-root", str(root), "--synth-ids", "6", "4", "--synth-cams", "2", "--synth-images", "3",
            "--height", "32", "--width", "16", "--batch-size", "8", "--num-instances", "2", "--epochs", "1",
            "--max-iters", "1", "--workers", "0", "--backend", "reference", "--output-dir", str(out),
            "--progress", "off", "--losses", "ksl-h", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _ksl(*argv, cwd=None, env=None, timeout=300, **kw):
    """The `ksl` command in a fresh process."""
    return subprocess.run([sys.executable, "-m", "ksl_ops.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env or _env(), cwd=cwd, timeout=timeout, **kw)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") or ": error: " in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def _cli_error(capsys, argv, *needles):
    """`ksl argv` in this process: exit status 2 and one line on stderr holding every needle."""
    code = ksl_main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, (code, captured.out[-2000:], captured.err[-2000:])
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    for n in needles:
        assert n in captured.err, (n, captured.err)
    return captured


def _state(run):
    return torch.load(run / "last.ckpt", weights_only=True)


def _resave(state, path):
    torch.save(state, path)
    return path


# ---------------------------------------------------------------------------------------------
# a checkpoint's settings: validated like the command line's; never where files are written
# ---------------------------------------------------------------------------------------------

def test_eval_never_writes_into_a_checkpoint_data_root(run, tmp_path, monkeypatch, capsys):
    state = _state(run)
    elsewhere = tmp_path / "elsewhere" / "victim"
    state["config"]["data_root"] = str(elsewhere)
    path = _resave(state, tmp_path / "shared.ckpt")
    default = tmp_path / "default_root"
    monkeypatch.setenv("KSL_DATA", str(default))
    assert ksl_main(["eval", "--checkpoint", str(path), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "elsewhere").exists()
    assert (default / "manifest.json").is_file() and "never chooses where files are written" in out
    # --data-root is the user's choice and wins.
    mine = tmp_path / "mine"
    assert ksl_main(["eval", "--checkpoint", str(path), "--workers", "0", "--data-root", str(mine)]) == 0
    assert (mine / "manifest.json").is_file() and not (tmp_path / "elsewhere").exists()
    # A checkpoint data root that already holds its set rendered with its settings is only read.
    state["config"]["data_root"] = str(mine)
    before = {p: p.stat().st_mtime_ns for p in mine.rglob("*")}
    assert ksl_main(["eval", "--checkpoint", str(_resave(state, path)), "--workers", "0"]) == 0
    assert "(the checkpoint's data root; only read)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in mine.rglob("*")} == before


def test_resume_writes_into_the_checkpoint_folder_not_its_config_output_dir(run, tmp_path, capsys):
    state = _state(run)
    state["epoch"] = 0
    state["config"]["output_dir"] = str(tmp_path / "elsewhere")
    folder = tmp_path / "copy"
    folder.mkdir()
    path = _resave(state, folder / "last.ckpt")
    assert ksl_main(["train", "--resume", str(path), "--workers", "0", "--progress", "off"]) == 0
    capsys.readouterr()
    assert not (tmp_path / "elsewhere").exists()
    assert (folder / "metrics.json").is_file() and torch.load(path, weights_only=True)["epoch"] == 1


def test_huge_input_size_in_a_checkpoint_is_refused_before_anything_is_written(run, tmp_path):
    state = _state(run)
    state["config"]["height"] = state["config"]["width"] = 10 ** 6
    path = _resave(state, tmp_path / "huge.ckpt")
    env = dict(_env(), KSL_DATA=str(tmp_path / "default_root"))
    r = _ksl("eval", "--checkpoint", path, "--workers", "0", env=env, cwd=tmp_path)
    _one_line_error(r, str(path), "its config is not valid: height must be an integer in [1, 2048], got 1000000")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.ckpt"]


@pytest.mark.parametrize("field, value, msg", [
    ("recipe", "bogus", "recipe must be one of ['paper', 'ksl-ops'], got 'bogus'"),
    ("losses", ["ksl"], "losses must be one of"),
    ("workers", "2", "workers must be an integer in [0, 256], got '2'"),
    ("lr", float("nan"), "lr must be a finite number in (0, inf), got nan"),
    ("synthetic", {"num_train_ids": 6, "evil": 1}, "synthetic: unknown setting 'evil'"),
    ("synthetic", {"images_per_cam": 10 ** 6}, "more than the 1000000 a synthetic set may have"),
    ("device", "tpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("dataset", 7, "dataset must be one of"),
    ("nesterov", "yes", "nesterov must be True or False"),
])
def test_checkpoint_config_of_wrong_type_or_range(run, tmp_path, capsys, field, value, msg):
    state = _state(run)
    state["config"][field] = value
    path = _resave(state, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="its config is not valid"):
        from ksl_ops.engine.trainer import load_trained_model
        load_trained_model(path, log=lambda s: None)
    for argv in (["eval", "--checkpoint", path, "--workers", "0"],
                 ["train", "--resume", path, "--workers", "0", "--progress", "off"]):
        _cli_error(capsys, argv, f"error: {path}: its config is not valid: ", msg)


def test_settings_from_a_file_and_from_the_command_line_share_one_validation():
    good = TrainConfig.from_preset("cpu").to_dict()
    assert TrainConfig.from_dict(good) == TrainConfig.from_preset("cpu")
    for field, value in [("recipe", "bogus"), ("lr", float("inf")), ("height", 10 ** 6), ("workers", -1),
                         ("label_smoothing", float("nan")), ("margin", -1.0), ("momentum", 1.5),
                         ("temperature", 0.0), ("weight_decay", float("inf")), ("min_lr_ratio", 2.0),
                         ("seed", -1), ("epochs", True), ("output_dir", ""), ("data_root", 3)]:
        with pytest.raises(ValueError, match=f"^{field} must be") as from_dict:
            TrainConfig.from_dict({**good, field: value})
        with pytest.raises(ValueError) as from_code:
            TrainConfig.from_preset("cpu", **{field: value})
        assert str(from_dict.value) == str(from_code.value)


# ---------------------------------------------------------------------------------------------
# crafted but well-formed checkpoints: CheckpointError, exit status 2, one line
# ---------------------------------------------------------------------------------------------

def _splice(src: Path, dst: Path, placeholder: str, ops: bytes) -> Path:
    """Copy the torch file `src` to `dst` with the pickled string `placeholder` replaced by raw pickle
    `ops` (how a file too deep for torch.save to write is made)."""
    s = placeholder.encode()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                for op in (b"X" + len(s).to_bytes(4, "little") + s, b"\x8c" + bytes([len(s)]) + s):
                    if op in data:
                        data = data.replace(op, ops)
                        break
                else:
                    raise AssertionError("placeholder not found")
            zout.writestr(info.filename, data)
    return dst


def test_list_nested_200000_deep_in_a_fresh_process(run, tmp_path):
    state = _state(run)
    state["metrics"]["history"] = "PLACEHOLDER_DEEP"
    src = _resave(state, tmp_path / "src.ckpt")
    n = 200_000
    path = _splice(src, tmp_path / "deep.ckpt", "PLACEHOLDER_DEEP", b"]" * n + b"a" * (n - 1))
    with pytest.raises(CheckpointError, match=r"deep.ckpt is not a valid ksl_ops checkpoint: "
                                              r"checkpoint\['metrics'\]\['history'\]\[0\].* nests lists or dicts "
                                              r"more than 64 deep"):
        ckpt.read_checkpoint(path)
    for argv in (["eval", "--checkpoint", path], ["train", "--resume", path, "--progress", "off"]):
        _one_line_error(_ksl(*argv, "--workers", "0", cwd=tmp_path), str(path), "more than 64 deep")


class _BareNumpyArray:
    """Pickles as numpy's ndarray _reconstruct call without the state that fills it."""

    def __reduce__(self):
        return (np.ndarray.__reduce__(np.zeros(1, np.uint32))[0], (np.ndarray, (0,), b"b"))


def test_format1_numpy_stand_in_without_state_or_bad_python_rng(run, tmp_path, capsys):
    state = _state(run)
    state["format"] = "ksl_ops.checkpoint/1"
    state["rng"]["numpy"] = ("MT19937", _BareNumpyArray(), 624, 0, 0.0)
    path = tmp_path / "v1.ckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="v1.ckpt: its RNG state cannot be restored: the format-1 NumPy key "
                                              "array has no data"):
        ckpt.read_checkpoint(path)
    _cli_error(capsys, ["eval", "--checkpoint", path, "--workers", "0"], str(path), "has no data")

    for python_state, msg in [([3, [2 ** 64] * 625, None], "625 integers in [0, 2**32)"),
                              ([3, list(range(625)), "x"], "gauss_next must be None or a float"),
                              ([3, [0] * 624 + [10 ** 6], None], "ValueError"),
                              ([3, [0] * 625], "ValueError")]:
        state = _state(run)
        state["epoch"] = 0
        state["rng"]["python"] = python_state
        path = _resave(state, tmp_path / "rng.ckpt")
        rng_before = torch.get_rng_state()
        with pytest.raises(CheckpointError, match="rng.ckpt: its RNG state cannot be restored"):
            ckpt.load_checkpoint(path, restore_rng=True)
        assert torch.equal(torch.get_rng_state(), rng_before)  # nothing was half-restored
        _cli_error(capsys, ["train", "--resume", path, "--workers", "0", "--progress", "off"],
                   f"{path}: its RNG state cannot be restored", msg)


def test_classifier_weight_0d_expanded_or_disagreeing(run, tmp_path, capsys):
    key = "classifier.weight"
    base = _state(run)
    name = min((k for k in base["model"] if k.endswith(key)), key=len)
    features = base["model"][name].shape[1]
    cases = [
        (torch.tensor(1.0), "has shape [], not [classes, features]"),
        (torch.zeros(1, features).expand(10 ** 7, features), "is an overlapping view of [10000000, "),
    ]
    for tensor, msg in cases:
        state = _state(run)
        state["model"][name] = tensor
        path = _resave(state, tmp_path / "cls.ckpt")
        # a few bytes declaring a huge classifier: the file is no larger than the real one
        assert os.path.getsize(path) <= os.path.getsize(run / "last.ckpt") + 10 ** 4
        with pytest.raises(CheckpointError, match="cls.ckpt is not a valid ksl_ops checkpoint"):
            ckpt.read_checkpoint(path)
        for argv in (["eval", "--checkpoint", path, "--workers", "0"],
                     ["train", "--resume", path, "--workers", "0", "--progress", "off"]):
            _cli_error(capsys, argv, str(path), msg)
    state = _state(run)
    state["num_classes"] = 10 ** 12
    path = _resave(state, tmp_path / "n.ckpt")
    _cli_error(capsys, ["eval", "--checkpoint", path, "--workers", "0"], "num_classes is 1000000000000 but")
    for k in [k for k in state["model"] if k.endswith(key)]:  # the main and the branch classifiers
        del state["model"][k]
    path = _resave(state, tmp_path / "n.ckpt")
    _cli_error(capsys, ["eval", "--checkpoint", path, "--workers", "0"], "has no classifier weight")


def test_resume_checks_optimizer_state_shapes_and_hyperparameters_at_load(run, tmp_path, capsys):
    state = _state(run)
    state["epoch"] = 0
    bufs = state["optimizer"]["state"]
    idx = next(iter(bufs))
    shape = list(bufs[idx]["momentum_buffer"].shape)
    bufs[idx]["momentum_buffer"] = torch.zeros(3, 5)
    path = _resave(state, tmp_path / "opt.ckpt")
    _cli_error(capsys, ["train", "--resume", path, "--workers", "0", "--progress", "off"],
               f"{path}: its optimizer state does not fit this optimizer: 'momentum_buffer' of parameter {idx} "
               f"(group 0) is torch.float32 [3, 5], the parameter torch.float32 {shape}")
    assert not (tmp_path / "metrics.json").exists()  # refused at load: no epoch ran

    for group_key, value, msg in [("lr", float("nan"), "group 0 lr is nan, not a finite number"),
                                  ("momentum", float("inf"), "group 0 momentum is inf")]:
        state = _state(run)
        state["epoch"] = 0
        state["optimizer"]["param_groups"][0][group_key] = value
        _cli_error(capsys, ["train", "--resume", _resave(state, tmp_path / "opt.ckpt"), "--workers", "0",
                            "--progress", "off"], msg)
    state = _state(run)
    state["epoch"] = 0
    state["scheduler"]["base_lrs"] = [float("nan")]
    _cli_error(capsys, ["train", "--resume", _resave(state, tmp_path / "opt.ckpt"), "--workers", "0", "--progress",
                        "off"], "its scheduler state cannot be restored", "base_lrs must be a finite number")


def test_resume_checks_epoch_and_history(run, tmp_path, capsys):
    for change, msg in [(dict(epoch=99), "was saved after epoch 99, past the 1 epochs"),
                        (dict(epoch=-1), "epoch is -1, below 0"),
                        (dict(metrics={"history": "x"}), "its metrics are not a history of epoch records"),
                        (dict(metrics={"history": [{"loss": torch.ones(2)}]}), "not a history of epoch records"),
                        (dict(metrics=[1]), "not a history of epoch records")]:
        state = dict(_state(run), **change)
        path = _resave(state, tmp_path / "e.ckpt")
        _cli_error(capsys, ["train", "--resume", path, "--workers", "0", "--progress", "off"], str(path), msg)


# ---------------------------------------------------------------------------------------------
# work lost or found late: the output folder, options, devices
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _unwritable_folder(tmp_path):
    """An existing folder in which this process really cannot create a file. Permissions do not stop
    root, so as root the folder is made immutable (chattr +i, which binds root too) or, where that is
    not allowed, a sysfs folder (which refuses new files to everyone) stands in."""
    folder = tmp_path / "out"
    folder.mkdir()
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0:
        try:
            try:
                (folder / "probe").write_text("x")  # a file system that keeps the flag but ignores it
            except OSError:
                yield folder
                return
        finally:
            subprocess.run([chattr, "-i", str(folder)], capture_output=True)
        (folder / "probe").unlink()
    for candidate in (Path("/sys/kernel"), Path("/sys")):
        try:
            (candidate / ".ksl-probe").touch()
        except OSError:
            yield candidate
            return
        (candidate / ".ksl-probe").unlink()
    pytest.skip("no folder that root cannot write here (no chattr, no read-only sysfs)")


def test_unwritable_output_folder_is_found_before_training(synth_root, tmp_path):
    with _unwritable_folder(tmp_path) as folder:
        with pytest.raises(OSError):  # the folder really refuses new files
            (folder / "probe").write_text("x")
        r = _ksl(*_train_argv(synth_root, folder), cwd=tmp_path)
    _one_line_error(r, f"output folder {str(folder)!r} cannot be written (", "); nothing was run")
    assert "epoch" not in r.stdout and "synthetic set ready" not in r.stdout  # before data and training


def test_output_path_under_a_file_device_and_batch(synth_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _cli_error(capsys, _train_argv(synth_root, blocker / "run"),
               f"output folder {str(blocker / 'run')!r} is under {str(blocker)!r}, which is a file")
    _cli_error(capsys, _train_argv(synth_root, blocker), f"output folder {str(blocker)!r} is a file")
    out = tmp_path / "run"
    _cli_error(capsys, _train_argv(synth_root, out, "--device", "tpu"),
               "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'", "'tpu'")
    if not torch.cuda.is_available():
        _cli_error(capsys, _train_argv(synth_root, out, "--device", "cuda:1"), "CUDA is not available")
    _cli_error(capsys, ["eval", "--checkpoint", tmp_path / "x.ckpt", "--device", "tpu"], "'tpu'")
    # A batch the data cannot fill: found before the first epoch, not where its sampler starts.
    _cli_error(capsys, _train_argv(synth_root, out, "--batch-size", "64", "--num-instances", "4", "--epochs", "3",
                                   "--triplet-start", "2"),
               "batch_size (64) is larger than the training set (36 images)")
    _cli_error(capsys, _train_argv(synth_root, out, "--batch-size", "16", "--num-instances", "1", "--epochs", "3",
                                   "--triplet-start", "2"),
               "RandomIdentitySampler: a batch of 16 with num_instances=1 needs 16 identities, the data has 6")
    assert not (out / "last.ckpt").exists() and not (out / "metrics.json").exists()


def test_output_folder_holding_a_folder_named_like_an_output(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "last.ckpt").mkdir(parents=True)
    _cli_error(capsys, _train_argv(synth_root, out), "last.ckpt' is a folder; the run writes a file of that name")


@pytest.mark.parametrize("option", ["--lr", "--label-noise", "--weight-e"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_float_options_are_refused(synth_root, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as e:
        ksl_main(_train_argv(synth_root, tmp_path / "run", f"{option}={value}"))
    assert e.value.code == 2
    assert f"argument {option}: {value!r} is not a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_negative_weight_e_is_refused_before_the_run(synth_root, tmp_path, capsys):
    _cli_error(capsys, _train_argv(synth_root, tmp_path / "run", "--weight-e", "-1"),
               "weight_e must be a finite number in [0, inf), got -1.0")
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_non_finite_threshold_and_stop_after(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ksl_main(["analyze", "weights", "--checkpoint", "x.ckpt", "--threshold", "nan"])
    assert e.value.code == 2 and "argument --threshold: 'nan' is not a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ksl_main(["train", "--stop-after", "0"])
    assert e.value.code == 2 and "argument --stop-after: must be >= 1, got 0" in capsys.readouterr().err


def test_result_files_are_checked_before_the_work(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _cli_error(capsys, ["eval", "--checkpoint", run / "last.ckpt", "--workers", "0", "--json", blocker / "r.json"],
               f"--json: the folder {str(blocker)!r} is a file")
    _cli_error(capsys, ["analyze", "weights", "--checkpoint", run / "last.ckpt", "--out", blocker / "w.png"],
               f"--out: the folder {str(blocker)!r} is a file")
    _cli_error(capsys, ["analyze", "tsne", "--checkpoint", run / "last.ckpt", "--out", tmp_path / "t.png",
                        "--json", tmp_path],
               f"--json {str(tmp_path)!r} is a folder, not a file path")
    # A result written over the checkpoint it came from would destroy it.
    copy = tmp_path / "copy.ckpt"
    shutil.copy(run / "last.ckpt", copy)
    before = copy.read_bytes()
    _cli_error(capsys, ["eval", "--checkpoint", copy, "--workers", "0", "--json", tmp_path / "." / "copy.ckpt"],
               "is the input file", "writing there would destroy it")
    _cli_error(capsys, ["analyze", "weights", "--checkpoint", copy, "--out", tmp_path / "w.png", "--json", copy],
               "--json", "is the input file")
    _cli_error(capsys, ["analyze", "weights", "--checkpoint", copy, "--out", copy], "--out", "is the input file")
    assert copy.read_bytes() == before


def test_synth_options_are_bounded_and_paths_checked_first(tmp_path, capsys):
    root = tmp_path / "s"
    _cli_error(capsys, ["synth", "--root", root, "--height", "1000000"],
               "render_synthetic: height must be an integer in [32, 2048], got 1000000")
    _cli_error(capsys, ["synth", "--root", root, "--images-per-cam", "1000000"], "more than the 1000000")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _cli_error(capsys, ["synth", "--root", blocker / "s"], f"is under {str(blocker)!r}, which is a file")
    _cli_error(capsys, ["synth", "--root", root, "--preview", blocker / "p.png"], "--preview: the folder")
    assert not root.exists()  # the bad preview path was found before rendering


# ---------------------------------------------------------------------------------------------
# bad images and names: found before training (and before evaluation), naming the file
# ---------------------------------------------------------------------------------------------

def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (10, 20, 30)).save(path)


def make_market(base: Path) -> Path:
    root = base / "Market-1501-v15.09.15"
    for sub, names in (("bounding_box_train", ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg",
                                               "0007_c1s2_001000_01.jpg", "0007_c3s3_076384_02.jpg"]),
                       ("query", ["0002_c2s1_000301_00.jpg", "0007_c3s3_075000_00.jpg"]),
                       ("bounding_box_test", ["0002_c1s1_000800_02.jpg", "0007_c1s1_001200_01.jpg"])):
        for n in names:
            _img(root / sub / n)
    return root


def make_msmt17(base: Path) -> Path:
    root = base / "MSMT17_V1"
    lists = {"list_train.txt": ("train", [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                          ("0002/0002_000_15_0303noon_0100_0.jpg", 2)]),
             "list_val.txt": ("train", [("0001/0001_000_03_0303afternoon_0010_0.jpg", 1)]),
             "list_query.txt": ("test", [("0000/0000_000_02_0303morning_0001_0.jpg", 0),
                                         ("0001/0001_003_11_0303noon_0002_1.jpg", 1)]),
             "list_gallery.txt": ("test", [("0000/0000_001_07_0303morning_0009_0.jpg", 0)])}
    for fname, (sub, rows) in lists.items():
        for rel, _ in rows:
            _img(root / sub / rel)
        (root / fname).write_text("".join(f"{rel} {pid}\n" for rel, pid in rows))
    return root


def _png_header(width, height) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _bad_bytes(good: bytes):
    return {"empty": (b"", "is empty (0 bytes)"),
            "random": (os.urandom(2000), "is not an image PIL can read (2000 bytes)"),
            "truncated": (good[: len(good) // 2], "cannot be decoded (OSError"),
            "no end marker": (good[:-2], "cannot be decoded (OSError: image file is truncated")}


@pytest.mark.parametrize("split", ["bounding_box_train", "query", "bounding_box_test"])
@pytest.mark.parametrize("kind", ["empty", "random", "truncated", "no end marker"])
def test_bad_jpeg_is_found_before_training(synth_root, tmp_path, capsys, split, kind):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    victim = sorted((data / split).iterdir())[1]
    victim.write_bytes(_bad_bytes(victim.read_bytes())[kind][0])
    out = tmp_path / "run"
    cap = _cli_error(capsys, _train_argv(data, out), "found before training", f"{str(victim)!r}",
                     _bad_bytes(b"xx")[kind][1])
    assert "epoch" not in cap.out and not (out / "last.ckpt").exists()


def test_decompression_bomb_png_is_found_before_training(tmp_path, capsys):
    root = make_market(tmp_path)
    bomb = root / "query" / "0002_c2s1_000301_00.jpg"
    bomb.write_bytes(_png_header(100_000, 100_000))  # a PNG under a .jpg name, as PIL reads by content
    _cli_error(capsys, ["train", "--dataset", "market1501", "--data-root", root, "--output-dir", tmp_path / "run",
                        "--workers", "0", "--progress", "off"],
               "market1501: 1 of its", f"{str(bomb)!r} (query) declares too many pixels", "found before training")


def test_bad_query_image_is_found_before_evaluating(run, tmp_path, capsys, synth_root):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    victim = sorted((data / "query").iterdir())[0]
    victim.write_bytes(b"")
    _cli_error(capsys, ["eval", "--checkpoint", run / "last.ckpt", "--workers", "0", "--data-root", data],
               "found before evaluating", f"{str(victim)!r} (query) is empty")


def test_many_bad_images_are_counted_and_the_first_named(synth_root, tmp_path):
    from ksl_ops.data.check import check_images

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    ds = build_dataset("synthetic", data)
    for path, _, _ in ds.train[:7]:
        Path(path).write_bytes(b"")
    with pytest.raises(ValueError, match=r"synthetic: 7 of its 36 images cannot be used, found before training: "
                                         r".*; and 2 more\. Replace or remove them"):
        check_images([("train", ds.train)], ds.name)
    assert check_images([("query", ds.query), ("gallery", ds.gallery)], ds.name) == len(ds.query) + len(ds.gallery)


@pytest.mark.parametrize("digits", [20, 200])  # (a file name holds at most 255 bytes)
def test_long_identity_or_camera_number_names_the_file(tmp_path, capsys, digits):
    root = make_market(tmp_path)
    big = "9" * digits
    bad = root / "query" / f"{big}_c1s1_000001_00.jpg"
    Image.new("RGB", (8, 16)).save(bad)
    with pytest.raises(ValueError, match=rf"market1501: identity 9+.*in '.*query/{big[:10]}.* has more than 18 digits"):
        build_dataset("market1501", root)
    bad.unlink()
    bad = root / "bounding_box_test" / f"0002_c{big}s1_000001_00.jpg"
    Image.new("RGB", (8, 16)).save(bad)
    with pytest.raises(ValueError, match=r"market1501: camera 9+.* in .*bounding_box_test.* has more than 18 digits"):
        build_dataset("market1501", root)
    _cli_error(capsys, ["train", "--dataset", "market1501", "--data-root", root, "--output-dir", tmp_path / "run",
                        "--workers", "0"], "has more than 18 digits", "bounding_box_test")


def test_msmt17_list_not_utf8_or_with_long_numbers_names_the_file(tmp_path):
    root = make_msmt17(tmp_path)
    lst = root / "list_query.txt"
    good = lst.read_bytes()
    lst.write_bytes(b"\xff" + good)
    with pytest.raises(ValueError, match=r"msmt17: list file '.*list_query.txt' is not UTF-8 text \(byte 0xFF at "
                                         r"offset 0, line 1\)"):
        build_dataset("msmt17", root)
    lst.write_bytes(good + b"0000/0000_000_02_0303morning_0002_0.jpg " + b"7" * 5000 + b"\n")
    with pytest.raises(ValueError, match=r"msmt17: label 7{12}\.\.\.7{6} \(5000 characters\) in line 3 of "
                                         r"'.*list_query.txt' has more than 18 digits"):
        build_dataset("msmt17", root)
    lst.write_bytes(good + b"0000/0000_000_" + b"1" * 30 + b"_0303morning_0002_0.jpg 0\n")
    with pytest.raises(ValueError, match=r"msmt17: camera 1{12}\.\.\.1{6} \(30 characters\) in line 3 of "
                                         r"'.*list_query.txt' has more than 18"):
        build_dataset("msmt17", root)
    lst.write_bytes(good + b"../../../etc/0000_000_02_0303morning_0002_0.jpg 0\n")
    with pytest.raises(ValueError, match=r"msmt17: image path '\.\./\.\./\.\./etc/.*' on line 3 of .* must be "
                                         r"relative to .* and stay inside it"):
        build_dataset("msmt17", root)


# ---------------------------------------------------------------------------------------------
# checkpoint files on disk: temp files after SIGKILL, file mode
# ---------------------------------------------------------------------------------------------

def test_sigkill_during_a_checkpoint_write_leaves_no_temp_file_after_resume(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    trainer = Trainer(_config(synth_root, out, epochs=2), log=lambda s: None)
    trainer.history.append(trainer.train_epoch(0))
    trainer.save(1)
    good = (out / "last.ckpt").read_bytes()
    # A process killed by SIGKILL in the middle of torch.save, inside atomic_save.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from ksl_ops.engine import checkpoint as ckpt
        def dying_save(obj, f, *a, **k):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        state = torch.load({str(out / 'last.ckpt')!r}, weights_only=True)
        ckpt.atomic_save(state, {str(out / 'last.ckpt')!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    stale = [p.name for p in out.iterdir() if p.name.startswith(".last.ckpt.") and p.name.endswith(".tmp")]
    assert len(stale) == 1 and (out / "last.ckpt").read_bytes() == good
    (out / ".metrics.json.tmp").write_text("{")  # the JSON writer's temp file, killed the same way
    (out / ".last.ckpt.notes.txt").write_text("not ours")  # other names are left alone
    assert ksl_main(["train", "--resume", str(out / "last.ckpt"), "--workers", "0", "--progress", "off"]) == 0
    assert "removed 2 temp file(s) left by an interrupted write" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".last.ckpt.notes.txt", "curves.png", "last.ckpt",
                                                     "metrics.json"]
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = ckpt.save_checkpoint(tmp_path / "last.ckpt", model=torch.nn.Linear(2, 2), epoch=1)
        plain = tmp_path / "plain"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask == stat.S_IMODE(plain.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_model_weights_of_another_dtype_or_not_finite(run, tmp_path, capsys):
    base = _state(run)
    name = next(k for k, v in base["model"].items() if v.is_floating_point() and v.dim() == 4)
    for value, msg in [(torch.complex(base["model"][name], base["model"][name]), "1 dtype mismatches"),
                       (torch.full_like(base["model"][name], float("nan")), "1 entries hold NaN or infinite"),
                       (torch.full_like(base["model"][name], float("inf")), "1 entries hold NaN or infinite")]:
        state = _state(run)
        state["model"][name] = value
        path = _resave(state, tmp_path / "w.ckpt")
        for argv in (["eval", "--checkpoint", path, "--workers", "0"],
                     ["train", "--resume", path, "--workers", "0", "--progress", "off"]):
            cap = _cli_error(capsys, argv, f"{path} does not fit this ", msg, name)
            assert "R1" not in cap.out  # refused at load, not after an evaluation


def test_diverging_loss_ends_in_one_line_and_keeps_the_last_checkpoint(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    # One step per epoch: epoch 1's loss is computed before its (huge) update, epoch 2's after it.
    _cli_error(capsys, _train_argv(synth_root, out, "--lr", "1e30", "--epochs", "2", "--triplet-start", "2"),
               "the loss became", "at epoch 2", "lower --lr (now 1e+30)")
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 1  # epoch 1's work is kept


def test_format_of_5000_digits_and_huge_strings_give_short_messages(run, tmp_path, capsys):
    state = _state(run)
    state["format"] = "ksl_ops.checkpoint/" + "9" * 5000
    path = _resave(state, tmp_path / "f.ckpt")
    with pytest.raises(CheckpointError, match=r"f.ckpt claims a ksl_ops checkpoint format version of 5000 digits"):
        ckpt.read_checkpoint(path)
    for field, where, value in [("format", None, "x" * 10 ** 6), ("config", "recipe", "y" * 10 ** 6),
                                ("model", "z" * 10 ** 6, "not a tensor")]:
        state = _state(run)
        if where is None:
            state[field] = value
        else:
            state[field][where] = value
        path = _resave(state, tmp_path / "f.ckpt")
        cap = _cli_error(capsys, ["eval", "--checkpoint", path, "--workers", "0"], str(path), "characters)")
        assert len(cap.err) < 600, cap.err[:600]
