"""Market-1501 (Zheng et al., ICCV 2015): 751 train / 750 test identities, 6 cameras.

Layout (``root`` may be this folder or its parent)::

    Market-1501-v15.09.15/
        bounding_box_train/   0002_c1s1_000451_03.jpg   pid_c{cam}s{sequence}_{frame}_{box}
        query/
        bounding_box_test/    pid -1 = junk boxes (dropped), pid 0 = distractors (gallery only)
"""
from __future__ import annotations

import re
from typing import Sequence

from .._typing import StrPath
from .base import ReIDDataset, parse_bbox_layout

MARKET_NAMES = ("Market-1501-v15.09.15", "Market-1501", "market1501", "Market1501", "market")
MARKET_PATTERN = re.compile(
    r"(?P<pid>-?\d+)_c(?P<cam>\d+)s(?P<seq>\d+)_(?P<frame>\d+)_(?P<box>\d+)\.[A-Za-z]+"
)


def load_market1501(root: StrPath, name: str = "market1501",
                    standard_names: Sequence[str] = MARKET_NAMES) -> ReIDDataset:
    """Parse a Market-1501 folder (also used for the synthetic set, which is written in this layout)."""
    return parse_bbox_layout(root, name, standard_names, MARKET_PATTERN, "0002_c1s1_000451_03.jpg")
