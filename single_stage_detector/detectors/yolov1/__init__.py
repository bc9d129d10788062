"""The YOLOv1 family (arXiv:1506.02640): presets, network, loss, decoding, detector; ``family``
registers them with the harness."""
