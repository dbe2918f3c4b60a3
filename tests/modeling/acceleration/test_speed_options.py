"""The seam's entry points: SpeedOptions read from the config, and a hand-assembled model whose
default SpeedOptions leave its parts as they were given."""
from diffusiondet.modeling import DiffusionDet
from diffusiondet.modeling.acceleration import SpeedOptions
from tests.utils import tiny_cfg

D = "MODEL.DiffusionDet."


def test_speed_options_are_the_config_keys():
    cfg = tiny_cfg(D + "DYNAMIC_CHUNK_SIZE", 7, D + "DYNAMIC_MEMORY_BUDGET_MB", 3, D + "POOLER_THREADS", 2,
                   D + "FIXED_SHAPE_POOLING", False, D + "FOLD_FROZEN_BN", False)  # fmt: skip
    assert DiffusionDet.from_config(cfg)["speed"] == SpeedOptions(
        dynamic_chunk_size=7, dynamic_memory_budget_mb=3, pooler_threads=2,
        fixed_shape_pooling=False, fold_frozen_bn=False, compile_head=False,
    )  # fmt: skip


def test_default_speed_options_leave_a_hand_assembled_model_as_given():
    cfg = tiny_cfg(D + "DYNAMIC_CHUNK_SIZE", 7, D + "DYNAMIC_MEMORY_BUDGET_MB", 3, D + "POOLER_THREADS", 2)
    parts = DiffusionDet.from_config(cfg)  # its head carries the config's options already
    model = DiffusionDet(**{**parts, "speed": SpeedOptions()})
    conv = model.head.head_series[0].inst_interact
    assert (conv.chunk_size, conv.memory_budget_bytes) == (7, 3 << 20)
    assert model.head.box_pooler.num_threads == 2
    assert model.fixed_shape_pooling is False  # the config's True is not applied either
