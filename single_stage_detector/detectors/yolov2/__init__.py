"""The YOLOv2 family: Darknet-19 / ResNet-50 + passthrough network, region loss, region decoding."""
