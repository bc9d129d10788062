"""Datasets, transforms and data-loading backends."""
