"""Floor 2: backbones, the embedding model and its heads, model bundles.

Imports from :mod:`deepfeat.finetune.data` and the errors; no Lightning.
"""
