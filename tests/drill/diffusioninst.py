"""DiffusionInst faults: masks that do not add up, and a non-finite mask loss, in a real (tiny)
DiffusionInst training on polygon-annotated data; the mask model then predicts finite masks."""
import json
import os

from .common import Case, capture_logs, check, expect_logged

INST_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "configs", "diffinst.synthetic.res18.yaml")  # fmt: skip
MASK_OPTS = ["MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 16, "MODEL.DiffusionInst.MASK_NUM_CONVS", 1,
             "MODEL.DiffusionInst.MASK_NORM", "BN"]  # fmt: skip


def _damaged_masks(workdir):
    """6 synthetic images with polygons; image 1's first annotation gets an RLE whose counts stop
    short of H x W, image 2's first a 2-point polygon. Returns (json, image folder, bad ids)."""
    from diffusiondet.data.synthetic import generate_synthetic_crowd

    root = os.path.join(workdir, "data")
    json_file = generate_synthetic_crowd(root, split="train", num_images=6, image_size=(64, 80),
                                         min_objects=2, max_objects=5, seed=11)  # fmt: skip
    with open(json_file) as f:
        coco = json.load(f)
    first = {}
    for anno in coco["annotations"]:
        first.setdefault(anno["image_id"], anno)
    rle, short = first[1], first[2]
    rle["segmentation"] = {"size": [64, 80], "counts": [100, 200]}  # 300 of 5120 pixels
    short["segmentation"] = [[1.0, 1.0, 9.0, 9.0]]
    with open(json_file, "w") as f:
        json.dump(coco, f)
    return json_file, os.path.join(root, "train"), (rle["id"], short["id"])


def bad_masks_and_nan_mask_loss(workdir):
    import torch
    from unittest import mock

    import detectron2.engine.defaults
    from diffusiondet.data.datasets import register_coco_json
    from diffusiondet.engine import Trainer
    from diffusionengine import build_config
    from tests.utils import TINY_OPTS

    json_file, images, (rle_id, short_id) = _damaged_masks(workdir)
    name = "drill_inst_" + os.path.basename(os.path.normpath(workdir))
    with capture_logs("diffusiondet") as logs:
        register_coco_json(name, json_file, images)
        cfg = build_config(INST_CONFIG, TINY_OPTS + MASK_OPTS + [
            "DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "MODEL.DiffusionDet.NUM_CLASSES", 5,
            "SOLVER.MAX_ITER", 4, "SOLVER.IMS_PER_BATCH", 3, "SEED", 7, "OUTPUT_DIR", os.path.join(workdir, "out"),
        ])  # fmt: skip
        cfg.freeze()
        with mock.patch.object(detectron2.engine.defaults, "setup_logger", lambda *a, **k: None):
            trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        # A finite loss dict whose mask term is NaN at the first step (a degenerate mask batch).
        trainer.loss_hook = lambda it, d: {**d, "loss_masks": d["loss_masks"] * float("nan")} if it == 0 else d
        trainer.train()
    short = expect_logged(logs, [f"{short_id}", "fewer than 3 points"])
    rle = expect_logged(logs, [f"annotation ids [{rle_id}]"])
    skipped = expect_logged(logs, ["iteration 0", "loss_masks=nan", "skipped"])
    check(trainer.nonfinite_steps == 1, f"nonfinite_steps = {trainer.nonfinite_steps}")
    state = trainer.model.state_dict()
    check(all(torch.isfinite(v).all() for v in state.values()), "NaN in the DiffusionInst weights")
    final = torch.load(os.path.join(workdir, "out", "model_final.pth"), map_location="cpu", weights_only=True)
    check(any(k.startswith("head.mask_head") or "mask" in k for k in final["model"]), "no mask branch saved")
    model = trainer.model.eval()
    with torch.no_grad():
        from tests.utils import random_input

        out = model([random_input(64, 80, 0, 5, seed=1), random_input(48, 96, 0, 5, seed=2)])
    masks = [o["instances"].pred_masks for o in out]
    check(all(m.shape[-2:] == s for m, s in zip(masks, [(64, 80), (48, 96)])), "mask sizes differ from the images")
    return (f"2-point polygon and short RLE skipped with their ids ({short[:60]}... / {rle[:60]}...); "
            f"NaN mask loss: {skipped[:80]}...; 4 iterations, finite weights with the mask branch, masks predicted")


CASES = [
    Case("inst_masks", "bad_masks_and_nan_mask_loss_in_training", bad_masks_and_nan_mask_loss),
]
