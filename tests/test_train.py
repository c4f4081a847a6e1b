"""End-to-end training: a tiny synthetic run through the real loader, metrics/curves/checkpoint files,
exact resume, and the `ksl` command line."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ksl_ops.cli import main as ksl_main
from ksl_ops.engine import TrainConfig, Trainer

from _helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _tiny_config(root, out, **kw):
    return tiny_config(root, out, **{"epochs": 2, "max_iters_per_epoch": 2, "backend": "reference", **kw})


def test_config_scales_triplet_start_and_presets():
    assert TrainConfig.from_preset("paper").triplet_start == 150
    assert TrainConfig.from_preset("paper").lr == 0.0015
    assert TrainConfig.from_preset("cpu", epochs=35).triplet_start == 15      # 150/350 of 35
    assert TrainConfig.from_preset("cpu", epochs=7, triplet_start_epoch=2).triplet_start == 2
    with pytest.raises(ValueError, match="losses"):
        TrainConfig.from_preset("cpu", losses="nope")
    with pytest.raises(ValueError, match="multiple of num_instances"):
        TrainConfig.from_preset("cpu", batch_size=30, num_instances=4)


def test_tiny_run_writes_metrics_and_resumes_exactly(synth_root, tmp_path):
    logs = []
    # The uninterrupted run: 2 epochs; triplets and the P×K sampler from epoch round(2*150/350) = 1.
    full = Trainer(_tiny_config(synth_root, tmp_path / "full"), log=logs.append)
    result = full.fit()
    assert [h["sampler"] for h in result["history"]] == ["random", "pk"]
    assert "triplet" not in result["history"][0]["loss"] and "triplet" in result["history"][1]["loss"]
    # The default recipe (ksl-ops) starts KSL-P/KSL-E with the triplets; the paper's from the first epoch.
    assert set(result["history"][0]["loss"]) == {"ce", "total"}
    for part in ("ce", "ksl_pp", "ksl_pa", "ksl_ep", "ksl_ea", "ksl_h", "triplet", "total"):
        assert part in result["history"][1]["loss"]
    for h in result["history"]:  # per-epoch diagnostics of every branch
        for b in range(3):
            assert {f"ce/b{b}", f"emb_norm/b{b}", f"bn_var/b{b}"} <= set(h["diag"])
    assert 0.0 <= result["history"][1]["diag"]["triplet_active/cross"] <= 1.0
    final = result["final"]
    assert 0.0 <= final["mAP"] <= 100.0 and final["R1"] <= final["R5"] <= final["R10"] <= 100.0
    assert final["num_query"] == 8  # 4 test ids x 2 queried cameras

    out = tmp_path / "full"
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["final"]["R1"] == pytest.approx(final["R1"])
    assert metrics["history"][1]["eval"]["mAP"] == pytest.approx(final["mAP"])
    assert 0.0 < metrics["history"][0]["loss_time_share"] < 1.0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(out / "last.ckpt", weights_only=True)  # plain data only
    assert state["epoch"] == 2 and state["config"]["losses"] == "ksl" and "rng" in state
    assert any("epoch   1/2" in line for line in logs) and any("R1" in line for line in logs)

    # An interrupted run: epoch 1 only, checkpointed; then a fresh trainer resumes it.
    part = Trainer(_tiny_config(synth_root, tmp_path / "part"), log=lambda s: None)
    part.history.append(part.train_epoch(0))
    part.save(1)
    torch.manual_seed(999)  # whatever the new process's RNG state, the resumed epoch is the same
    resumed = Trainer(_tiny_config(synth_root, tmp_path / "part"), log=lambda s: None)
    assert resumed.resume(tmp_path / "part" / "last.ckpt") == 1
    again = resumed.fit()
    assert len(again["history"]) == 2
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, full.model.state_dict()[k], rtol=0, atol=0, msg=f"resume differs at {k}")
    assert again["final"]["mAP"] == pytest.approx(final["mAP"])


def test_baseline_preset_has_one_branch(synth_root, tmp_path):
    tr = Trainer(_tiny_config(synth_root, tmp_path / "b", losses="baseline", epochs=1, max_iters_per_epoch=1,
                              triplet_start_epoch=0), log=lambda s: None)
    rec = tr.train_epoch(0)
    assert set(rec["loss"]) == {"ce", "triplet", "total"}
    assert not hasattr(tr.model, "branches")


def test_cli_train_eval_synth(synth_root, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--data-root", str(synth_root), "--synth-ids", "6", "4", "--synth-cams", "2",
            "--synth-images", "3", "--height", "32", "--width", "16", "--batch-size", "8", "--num-instances", "2",
            "--epochs", "1", "--max-iters", "1", "--workers", "0", "--backend", "reference",
            "--output-dir", str(out), "--progress", "off", "--losses", "ksl-h", "--rerank"]
    assert ksl_main(argv) == 0
    text = capsys.readouterr().out
    assert "input 32x16, 1 epochs" in text and "shortened CPU schedule" in text
    assert "R1 " in text and "mAP " in text and "re-ranking" in text
    assert ksl_main(["eval", "--checkpoint", str(out / "last.ckpt"), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "epoch 1" in text and "mAP" in text
    assert f"loaded {out / 'last.ckpt'}: shufflenetv2, losses ksl-h, 6 classes, epoch 1/1, input 32x16" in text
    # Resuming a finished run only evaluates it.
    assert ksl_main(["train", "--resume", str(out / "last.ckpt"), "--workers", "0", "--progress", "off"]) == 0
    assert "resumed from" in capsys.readouterr().out

    synth = tmp_path / "s"
    assert ksl_main(["synth", "--root", str(synth), "--num-train-ids", "3", "--num-test-ids", "2",
                     "--num-cams", "2", "--images-per-cam", "2"]) == 0
    assert (synth / "preview.png").is_file() and (synth / "bounding_box_train").is_dir()
    assert ksl_main(["eval", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        ksl_main(["--help"])
    assert e.value.code == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        ksl_main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--data-root", "--dataset", "--backbone", "--losses", "--epochs", "--rerank", "--output-dir",
                "--seed", "--device", "--resume", "--height", "--width", "--batch-size", "--workers"):
        assert opt in text
    # The console entry point (installed) or the module behind it (source checkout).
    exe = shutil.which("ksl")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "ksl_ops.cli", "--help"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ksl" in r.stdout and "synth" in r.stdout
