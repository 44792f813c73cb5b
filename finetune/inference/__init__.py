"""Floor 3: the embedding engine, device decoding, the shard contract, the runtime resolver, evaluation.

Imports from :mod:`deepfeat.finetune.models` and below; no Lightning.
"""
