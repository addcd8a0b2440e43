"""The Transfusion network: config, packed-batch contract, decoder, patch codecs, diffusion, losses."""

from .batch import IGNORE_INDEX, PackedBatch
from config import DiffusionConfig, ModelConfig, SpecialTokens
from .diffusion import NoiseSchedule
from .losses import LossNorm, LossOutput, transfusion_loss
from .objective import Objective, noise_generator
from .transfusion import ModelOutput, TransfusionModel

__all__ = [
    "IGNORE_INDEX", "PackedBatch", "DiffusionConfig", "ModelConfig", "SpecialTokens", "NoiseSchedule",
    "LossNorm", "LossOutput", "Objective", "noise_generator", "transfusion_loss", "ModelOutput", "TransfusionModel",
]
