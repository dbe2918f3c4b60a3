"""Dynamic-k (SimOTA-style, one-to-many) matching of predicted boxes to ground truth.

Shape legend: B images, N proposals (queries), K classes, G ground-truth boxes of one image.
Boxes are absolute xyxy (pixel x1, y1, x2, y2) unless a name says otherwise.

Per image, as the official implementation matches (the optimal-transport assignment of the
DiffusionDet paper, arXiv 2211.09788, Sec. 3.3 "Training losses"):

1. geometry prior: a query is a *candidate* if its box centre lies strictly inside some GT box
   or within ``center_radius`` x (GT width, GT height) of some GT centre;
2. cost (N, G) = cost_bbox * L1(size-normalised xyxy) + cost_class * focal class cost
   + cost_giou * (-GIoU) + ``not_in_both_cost`` where the query is not both inside that GT and
   near its centre, + ``not_fg_cost`` on rows of non-candidates;
3. each GT g takes its k_g cheapest queries, k_g = max(1, floor(sum of its top-``ota_k`` IoUs));
4. a query taken by several GTs keeps only its cheapest GT;
5. GTs left without a query repeatedly take their cheapest query, after already-matched queries
   are made ``unmatched_gt_cost`` more expensive.

Every cost (class, L1, GIoU, the IoUs of dynamic k, the centre prior) is computed in float32
whatever the input dtype: fp16 / bf16 logits and boxes (AMP training) are upcast on entry, because
in fp16 the ``1e-8`` inside the class cost's logs rounds to 0, so logits beyond about +8 / -17 make
the cost infinite, and the ``1e5`` re-matching penalty overflows fp16. Float64 inputs stay float64
(the matcher never computes in less precision than its input).

The official implementation's class name (``HungarianMatcherDynamicK``) is a misnomer: there is no
Hungarian step. Step 5 reproduces an official quirk on purpose, see ``_assign``.
"""
from typing import Dict, List, Tuple

import torch
from torchvision.ops import box_iou, generalized_box_iou

from .box_losses import order_box_corners

Match = Tuple[torch.Tensor, torch.Tensor]


def cost_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Dtype the matcher computes in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class DynamicKMatcher:
    """Dynamic-k matcher; stateless (adds no ``state_dict`` keys) and never tracks gradients.

    Costs are float32 for any input dtype (float64 inputs: float64), see the module docstring.

    Args:
        cost_class / cost_bbox / cost_giou: weights of the classification, L1 and GIoU costs
            (the official code uses the loss weights 2 / 5 / 2).
        use_focal: focal classification cost (sigmoid probabilities). Otherwise, with
            ``use_fed_loss`` the same cost with gamma 0 and no alpha (plain BCE form), else the
            softmax cost ``-p[class]`` over K + 1 logits.
        focal_alpha / focal_gamma: focal cost parameters.
        ota_k: number of top IoUs summed to get each GT's dynamic k (capped at N).
        center_radius: centre-prior radius in units of the GT's full width / height.
        not_in_both_cost: penalty for (query, GT) pairs not both in-box and in-centre.
        not_fg_cost: penalty on queries that are in no GT box and near no GT centre.
        unmatched_gt_cost: added to matched queries' costs when re-matching GTs left empty.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        use_focal: bool = True,
        use_fed_loss: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        ota_k: int = 5,
        center_radius: float = 2.5,
        not_in_both_cost: float = 100.0,
        not_fg_cost: float = 10000.0,
        unmatched_gt_cost: float = 1e5,
    ):
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.use_focal = use_focal
        self.use_fed_loss = use_fed_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.ota_k = ota_k
        self.center_radius = center_radius
        self.not_in_both_cost = not_in_both_cost
        self.not_fg_cost = not_fg_cost
        self.unmatched_gt_cost = unmatched_gt_cost

    @torch.no_grad()
    def __call__(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: List[Dict]
    ) -> List[Match]:
        """Match every image of a batch independently.

        Args:
            pred_logits: (B, N, K) class logits (K + 1 for the softmax variant), any float dtype.
            pred_boxes: (B, N, 4) abs xyxy predicted boxes, any float dtype.
            targets: B dicts with ``labels`` (G,) long, ``boxes_xyxy`` (G, 4) abs xyxy and
                ``image_size_xyxy`` (4,) = (w, h, w, h) of the un-padded image; G may be 0.

        Returns:
            B tuples ``(fg_mask (N,) bool, matched_gt (num_pos,) long)``: the positive queries and,
            in query order, the index into that image's GT list of each positive's GT.
        """
        dtype = cost_dtype(pred_logits, pred_boxes)  # upcast before the sigmoid: fp16 underflows
        probs = self.class_probabilities(pred_logits.to(dtype))  # (B, N, K) or (B, N, K + 1)
        pred_boxes = pred_boxes.to(dtype)
        return [self.match_image(p, b, t) for p, b, t in zip(probs, pred_boxes, targets)]

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities (focal / federated), else a softmax over the K + 1 logits."""
        if self.use_focal or self.use_fed_loss:
            return logits.sigmoid()
        return logits.softmax(-1)

    def match_image(self, probs: torch.Tensor, boxes: torch.Tensor, target: Dict) -> Match:
        """Match one image.

        Args:
            probs: (N, K) class probabilities (sigmoid; softmax over K + 1 for that variant).
            boxes: (N, 4) abs xyxy predicted boxes.
            target: one target dict (see ``__call__``).

        Returns:
            ``(fg_mask (N,) bool, matched_gt (num_pos,) long)``.
        """
        dtype = cost_dtype(probs, boxes)
        probs, boxes = probs.to(dtype), boxes.to(dtype)
        gt_labels = target["labels"]
        gt_boxes = target["boxes_xyxy"].to(boxes.dtype)
        num_queries, num_gt = boxes.shape[0], gt_labels.shape[0]
        if num_gt == 0 or num_queries == 0:
            return (
                torch.zeros(num_queries, dtype=torch.bool, device=boxes.device),
                torch.zeros(0, dtype=torch.long, device=boxes.device),
            )
        image_size = target["image_size_xyxy"].to(boxes)  # (4,) w, h, w, h
        is_candidate, in_box_and_center = self.center_prior(boxes, gt_boxes)  # (N,), (N, G)

        ordered = order_box_corners(boxes)  # GIoU/IoU must not crash on inverted boxes (#60)
        cost = (
            self.cost_bbox * torch.cdist(boxes / image_size, gt_boxes / image_size, p=1)
            + self.cost_class * self.class_cost(probs, gt_labels)
            + self.cost_giou * -generalized_box_iou(ordered, gt_boxes)
            + self.not_in_both_cost * (~in_box_and_center).to(boxes.dtype)
        )  # (N, G)
        cost[~is_candidate] += self.not_fg_cost
        return self.assign(cost, box_iou(ordered, gt_boxes))

    def class_cost(self, probs: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
        """(N, G) classification cost of giving each query each GT's class."""
        p = probs[:, gt_labels]  # (N, G)
        if not (self.use_focal or self.use_fed_loss):
            return -p
        if self.use_focal:
            pos_weight, neg_weight, gamma = self.focal_alpha, 1 - self.focal_alpha, self.focal_gamma
        else:  # federated loss without focal: the BCE form (gamma 0, no alpha), as official
            pos_weight, neg_weight, gamma = 1.0, 1.0, 0.0
        # 1e-8 inside the logs as in the official cost, so p in {0, 1} stays finite.
        pos = pos_weight * (1 - p) ** gamma * -(p + 1e-8).log()
        neg = neg_weight * p**gamma * -(1 - p + 1e-8).log()
        return pos - neg

    def center_prior(self, boxes: torch.Tensor, gt_boxes: torch.Tensor):
        """Candidate mask (N,) and per-pair "inside GT box and near GT centre" mask (N, G)."""
        cx = ((boxes[:, 0] + boxes[:, 2]) / 2)[:, None]  # (N, 1)
        cy = ((boxes[:, 1] + boxes[:, 3]) / 2)[:, None]
        gx1, gy1, gx2, gy2 = gt_boxes.unbind(-1)  # (G,) each
        in_box = (cx > gx1) & (cx < gx2) & (cy > gy1) & (cy < gy2)  # (N, G), strict
        gcx, gcy = (gx1 + gx2) / 2, (gy1 + gy2) / 2
        rx, ry = self.center_radius * (gx2 - gx1), self.center_radius * (gy2 - gy1)
        in_center = (cx > gcx - rx) & (cx < gcx + rx) & (cy > gcy - ry) & (cy < gcy + ry)
        return (in_box | in_center).any(dim=1), in_box & in_center

    def dynamic_k(self, ious: torch.Tensor) -> torch.Tensor:
        """Number of queries each GT takes: max(1, floor(sum of its top-``ota_k`` IoUs)).

        Args:
            ious: (N, G) IoU of every (query, GT) pair.

        Returns:
            (G,) int32 in [1, min(ota_k, N)].
        """
        top_ious = ious.topk(min(self.ota_k, ious.shape[0]), dim=0).values  # (ota_k, G)
        return top_ious.sum(0).int().clamp(min=1)  # int() floors, as the official cast

    def assign(self, cost: torch.Tensor, ious: torch.Tensor) -> Match:
        """Dynamic-k selection, conflict resolution and re-matching of empty GTs.

        Args:
            cost: (N, G) matching cost (not modified; re-matching works on a copy).
            ious: (N, G) IoU of every (query, GT) pair.

        Returns:
            ``(fg_mask (N,) bool, matched_gt (num_pos,) long)``.
        """
        num_gt = cost.shape[1]
        # A copy (re-matching raises the cost of matched rows), in float32 at least: the
        # unmatched_gt_cost penalty would overflow fp16.
        cost = cost.to(cost_dtype(cost), copy=True)
        ious = ious.to(cost.dtype)
        matching = torch.zeros_like(cost)  # (N, G), 1 = query assigned to GT
        gt_index = torch.arange(num_gt, device=cost.device)

        dynamic_ks = self.dynamic_k(ious)  # (G,)
        max_k = int(dynamic_ks.max())
        cheapest = cost.topk(max_k, dim=0, largest=False).indices  # (max_k, G), ascending cost
        take = torch.arange(max_k, device=cost.device)[:, None] < dynamic_ks[None, :]
        matching[cheapest[take], gt_index.expand(max_k, num_gt)[take]] = 1.0

        multi_assigned = matching.sum(1) > 1  # (N,)
        self._keep_cheapest_gt(matching, cost, multi_assigned)

        # Official quirk reproduced for exact parity: the re-resolution inside the loop uses the
        # multi-assigned mask from the step above, never recomputed. So when two empty GTs pick
        # the same query in one round, that query keeps both GTs (and is reported with the
        # lower GT index, via argmax below), and the GT with the higher index ends up unmatched.
        # Termination: while some query is unmatched, an empty GT always picks an unmatched query
        # (matched rows just got +unmatched_gt_cost, far above every other cost term), so one
        # round suffices. Only when all N queries are taken (G near or above N) can a pick land
        # on a stale row and be undone; the official loop can then spin forever (e.g. N = 1,
        # G = 2). We stop after G rounds and leave the remaining GTs unmatched.
        for _ in range(num_gt):
            empty_gt = matching.sum(0) == 0  # (G,)
            if not empty_gt.any():
                break
            cost[matching.sum(1) > 0] += self.unmatched_gt_cost
            empty_cols = empty_gt.nonzero().squeeze(1)
            matching[cost[:, empty_cols].argmin(0), empty_cols] = 1.0
            self._keep_cheapest_gt(matching, cost, multi_assigned)

        fg_mask = matching.sum(1) > 0
        return fg_mask, matching[fg_mask].argmax(1)

    @staticmethod
    def _keep_cheapest_gt(matching: torch.Tensor, cost: torch.Tensor, rows: torch.Tensor) -> None:
        """In place: each query in ``rows`` (N,) bool keeps only its cheapest GT.

        The minimum is over all G GTs, not only those assigned to the query (official
        behaviour; the parity fixture has a query that thereby switches to a GT it had not taken).
        """
        if rows.any():
            cheapest_gt = cost[rows].argmin(1)
            matching[rows] = 0.0
            matching[rows.nonzero().squeeze(1), cheapest_gt] = 1.0
