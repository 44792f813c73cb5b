"""Floor 1: records (the one data contract), readers, splits, image decoding, transforms, datasets.

Imports only :mod:`deepfeat.finetune.errors` from deepfeat; no Lightning.
"""
