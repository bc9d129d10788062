"""The SSD family. Its parts keep their documented homes (``single_stage_detector.box_coder``:
default boxes, matching and encoding; ``losses``: the multibox loss; ``postprocess``: decode +
NMS; ``detector.SSDDetector``; ``models``: the network, backbones and presets); ``family``
registers them with the harness."""
