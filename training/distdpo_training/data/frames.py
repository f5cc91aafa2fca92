"""Frames and the interface between dataset formats.

A :class:`Frame` is one LiDAR scan with its pose (and, where the format has them, per-point
semantic labels). Every reader yields frames and every writer takes them, so formats convert into
each other through this one type: `bag2kitti` is a rosbag2 reader feeding a SemanticKITTI writer,
`kitti2bag` the reverse, and the simulator is one more reader.

Adding a dataset format
-----------------------
Write one reader class that implements :class:`FrameSource`: a `name`, `len()` and iteration over
:class:`Frame` objects in time order (points as (N, 4) float32 x, y, z, intensity in the sensor
frame; the pose as a 4x4 sensor -> world matrix; labels as raw SemanticKITTI uint32 ids when the
format has them). That is enough for `write_sequence` (:mod:`.kitti`) to turn it into the
SemanticKITTI layout, which `build-maps`, training and evaluation read. A reader that can also
seek (``__getitem__``, :class:`IndexedFrameSource`, like :class:`.kitti.KittiSequence`) can feed
the training dataset and map building directly. The two implementations to read are
:class:`.kitti.KittiSequence` (files, random access) and :class:`.bags.BagFrames` (a rosbag2 with
PointCloud2 + /tf or odometry, streamed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

SEMANTIC_MASK = 0xFFFF
FIRST_MOVING_CLASS = 252  # SemanticKITTI ids 252..259 are the moving classes


@dataclass
class Frame:
    """One LiDAR scan with its pose, as every reader yields it and every writer takes it."""

    index: int  # frame number (the file name in KITTI, the position in a bag)
    stamp_ns: int  # acquisition time in nanoseconds
    points: np.ndarray  # (N, 4) float32: x, y, z, intensity (remission)
    pose: np.ndarray  # (4, 4) float64, sensor frame -> world frame
    labels: np.ndarray | None = None  # (N,) uint32 raw SemanticKITTI labels
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # other fields (ring, time)
    origin: str = ''  # where the frame came from (a file, a bag and topic), for messages

    @property
    def xyz(self) -> np.ndarray:
        return self.points[:, :3]


class FrameSource(Protocol):
    """What a format reader offers: a name, a length and frames in time order."""

    name: str

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Frame]: ...


class IndexedFrameSource(FrameSource, Protocol):
    """A reader that can also seek: frame i (0 <= i < len) in time order."""

    def __getitem__(self, i: int) -> Frame: ...


def semantic(labels: np.ndarray) -> np.ndarray:
    """Semantic class ids (lower 16 bits) of raw SemanticKITTI labels."""
    return labels & SEMANTIC_MASK


def static_mask(labels: np.ndarray) -> np.ndarray:
    """Points of static, labelled classes: 1 < semantic < 252 (reference §1.2)."""
    sem = semantic(labels)
    return (sem > 1) & (sem < FIRST_MOVING_CLASS)
