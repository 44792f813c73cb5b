"""Floor 3: the embedding engine (local, and on Ray Data in ``distributed``), device decode, the shard contract
(``shards``), the runtime resolver, evaluation.

Imports from :mod:`deepfeat.finetune.models` and below; no Lightning. Ray is imported only when a Ray run starts.
"""
