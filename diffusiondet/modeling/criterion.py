"""Set criterion of DiffusionDet: dynamic-k matching per stage, then focal / L1 / GIoU losses.

Shape legend: S stages, B images, N proposals, K classes, G ground-truth boxes of one image,
P positive (query, GT) pairs of a batch. Boxes are absolute xyxy unless a name says otherwise.

Every stage output (the final one and, with deep supervision, each auxiliary one) is matched and
scored independently (losses of the DiffusionDet paper, arXiv 2211.09788, Sec. 3.3 "Training
losses"). All terms are normalised by the number of positive queries of the
batch on this process (at least 1), as the official code does; the official all-reduced GT count
is computed there but never used, so it is not computed here.

Extension point: :meth:`SetCriterion.get_loss_functions` maps loss names to methods with the
signature ``(stage_outputs, targets, matches, num_pos) -> {key: unweighted loss}``; a subclass
(e.g. DiffusionInst's masks) adds an entry and the matching weights to ``weight_dict``.
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from .box_losses import giou_loss_sum, normalized_l1_sum
from .matcher import DynamicKMatcher

Match = Tuple[torch.Tensor, torch.Tensor]

# Key under which the per-image outputs (B, ...) reach the loss functions of every stage.
PER_IMAGE = "per_image"
LossFn = Callable[[Dict, List[Dict], List[Match], float], Dict[str, torch.Tensor]]


class SetCriterion(nn.Module):
    """Weighted DiffusionDet training losses with the official key names.

    Args:
        num_classes: K, number of foreground classes.
        matcher: matcher called per stage as ``matcher(logits (B,N,K), boxes (B,N,4), targets)``;
            stored as ``self.matcher`` and must hold no parameters or buffers.
        class_weight / l1_weight / giou_weight: weights of ``loss_ce`` / ``loss_bbox`` /
            ``loss_giou`` (official 2 / 5 / 2).
        deep_supervision: also score stages 0..S-2 (keys suffixed ``_{i}``).
        use_focal: sigmoid focal classification. With ``use_focal=False`` and ``use_fed_loss``
            the classification is masked BCE; with neither (the softmax variant) training raises
            NotImplementedError exactly like the official code.
        use_fed_loss: federated loss (LVIS): the per-element loss is kept only for the batch's
            GT classes plus classes sampled with probability proportional to
            ``fed_loss_cls_weights``, ``fed_loss_num_classes`` in total with background counted.
        focal_alpha / focal_gamma: focal loss parameters.
        fed_loss_cls_weights: (K,) sampling weights (LVIS: image_count ** 0.5, from
            ``detectron2.data.detection_utils.get_fed_loss_cls_weights``). Registered as the
            persistent buffer ``fed_loss_cls_weights`` (the official checkpoint key); ``None``
            means uniform weights (e.g. before loading a checkpoint).
        fed_loss_num_classes: number of classes kept by the federated loss.
        no_object_weight: background weight of the (unimplemented) softmax variant, kept only as
            the ``empty_weight`` (K + 1) buffer of the official checkpoint layout.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: DynamicKMatcher,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        deep_supervision: bool = True,
        use_focal: bool = True,
        use_fed_loss: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        fed_loss_cls_weights: Optional[torch.Tensor] = None,
        fed_loss_num_classes: int = 50,
        no_object_weight: float = 0.1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {
            "loss_ce": class_weight,
            "loss_bbox": l1_weight,
            "loss_giou": giou_weight,
        }
        self.deep_supervision = deep_supervision
        self.use_focal = use_focal
        self.use_fed_loss = use_fed_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.fed_loss_num_classes = fed_loss_num_classes
        if use_fed_loss:
            if fed_loss_cls_weights is None:
                fed_loss_cls_weights = torch.ones(num_classes)
            if fed_loss_cls_weights.shape != (num_classes,):
                raise ValueError(
                    f"fed_loss_cls_weights must have shape ({num_classes},), "
                    f"got {tuple(fed_loss_cls_weights.shape)}"
                )
            self.register_buffer("fed_loss_cls_weights", fed_loss_cls_weights.float())
        elif not use_focal:
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = no_object_weight
            self.register_buffer("empty_weight", empty_weight)

    def get_loss_functions(self) -> Dict[str, LossFn]:
        """Loss name -> method; override (and extend ``weight_dict``) to add losses."""
        return {"labels": self.loss_labels, "boxes": self.loss_boxes}

    def forward(
        self, outputs: Dict, targets: List[Dict], per_image: Optional[Dict] = None
    ) -> Dict[str, torch.Tensor]:
        """Match every scored stage and return the weighted losses.

        Args:
            outputs: the head's output: stage-major per-proposal tensors (S, B, N, ...) with the
                final stage last, at least ``pred_logits`` (S, B, N, K) and ``pred_boxes``
                (S, B, N, 4) abs xyxy; each is sliced per stage for the loss functions.
            targets: B dicts with ``labels`` (G,) long, ``boxes_xyxy`` (G, 4) abs xyxy and
                ``image_size_xyxy`` (4,) = (w, h, w, h) of the un-padded image; G may be 0.
            per_image: the head's per-image outputs, name -> (B, ...) (e.g. a mask feature
                map); every stage's loss functions see them unsliced under ``"per_image"``.

        Returns:
            Weighted scalar losses: ``loss_ce``, ``loss_bbox``, ``loss_giou`` for the final stage
            and ``loss_ce_{i}``, ``loss_bbox_{i}``, ``loss_giou_{i}`` for stage i = 0..S-2.
        """
        losses = {}
        loss_fns = self.get_loss_functions()
        for stage in self._scored_stages(outputs):
            suffix = "" if stage == self._num_stages(outputs) - 1 else f"_{stage}"
            stage_outputs = self._select_stage(outputs, stage)
            stage_outputs[PER_IMAGE] = per_image or {}
            matches = self.matcher(
                stage_outputs["pred_logits"], stage_outputs["pred_boxes"], targets
            )
            num_pos = max(float(sum(int(fg.sum()) for fg, _ in matches)), 1.0)
            for loss_fn in loss_fns.values():
                for key, value in loss_fn(stage_outputs, targets, matches, num_pos).items():
                    losses[key + suffix] = value * self.weight_dict[key]
        return losses

    @torch.no_grad()
    def match_all_stages(self, outputs: Dict, targets: List[Dict]) -> List[List[Match]]:
        """Matches of every scored stage, ordered [final, stage 0, ..., stage S-2].

        Args:
            outputs / targets: as in :meth:`forward`.

        Returns:
            One list per scored stage of B tuples ``(fg_mask (N,) bool, matched_gt (num_pos,))``.
        """
        return [
            self.matcher(s["pred_logits"], s["pred_boxes"], targets)
            for s in (self._select_stage(outputs, i) for i in self._scored_stages(outputs))
        ]

    @staticmethod
    def _num_stages(outputs: Dict) -> int:
        return outputs["pred_logits"].shape[0]

    def _scored_stages(self, outputs: Dict) -> List[int]:
        last = self._num_stages(outputs) - 1
        return [last] + (list(range(last)) if self.deep_supervision else [])

    @staticmethod
    def _select_stage(outputs: Dict, stage: int) -> Dict:
        """One stage's per-proposal outputs (B, N, ...)."""
        num_stages = outputs["pred_logits"].shape[0]
        selected = {}
        for key, value in outputs.items():
            if not torch.is_tensor(value) or value.shape[0] != num_stages:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(
                    f"head output {key!r} ({shape}) is not a stage-major (S={num_stages}, B, N, "
                    "...) tensor; pass per-image outputs as the criterion's per_image argument"
                )
            else:
                selected[key] = value[stage]
        return selected

    def loss_labels(
        self, outputs: Dict, targets: List[Dict], matches: List[Match], num_pos: float
    ) -> Dict[str, torch.Tensor]:
        """Sigmoid focal (or masked federated) classification loss of one stage.

        Args:
            outputs: ``pred_logits`` (B, N, K) of one stage.
            targets / matches: targets and this stage's per-image matches.
            num_pos: number of positive queries in the batch (>= 1).

        Returns:
            ``{"loss_ce": scalar}``, summed over all B*N*K entries and divided by ``num_pos``.
        """
        if not (self.use_focal or self.use_fed_loss):
            raise NotImplementedError(
                "softmax classification (USE_FOCAL=False, USE_FED_LOSS=False) is not "
                "implemented for training, as in the official DiffusionDet"
            )
        logits = outputs["pred_logits"]  # (B, N, K)
        num_images, num_queries, num_classes = logits.shape
        # class id per query; background = K, which the federated sampling expects
        query_classes = torch.full(
            (num_images, num_queries), num_classes, dtype=torch.long, device=logits.device
        )  # (B, N)
        for image, ((fg_mask, matched_gt), target) in enumerate(zip(matches, targets)):
            query_classes[image, fg_mask] = target["labels"][matched_gt]
        one_hot = nn.functional.one_hot(query_classes, num_classes + 1)[..., :num_classes]
        alpha, gamma = (self.focal_alpha, self.focal_gamma) if self.use_focal else (-1.0, 0.0)
        loss = sigmoid_focal_loss(logits, one_hot.to(logits.dtype), alpha, gamma, "none")
        if self.use_fed_loss:
            loss = loss * self._fed_loss_class_mask(query_classes.flatten(), num_classes)
        return {"loss_ce": loss.sum() / num_pos}

    def _fed_loss_class_mask(self, query_classes: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(K,) float mask of classes kept by the federated loss; query_classes (B*N,) with bg K."""
        # detectron2's sampler draws negatives without replacement, so asking for more classes
        # than there are (FED_LOSS_NUM_CLASSES 50 on a 10-class dataset) would crash: keep at
        # most the batch's classes plus every negative class with a non-zero weight.
        present = torch.unique(query_classes)
        negatives = self.fed_loss_cls_weights > 0
        negatives[present[present < num_classes]] = False
        num_kept = min(self.fed_loss_num_classes, len(present) + int(negatives.sum()))
        # detectron2's sampler (CenterNet2's fed loss) never reads `self`, so it is reused unbound.
        kept = FastRCNNOutputLayers.get_fed_loss_classes(
            None, query_classes, num_kept, num_classes, self.fed_loss_cls_weights
        )
        mask = query_classes.new_zeros(num_classes + 1)
        mask[kept] = 1
        # background (id K) took one of the fed_loss_num_classes slots and is dropped here
        return mask[:num_classes].float()

    def loss_boxes(
        self, outputs: Dict, targets: List[Dict], matches: List[Match], num_pos: float
    ) -> Dict[str, torch.Tensor]:
        """L1 (on image-size-normalised xyxy) and GIoU (on abs xyxy) losses of one stage.

        Args:
            outputs: ``pred_boxes`` (B, N, 4) abs xyxy of one stage.
            targets / matches: targets and this stage's per-image matches.
            num_pos: number of positive queries in the batch (>= 1).

        Returns:
            ``{"loss_bbox": scalar, "loss_giou": scalar}``, each summed over the P positive pairs
            and divided by ``num_pos``; a graph-connected 0 when P = 0.
        """
        pred_boxes = outputs["pred_boxes"]  # (B, N, 4)
        matched_pred, matched_gt, sizes = [], [], []
        for boxes, (fg_mask, gt_index), target in zip(pred_boxes, matches, targets):
            matched_pred.append(boxes[fg_mask])
            matched_gt.append(target["boxes_xyxy"][gt_index].to(boxes))
            sizes.append(target["image_size_xyxy"].to(boxes).expand(len(gt_index), 4))
        matched_pred = torch.cat(matched_pred)  # (P, 4)
        if matched_pred.shape[0] == 0:
            zero = pred_boxes.sum() * 0.0  # keeps the stage in the graph (DDP unused params)
            return {"loss_bbox": zero, "loss_giou": zero}
        matched_gt = torch.cat(matched_gt)  # (P, 4)
        return {
            "loss_bbox": normalized_l1_sum(matched_pred, matched_gt, torch.cat(sizes)) / num_pos,
            "loss_giou": giou_loss_sum(matched_pred, matched_gt) / num_pos,
        }
