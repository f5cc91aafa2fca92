"""Simulated HDL-64E drives through procedural streets, written in the SemanticKITTI layout.

`simulate_dataset(out, sequences, frames, seed)` writes OUT/sequences/SS (and bags with
`bag=True`); `make_sequence(seed, index, frames)` gives one drive to render frame by frame
(`Sequence.frame(f)` -> :class:`distdpo_training.data.kitti.Frame`). See :mod:`.scene` (the world),
:mod:`.agents` (traffic), :mod:`.sensor` (the LiDAR) and :mod:`.drive` (trajectory and writing).
"""

from distdpo_training.data.simulation.drive import Sequence, make_sequence, simulate_dataset
from distdpo_training.data.simulation.preview import save_birds_eye, save_preview

__all__ = ['Sequence', 'make_sequence', 'save_birds_eye', 'save_preview', 'simulate_dataset']
