"""The one config system: a recipe YAML parsed by the LightningCLI parser into real objects."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from deepfeat.finetune.training.datamodule import RetrievalDataModule
from deepfeat.finetune.training.module import MetricLearningModule


class DeepfeatCLI(LightningCLI):
    """LightningCLI over :class:`MetricLearningModule` and :class:`RetrievalDataModule`."""

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        # A recipe YAML (recipes/configs/*.yaml) is a LightningCLI config plus a `recipe:` section (collection,
        # search, the recipe's action) that only `deepfeat recipe run` reads; `fit` accepts and ignores it.
        parser.add_argument("--recipe", type=dict[str, Any] | None, default=None,
                            help="deepfeat recipe section, read by 'deepfeat recipe run' (ignored here)")


def run_lightning_cli(args: list[str]) -> DeepfeatCLI:
    """Run ``fit|validate|test|predict`` with LightningCLI arguments (``--config recipe.yaml``)."""
    import sys

    saved = sys.argv
    sys.argv = [saved[0] if saved else "deepfeat"]  # LightningCLI reads args= only; keep sys.argv out of it
    try:
        return DeepfeatCLI(MetricLearningModule, RetrievalDataModule, args=args,
                           save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    finally:
        sys.argv = saved
