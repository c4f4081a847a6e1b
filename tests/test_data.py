"""Tests for ksl_ops.data: the four folder parsers, the synthetic set, transforms, samplers, loaders.

Fixture folders are written into tmp_path with tiny images (16x8), in each dataset's real layout.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ksl_ops.data import (
    ImageDataset,
    Normalize,
    Pad,
    RandomCrop,
    RandomErasing,
    RandomHorizontalFlip,
    RandomIdentitySampler,
    RandomSampler,
    Resize,
    ToTensor,
    build_dataset,
    build_test_loaders,
    build_train_loader,
    build_transforms,
    render_synthetic,
    synthetic_preview,
)


def _img(path: Path, colour=(10, 20, 30), size=(8, 16)) -> None:
    """A tiny image (width 8, height 16); PNG or JPEG from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _names(items):
    return sorted(os.path.basename(p) for p, _, _ in items)


# ---------------------------------------------------------------------------------------------
# Market-1501
# ---------------------------------------------------------------------------------------------
MARKET_TRAIN = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c1s2_001000_01.jpg",
                "0007_c3s3_076384_02.jpg", "0007_c3s3_076410_01.jpg", "0010_c6s4_002202_01.jpg",
                "0000_c1s1_000001_01.jpg"]  # pid 0 in train: distractor, dropped
MARKET_QUERY = ["0002_c2s1_000301_00.jpg", "0007_c3s3_075000_00.jpg"]
MARKET_TEST = ["0002_c1s1_000800_02.jpg", "0007_c1s1_001200_01.jpg", "0000_c4s2_000100_03.jpg",
               "-1_c1s1_000401_03.jpg", "-1_c5s3_065017_05.jpg", "0010_c2s1_004400_01.jpg"]


def make_market(base: Path, folder="Market-1501-v15.09.15") -> Path:
    root = base / folder
    for sub, names in (("bounding_box_train", MARKET_TRAIN), ("query", MARKET_QUERY),
                       ("bounding_box_test", MARKET_TEST)):
        for n in names:
            _img(root / sub / n)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0\1")  # shipped by the real archive
    return root


def test_market_counts_relabel_junk_distractors(tmp_path):
    root = make_market(tmp_path)
    ds = build_dataset("market1501", root)
    assert ds.name == "market1501" and Path(ds.root) == root
    # train: pid 0 dropped; pids 2, 7, 10 -> 0, 1, 2 (ascending); camids c1->0, c6->5
    assert ds.num_train_pids == 3 and ds.num_train_cams == 4
    got = sorted((os.path.basename(p), pid, cam) for p, pid, cam in ds.train)
    assert got == [("0002_c1s1_000451_03.jpg", 0, 0), ("0002_c2s1_000551_01.jpg", 0, 1),
                   ("0007_c1s2_001000_01.jpg", 1, 0), ("0007_c3s3_076384_02.jpg", 1, 2),
                   ("0007_c3s3_076410_01.jpg", 1, 2), ("0010_c6s4_002202_01.jpg", 2, 5)]
    # query keeps original pids
    assert sorted((pid, cam) for _, pid, cam in ds.query) == [(2, 1), (7, 2)]
    # gallery: two junk (-1) dropped, the distractor (0) kept, Thumbs.db ignored
    assert sorted((pid, cam) for _, pid, cam in ds.gallery) == [(0, 3), (2, 0), (7, 0), (10, 1)]
    assert all(os.path.isfile(p) for p, _, _ in ds.train + ds.query + ds.gallery)
    s = ds.summary()
    assert "train" in s and "gallery" in s and "market1501" in s
    lines = {ln.split("|")[0].strip(): [int(v) for v in ln.split("|")[1:]] for ln in s.splitlines()
             if ln.strip().startswith(("train", "query", "gallery"))}
    assert lines == {"train": [3, 6, 4], "query": [2, 2, 2], "gallery": [4, 4, 3]}


def test_market_root_is_parent_or_other_spelling(tmp_path):
    make_market(tmp_path / "a")
    assert len(build_dataset("market1501", tmp_path / "a").train) == 6
    make_market(tmp_path / "b", folder="market1501")
    ds = build_dataset("Market-1501", tmp_path / "b")  # name alias, folder found under its parent
    assert Path(ds.root) == tmp_path / "b" / "market1501" and len(ds.gallery) == 4


def test_market_missing_folder_and_root(tmp_path):
    root = make_market(tmp_path)
    for p in (root / "query").iterdir():
        p.unlink()
    (root / "query").rmdir()
    with pytest.raises(FileNotFoundError, match=str(root / "query")):
        build_dataset("market1501", root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset("market1501", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="bounding_box_train"):
        build_dataset("market1501", tmp_path / "empty")


def test_market_malformed_name(tmp_path):
    root = make_market(tmp_path)
    _img(root / "query" / "person_2.jpg")
    with pytest.raises(ValueError, match="person_2.jpg"):
        build_dataset("market1501", root)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'viper'"):
        build_dataset("viper", tmp_path)


# ---------------------------------------------------------------------------------------------
# DukeMTMC-reID
# ---------------------------------------------------------------------------------------------
def make_duke(base: Path) -> Path:
    root = base / "DukeMTMC-reID"
    for n in ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg", "0003_c8_f0012000.jpg",
              "0005_c1_f0000100.jpg", "0005_c1_f0000200.jpg"]:
        _img(root / "bounding_box_train" / n)
    for n in ["0002_c3_f0100000.jpg", "0004_c7_f0000011.jpg"]:
        _img(root / "query" / n)
    for n in ["0002_c1_f0100500.jpg", "0004_c2_f0000999.jpg", "0006_c8_f0000001.jpg"]:
        _img(root / "bounding_box_test" / n)
    return root


def test_duke(tmp_path):
    make_duke(tmp_path)
    ds = build_dataset("dukemtmc", tmp_path)  # parent given
    assert ds.num_train_pids == 3 and ds.num_train_cams == 4
    assert sorted((pid, cam) for _, pid, cam in ds.train) == [(0, 1), (0, 4), (1, 7), (2, 0), (2, 0)]
    assert sorted((pid, cam) for _, pid, cam in ds.query) == [(2, 2), (4, 6)]
    assert sorted((pid, cam) for _, pid, cam in ds.gallery) == [(2, 0), (4, 1), (6, 7)]


def test_duke_malformed_and_missing(tmp_path):
    root = make_duke(tmp_path)
    _img(root / "bounding_box_test" / "0002_c1s1_000451_03.jpg")  # a Market name is not a Duke name
    with pytest.raises(ValueError, match="0002_c1s1_000451_03.jpg"):
        build_dataset("dukemtmc", root)
    with pytest.raises(FileNotFoundError, match="bounding_box_train"):
        build_dataset("dukemtmc", tmp_path / "DukeMTMC-reID" / "query")


# ---------------------------------------------------------------------------------------------
# CUHK03 (CUHK03-NP layout, detected)
# ---------------------------------------------------------------------------------------------
def make_cuhk03(base: Path, n_train=3, n_test=2, touch_only=False) -> Path:
    det = base / "cuhk03-np" / "detected"
    def put(path):
        if touch_only:  # the parser never opens images; empty files keep the 767/700 case fast
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            _img(path)
    for pid in range(1, n_train + 1):
        put(det / "bounding_box_train" / f"{pid:04d}_c1_1.png")
        put(det / "bounding_box_train" / f"{pid:04d}_c2_6.png")
    for pid in range(n_train + 1, n_train + n_test + 1):
        put(det / "query" / f"{pid:04d}_c1_2.png")
        put(det / "bounding_box_test" / f"{pid:04d}_c2_7.png")
    (base / "cuhk03-np" / "labeled").mkdir()
    return det


def test_cuhk03_small_warns_about_protocol(tmp_path):
    make_cuhk03(tmp_path)
    with pytest.warns(UserWarning, match=r"767 train and 700 query identities.*gives 3 and 2"):
        ds = build_dataset("cuhk03", tmp_path / "cuhk03-np")
    assert Path(ds.root) == tmp_path / "cuhk03-np" / "detected"
    assert ds.num_train_pids == 3 and ds.num_train_cams == 2 and len(ds.train) == 6
    assert sorted((pid, cam) for _, pid, cam in ds.query) == [(4, 0), (5, 0)]
    assert sorted((pid, cam) for _, pid, cam in ds.gallery) == [(4, 1), (5, 1)]
    # the detected folder itself and the grand-parent work too
    with pytest.warns(UserWarning):
        assert len(build_dataset("cuhk03", tmp_path / "cuhk03-np" / "detected").train) == 6
    with pytest.warns(UserWarning):
        assert len(build_dataset("cuhk03", tmp_path).train) == 6


def test_cuhk03_767_700_no_warning(tmp_path):
    make_cuhk03(tmp_path, n_train=767, n_test=700, touch_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = build_dataset("cuhk03", tmp_path)
    assert ds.num_train_pids == 767 and len({p for _, p, _ in ds.query}) == 700
    assert sorted({p for _, p, _ in ds.train}) == list(range(767))


def test_cuhk03_errors(tmp_path):
    det = make_cuhk03(tmp_path)
    _img(det / "query" / "c1_0004.png")
    with pytest.raises(ValueError, match="c1_0004.png"):
        build_dataset("cuhk03", tmp_path)
    with pytest.raises(FileNotFoundError, match="detected"):
        build_dataset("cuhk03", tmp_path / "cuhk03-np" / "labeled")


# ---------------------------------------------------------------------------------------------
# MSMT17 (V1)
# ---------------------------------------------------------------------------------------------
def make_msmt17(base: Path) -> Path:
    root = base / "MSMT17_V1"
    lists = {
        "list_train.txt": ("train", [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                     ("0000/0000_001_05_0303morning_0036_1.jpg", 0),
                                     ("0002/0002_000_15_0303noon_0100_0.jpg", 2)]),
        "list_val.txt": ("train", [("0001/0001_000_03_0303afternoon_0010_0.jpg", 1)]),
        "list_query.txt": ("test", [("0000/0000_000_02_0303morning_0001_0.jpg", 0),
                                    ("0001/0001_003_11_0303noon_0002_1.jpg", 1)]),
        "list_gallery.txt": ("test", [("0000/0000_001_07_0303morning_0009_0.jpg", 0),
                                      ("0001/0001_000_12_0303noon_0020_0.jpg", 1),
                                      ("0001/0001_004_12_0303noon_0030_0.jpg", 1)]),
    }
    for fname, (sub, rows) in lists.items():
        for rel, _ in rows:
            _img(root / sub / rel)
        (root / fname).write_text("".join(f"{rel} {pid}\n" for rel, pid in rows))
    return root


def test_msmt17(tmp_path):
    root = make_msmt17(tmp_path)
    ds = build_dataset("msmt17", tmp_path)
    assert Path(ds.root) == root
    # train = list_train + list_val; labels 0, 1, 2 stay 0, 1, 2; camera = third name field - 1
    assert sorted((pid, cam) for _, pid, cam in ds.train) == [(0, 0), (0, 4), (1, 2), (2, 14)]
    assert ds.num_train_pids == 3 and ds.num_train_cams == 4
    assert sorted((pid, cam) for _, pid, cam in ds.query) == [(0, 1), (1, 10)]
    assert sorted((pid, cam) for _, pid, cam in ds.gallery) == [(0, 6), (1, 11), (1, 11)]
    assert all(os.path.isfile(p) for p, _, _ in ds.train + ds.query + ds.gallery)
    assert any(p.endswith(os.path.join("test", "0001", "0001_003_11_0303noon_0002_1.jpg"))
               for p, _, _ in ds.query)


def test_msmt17_errors(tmp_path):
    root = make_msmt17(tmp_path)
    with open(root / "list_gallery.txt", "a") as fh:
        fh.write("0001/0001_000_12_0303noon_0040_0.jpg\n")  # no label
    with pytest.raises(ValueError, match=r"line 4 of .*list_gallery.txt"):
        build_dataset("msmt17", root)
    (root / "list_gallery.txt").write_text("0001/badname.jpg 1\n")
    with pytest.raises(ValueError, match="badname.jpg"):
        build_dataset("msmt17", root)
    (root / "list_query.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_query.txt"):
        build_dataset("msmt17", root)
    with pytest.raises(FileNotFoundError, match="train"):
        build_dataset("msmt17", root / "test")


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------
SMALL = dict(num_train_ids=5, num_test_ids=4, num_cams=3, images_per_cam=2, height=32, width=16)


def _pixels(folder: Path):
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p))
            for p in sorted(folder.rglob("*.jpg"))}


def test_synthetic_deterministic_and_seeded(tmp_path):
    a = render_synthetic(tmp_path / "a", seed=3, **SMALL)
    b = render_synthetic(tmp_path / "b", seed=3, **SMALL)
    c = render_synthetic(tmp_path / "c", seed=4, **SMALL)
    pa, pb, pc = _pixels(a), _pixels(b), _pixels(c)
    # 5*3*2 train + 4*3*2 test images, of 32x16
    assert len(pa) == 30 + 24 and all(v.shape == (32, 16, 3) for v in pa.values())
    assert pa.keys() == pb.keys() == pc.keys()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert sum(not np.array_equal(pa[k], pc[k]) for k in pa) == len(pa)
    # images are not all alike: different identities differ
    assert not np.array_equal(pa["bounding_box_train/0001_c1s1_000000_00.jpg"],
                              pa["bounding_box_train/0002_c1s1_000000_00.jpg"])


def test_synthetic_split_parsed_by_market_parser(tmp_path):
    root = render_synthetic(tmp_path / "syn", seed=0, **SMALL)
    ds = build_dataset("synthetic", root)
    assert ds.name == "synthetic" and ds.num_train_pids == 5 and ds.num_train_cams == 3
    assert len(ds.train) == 30 and len(ds.query) + len(ds.gallery) == 24
    assert len(ds.query) == 4 * 2  # two query cameras per test identity
    assert Counter(pid for _, pid, _ in ds.train) == {i: 6 for i in range(5)}
    # Market parser on the raw folder gives original pids: train 1..5, test 6..9, disjoint
    raw = build_dataset("market1501", root)
    train_ids = {int(os.path.basename(p)[:4]) for p, _, _ in raw.train}
    test_ids = {pid for _, pid, _ in raw.query + raw.gallery}
    assert train_ids == {1, 2, 3, 4, 5} and test_ids == {6, 7, 8, 9}
    # every query has a same-identity gallery image from another camera
    for _, qpid, qcam in ds.query:
        assert any(g == qpid and gc != qcam for _, g, gc in ds.gallery)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 0 and manifest["counts"]["query"] == 8


def test_synthetic_one_image_per_camera_still_has_matches(tmp_path):
    root = render_synthetic(tmp_path / "s", num_train_ids=2, num_test_ids=3, num_cams=2, images_per_cam=1,
                            height=32, width=16)
    ds = build_dataset("synthetic", root)
    assert len(ds.query) == 3 and len(ds.gallery) == 3
    for _, qpid, qcam in ds.query:
        assert any(g == qpid and gc != qcam for _, g, gc in ds.gallery)


def test_synthetic_idempotent_and_rerenders_on_new_config(tmp_path):
    root = render_synthetic(tmp_path / "s", **SMALL)
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    time.sleep(0.02)
    render_synthetic(tmp_path / "s", **SMALL)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamp
    render_synthetic(tmp_path / "s", **{**SMALL, "num_train_ids": 3})
    ds = build_dataset("synthetic", root)
    assert ds.num_train_pids == 3 and len(ds.train) == 18  # old train ids 4, 5 removed
    assert json.loads((root / "manifest.json").read_text())["config"]["num_train_ids"] == 3
    # a removed image makes the set incomplete: rendered again
    next((root / "query").iterdir()).unlink()
    render_synthetic(tmp_path / "s", **{**SMALL, "num_train_ids": 3})
    assert len(list((root / "query").iterdir())) == 8


def test_synthetic_refuses_foreign_folder_and_bad_config(tmp_path):
    make_market(tmp_path)
    with pytest.raises(FileExistsError, match="manifest"):
        render_synthetic(tmp_path / "Market-1501-v15.09.15", **SMALL)
    with pytest.raises(ValueError, match="num_cams"):
        render_synthetic(tmp_path / "x", num_cams=1)
    with pytest.raises(ValueError, match="height"):
        render_synthetic(tmp_path / "x", height=8)


def test_synthetic_default_is_fast_and_preview(tmp_path):
    # CPU time of this process, not wall time: a guard against a slow renderer that does not fail
    # because other jobs share the machine.
    t0 = time.process_time()
    root = render_synthetic(tmp_path / "synthetic")
    elapsed = time.process_time() - t0
    ds = build_dataset("synthetic", tmp_path)  # found under its parent by the standard name
    assert Path(ds.root) == root
    assert (ds.num_train_pids, len(ds.train), len(ds.query), len(ds.gallery)) == (48, 768, 96, 672)
    assert Image.open(ds.train[0][0]).size == (64, 128)
    assert elapsed < 45.0, f"rendering the default synthetic set took {elapsed:.1f} s of CPU"
    png = synthetic_preview(root, tmp_path / "preview.png", num_ids=4, per_cam=2)
    sheet = Image.open(png)
    assert sheet.size[0] > 4 * 2 * 64 and sheet.size[1] > 4 * 128


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------
def test_to_tensor_exact():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    x = ToTensor()(Image.fromarray(arr))
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert ToTensor()(Image.fromarray(arr[..., 0])).shape == (3, 2, 3)  # grey -> RGB


def test_resize_matches_pil_bilinear():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(64, 32, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    for h, w in ((32, 16), (48, 24), (80, 40)):
        x = Resize(h, w)(ToTensor()(img))
        ref = ToTensor()(img.resize((w, h), Image.BILINEAR))
        assert x.shape == (3, h, w)
        # PIL's bilinear resize also antialiases when shrinking: same filter, up to 8-bit rounding
        assert (x - ref).abs().max() < 2.5 / 255
    const = torch.full((3, 20, 10), 0.3)
    assert torch.allclose(Resize(7, 5)(const), torch.full((3, 7, 5), 0.3), atol=1e-6)


def test_flip_exact():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    y = RandomHorizontalFlip(p=1.0)(x)
    assert torch.equal(y[..., 0], x[..., 3]) and torch.equal(y[..., 3], x[..., 0])
    assert torch.equal(RandomHorizontalFlip(p=1.0)(y), x)
    assert RandomHorizontalFlip(p=0.0)(x) is x
    g = torch.Generator().manual_seed(0)
    flips = [torch.equal(RandomHorizontalFlip(0.5, generator=g)(x), x.flip(-1)) for _ in range(400)]
    assert 150 < sum(flips) < 250


def test_pad_and_random_crop():
    x = torch.rand(3, 6, 4) + 1.0  # strictly positive, so padding zeros are recognisable
    p = Pad(2)(x)
    assert p.shape == (3, 10, 8)
    assert torch.equal(p[:, 2:8, 2:6], x) and p[:, :2].abs().sum() == 0 and p[:, :, -2:].abs().sum() == 0
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(60):
        c = RandomCrop(6, 4, generator=g)(p)
        assert c.shape == (3, 6, 4)
        hits = [(t, x) for t in range(5) for x in range(5) if torch.equal(c, p[:, t:t + 6, x:x + 4])]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 10  # offsets vary
    with pytest.raises(ValueError, match="smaller than the crop"):
        RandomCrop(20, 4)(x)


def test_normalize_values():
    x = torch.full((3, 2, 2), 0.5)
    y = Normalize()(x)
    want = [(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]
    for c in range(3):
        assert torch.allclose(y[c], torch.full((2, 2), want[c]), atol=1e-6)
    assert torch.allclose(Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(torch.ones(3, 1, 1)), torch.ones(3, 1, 1))
    with pytest.raises(ValueError, match="std"):
        Normalize((0.0,), (0.0,))


def test_random_erasing_region():
    g = torch.Generator().manual_seed(0)
    er = RandomErasing(p=1.0, scale=(0.1, 0.3), value=0.0, generator=g)
    for _ in range(20):
        x = torch.rand(3, 64, 32) + 1.0
        y = er(x)
        changed = (y != x).any(0)
        assert (y[:, changed] == 0).all() and torch.equal(y[:, ~changed], x[:, ~changed])
        rows, cols = changed.nonzero(as_tuple=True)
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h * w == int(changed.sum())  # one solid rectangle
        assert 0.1 * 64 * 32 * 0.85 <= h * w <= 0.3 * 64 * 32 * 1.15
    x = torch.rand(3, 8, 8)
    assert RandomErasing(p=0.0)(x) is x


def test_build_transforms_shapes():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 45, 3), dtype=np.uint8))
    torch.manual_seed(0)
    for train in (True, False):
        t = build_transforms(64, 32, train=train)
        y = t(img)
        assert y.shape == (3, 64, 32) and y.dtype == torch.float32
    ev = build_transforms(64, 32, train=False)
    assert torch.equal(ev(img), ev(img))
    ref = Normalize()(Resize(64, 32)(ToTensor()(img)))
    assert torch.allclose(ev(img), ref)


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------
PIDS = [0] * 9 + [1] * 4 + [2] * 1 + [3] * 5 + [4] * 2 + [5] * 7 + [6] * 3 + [7] * 2


def _check_pk(order, pids, P, K):
    assert len(order) % (P * K) == 0
    for b in range(0, len(order), P * K):
        counts = Counter(pids[i] for i in order[b:b + P * K])
        assert len(counts) == P and set(counts.values()) == {K}, counts


def test_pk_sampler_composition_and_length():
    s = RandomIdentitySampler(PIDS, batch_size=8, num_instances=2, seed=0)
    order = list(s)
    # chunks of 2: [4, 2, 1, 2, 1, 3, 1, 1] = 15 -> T = 15 // 4 = 3 (feasible): 3 batches of 8
    assert len(s) == len(order) == 24
    _check_pk(order, PIDS, P=4, K=2)
    assert all(0 <= i < len(PIDS) for i in order)
    # identity 2 has one image: both its instances are that image when it is drawn
    for b in range(0, 24, 8):
        own = [i for i in order[b:b + 8] if PIDS[i] == 2]
        assert own in ([], [13, 13])


def test_pk_sampler_dominant_identity():
    pids = [0] * 6 + [1] * 2 + [2] * 2 + [3] * 2
    s = RandomIdentitySampler(pids, batch_size=4, num_instances=2, seed=5)
    order = list(s)
    # chunks [3, 1, 1, 1]: 3 batches of P=2 distinct ids; id 0 is in every batch
    assert len(s) == len(order) == 12
    _check_pk(order, pids, P=2, K=2)
    assert all(0 in {pids[i] for i in order[b:b + 4]} for b in range(0, 12, 4))
    assert sorted(order) == list(range(12))  # every image used exactly once here


def test_pk_sampler_deterministic_per_seed_and_epoch():
    a = RandomIdentitySampler(PIDS, 8, 2, seed=1)
    b = RandomIdentitySampler([(f"x{i}.jpg", p, 0) for i, p in enumerate(PIDS)], 8, 2, seed=1)
    e0 = list(a)
    assert e0 == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    e1 = list(a)
    assert e1 == list(b) and e1 != e0
    a.set_epoch(0)
    assert list(a) == e0
    # without set_epoch the next iteration moves on to the next epoch
    c = RandomIdentitySampler(PIDS, 8, 2, seed=1)
    assert list(c) == e0 and list(c) == e1 and c.epoch == 1
    assert list(RandomIdentitySampler(PIDS, 8, 2, seed=2)) != e0


def test_pk_sampler_errors():
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler(PIDS, 9, 2)
    with pytest.raises(ValueError, match="needs 8 identities"):
        RandomIdentitySampler([0, 0, 1, 1], 16, 2)


def test_random_sampler():
    s = RandomSampler(10, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and len(s) == 10
    e1 = list(s)
    assert e1 != e0
    s.set_epoch(0)
    assert list(s) == e0


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory):
    root = render_synthetic(tmp_path_factory.mktemp("syn") / "s", num_train_ids=6, num_test_ids=3,
                            num_cams=2, images_per_cam=3, height=32, width=16, seed=0)
    return build_dataset("synthetic", root)


def test_train_loader_pk_workers(small_synthetic):
    ds = small_synthetic
    loader = build_train_loader(ds, 32, 16, batch_size=8, sampler="pk", num_instances=4, workers=2, seed=0)
    assert isinstance(loader.sampler, RandomIdentitySampler)
    loader.sampler.set_epoch(0)
    # 6 ids x 6 images -> 6 chunks of 4 -> 3 batches of P=2
    assert len(loader) == 3
    images, pids, camids = next(iter(loader))
    assert images.shape == (8, 3, 32, 16) and images.dtype == torch.float32
    assert pids.dtype == torch.int64 and camids.dtype == torch.int64
    assert sorted(Counter(pids.tolist()).values()) == [4, 4]
    assert set(camids.tolist()) <= {0, 1} and set(pids.tolist()) <= set(range(6))
    # same seed -> same first batch, augmentation included (worker RNGs come from the generator)
    again = build_train_loader(ds, 32, 16, batch_size=8, sampler="pk", num_instances=4, workers=2, seed=0)
    again.sampler.set_epoch(0)
    images2, pids2, _ = next(iter(again))
    assert torch.equal(pids, pids2) and torch.equal(images, images2)


def test_train_loader_random_and_test_loaders(small_synthetic):
    ds = small_synthetic
    loader = build_train_loader(ds, 32, 16, batch_size=5, sampler="random", workers=0, seed=0)
    assert isinstance(loader.sampler, RandomSampler) and len(loader) == 36 // 5
    batches = list(loader)
    assert all(b[0].shape == (5, 3, 32, 16) for b in batches)
    assert len({i for b in batches for i in b[1].tolist()}) == 6
    q, g = build_test_loaders(ds, 32, 16, batch_size=4, workers=0)
    qp = torch.cat([b[1] for b in q]).tolist()
    gp = torch.cat([b[1] for b in g]).tolist()
    assert qp == [p for _, p, _ in ds.query] and gp == [p for _, p, _ in ds.gallery]
    x = next(iter(q))[0]
    ref = build_transforms(32, 16, train=False)(Image.open(ds.query[0][0]))
    assert torch.allclose(x[0], ref)
    with pytest.raises(ValueError, match="sampler must be"):
        build_train_loader(ds, 32, 16, 8, sampler="balanced")
    with pytest.raises(ValueError, match="multiple of num_instances"):
        build_train_loader(ds, 32, 16, 6, sampler="pk", num_instances=4)


def test_image_dataset_names_bad_file(tmp_path):
    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError, match="0001_c1s1_000001_00.jpg"):
        _ = ImageDataset([(str(bad), 0, 0)])[0]
