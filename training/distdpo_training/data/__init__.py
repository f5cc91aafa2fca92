"""Data: frames and the sources that yield them, ground-truth maps, the training dataset.

- :mod:`.frames`: :class:`~.frames.Frame` and the :class:`~.frames.FrameSource` interface. A new
  dataset format is one reader that implements it (see that module for the recipe);
- :mod:`.kitti`: SemanticKITTI sequences (reader with random access, writer);
- :mod:`.bags`: rosbag2 (MCAP / sqlite3): frames from PointCloud2 + /tf (poses through
  :mod:`.transforms`), bag writing, and the raw message stream and recorder of replay;
- :mod:`.maps`: per-sequence static ground-truth maps;
- :mod:`.dataset`: (scan, ground truth) training items and the evaluation ground truth;
- :mod:`.simulation`: simulated HDL-64E drives written as SemanticKITTI sequences.
"""
