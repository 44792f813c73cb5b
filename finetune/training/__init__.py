"""Floor 4: Lightning training: the module, the data module, the sampler, callbacks, whitening, the guarded
pipeline and the one config parser. The only floor of ``deepfeat.finetune`` that imports Lightning.
"""

from deepfeat.finetune.training.callbacks import EMA, ExportBundle, FinetuneResult, FreezeBackbone, load_module_weights
from deepfeat.finetune.training.datamodule import RetrievalDataModule
from deepfeat.finetune.training.module import MetricLearningModule

__all__ = ["EMA", "ExportBundle", "FinetuneResult", "FreezeBackbone", "MetricLearningModule", "RetrievalDataModule",
           "load_module_weights"]
