"""The training engine shared by every `distdpo train ...` loop (see loop.py for the picture)."""

from distdpo_training.engine.config import EngineConfig, ModelSpec, load_config, to_dict
from distdpo_training.engine.loop import Engine, Task
from distdpo_training.engine.runlog import read_log

__all__ = ['Engine', 'EngineConfig', 'ModelSpec', 'Task', 'load_config', 'read_log', 'to_dict']
