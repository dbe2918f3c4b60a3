"""DiffusionDet's denoising head: time embedding, DynamicConv, refinement stages, DynamicHead."""
from .dynamic_conv import DynamicConv
from .dynamic_head import DynamicHead, xavier_init_matrices
from .refinement_stage import RefinementStage
from .time_embedding import SinusoidalTimeEmbedding, build_time_mlp

__all__ = [
    "DynamicConv",
    "DynamicHead",
    "RefinementStage",
    "SinusoidalTimeEmbedding",
    "build_time_mlp",
    "xavier_init_matrices",
]
