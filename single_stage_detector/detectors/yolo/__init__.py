"""The YOLO family (v3): network, anchors, assigner + loss, decode, darknet weight files."""
