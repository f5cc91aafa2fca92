"""LiDiff's networks (exact checkpoint layout) and the point-cloud facades built on them."""

from distdpo_ros.models.conditioning import Condition
from distdpo_ros.models.minkunet import MinkGlobalEnc, MinkUNet, MinkUNetDiff, timestep_embedding
from distdpo_ros.models.networks import DiffusionNet, RefineNet, identical_groups

__all__ = ['Condition', 'DiffusionNet', 'MinkGlobalEnc', 'MinkUNet', 'MinkUNetDiff', 'RefineNet',
           'identical_groups', 'timestep_embedding']
