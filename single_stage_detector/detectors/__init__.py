"""Detector families behind one contract (see ``base``): ``ssd`` and ``yolo``."""
