"""Reproducible data order and randomness, independent of the number of processes and of resuming.

- :class:`GlobalBatchSampler` shuffles the dataset once per epoch from (seed, epoch), cuts it into
  global batches and gives each rank its contiguous share; it can start in the middle of an epoch.
  Union of the ranks' k-th batches = the single process's k-th batch, so 1 and N processes see the
  same samples per step.
- :class:`SeededItems` seeds Python/NumPy/torch from (seed, epoch, index) around every item, so
  augmentations do not depend on worker processes or on where a run was resumed.
- :func:`sample_generators` gives one torch.Generator per sample, seeded from (seed, step, index):
  noise, timesteps and condition dropout drawn from them are identical however the batch is split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across runs and platforms)."""
    digest = hashlib.blake2b(':'.join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & ((1 << 63) - 1)


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, dataset index) for this rank: its share of each global batch, in order."""

    def __init__(self, size: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if global_batch % world_size:
            raise ValueError(f'global batch {global_batch} is not divisible by {world_size} ranks')
        if size < global_batch:
            raise ValueError(f'dataset of {size} items is smaller than one batch ({global_batch})')
        self.size, self.global_batch = size, global_batch
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch

    def set_position(self, epoch: int, batch: int) -> None:
        """Start the next iteration at global batch `batch` of epoch `epoch`."""
        self.epoch, self.start_batch = epoch, batch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(derive_seed(self.seed, 'order', epoch))
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order(self.epoch)
        for b in range(self.start_batch, self.batches_per_epoch):
            first = b * self.global_batch + self.rank * self.local_batch
            for i in order[first:first + self.local_batch]:
                yield self.epoch, i

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch


class SeededItems(Dataset):
    """item (epoch, i) is dataset[i] drawn with RNGs seeded from (seed, epoch, i).

    The global RNG states are restored afterwards, so loading in the main process does not disturb
    the training randomness. Returns (i, item).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        epoch, index = key
        saved = capture_rng(cuda=False)
        seed = derive_seed(self.seed, 'item', epoch, index)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)
        set_epoch = getattr(self.dataset, 'set_epoch', None)
        if set_epoch is not None:  # datasets that draw from their own (seed, epoch, index) RNG
            set_epoch(epoch)
        try:
            return index, self.dataset[index]
        finally:
            restore_rng(saved)


def indexed_collate(collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """Collate (index, item) pairs into (indices tensor, collate(items))."""

    def run(pairs: list[tuple[int, Any]]) -> tuple[torch.Tensor, Any]:
        indices = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        return indices, collate([item for _, item in pairs])

    return run


def sample_generators(seed: int, step: int, indices: Sequence[int] | torch.Tensor,
                      device: torch.device, stream: str = '') -> list[torch.Generator]:
    """One generator per sample, seeded from (seed, step, dataset index, stream)."""
    out = []
    for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices):
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(seed, 'step', step, int(i), stream))
        out.append(g)
    return out


def capture_rng(cuda: bool = True) -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and current CUDA device) RNG states."""
    state: dict[str, Any] = {'python': random.getstate(), 'numpy': np.random.get_state(),
                             'torch': torch.get_rng_state()}
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (accepts the list/tuple forms read back from JSON)."""
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state['numpy']
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), int(np_state[2]),
                         int(np_state[3]), float(np_state[4])))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


_PY_WORDS, _NP_WORDS = 628, 627  # random.getstate(): 1 + 625 + 2; np.random: 624 + 3


def rng_to_tensor(state: dict[str, Any]) -> torch.Tensor:
    """Pack a :func:`capture_rng` state into one fixed-size uint8 tensor (to gather over ranks)."""
    version, internal, gauss = state['python']
    gauss_bits = np.array([0.0 if gauss is None else gauss]).view(np.uint64)[0]
    py = np.array([version, *internal, gauss is not None, gauss_bits], dtype=np.uint64)
    _, keys, pos, has_gauss, cached = state['numpy']
    np_words = np.concatenate([np.asarray(keys, dtype=np.uint64),
                               np.array([pos, has_gauss], dtype=np.uint64),
                               np.array([cached], dtype=np.float64).view(np.uint64)])
    parts = [torch.from_numpy(np.concatenate([py, np_words]).view(np.uint8).copy()),
             state['torch'].to(torch.uint8)]
    if 'cuda' in state:
        parts.append(state['cuda'].to(torch.uint8))
    return torch.cat(parts)


def rng_from_tensor(packed: torch.Tensor) -> dict[str, Any]:
    """Inverse of :func:`rng_to_tensor`."""
    raw = packed.numpy()
    words = raw[:8 * (_PY_WORDS + _NP_WORDS)].view(np.uint64)
    py, npw = words[:_PY_WORDS], words[_PY_WORDS:]
    gauss = float(py[-1:].view(np.float64)[0]) if py[-2] else None
    state: dict[str, Any] = {
        'python': (int(py[0]), tuple(int(v) for v in py[1:-2]), gauss),
        'numpy': ('MT19937', npw[:624].astype(np.uint32), int(npw[624]), int(npw[625]),
                  float(npw[626:627].view(np.float64)[0])),
    }
    rest = packed[8 * (_PY_WORDS + _NP_WORDS):]
    n_torch = torch.get_rng_state().numel()
    state['torch'] = rest[:n_torch].clone()
    if rest.numel() > n_torch:
        state['cuda'] = rest[n_torch:].clone()
    return state
