"""DukeMTMC-reID (Ristani et al. 2016; Zheng et al. 2017): 702 train / 1110 test identities, 8 cameras.

Layout (``root`` may be this folder or its parent)::

    DukeMTMC-reID/
        bounding_box_train/   0001_c2_f0046182.jpg   pid_c{cam}_f{frame}
        query/
        bounding_box_test/
"""
from __future__ import annotations

import re

from .._typing import StrPath
from .base import ReIDDataset, parse_bbox_layout

DUKE_NAMES = ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid", "DukeMTMC", "dukemtmc", "duke")
DUKE_PATTERN = re.compile(r"(?P<pid>-?\d+)_c(?P<cam>\d+)_f(?P<frame>\d+)\.[A-Za-z]+")


def load_dukemtmc(root: StrPath) -> ReIDDataset:
    """Parse a DukeMTMC-reID folder."""
    return parse_bbox_layout(root, "dukemtmc", DUKE_NAMES, DUKE_PATTERN, "0001_c2_f0046182.jpg")
