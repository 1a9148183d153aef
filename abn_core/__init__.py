"""abn_core: the Attention Branch Network (Fukui et al., CVPR 2019) and its training engine.

Knows nothing about any dataset: task plugins in ``tasks/`` supply data and choose the head.
"""
from .backbones import BACKBONES
from .errors import CheckpointError, ConfigError, DataError, UserError
from .explain import Explanation, explain
from .losses import ABNLoss
from .model import ABN, ABNOutput, build_model
from .official import load_official_checkpoint
from .weights import load_pretrained, read_state_dict

__all__ = [
    "ABN", "ABNLoss", "ABNOutput", "BACKBONES", "CheckpointError", "ConfigError", "DataError", "Explanation", "UserError",
    "build_model", "explain", "load_official_checkpoint", "load_pretrained", "read_state_dict",
]
