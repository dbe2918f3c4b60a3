"""Config keys of DiffusionDet.

Every key lives under ``MODEL.DiffusionDet`` (the official node name, so official YAML files merge
unchanged). Keys the official code already has keep their names and defaults; every constant the
official code hard-codes is a key here whose default equals the official value.
Only this file, ``from_config`` classmethods and ``diffusiondet/engine`` read a ``cfg``.

:func:`build_config` (command line -> validated config) lives here too, with the extension seam
of ``config_extensions``; it imports the data and model code only when it runs, by name, so that
importing this module never imports the model.
"""
import os

import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.config import CfgNode as CN

from .diffusion import PADDING_STRATEGIES
from .backbone_config import add_backbone_config, backbone_config_errors
from .training_extras_config import add_training_extras_config, training_extras_config_errors
from .options import ENSEMBLE_MODES, INFERENCE_AMP_DTYPES, SAMPLER_UPDATES, SAMPLING_MODES
from .config_extensions import register_config_extension, resolve_config_extensions


def add_diffusiondet_config(cfg):
    """Add the DiffusionDet keys (and the solver/dataset keys it uses) to a detectron2 config."""
    cfg.MODEL.DiffusionDet = CN()
    d = cfg.MODEL.DiffusionDet
    # Number of object classes K (sigmoid/focal: K logits; softmax: K + 1).
    d.NUM_CLASSES = 80
    # Number of noisy boxes N fed to the head during training (and at test time unless
    # EVAL_NUM_PROPOSALS > 0).
    d.NUM_PROPOSALS = 300
    # Boxes used at inference; 0 means "same as NUM_PROPOSALS". The same weights work with any N.
    d.EVAL_NUM_PROPOSALS = 0

    # --- head (one RCNN-style refinement stage repeated NUM_HEADS times) ---
    # Attention heads of the per-stage self-attention over proposals.
    d.NHEADS = 8
    # Dropout probability inside every stage.
    d.DROPOUT = 0.0
    # Hidden width of the per-stage feed-forward network.
    d.DIM_FEEDFORWARD = 2048
    # Activation of the feed-forward network: relu, gelu or glu.
    d.ACTIVATION = "relu"
    # Object-feature width d; must equal the FPN output channels.
    d.HIDDEN_DIM = 256
    # Depth of the classification tower (Linear-LayerNorm-ReLU blocks).
    d.NUM_CLS = 1
    # Depth of the box-regression tower.
    d.NUM_REG = 3
    # Number of cascaded refinement stages per model call.
    d.NUM_HEADS = 6
    # Number of dynamic linear layers in DynamicConv (the architecture needs exactly 2).
    d.NUM_DYNAMIC = 2
    # Bottleneck width of DynamicConv.
    d.DIM_DYNAMIC = 64
    # Proposals per chunk in DynamicConv (bounds the generated parameters in memory); 0 = automatic.
    d.DYNAMIC_CHUNK_SIZE = 0
    # GPU inference with DYNAMIC_CHUNK_SIZE 0: MiB of generated parameters per chunk; 0 = unchunked.
    d.DYNAMIC_MEMORY_BUDGET_MB = 512
    # MiB that the O(N^2) parts of inference may take (see inference_memory_mb: one stage's
    # attention weights and the NMS IoU matrix); an EVAL_NUM_PROPOSALS (--boxes) whose estimate
    # exceeds it is a config error at start-up, not an out-of-memory kill mid-evaluation. 16 GiB
    # admits the paper's largest setting (2000 boxes, 4 steps: ~0.5 GiB) and 5000 boxes (~3 GiB);
    # 0 = no check.
    d.MAX_INFERENCE_MEMORY_MB = 16384
    # Box-delta clamp for width/height (official: ln(100000 / 16)).
    d.BBOX_SCALE_CLAMP = 8.740336742730447

    # --- loss and matching ---
    # Weight of the classification loss and of its matching cost.
    d.CLASS_WEIGHT = 2.0
    # Weight of the GIoU loss and of its matching cost.
    d.GIOU_WEIGHT = 2.0
    # Weight of the L1 loss (image-size-normalised xyxy) and of its matching cost.
    d.L1_WEIGHT = 5.0
    # Losses on every stage (True) or only on the last one.
    d.DEEP_SUPERVISION = True
    # Weight of the no-object class in softmax classification (only used when USE_FOCAL is False).
    d.NO_OBJECT_WEIGHT = 0.1
    # Sigmoid focal classification (the official setting).
    d.USE_FOCAL = True
    # Federated loss (LVIS): focal loss restricted to present + sampled negative classes.
    d.USE_FED_LOSS = False
    # Classes active per federated-loss call, background id included (official hard-codes 50).
    d.FED_LOSS_NUM_CLASSES = 50
    # Exponent on the per-class image counts giving federated sampling weights.
    d.FED_LOSS_FREQ_WEIGHT_POWER = 0.5
    # Focal loss alpha (loss and matching cost).
    d.ALPHA = 0.25
    # Focal loss gamma (loss and matching cost).
    d.GAMMA = 2.0
    # Prior probability used to initialise the classifier bias: -ln((1 - p) / p).
    d.PRIOR_PROB = 0.01
    # Dynamic-k matching: k = floor(sum of the top OTA_K IoUs of a GT), at least 1.
    d.OTA_K = 5
    # Centre prior: a query is a candidate if its centre is within CENTER_RADIUS GT widths/heights.
    d.CENTER_RADIUS = 2.5
    # Matching cost added when a query is not both inside the GT box and its centre region.
    d.NOT_IN_BOTH_COST = 100.0
    # Matching cost added to queries outside every GT box and centre region.
    d.NOT_FG_COST = 10000.0

    # --- diffusion ---
    # Number of training timesteps T of the cosine schedule.
    d.NUM_TIMESTEPS = 1000
    # Signal scale s: boxes are mapped to (2 b - 1) s before noising.
    d.SNR_SCALE = 2.0
    # How ground truth is padded to N boxes (paper Table 4b): gaussian_concat (official),
    # uniform_concat, full_image_concat or repeat.
    d.PADDING = "gaussian_concat"
    # Std of the Gaussian placeholder boxes around 0.5 (official 1/6).
    d.PLACEHOLDER_STD = 1.0 / 6.0
    # DDIM sampling steps at inference (the --steps shorthand of tools/train_net.py).
    d.SAMPLE_STEP = 1
    # DDIM eta (1.0 = official: fully stochastic DDIM).
    d.DDIM_ETA = 1.0
    # Replace low-score boxes by fresh noise between steps.
    d.BOX_RENEWAL = True
    # Boxes whose best class probability is <= this are renewed.
    d.RENEWAL_THRESHOLD = 0.5
    # Which model calls feed the multi-step ensemble: "official" skips the last call
    # (as the released code does, issue #56), "all_steps" uses every call.
    d.ENSEMBLE = "official"
    # How a step moves the kept boxes to the next timestep (paper Table 4c): "ddim" (official)
    # or "x0" (no DDIM: the step's predicted boxes are the next step's input as they are).
    d.SAMPLER_UPDATE = "ddim"

    # --- inference ---
    # Class-aware NMS on the final candidates.
    d.USE_NMS = True
    # IoU threshold of that NMS.
    d.NMS_THRESH = 0.5
    # Keep at most this many detections per image after NMS; 0 keeps all (official behaviour).
    d.DETECTIONS_PER_IMAGE = 0

    # --- solver extras ---
    # "ADAMW" (official) or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # AdamW as one fused kernel (torch's fused=True): same update up to float rounding, about
    # 8 % of a CPU training iteration saved; False = torch's default per-tensor implementation.
    cfg.SOLVER.FUSED_ADAMW = True
    # Learning-rate multiplier for parameters whose name contains "backbone".
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # Non-finite (NaN/inf) losses in a row that are skipped (no optimizer step, counted in the
    # "nonfinite_steps" scalar) before training stops with an error; 0 stops at the first one,
    # as detectron2 does. An isolated bad batch then costs one step, not the run.
    cfg.SOLVER.MAX_NONFINITE_STEPS = 10

    add_backbone_config(cfg)  # MODEL.SWIN and MODEL.TIMM
    add_training_extras_config(cfg)  # MODEL_EMA, accumulation, checkpoint retention, TTA

    # Load MODEL.WEIGHTS (and resumed checkpoints) with full pickle: .pkl and .pth files may then
    # run code. False (default): .pkl files go through an unpickler that admits only data, .pth
    # files through torch.load(weights_only=True); a file holding code is an error naming it.
    # Only for files you trust (docs/untrusted_inputs.md).
    cfg.MODEL.TRUST_WEIGHTS = False

    # --- own COCO-format data without writing Python ---
    # When TRAIN_JSON is set, it is registered as "custom_train" and used as DATASETS.TRAIN;
    # likewise TEST_JSON as "custom_test" for DATASETS.TEST.
    cfg.DATASETS.CUSTOM = CN()
    # COCO instances json of the training split.
    cfg.DATASETS.CUSTOM.TRAIN_JSON = ""
    # Folder holding the training images named in TRAIN_JSON.
    cfg.DATASETS.CUSTOM.TRAIN_IMAGES = ""
    # COCO instances json of the evaluation split.
    cfg.DATASETS.CUSTOM.TEST_JSON = ""
    # Folder holding the evaluation images named in TEST_JSON.
    cfg.DATASETS.CUSTOM.TEST_IMAGES = ""

    # Accept image file_names that are absolute or contain ".." (they read files outside the
    # DATASETS.CUSTOM / registered image folder); False: such a json is an error naming the image.
    cfg.DATASETS.ALLOW_OUTSIDE_IMAGE_ROOT = False
    # (name, factor > 0): DATASETS.TRAIN sets weighted by WeightedTrainingSampler (read, not declared, by detectron2).
    cfg.DATASETS.TRAIN_REPEAT_FACTOR = ()

    # Images per batch in evaluation loaders (inference is batch-safe; detectron2 uses 1).
    cfg.TEST.IMS_PER_BATCH = 1
    # Zero-shot transfer: "source:target" class-name pairs relabelling the detections (training
    # classes) to the evaluated dataset's classes before evaluation; unmapped classes are
    # dropped. Empty: no relabelling. E.g. ("person:person",) for COCO -> CrowdHuman.
    cfg.TEST.CLASS_MAPPING = ()

    # Shorter-side sizes of the resize that precedes the random crop in the DETR-style branch.
    cfg.INPUT.CROP.PRE_CROP_MIN_SIZES = (400, 500, 600)
    # Longest-edge cap of that resize (the official code has none): bounds the memory of a very
    # elongated image; 4000 keeps the official resize for aspects up to 6.67 at 600.
    cfg.INPUT.CROP.PRE_CROP_MAX_SIZE = 4000

    # --- speed switches (detections unchanged unless noted) ---
    # Threads pooling RoIs at CPU inference (bit-identical output): 0 = torch.get_num_threads(),
    # 1 = detectron2's serial ROIPooler.
    d.POOLER_THREADS = 0
    # Mixed precision of backbone and head at inference: "" (off, fp32), "bf16" or "fp16";
    # detections change slightly (scores and boxes are still computed and returned in fp32).
    d.INFERENCE_AMP = ""
    # torch.compile every head stage (meant for GPUs; the first calls are slow while compiling).
    d.COMPILE_HEAD = False
    # Skip the model call whose predictions nothing uses (the last one with ENSEMBLE "official"
    # and SAMPLE_STEP > 1): same detections, 1/SAMPLE_STEP less head time. False = official calls.
    d.SKIP_UNUSED_CALLS = True
    # Fold every frozen BatchNorm of the backbone into its convolution at inference and run those
    # convolutions channels-last (R-50, 800x1216, 2-core CPU: 2.94 -> 1.74 s by
    # tools/profile_speed.py backbone; outputs equal up to float rounding). Parameters and
    # checkpoints are unchanged; training is unaffected.
    d.FOLD_FROZEN_BN = True
    # CPU inference pools RoIs with FixedShapeROIPooler (one channels-last gather kernel; equal to
    # detectron2's ROIPooler within 1e-6) instead of torchvision's roi_align: R-50 head at 500
    # boxes 1.31 -> 0.73 s on 2 cores (tools/profile_speed.py head). GPUs keep roi_align
    # (SAMPLING_MODE "graph" always uses the fixed-shape pooler). False = detectron2's pooler
    # everywhere.
    d.FIXED_SHAPE_POOLING = True
    # "parity" (official draw order, renewal by compaction) or "graph" (renewal by masking with
    # N fixed, fixed-shape RoI pooling, one batched NMS: no host syncs inside the sampling loop).
    d.SAMPLING_MODE = "parity"
    # With SAMPLING_MODE "graph": torch.compile(fullgraph=True) each sampling step (head, renewal,
    # DDIM update), captured as a CUDA graph per (batch, boxes) on GPUs.
    d.COMPILE_SAMPLING_STEP = False
    # Allow TF32 matmuls on GPUs (torch.backends.cuda.matmul.allow_tf32, set when the model is
    # built on CUDA). False keeps PyTorch's default: fp32 matmuls (cuDNN convolutions may use TF32).
    d.ALLOW_TF32 = False


def inference_memory_mb(boxes: int, *, heads: int, images: int, steps: int, ensemble: bool) -> float:
    """Estimated MiB of the parts of inference that grow as the square of the box count ``boxes``.

    - Self-attention over the proposals, one stage at a time: ``images * heads * boxes^2`` fp32
      weights, counted twice (the scores and their softmax live together).
    - NMS over the candidates of one image (``boxes`` per step, from every step when the
      predictions of all steps are ensembled): a dense ``candidates^2`` fp32 IoU matrix, the
      most a batched NMS may build.

    The linear parts (features, RoI pooling, the DynamicConv parameters chunked by
    DYNAMIC_MEMORY_BUDGET_MB) are left out: they are not what a large ``--boxes`` blows up.
    """
    attention = 2 * images * heads * boxes**2 * 4
    candidates = boxes * (steps if ensemble else 1)
    return (attention + candidates**2 * 4) / 2**20


def _inference_memory_error(cfg):
    d = cfg.MODEL.DiffusionDet
    boxes = d.EVAL_NUM_PROPOSALS or d.NUM_PROPOSALS
    if d.MAX_INFERENCE_MEMORY_MB <= 0 or boxes < 1 or d.NHEADS < 1:
        return None  # no budget, or values that other checks report
    # Every ensemble mode with more than one step keeps the boxes of several steps for the NMS.
    estimate = inference_memory_mb(
        boxes, heads=d.NHEADS, images=max(cfg.TEST.IMS_PER_BATCH, 1), steps=max(d.SAMPLE_STEP, 1),
        ensemble=d.SAMPLE_STEP > 1,
    )
    if estimate <= d.MAX_INFERENCE_MEMORY_MB:
        return None
    return (
        f"MODEL.DiffusionDet.EVAL_NUM_PROPOSALS (--boxes) {boxes} needs an estimated {estimate:.0f} MiB"
        f" for attention and NMS ({cfg.TEST.IMS_PER_BATCH} image(s) per batch, {d.SAMPLE_STEP} step(s)),"
        f" above MODEL.DiffusionDet.MAX_INFERENCE_MEMORY_MB = {d.MAX_INFERENCE_MEMORY_MB}: use fewer boxes,"
        " or raise the budget (0 = no check) if the machine has the memory"
    )


def _train_repeat_factor_errors(cfg):
    """DATASETS.TRAIN_REPEAT_FACTOR: (name, factor > 0) pairs naming training sets (detectron2
    only asserts, after loading every dataset). DATASETS.CUSTOM's set is named custom_train."""
    train = set(cfg.DATASETS.TRAIN) | ({"custom_train"} if cfg.DATASETS.CUSTOM.TRAIN_JSON else set())
    errors = []
    for pair in cfg.DATASETS.TRAIN_REPEAT_FACTOR:
        if not (
            isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)
            and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool) and pair[1] > 0
        ):
            errors.append(f"DATASETS.TRAIN_REPEAT_FACTOR entries must be (dataset name, factor > 0) pairs, got {pair!r}")
        elif pair[0] not in train:
            errors.append(
                f"DATASETS.TRAIN_REPEAT_FACTOR names {pair[0]!r}, which is not in DATASETS.TRAIN"
                f" {tuple(cfg.DATASETS.TRAIN)}"
            )
    names = [p[0] for p in cfg.DATASETS.TRAIN_REPEAT_FACTOR if isinstance(p, (list, tuple)) and p]
    if len(names) != len(set(names)):
        errors.append(f"DATASETS.TRAIN_REPEAT_FACTOR names a dataset twice: {names}")
    return errors


def validate_diffusiondet_config(cfg):
    """Raise a clear ``ValueError`` at start-up for values that would only fail hours later."""
    d = cfg.MODEL.DiffusionDet
    checks = [
        (d.NUM_CLASSES >= 1, f"MODEL.DiffusionDet.NUM_CLASSES must be >= 1, got {d.NUM_CLASSES}"),
        (d.NUM_PROPOSALS >= 1, f"MODEL.DiffusionDet.NUM_PROPOSALS must be >= 1, got {d.NUM_PROPOSALS}"),
        (
            d.EVAL_NUM_PROPOSALS >= 0,
            "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS (--boxes) must be >= 1, or 0 for NUM_PROPOSALS;"
            f" got {d.EVAL_NUM_PROPOSALS}",
        ),
        (d.SAMPLE_STEP >= 1, f"MODEL.DiffusionDet.SAMPLE_STEP (--steps) must be >= 1, got {d.SAMPLE_STEP}"),
        (
            d.SAMPLE_STEP <= d.NUM_TIMESTEPS,
            f"MODEL.DiffusionDet.SAMPLE_STEP ({d.SAMPLE_STEP}) cannot exceed NUM_TIMESTEPS ({d.NUM_TIMESTEPS})",
        ),
        (
            d.PADDING in PADDING_STRATEGIES,
            f"MODEL.DiffusionDet.PADDING must be one of {PADDING_STRATEGIES}, got {d.PADDING!r}",
        ),
        (d.ENSEMBLE in ENSEMBLE_MODES, f"MODEL.DiffusionDet.ENSEMBLE must be one of {ENSEMBLE_MODES}, got {d.ENSEMBLE!r}"),
        (
            d.SAMPLING_MODE in SAMPLING_MODES,
            f"MODEL.DiffusionDet.SAMPLING_MODE must be one of {SAMPLING_MODES}, got {d.SAMPLING_MODE!r}",
        ),
        (
            not d.COMPILE_SAMPLING_STEP or d.SAMPLING_MODE == "graph",
            f"MODEL.DiffusionDet.COMPILE_SAMPLING_STEP = {d.COMPILE_SAMPLING_STEP} needs SAMPLING_MODE"
            f" 'graph', got {d.SAMPLING_MODE!r} (the parity mode has data-dependent shapes)",
        ),
        (
            d.SAMPLER_UPDATE in SAMPLER_UPDATES,
            f"MODEL.DiffusionDet.SAMPLER_UPDATE must be one of {SAMPLER_UPDATES}, got {d.SAMPLER_UPDATE!r}",
        ),
        (d.NUM_TIMESTEPS >= 2, f"MODEL.DiffusionDet.NUM_TIMESTEPS must be >= 2, got {d.NUM_TIMESTEPS}"),
        (d.SNR_SCALE > 0, f"MODEL.DiffusionDet.SNR_SCALE must be > 0, got {d.SNR_SCALE}"),
        (d.PLACEHOLDER_STD > 0, f"MODEL.DiffusionDet.PLACEHOLDER_STD must be > 0, got {d.PLACEHOLDER_STD}"),
        (
            0.0 <= d.RENEWAL_THRESHOLD <= 1.0,
            f"MODEL.DiffusionDet.RENEWAL_THRESHOLD must be in [0, 1], got {d.RENEWAL_THRESHOLD}",
        ),
        (0.0 < d.NMS_THRESH <= 1.0, f"MODEL.DiffusionDet.NMS_THRESH must be in (0, 1], got {d.NMS_THRESH}"),
        (d.DDIM_ETA >= 0.0, f"MODEL.DiffusionDet.DDIM_ETA must be >= 0, got {d.DDIM_ETA}"),
        (cfg.TEST.IMS_PER_BATCH >= 1, f"TEST.IMS_PER_BATCH must be >= 1, got {cfg.TEST.IMS_PER_BATCH}"),
        (d.NUM_DYNAMIC == 2, f"MODEL.DiffusionDet.NUM_DYNAMIC must be 2, got {d.NUM_DYNAMIC}"),
        (d.OTA_K >= 1, f"MODEL.DiffusionDet.OTA_K must be >= 1, got {d.OTA_K}"),
        (
            d.HIDDEN_DIM == cfg.MODEL.FPN.OUT_CHANNELS,
            f"MODEL.DiffusionDet.HIDDEN_DIM ({d.HIDDEN_DIM}) must equal MODEL.FPN.OUT_CHANNELS"
            f" ({cfg.MODEL.FPN.OUT_CHANNELS})",
        ),
        (
            cfg.SOLVER.OPTIMIZER.upper() in ("ADAMW", "SGD"),
            f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}",
        ),
        (
            bool(cfg.DATASETS.CUSTOM.TRAIN_JSON) == bool(cfg.DATASETS.CUSTOM.TRAIN_IMAGES),
            "DATASETS.CUSTOM.TRAIN_JSON and DATASETS.CUSTOM.TRAIN_IMAGES must be set together, got"
            f" {cfg.DATASETS.CUSTOM.TRAIN_JSON!r} and {cfg.DATASETS.CUSTOM.TRAIN_IMAGES!r}",
        ),
        (
            bool(cfg.DATASETS.CUSTOM.TEST_JSON) == bool(cfg.DATASETS.CUSTOM.TEST_IMAGES),
            "DATASETS.CUSTOM.TEST_JSON and DATASETS.CUSTOM.TEST_IMAGES must be set together, got"
            f" {cfg.DATASETS.CUSTOM.TEST_JSON!r} and {cfg.DATASETS.CUSTOM.TEST_IMAGES!r}",
        ),
        (
            d.INFERENCE_AMP in INFERENCE_AMP_DTYPES,
            f"MODEL.DiffusionDet.INFERENCE_AMP must be one of {sorted(INFERENCE_AMP_DTYPES)},"
            f" got {d.INFERENCE_AMP!r}",
        ),
        (
            d.DYNAMIC_MEMORY_BUDGET_MB >= 0,
            f"MODEL.DiffusionDet.DYNAMIC_MEMORY_BUDGET_MB must be >= 0, got {d.DYNAMIC_MEMORY_BUDGET_MB}",
        ),
        (
            d.POOLER_THREADS >= 0,
            f"MODEL.DiffusionDet.POOLER_THREADS must be >= 0, got {d.POOLER_THREADS}",
        ),
        (
            cfg.SOLVER.MAX_NONFINITE_STEPS >= 0,
            f"SOLVER.MAX_NONFINITE_STEPS must be >= 0, got {cfg.SOLVER.MAX_NONFINITE_STEPS}",
        ),
        # Head sizes: out of range they fail deep inside torch, or (negative tower depths, an
        # odd glu width) build a model that is not the one asked for.
        (
            d.NHEADS >= 1 and d.HIDDEN_DIM % d.NHEADS == 0,
            f"MODEL.DiffusionDet.NHEADS must be >= 1 and divide HIDDEN_DIM ({d.HIDDEN_DIM}), got {d.NHEADS}",
        ),
        (0.0 <= d.DROPOUT < 1.0, f"MODEL.DiffusionDet.DROPOUT must be in [0, 1), got {d.DROPOUT}"),
        (
            d.DIM_FEEDFORWARD >= 1 and (d.ACTIVATION != "glu" or d.DIM_FEEDFORWARD % 2 == 0),
            "MODEL.DiffusionDet.DIM_FEEDFORWARD must be >= 1, and even with MODEL.DiffusionDet.ACTIVATION"
            f" 'glu' (which halves it); got {d.DIM_FEEDFORWARD} with ACTIVATION {d.ACTIVATION!r}",
        ),
        (d.NUM_CLS >= 0, f"MODEL.DiffusionDet.NUM_CLS must be >= 0, got {d.NUM_CLS}"),
        (d.NUM_REG >= 0, f"MODEL.DiffusionDet.NUM_REG must be >= 0, got {d.NUM_REG}"),
        (d.NUM_HEADS >= 1, f"MODEL.DiffusionDet.NUM_HEADS must be >= 1, got {d.NUM_HEADS}"),
        (d.DIM_DYNAMIC >= 1, f"MODEL.DiffusionDet.DIM_DYNAMIC must be >= 1, got {d.DIM_DYNAMIC}"),
        (
            d.DYNAMIC_CHUNK_SIZE >= 0,
            f"MODEL.DiffusionDet.DYNAMIC_CHUNK_SIZE must be >= 0 (0 = automatic), got {d.DYNAMIC_CHUNK_SIZE}",
        ),
        (
            d.BBOX_SCALE_CLAMP > 0,
            f"MODEL.DiffusionDet.BBOX_SCALE_CLAMP must be > 0, got {d.BBOX_SCALE_CLAMP}",
        ),
        # Loss and matching: a negative weight or cost rewards the wrong predictions; focal alpha
        # weighs positives against negatives; PRIOR_PROB 0 or 1 makes the initial classifier bias
        # -ln((1 - p) / p) infinite (0 divides by zero).
        (d.CLASS_WEIGHT >= 0, f"MODEL.DiffusionDet.CLASS_WEIGHT must be >= 0, got {d.CLASS_WEIGHT}"),
        (d.GIOU_WEIGHT >= 0, f"MODEL.DiffusionDet.GIOU_WEIGHT must be >= 0, got {d.GIOU_WEIGHT}"),
        (d.L1_WEIGHT >= 0, f"MODEL.DiffusionDet.L1_WEIGHT must be >= 0, got {d.L1_WEIGHT}"),
        (
            d.NO_OBJECT_WEIGHT >= 0,
            f"MODEL.DiffusionDet.NO_OBJECT_WEIGHT must be >= 0, got {d.NO_OBJECT_WEIGHT}",
        ),
        (0.0 <= d.ALPHA <= 1.0, f"MODEL.DiffusionDet.ALPHA must be in [0, 1], got {d.ALPHA}"),
        (d.GAMMA >= 0.0, f"MODEL.DiffusionDet.GAMMA must be >= 0, got {d.GAMMA}"),
        (
            0.0 < d.PRIOR_PROB < 1.0,
            f"MODEL.DiffusionDet.PRIOR_PROB must be in (0, 1), got {d.PRIOR_PROB}",
        ),
        (
            d.FED_LOSS_NUM_CLASSES >= 1,
            f"MODEL.DiffusionDet.FED_LOSS_NUM_CLASSES must be >= 1, got {d.FED_LOSS_NUM_CLASSES}",
        ),
        (d.CENTER_RADIUS >= 0, f"MODEL.DiffusionDet.CENTER_RADIUS must be >= 0, got {d.CENTER_RADIUS}"),
        (
            d.NOT_IN_BOTH_COST >= 0,
            f"MODEL.DiffusionDet.NOT_IN_BOTH_COST must be >= 0, got {d.NOT_IN_BOTH_COST}",
        ),
        (d.NOT_FG_COST >= 0, f"MODEL.DiffusionDet.NOT_FG_COST must be >= 0, got {d.NOT_FG_COST}"),
        (
            d.DETECTIONS_PER_IMAGE >= 0,
            f"MODEL.DiffusionDet.DETECTIONS_PER_IMAGE must be >= 0 (0 keeps all), got {d.DETECTIONS_PER_IMAGE}",
        ),
        (
            cfg.SOLVER.BACKBONE_MULTIPLIER >= 0,
            f"SOLVER.BACKBONE_MULTIPLIER must be >= 0, got {cfg.SOLVER.BACKBONE_MULTIPLIER}",
        ),
        (
            len(cfg.INPUT.CROP.PRE_CROP_MIN_SIZES) >= 1 and min(cfg.INPUT.CROP.PRE_CROP_MIN_SIZES) >= 1,
            "INPUT.CROP.PRE_CROP_MIN_SIZES must be one or more sizes >= 1, got"
            f" {tuple(cfg.INPUT.CROP.PRE_CROP_MIN_SIZES)}",
        ),
        (
            d.MAX_INFERENCE_MEMORY_MB >= 0,
            f"MODEL.DiffusionDet.MAX_INFERENCE_MEMORY_MB must be >= 0 (0 = no check), got {d.MAX_INFERENCE_MEMORY_MB}",
        ),
        (
            cfg.INPUT.CROP.PRE_CROP_MAX_SIZE >= 1,
            f"INPUT.CROP.PRE_CROP_MAX_SIZE must be >= 1, got {cfg.INPUT.CROP.PRE_CROP_MAX_SIZE}",
        ),
        # yacs type-checks merged values, but code may assign 1 or "yes"; only a real bool opts in.
        (
            isinstance(cfg.MODEL.TRUST_WEIGHTS, bool),
            f"MODEL.TRUST_WEIGHTS must be True or False, got {cfg.MODEL.TRUST_WEIGHTS!r}",
        ),
    ]
    errors = [msg for ok, msg in checks if not ok] + backbone_config_errors(cfg)
    errors += training_extras_config_errors(cfg)
    errors += _train_repeat_factor_errors(cfg)
    memory = _inference_memory_error(cfg)  # after the checks of the values it reads
    if memory:
        errors.append(memory)
    if errors:
        raise ValueError("Invalid DiffusionDet config:\n  " + "\n  ".join(errors))


def shorthand_opts(steps=None, boxes=None):
    """Translate --steps/--boxes into config overrides (validated with the rest of the config)."""
    opts = []
    if boxes is not None and boxes < 1:
        # 0 is the config's "same as NUM_PROPOSALS"; on the command line it is a mistake.
        raise ValueError(f"--boxes (MODEL.DiffusionDet.EVAL_NUM_PROPOSALS) must be >= 1, got {boxes}")
    if steps is not None:
        opts += ["MODEL.DiffusionDet.SAMPLE_STEP", steps]
    if boxes is not None:
        opts += ["MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", boxes]
    return opts


def _check_override_keys(cfg, opts):
    """yacs reports an unknown command-line key with an ``assert`` (gone under ``python -O``);
    raise the KeyError that an unknown key in a YAML file gets instead."""
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs; got an odd number: {list(opts)}")
    for key in opts[0::2]:
        node = cfg
        for part in str(key).split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise KeyError(f"Non-existent config key: {key}")
            node = node[part]


# The core goes through the same seam as the packages built on it. Its registrations are named,
# not imported: the data package registers the built-in datasets (synthetic_crowd_*, CrowdHuman),
# the modeling package the DiffusionDet meta-architecture and the Swin/timm backbones, which
# detectron2's build_model and build_backbone look up by name.
DIFFUSIONDET_EXTENSION = register_config_extension(
    "diffusiondet",
    add_config=add_diffusiondet_config,
    validate=validate_diffusiondet_config,
    registers=("diffusiondet.data.datasets", "diffusiondet.modeling"),
    prepare="diffusiondet.data.datasets.custom:register_custom_datasets",
)


# Environment variable that lets config YAML files use ``!!python/...`` tags (which run code).
TRUST_CONFIG_ENV = "DIFFUSIONDET_TRUST_CONFIG"


def _trusts_config(trust_config) -> bool:
    if trust_config is not None:
        return bool(trust_config)
    return os.environ.get(TRUST_CONFIG_ENV, "") not in ("", "0")


def merge_config_file(cfg, config_file, trust_config=None):
    """``cfg.merge_from_file`` with safe YAML by default.

    detectron2 merges config files with ``allow_unsafe=True``: a ``!!python/object/apply:`` tag
    runs code and only a log line says so. Here such a tag is a ValueError naming the file, unless
    ``trust_config`` (or ``DIFFUSIONDET_TRUST_CONFIG=1``, for the command-line tools) is set."""
    trusted = _trusts_config(trust_config)
    try:
        cfg.merge_from_file(config_file, allow_unsafe=trusted)
    except yaml.constructor.ConstructorError as e:
        # The mark names the file holding the tag (a _BASE_ file, maybe), the line and the column.
        raise ValueError(
            f"config {config_file} uses a YAML tag that constructs Python objects (it would run"
            f" code): {e.problem}{e.problem_mark}. If you trust this file, set"
            f" {TRUST_CONFIG_ENV}=1 (docs/untrusted_inputs.md)"
        ) from e


def build_config(config_file="", opts=(), steps=None, boxes=None, extensions=(), trust_config=None):
    """Build and validate a (not yet frozen) config; registers what it names.

    Args:
        config_file: YAML file merged over the defaults ("" for the defaults alone).
        opts: ``KEY VALUE`` overrides; an unknown key raises ``KeyError``.
        steps, boxes: the ``--steps`` / ``--boxes`` shorthands.
        extensions: names of packages that registered a config extension (imported here if
            needed) or ``ConfigExtension`` objects, applied after the core in the given order.
            See ``diffusiondet.config_extensions`` for what each contributes and when.
        trust_config: allow YAML tags that run code (``!!python/...``); None reads the
            ``DIFFUSIONDET_TRUST_CONFIG`` environment variable (default: not trusted).

    When it returns, the datasets, meta-architectures and backbones of the core and of every
    extension are registered, and ``DATASETS.CUSTOM`` json files are registered as
    custom_train / custom_test (with ``NUM_CLASSES`` taken from the training json).
    """
    # The core always comes first; a caller that also names "diffusiondet" changes nothing.
    chain = resolve_config_extensions([DIFFUSIONDET_EXTENSION, *resolve_config_extensions(extensions)])
    cfg = get_cfg()
    for extension in chain:
        if extension.add_config is not None:
            extension.add_config(cfg)
    if config_file:
        merge_config_file(cfg, config_file, trust_config)
    opts = list(opts) + shorthand_opts(steps, boxes)
    _check_override_keys(cfg, opts)
    cfg.merge_from_list(opts)
    # Every check before any registration: a bad value fails before the model code is imported.
    for extension in chain:
        if extension.validate is not None:
            extension.validate(cfg)
    for extension in chain:
        extension.load_registrations(cfg)
    return cfg
