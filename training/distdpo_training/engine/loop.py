"""The training engine shared by every loop (teacher, refine, Diffusion-DPO, distillation).

A loop is a :class:`Task`: it registers its networks, optimisers and schedulers with the engine
in `setup`, computes one update in `train_step` (any number of networks, optimisers and backward
passes, e.g. the alternating updates of Distillation-DPO), scores a few scans in `validate` and
writes the model in our checkpoint format in `export`. The engine owns everything else, read top
to bottom in :meth:`Engine.fit`: torchrun DDP, data order, per-sample randomness, mixed
precision, progress, logs, validation, atomic checkpoints, exact resume and stopping cleanly on
SIGTERM / Ctrl-C.

Run folder (OUT):
  config.yaml           the resolved configuration of the run
  log.jsonl             one JSON record per log step / validation
  curves.png            training loss and validation metrics beside the input baselines
  tensorboard/          the same scalars for TensorBoard (when installed)
  state/last.safetensors, state/previous.safetensors, state/best.safetensors   training states
  model/last/, model/best/   the networks in our model format (what the Completer loads)
"""

from __future__ import annotations

import contextlib
import copy
import errno
import gc
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from distdpo_ros.atomic import write_bytes_atomic
from distdpo_ros.errors import Cancelled, UserError
from distdpo_training.engine import distributed as D
from distdpo_training.engine.config import EngineConfig
from distdpo_training.engine.data import (
    GlobalBatchSampler,
    SeededItems,
    capture_rng,
    derive_seed,
    indexed_collate,
    restore_rng,
    rng_from_tensor,
    rng_to_tensor,
    sample_generators,
)
from distdpo_training.engine.runlock import lock_run_folder
from distdpo_training.engine.runlog import RunLog, plot_log
from distdpo_training.engine.state import load_state, save_state


class Task(Protocol):
    """What a training loop plugs into the :class:`Engine`."""

    #: name of the validation metric that selects the best model, and whether lower is better
    best_metric: str
    lower_is_better: bool

    def setup(self, engine: Engine) -> None:
        """Build networks, optimisers, schedulers; register them with engine.add_*."""

    def train_step(self, engine: Engine, batch: Any, gens: list[torch.Generator]
                   ) -> dict[str, torch.Tensor]:
        """One update on this rank's share of the global batch; returns scalar tensors to log.

        `gens` holds one generator per sample (seeded from seed, step and the sample's dataset
        index): draw all per-sample randomness from them so that any number of ranks and resumed
        runs see the same numbers.
        """

    def validate(self, engine: Engine, item: Any, index: int) -> dict[str, float]:
        """Metrics of one validation item (dataset[index]); called on the rank that owns it."""

    def export(self, engine: Engine, out_dir: Path, info: dict[str, Any]) -> None:
        """Write the trained networks in our model format to out_dir (rank 0 only)."""


class Engine:
    """Runs a :class:`Task` on one process or under torchrun; see the module docstring."""

    def __init__(self, cfg: EngineConfig, out_dir: Path, run_config: dict[str, Any],
                 resume: str | None = None, loop: str = 'train') -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        self.run_config, self.loop = run_config, loop
        self.dist = D.setup(cfg.device)
        # One run per folder: a second process on it is refused before it reads or writes there.
        self.lock = lock_run_folder(self.out, f'distdpo train {loop}', self.dist)
        try:
            self.resume_from = self._resume_path(resume)
        except BaseException:
            self.lock.release()
            raise
        self.device = self.dist.device
        self.precision = self._precision()
        self.modules: dict[str, nn.Module] = {}
        self.wrapped: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.emas: dict[str, tuple[nn.Module, float]] = {}  # trained module -> (average, decay)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.steps_per_epoch = 1
        self.best: float | None = None
        self._stop_signal: int | None = None
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts)

    # ---- registration (called from Task.setup) -------------------------------------------------
    def add_module(self, name: str, module: nn.Module, trainable: bool = True) -> nn.Module:
        """Register a network; returns what to call in train_step (DDP-wrapped when trainable).

        Frozen networks are put in eval mode with requires_grad off. Trainable ones get BatchNorm
        statistics shared over ranks. Call the returned module once per backward pass (batch the
        inputs instead of calling it twice): that is what DDP expects.
        """
        module = module.to(self.device)
        if not trainable:
            module.eval().requires_grad_(False)
            self.modules[name] = self.wrapped[name] = module
            return module
        if self.dist.enabled:
            module = D.convert_batchnorm(module, self.device)
        self.modules[name] = module
        wrapped: nn.Module = module
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == 'cuda' else None
            wrapped = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        self.wrapped[name] = wrapped
        return wrapped

    def add_optimizer(self, name: str, optimizer: torch.optim.Optimizer,
                      scheduler: Any | None = None) -> None:
        """Register an optimiser (and its scheduler, stepped by the engine after every step)."""
        self.optimizers[name] = optimizer
        if scheduler is not None:
            self.schedulers[name] = scheduler

    def add_ema(self, name: str, decay: float) -> nn.Module:
        """An exponential moving average of the registered module `name`, updated by the engine
        after every optimisation step and saved with the training state as `<name>_ema`.

        The effective decay ramps up as min(decay, (1 + step) / (10 + step)), so early averages
        are not dominated by the random initial weights. Buffers (BatchNorm statistics) are
        copied, not averaged.
        """
        if not 0.0 < decay < 1.0:
            raise UserError(f'EMA decay must lie in (0, 1), got {decay}')
        average = copy.deepcopy(self.modules[name]).eval().requires_grad_(False)
        self.modules[f'{name}_ema'] = average
        self.emas[name] = (average, float(decay))
        return average

    def averaged(self, name: str) -> nn.Module:
        """The EMA of module `name` when it has one, else the module itself."""
        return self.emas[name][0] if name in self.emas else self.modules[name]

    @torch.no_grad()
    def _update_emas(self) -> None:
        for name, (average, decay) in self.emas.items():
            rate = 1.0 - min(decay, (1.0 + self.step) / (10.0 + self.step))
            source = self.modules[name]
            params = [p for p in average.parameters()]
            torch._foreach_lerp_(params, [p.detach() for p in source.parameters()], rate)
            for mine, theirs in zip(average.buffers(), source.buffers(), strict=True):
                mine.copy_(theirs)

    def unwrap(self, name: str) -> nn.Module:
        return self.modules[name]

    # ---- helpers for train_step -------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the run uses mixed precision, else a no-op."""
        if self.precision == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimize(self, loss: torch.Tensor, optimizer: str, clip: float | None = None
                 ) -> torch.Tensor:
        """Backward, optional gradient-norm clipping, optimiser step, zero grads; returns norm."""
        opt = self.optimizers[optimizer]
        loss.backward()
        params = [p for group in opt.param_groups for p in group['params'] if p.grad is not None]
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in params])) if params else \
                torch.zeros((), device=self.device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm.detach()

    def generator(self, *parts: Any) -> torch.Generator:
        """A generator on the run's device seeded from (seed, *parts), e.g. ('val', index)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.cfg.seed, *parts))
        return g

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self, task: Task, train_set: Dataset, collate: Callable[[list[Any]], Any],
            val_set: Dataset | None = None) -> int:
        """Train until train.max_steps; returns 0, or 128 + signal when stopped by a signal.

        A full disk (or another write error of the run folder) ends the run with one line; the
        training states are written atomically, so the last complete one stays valid."""
        try:
            return self._fit(task, train_set, collate, val_set)
        except OSError as exc:
            if exc.errno not in _DISK_ERRORS:
                raise
            state = self.out / 'state' / 'last.safetensors'
            kept = (f'the last training state {state} is intact; free space and continue with '
                    '--resume' if state.is_file() else 'no training state was written yet')
            raise UserError(f'{exc.filename or self.out}: cannot write ({exc.strerror}) at step '
                            f'{self.step}; {kept}') from None

    def stop_requested(self) -> bool:
        """Whether SIGTERM / Ctrl-C asked this process to stop (asked between sampler steps and
        validation scans, so that a long validation does not hold the stop up)."""
        return self._stop_signal is not None

    def _fit(self, task: Task, train_set: Dataset, collate: Callable[[list[Any]], Any],
             val_set: Dataset | None) -> int:
        cfg, d = self.cfg, self.dist
        if cfg.batch_size % d.world_size:
            raise UserError(f'train.batch_size {cfg.batch_size} must be divisible by the '
                            f'{d.world_size} torchrun processes')
        if len(train_set) < cfg.batch_size:
            raise UserError(f'the training set has {len(train_set)} samples, fewer than one '
                            f'batch (train.batch_size {cfg.batch_size})')
        sampler = GlobalBatchSampler(len(train_set), cfg.batch_size, d.rank, d.world_size,
                                     cfg.seed)
        self.steps_per_epoch = sampler.batches_per_epoch
        workers = cfg.num_workers if cfg.num_workers >= 0 else (
            2 if self.device.type == 'cuda' else 0)
        preload = getattr(train_set, 'preload', None)
        if workers > 0 and preload is not None:
            preload()  # load shared data (e.g. maps) once, before the workers fork
        loader = DataLoader(SeededItems(train_set, cfg.seed), batch_size=sampler.local_batch,
                            sampler=sampler, collate_fn=indexed_collate(collate),
                            num_workers=workers, pin_memory=self.device.type == 'cuda',
                            drop_last=True, persistent_workers=False,
                            worker_init_fn=_leave_signals_to_the_trainer if workers else None)
        task.setup(self)
        if self.resume_from is not None:
            self._load(self.resume_from)
        elif self.is_main:
            self._start_folder()
        log = RunLog(self.out, cfg.tensorboard, enabled=self.is_main)
        previous_handlers = self._install_signal_handlers()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.loop, unit='step',
                   disable=not self.is_main, dynamic_ncols=True, file=sys.stderr)
        sums: dict[str, torch.Tensor] = {}
        count, data_s, step_s = 0, 0.0, 0.0
        stopped = False  # agreed by all ranks, so that they stop after the same step
        try:
            if self.resume_from is not None and self.is_main:
                log.write(self.step, {'resumed_from': str(self.resume_from)}, kind='event')
            if cfg.val_at_start and self.step == 0 and self.resume_from is None:
                self._validate(task, val_set, log)
                stopped = D.any_rank(self.stop_requested(), d)
                if stopped:
                    self._save(task, 'last')
            while self.step < cfg.max_steps and not stopped:
                sampler.set_position(self.epoch, self.batch_in_epoch)
                t_data = time.perf_counter()
                for indices, batch in loader:
                    t_step = time.perf_counter()
                    data_s += t_step - t_data
                    gens = sample_generators(cfg.seed, self.step, indices, self.device)
                    for module in self.wrapped.values():  # frozen ones stay in eval
                        if any(p.requires_grad for p in module.parameters()):
                            module.train()
                    values = task.train_step(self, _to_device(batch, self.device), gens)
                    for sched in self.schedulers.values():
                        sched.step()
                    self._update_emas()
                    self.step += 1
                    self.batch_in_epoch += 1
                    step_s += time.perf_counter() - t_step
                    bar.update(1)
                    for key, value in values.items():
                        sums[key] = sums.get(key, 0.0) + value.detach().float()
                    count += 1
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        record = self._reduce_log(sums, count, data_s, step_s)
                        log.write(self.step, record)
                        bar.set_postfix({k: f'{v:.4g}' for k, v in record.items()
                                         if k in ('loss', 'lr')})
                        sums, count, data_s, step_s = {}, 0, 0.0, 0.0
                    final = self.step >= cfg.max_steps
                    if cfg.val_every and (self.step % cfg.val_every == 0 or final):
                        self._validate(task, val_set, log)
                    stopped = D.any_rank(self._stop_signal is not None, d)
                    if self.step % cfg.ckpt_every == 0 or stopped or final:
                        self._save(task, 'last')
                    if stopped or final:
                        break
                    t_data = time.perf_counter()
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
        finally:
            bar.close()
            failing = sys.exc_info()[0] is not None
            with contextlib.suppress(OSError) if failing else contextlib.nullcontext():
                log.close()  # on a full disk, the error in flight is the one to report
            self._restore_signal_handlers(previous_handlers)
            D.barrier(d)
        if stopped:
            signum = self._stop_signal or signal.SIGTERM  # another rank may have received it
            if self.is_main:
                print(f'distdpo: stopped by {signal.Signals(signum).name} at step '
                      f'{self.step}; state saved to {self.out / "state" / "last.safetensors"} '
                      '(continue with --resume)', file=sys.stderr)
            return 128 + int(signum)
        return 0

    def close(self) -> None:
        """Release the DDP wrappers (their reducers use the process group), leave it, and unlock
        the run folder."""
        self.wrapped.clear()
        self.modules.clear()
        self.optimizers.clear()
        self.schedulers.clear()
        gc.collect()
        try:
            D.teardown()
        finally:
            self.lock.release()

    # ---- internals ---------------------------------------------------------------------------
    def _precision(self) -> torch.dtype | None:
        p = self.cfg.precision
        if p == 'auto':
            return torch.bfloat16 if self.device.type == 'cuda' else None
        return torch.bfloat16 if p == 'bf16' else None

    def _resume_path(self, resume: str | None) -> Path | None:
        state_dir = self.out / 'state'
        if resume is None:
            if (state_dir / 'last.safetensors').exists():
                raise UserError(f'{self.out} already holds a training run; pass --resume to '
                                'continue it or choose another --out')
            return None
        path = state_dir / 'last.safetensors' if resume == 'last' else Path(resume)
        if not path.is_file():
            raise UserError(f'--resume: no training state at {path}')
        return path

    def _start_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.run_config, sort_keys=False)
        write_bytes_atomic(self.out / 'config.yaml', text.encode())

    def _install_signal_handlers(self) -> dict[int, Any]:
        def on_signal(signum: int, frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._stop_signal = signum
            if self.is_main:
                print(f'\ndistdpo: {signal.Signals(signum).name} received: finishing this step '
                      'and saving a checkpoint (Ctrl-C again to stop at once)', file=sys.stderr)

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread
                previous[sig] = signal.signal(sig, on_signal)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _reduce_log(self, sums: dict[str, torch.Tensor], count: int, data_s: float,
                    step_s: float) -> dict[str, float]:
        """Interval means over steps and ranks, learning rates, and rank 0's timings."""
        keys = sorted(sums)
        record: dict[str, float] = {}
        if keys:
            stacked = torch.stack([sums[k].reshape(()) for k in keys]).to(self.device)
            total = D.all_reduce_sum(stacked, self.dist) / (count * self.dist.world_size)
            record = {k: float(v) for k, v in zip(keys, total.tolist(), strict=True)}
        for name, opt in self.optimizers.items():
            key = 'lr' if len(self.optimizers) == 1 else f'lr/{name}'
            record[key] = float(opt.param_groups[0]['lr'])
        record['epoch'] = self.epoch
        record['data_s'] = data_s / count  # waiting for the batch, per step
        record['step_s'] = step_s / count  # forward, backward and update, per step
        record['steps_per_s'] = count / max(data_s + step_s, 1e-9)
        return record

    def _validate(self, task: Task, val_set: Dataset | None, log: RunLog) -> None:
        """Score the first val_scans items, shared out over the ranks; keep the best model."""
        if val_set is None or self.cfg.val_scans == 0:
            return
        for module in self.modules.values():
            module.eval()
        n = min(self.cfg.val_scans, len(val_set))
        rows: list[dict[str, float]] = []
        t0 = time.perf_counter()
        interrupted = False
        with torch.no_grad():
            for index in range(self.dist.rank, n, self.dist.world_size):
                if self.stop_requested():  # between scans; within one, between sampler steps
                    interrupted = True
                    break
                try:
                    rows.append(task.validate(self, val_set[index], index))
                except Cancelled:
                    interrupted = True
                    break
        if D.any_rank(interrupted, self.dist):
            log.write(self.step, {'validation': 'interrupted by a signal'}, kind='event')
            if self.is_main:
                tqdm.write(f'[{self.loop}] step {self.step} validation interrupted',
                           file=sys.stderr)
            return
        names = sorted({k for row in rows for k in row})
        names = self._agree_on_names(names)
        sums = torch.tensor([[sum(r.get(k, 0.0) for r in rows) for k in names],
                             [sum(k in r for r in rows) for k in names]],
                            dtype=torch.float64, device=self.device) if names else None
        if sums is not None:
            sums = D.all_reduce_sum(sums, self.dist)
            metrics = {k: float(s / max(c, 1)) for k, s, c in
                       zip(names, sums[0].tolist(), sums[1].tolist(), strict=True)}
        else:
            metrics = {}
        metrics['seconds'] = time.perf_counter() - t0
        log.write(self.step, metrics, kind='val')
        # Before the first step, the score is the curve's starting point, not a candidate:
        # an untrained diffusion model that leaves the scan in place can beat a half-trained one
        # on Chamfer distance, and model/best must be a trained model.
        score = metrics.get(task.best_metric) if self.step > 0 else None
        if score is not None and math.isfinite(score) and self._is_better(score, task):
            self.best = score
            self._save(task, 'best')
        if self.is_main:
            with contextlib.suppress(ImportError):  # matplotlib: training extra
                plot_log(log.path, log.path.with_name('curves.png'))
            shown = ', '.join(f'{k} {v:.4g}' for k, v in metrics.items())
            tqdm.write(f'[{self.loop}] step {self.step} validation: {shown}', file=sys.stderr)

    def _agree_on_names(self, names: list[str]) -> list[str]:
        """Metric names as seen by rank 0 (ranks without validation items have none)."""
        if not self.dist.enabled:
            return names
        import torch.distributed as dist

        box: list[Any] = [names if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return list(box[0])

    def _is_better(self, score: float, task: Task) -> bool:
        if self.best is None:
            return True
        return score < self.best if task.lower_is_better else score > self.best

    def _state(self) -> dict[str, Any]:
        packed = rng_to_tensor(capture_rng(cuda=self.device.type == 'cuda'))
        rng_all = D.all_gather_tensor(packed, self.dist)
        return {
            'loop': self.loop,
            'step': self.step, 'epoch': self.epoch, 'batch_in_epoch': self.batch_in_epoch,
            'best': self.best, 'world_size': self.dist.world_size,
            'config': self.run_config,
            'modules': {k: m.state_dict() for k, m in self.modules.items()},
            'optimizers': {k: o.state_dict() for k, o in self.optimizers.items()},
            'schedulers': {k: s.state_dict() for k, s in self.schedulers.items()},
            'rng': rng_all,
        }

    def _save(self, task: Task, tag: str) -> None:
        """Write state/<tag>.safetensors and model/<tag>/ (rank 0), all ranks in step."""
        state = self._state()  # a collective: every rank takes part
        if self.is_main:
            state_dir = self.out / 'state'
            state_dir.mkdir(parents=True, exist_ok=True)
            target = state_dir / f'{tag}.safetensors'
            if tag == 'last' and target.exists():
                _keep_previous(target, state_dir / 'previous.safetensors')
            save_state(target, state)
            info = {'step': self.step, 'epoch': self.epoch, 'loop': self.loop, 'best': self.best}
            task.export(self, self.out / 'model' / tag, info)
        D.barrier(self.dist)

    def _load(self, path: Path) -> None:
        """Restore everything written by _save; refuse a state of another loop or model."""
        state = load_state(path)
        for key, (types, low) in _STATE_LAYOUT.items():
            value = state.get(key)
            if not isinstance(value, types) or isinstance(value, bool) or (
                    low is not None and value < low) or (
                    key == 'rng' and not all(isinstance(v, torch.Tensor) for v in value)):
                raise UserError(f'{path}: training state field "{key}" is {value!r:.60}; the '
                                'file was edited or is not a state of `distdpo train`')
        if state.get('loop') != self.loop:
            raise UserError(f'{path}: a state of `distdpo train {state.get("loop")}`, '
                            f'not of `{self.loop}`')
        saved_model, current_model = state['config'].get('model'), self.run_config.get('model')
        if saved_model != current_model:
            diff = sorted(k for k in set(saved_model or {}) | set(current_model or {})
                          if (saved_model or {}).get(k) != (current_model or {}).get(k))
            raise UserError(f'{path}: the model config does not fit this checkpoint (fields '
                            f'{diff} differ); resume with the config the run was started with')
        for kind, registry in (('modules', self.modules), ('optimizers', self.optimizers),
                               ('schedulers', self.schedulers)):
            missing = sorted(set(registry) ^ set(state[kind]))
            if missing:
                raise UserError(f'{path}: {kind} {missing} do not match this loop')
        for name, module in self.modules.items():
            module.load_state_dict(state['modules'][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state['optimizers'][name])  # moves tensors to the params
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state['schedulers'][name])
        self.step, self.epoch = int(state['step']), int(state['epoch'])
        self.batch_in_epoch, self.best = int(state['batch_in_epoch']), state['best']
        rng = state['rng']
        if len(rng) == self.dist.world_size:
            restore_rng(rng_from_tensor(rng[self.dist.rank]))
        elif self.is_main:
            print(f'distdpo: the state was written by {len(rng)} processes, this run has '
                  f'{self.dist.world_size}: global RNG states are not restored (the data order '
                  'and per-sample noise still are)', file=sys.stderr)


# Write errors that mean "the disk", not a bug: one line for the user, not a traceback.
_DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES})

# What _state() writes, checked on load before anything is used: the header of a state file is
# plain JSON, so an edited one must be refused with a line, not a KeyError.
_STATE_LAYOUT: dict[str, tuple[tuple[type, ...], int | None]] = {  # key: (types, minimum)
    'loop': ((str,), None), 'step': ((int,), 0), 'epoch': ((int,), 0),
    'batch_in_epoch': ((int,), 0), 'best': ((float, int, type(None)), None),
    'world_size': ((int,), 1), 'config': ((dict,), None), 'modules': ((dict,), None),
    'optimizers': ((dict,), None), 'schedulers': ((dict,), None), 'rng': ((list,), None),
}


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """Data-loading workers ignore SIGINT and SIGTERM: Ctrl-C in a terminal, `kill` of the
    process group or a launcher's shutdown reach every process, and a worker that died first
    would abort the trainer before it saves its state; the trainer stops them itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _keep_previous(last: Path, previous: Path) -> None:
    """Make `previous` the current `last` (a hard link, or a copy), atomically."""
    tmp = previous.with_name('.previous.tmp')
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:
        shutil.copy2(last, tmp)
    os.replace(tmp, previous)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
