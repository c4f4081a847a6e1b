"""CUHK03 (Li et al., CVPR 2014) under the 767/700 protocol of Zhong et al. (CVPR 2017).

The protocol's official split ships as a MATLAB file that needs scipy to read; instead this parser
accepts the widely used **CUHK03-NP** folder release of the same split, which is in the Market-1501
layout::

    cuhk03-np/
        detected/                 (the protocol the paper reports; "labeled" is selectable)
            bounding_box_train/   0001_c1_1.png   names start with pid_c{cam}; the rest is free
            query/
            bounding_box_test/
        labeled/ ...

``root`` may be the ``detected`` folder, the ``cuhk03-np`` folder, or a parent of it. The protocol
has 767 train identities (7365 detected images) and 700 test identities (1400 query, 5332 gallery);
other counts give a warning, not an error, so trimmed copies still load.
"""
from __future__ import annotations

import re
import warnings
from typing import Literal

from .._typing import StrPath
from .base import ReIDDataset, parse_bbox_layout

CUHK03_NAMES = ("cuhk03-np", "CUHK03-NP", "cuhk03_np", "cuhk03np", "cuhk03", "CUHK03")
CUHK03_PATTERN = re.compile(r"(?P<pid>-?\d+)_c(?P<cam>\d+)(?:[_s][^.]*)?\.[A-Za-z]+")
PROTOCOL_TRAIN_IDS = 767
PROTOCOL_TEST_IDS = 700


def load_cuhk03(root: StrPath, subset: Literal["detected", "labeled"] = "detected") -> ReIDDataset:
    """Parse CUHK03-NP (``subset`` = "detected" or "labeled") with the 767/700 split."""
    if subset not in ("detected", "labeled"):
        raise ValueError(f"cuhk03: subset must be 'detected' or 'labeled', got {subset!r}")
    ds = parse_bbox_layout(root, "cuhk03", CUHK03_NAMES, CUHK03_PATTERN, "0001_c1_1.png",
                           suffix=subset)
    n_query_ids = len({pid for _, pid, _ in ds.query})
    if ds.num_train_pids != PROTOCOL_TRAIN_IDS or n_query_ids != PROTOCOL_TEST_IDS:
        warnings.warn(
            f"cuhk03: the 767/700 protocol has {PROTOCOL_TRAIN_IDS} train and {PROTOCOL_TEST_IDS} "
            f"query identities; {ds.root!r} gives {ds.num_train_pids} and {n_query_ids}",
            UserWarning,
            stacklevel=2,
        )
    return ds
