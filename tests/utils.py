"""Shared helpers for tests: a tiny CPU configuration and random detectron2 inputs."""
import torch

from detectron2.structures import Boxes, Instances

from diffusioninst import build_config  # builds DiffusionDet and DiffusionInst configs

TINY_OPTS = [
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", "cpu",
    "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.NORM", "GN",
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.DiffusionDet.HIDDEN_DIM", 32,
    "MODEL.DiffusionDet.DIM_FEEDFORWARD", 64,
    "MODEL.DiffusionDet.NHEADS", 4,
    "MODEL.DiffusionDet.DIM_DYNAMIC", 8,
    "MODEL.DiffusionDet.NUM_HEADS", 2,
    "MODEL.DiffusionDet.NUM_CLASSES", 3,
    "MODEL.DiffusionDet.NUM_PROPOSALS", 20,
    "INPUT.MIN_SIZE_TRAIN", (64,),
    "INPUT.MAX_SIZE_TRAIN", 96,
    "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.MAX_SIZE_TEST", 96,
    "DATALOADER.NUM_WORKERS", 0,
    "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.BASE_LR", 1e-3,
    "SOLVER.WARMUP_ITERS", 0,
    "SOLVER.STEPS", (),
    "TEST.EVAL_PERIOD", 0,
]


def tiny_cfg(*opts, config_file="configs/diffdet.synthetic.res18.yaml"):
    """A small, fast CPU config (ResNet-18-FPN with 32 channels, 2 stages, 20 boxes)."""
    return build_config(config_file, TINY_OPTS + list(opts))


def random_input(height=64, width=80, num_boxes=3, num_classes=3, seed=0):
    """A detectron2 input dict with a random image and ``num_boxes`` random GT boxes."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
    wh = 4 + torch.rand(num_boxes, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3])
    inst = Instances((height, width))
    inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
    inst.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
    return {"image": image, "instances": inst, "height": height, "width": width}


def damp_box_refinements(model, scale=0.05):
    """Scale every head stage's box-delta layer down (in place), as in a trained model: an
    untrained head grows boxes to several times the image and amplifies rounding ~20x per stage."""
    with torch.no_grad():
        for stage in model.head.head_series:
            stage.bboxes_delta.weight.mul_(scale)
            stage.bboxes_delta.bias.zero_()
    return model
