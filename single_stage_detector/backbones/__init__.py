"""Backbones not in torchvision: Darknet-53 (YOLOv3)."""
