"""Former home of the training classes, kept so that older recipe YAMLs' ``class_path``s still resolve.

New code imports from :mod:`deepfeat.finetune.training`.
"""

from deepfeat.finetune.training.callbacks import FreezeBackbone
from deepfeat.finetune.training.module import MetricLearningModule

__all__ = ["FreezeBackbone", "MetricLearningModule"]
