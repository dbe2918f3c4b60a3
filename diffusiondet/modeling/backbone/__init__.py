"""Backbones beyond detectron2's ResNet-FPN, registered in detectron2's BACKBONE_REGISTRY."""
