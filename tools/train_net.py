#!/usr/bin/env python
"""Train or evaluate DiffusionDet or DiffusionInst (one or many GPUs/machines through detectron2's launch).

    python tools/train_net.py --config-file configs/diffdet.coco.res50.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth --steps 4 --boxes 1000
"""
import sys
from datetime import timedelta

from torch.multiprocessing import ProcessExitedException

from detectron2.engine import default_setup, hooks, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from diffusiondet.engine import DiffusionDetCheckpointer, Trainer, argument_parser, load_model_weights
from diffusiondet.engine.stop_signal import forward_stop_signals
from diffusiondet.test_time_augmentation import evaluate_with_tta
from diffusionengine import build_config  # DiffusionDet, DiffusionInst and DiffusionEngine configs alike


def setup(args):
    setup_logger(distributed_rank=comm.get_rank(), name="diffusiondet")
    cfg = build_config(args.config_file, args.opts, steps=args.steps, boxes=args.boxes)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = DiffusionDetCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, trust_code=cfg.MODEL.TRUST_WEIGHTS
        )
        last = checkpointer.get_checkpoint_file() if args.resume and checkpointer.has_checkpoint() else None
        # Evaluating a random model is an error, not an AP of 0. MODEL_EMA.ENABLED: the file's
        # EMA weights (ema_state) are evaluated; the log says which weights were loaded.
        load_model_weights(model, cfg, last)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:  # also with test-time augmentation (docs/tta.md), keys "<task>_TTA"
            res.update(evaluate_with_tta(cfg, model))
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:  # after the last iteration, as detectron2's train_net.py
        trainer.register_hooks([hooks.EvalHook(0, lambda: evaluate_with_tta(cfg, trainer.model))])
    return trainer.train()


def invoke_main():
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    if args.num_gpus > 1:
        # SIGTERM to this launcher reaches every rank: they checkpoint and exit with 128 + 15.
        forward_stop_signals()
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            timeout=timedelta(minutes=args.dist_timeout),
        )
    except ProcessExitedException as stopped:
        if stopped.exit_code is None or stopped.exit_code <= 128:
            raise
        # A rank stopped on a signal after its checkpoint (it logged which); no traceback here.
        sys.exit(stopped.exit_code)


if __name__ == "__main__":
    invoke_main()
