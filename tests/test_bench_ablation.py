"""bench/ablation.py's bookkeeping: seeds, the job list, and the paired statistics it reports."""
import importlib
import math

import pytest


@pytest.fixture(scope="module")
def ablation():
    return importlib.import_module("bench.ablation")


def test_parse_seeds(ablation):
    assert ablation.parse_seeds(["0-2", "5", "7,9"]) == [0, 1, 2, 5, 7, 9]


def test_jobs_cover_every_row_once(ablation):
    jobs = ablation.jobs_for(["4", "5", "6"], [0, 1], "cmsnet")
    rows = {losses for _, losses in ablation.TABLES["4"] + ablation.TABLES["5"] + ablation.TABLES["6"]}
    assert {(row, s) for row, _, s in jobs} == {(row, s) for row in rows for s in (0, 1)}
    assert len(jobs) == len(set(jobs)) == 2 * len(rows)
    t1 = ablation.jobs_for(["1"], [3], "cmsnet")
    assert {(row, b) for row, b, _ in t1} == {(row, b) for b in ablation.BACKBONES for row in ("aux", "ksl")}


def test_summary_is_paired_against_aux(ablation):
    res = {("aux", "cmsnet"): {0: {"R1": 50.0, "mAP": 40.0}, 1: {"R1": 60.0, "mAP": 50.0},
                               2: {"R1": 70.0, "mAP": 60.0}},
           ("ksl", "cmsnet"): {0: {"R1": 52.0, "mAP": 41.0}, 1: {"R1": 61.0, "mAP": 49.0},
                               2: {"R1": 73.0, "mAP": 63.0}}}
    rows = ablation.summarise([("AUX", "aux"), ("KSL", "ksl")], "cmsnet", res)
    aux, ksl = rows
    assert "delta_R1" not in aux
    assert ksl["R1"]["mean"] == pytest.approx(62.0)
    sd = math.sqrt(((52 - 62) ** 2 + (61 - 62) ** 2 + (73 - 62) ** 2) / 2)
    assert ksl["R1"]["se"] == pytest.approx(sd / math.sqrt(3))
    d = ksl["delta_R1"]  # per-seed differences 2, 1, 3
    assert d["per_seed"] == [2.0, 1.0, 3.0] and d["mean"] == pytest.approx(2.0)
    assert d["se"] == pytest.approx(1.0 / math.sqrt(3)) and d["n_positive"] == 3 and d["n"] == 3
    assert ksl["delta_mAP"]["n_positive"] == 2


def _load(name):
    return importlib.import_module(f"bench.{name}")


def _run_args(**kw):
    import argparse

    base = dict(data_root="/tmp/d", epochs=60, lr=0.01, recipe="ksl-ops", split="test", neck=None,
                consensus_start=None, weight_e=None, normalize_e=None, normalize_triplet=None, label_noise=0.0,
                jobs=2)
    base.update(kw)
    return argparse.Namespace(**base)


def test_label_noise_level_zero_is_the_ablation_run(ablation, tmp_path):
    noise = _load("label_noise")
    assert noise.tag_for(0.0, "test") == "ablation_test" and noise.tag_for(0.2, "val") == "label_noise_0.2_val"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    clean = ablation.command(_run_args(), "ksl", "shufflenetv2", 0, tmp_path / "a")
    assert "--label-noise" not in clean  # so level 0 resumes / reuses the ablation's own run
    noisy = ablation.command(_run_args(label_noise=0.3), "ksl", "shufflenetv2", 0, tmp_path / "b")
    assert noisy[noisy.index("--label-noise") + 1] == "0.3"
    moved = [a.replace(str(tmp_path / "a"), str(tmp_path / "b")) for a in clean]
    assert [a for a in noisy if a not in ("--label-noise", "0.3")] == moved


def test_weight_e_reaches_the_training_command(ablation, tmp_path):
    cmd = ablation.command(_run_args(weight_e=19.0), "ksl-e", "shufflenetv2", 0, tmp_path)
    assert cmd[cmd.index("--weight-e") + 1] == "19.0"
    assert "--weight-e" not in ablation.command(_run_args(), "ksl-e", "shufflenetv2", 0, tmp_path)


def test_one_seed_has_no_standard_error(ablation):
    """A row with a single seed reports its error as None (JSON null), never NaN, and prints without one."""
    import json

    res = {("aux", "mobilenetv2"): {0: {"R1": 83.5, "mAP": 67.0}},
           ("ksl", "mobilenetv2"): {0: {"R1": 89.0, "mAP": 70.8}}}
    aux, ksl = ablation.summarise([("AUX", "aux"), ("KSL", "ksl")], "mobilenetv2", res)
    assert ksl["R1"]["se"] is None and ksl["delta_R1"]["se"] is None and ksl["delta_R1"]["mean"] == pytest.approx(5.5)
    text = json.dumps([aux, ksl], allow_nan=False)  # raises on NaN
    assert json.loads(text)[1]["R1"]["se"] is None
    assert ablation.fmt(ksl, "R1") == "89.0 (1 seed)" and ablation.fmt_delta(ksl, "R1") == "+5.5 (1 seed) (1/1)"
    assert ablation.pm(2.0, 0.25, 2, "+") == "+2.00 ± 0.25"


def test_ksl_e_screening_pairs_each_cell_with_its_baseline(tmp_path, monkeypatch):
    import json

    screening = _load("ksl_e_screening")

    def record(tag, losses, seed, r1, norm, triplet, active):
        d = tmp_path / tag
        d.mkdir(exist_ok=True)
        rec = {"losses": losses, "seed": seed, "final": {"R1": r1, "mAP": r1 - 20},
               "history": [{"epoch": 1, "loss": {"triplet": 9.0}, "diag": {"emb_norm/b0": 99.0}},
                           {"epoch": 2, "loss": {"ce": 1.0, "triplet": triplet},
                            "diag": {"emb_norm/b0": norm, "triplet_active/self": active}}]}
        (d / f"shufflenetv2_{losses}_s{seed}.json").write_text(json.dumps(rec))

    record("base", "aux", 0, 80.0, 5.0, 0.4, 0.6)
    record("base", "aux", 1, 70.0, 5.0, 0.4, 0.6)
    record("cell", "ksl-e", 0, 83.0, 30.0, 0.8, 1.0)
    record("cell", "ksl-e", 1, 69.0, 34.0, 0.9, 1.0)
    record("cell", "ksl-e", 2, 90.0, 32.0, 0.85, 1.0)  # no AUX of seed 2: not paired
    monkeypatch.setattr(screening, "CELLS", [("AUX", "base", "aux", None), ("E", "cell", "ksl-e", "base"),
                                             ("missing", "none", "ksl", "base")])
    monkeypatch.setattr(screening, "COMMANDS", {"base": "a", "cell": "b", "none": "c"})
    aux, cell, missing = screening.summarise(tmp_path)
    assert "delta_R1" not in aux and aux["seeds"] == [0, 1]
    assert cell["seeds"] == [0, 1, 2] and cell["R1"]["mean"] == pytest.approx((83 + 69 + 90) / 3)
    d = cell["delta_R1"]
    assert d["per_seed"] == [3.0, -1.0] and d["n"] == 2 and d["n_positive"] == 1
    assert d["se"] == pytest.approx(2.0)  # stdev of (3, -1) is 2*sqrt(2), over sqrt(2)
    # The diagnostics are the last epoch's, averaged over every seed of the cell.
    assert cell["emb_norm"]["mean"] == pytest.approx(32.0) and cell["triplet"]["mean"] == pytest.approx(0.85)
    assert cell["active"]["mean"] == pytest.approx(1.0) and cell["command"] == "b"
    assert missing["seeds"] == [] and missing["emb_norm"] is None
    text = screening.table([aux, cell, missing])
    assert "| E | 0, 1, 2 | 80.7 ± 6.2 | +1.0 ± 2.0 (1/2) |" in text and "| missing | – | not run |" in text
