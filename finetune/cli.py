"""Former home of ``ExportBundle``, kept so that older recipe YAMLs' ``class_path``s still resolve.

New code imports from :mod:`deepfeat.finetune.training`.
"""

from deepfeat.finetune.training.callbacks import ExportBundle

__all__ = ["ExportBundle"]
