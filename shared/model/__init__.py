"""`shared.model`: MoE decoder families from Hugging Face checkpoints, with the expert seam.

Import the pieces from their modules (`shared.model.moe`, `.model`, `.checkpoint`, ...); this
package re-exports the most used names.
"""

from shared.model.cache import KVCache
from shared.model.config import PRESETS, ModelConfig, RopeConfig, list_moe_layers, preset
from shared.model.errors import CheckpointError, ConfigError, InputError, ModelError, UnsupportedModelError
from shared.model.moe import ExpertWeights, LocalExperts, MoECall, Routing, combine, expert_forward

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "ExpertWeights",
    "InputError",
    "KVCache",
    "LocalExperts",
    "MoECall",
    "ModelConfig",
    "ModelError",
    "RopeConfig",
    "Routing",
    "UnsupportedModelError",
    "combine",
    "expert_forward",
    "list_moe_layers",
    "preset",
]
