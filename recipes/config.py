"""Recipe configs: one YAML per workflow, parsed once by the LightningCLI parser into real objects.

A recipe YAML (``recipes/configs/NAME.yaml``) is a LightningCLI config (``trainer`` with its callbacks, ``model``
with the loss and miner spelt out as ``class_path``/``init_args``, ``data``), so ``deepfeat fit --config`` trains
with it as it is, plus a ``recipe:`` section typed by :class:`RecipeSection`: the collection (name, index, key),
the search (top-k, group-by, filter), and the action's own options (``recipe.fashion``, ``recipe.medical``, ...).
:func:`load_recipe` parses the whole file with :class:`RecipeCLI` (instantiation-only mode): the module, the data
module and the trainer come out built, and a misspelt key anywhere, in the YAML or in a ``--set`` override, is
refused with the parser's reason. A new recipe adds its options dataclass here and its module to :data:`RECIPES`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from deepfeat.finetune.errors import DataError

__all__ = [
    "CONFIG_DIR",
    "RECIPES",
    "ClassifyOptions",
    "ClusterOptions",
    "CollectionOptions",
    "DedupOptions",
    "FashionOptions",
    "MedicalOptions",
    "QuickstartRecipeOptions",
    "RecipeConfig",
    "RecipeInfo",
    "RecipeSection",
    "SearchOptions",
    "check_config",
    "list_recipes",
    "load_recipe",
    "load_recipe_name",
    "read_yaml",
    "resolve_config",
]

#: Where the shipped recipe YAMLs live.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Recipe name -> the module with its reader and action (``read(source, config)``, ``act(context)``).
RECIPES: dict[str, str] = {
    "fashion": "deepfeat.recipes.fashion",
    "medical": "deepfeat.recipes.medical",
    "dedup": "deepfeat.recipes.dedup",
    "classify": "deepfeat.recipes.classify",
    "cluster": "deepfeat.recipes.cluster",
    "quickstart": "deepfeat.recipes.quickstart",
}

KeyMode = Literal["record_id", "content_hash"]


@dataclass
class CollectionOptions:
    """``recipe.collection``: the Milvus collection the recipe fills."""

    name: str | None = None
    index: str = "AUTOINDEX"
    key: KeyMode = "record_id"


@dataclass
class SearchOptions:
    """``recipe.search``: how the action searches."""

    top_k: int = 5
    group_by: str | None = None
    filter: str | None = None
    n_queries: int = 6


@dataclass
class FashionOptions:
    """``recipe.fashion``: a search within ``price_band`` (a fraction) of the query's price, when the column exists."""

    price_column: str | None = "price"
    price_band: float = 0.5


@dataclass
class MedicalOptions:
    """``recipe.medical``: fields a similar case shares with its query."""

    same_fields: list[str] = field(default_factory=lambda: ["modality", "body_part"])


@dataclass
class DedupOptions:
    """``recipe.dedup``: the similarity threshold and how many neighbours a range search returns."""

    threshold: float | None = 0.95
    max_neighbours: int = 32


@dataclass
class ClassifyOptions:
    """``recipe.classify``: kNN voting."""

    k: int = 10
    weighting: Literal["similarity", "uniform"] = "similarity"
    split: str = "test"


@dataclass
class ClusterOptions:
    """``recipe.cluster``: k-means (``k`` None: the number of labels)."""

    k: int | None = None
    per_cluster: int = 8
    seed: int = 0


@dataclass
class QuickstartRecipeOptions:
    """``recipe.quickstart``: how much of the data (per class and split) and the searches drawn in the picture."""

    train_per_class: int | None = 500
    test_per_class: int | None = 100
    n_queries: int = 6
    top_k: int = 6


@dataclass
class RecipeSection:
    """The ``recipe:`` section of a recipe YAML (only ``deepfeat recipe run`` reads it).

    Args:
        name: the action (a key of :data:`RECIPES`).
        description: one line for ``deepfeat recipe list``.
        train: fine-tune (guarded) or index with the off-the-shelf backbone.
        group_column: the manifest column that becomes the record group (product, patient).
        collection: the Milvus collection.
        search: how the action searches.
    """

    name: str
    description: str = ""
    train: bool = True
    group_column: str | None = None
    collection: CollectionOptions = field(default_factory=CollectionOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    fashion: FashionOptions = field(default_factory=FashionOptions)
    medical: MedicalOptions = field(default_factory=MedicalOptions)
    dedup: DedupOptions = field(default_factory=DedupOptions)
    classify: ClassifyOptions = field(default_factory=ClassifyOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    quickstart: QuickstartRecipeOptions = field(default_factory=QuickstartRecipeOptions)


def _recipe_cli() -> type[Any]:
    from deepfeat.finetune.training.config import DeepfeatCLI

    class RecipeCLI(DeepfeatCLI):
        """:class:`DeepfeatCLI` with the ``recipe:`` section typed by :class:`RecipeSection`."""

        recipe_type: ClassVar[Any] = RecipeSection

    return RecipeCLI


def _checking_cli(typed_recipe: bool) -> type[Any]:
    """The recipe parser (``typed_recipe``: :class:`RecipeSection`, else a free ``recipe:`` mapping) that parses and
    checks the config but builds nothing (no module, data module or trainer)."""
    from deepfeat.finetune.training.config import DeepfeatCLI

    base: type[Any] = _recipe_cli() if typed_recipe else DeepfeatCLI

    class CheckingCLI(base):  # type: ignore[misc,valid-type]
        """Parse only: :meth:`instantiate_classes` is skipped."""

        def instantiate_classes(self) -> None:
            """Build nothing: the config is only checked."""

    return CheckingCLI


@contextmanager
def _argv_alone() -> Iterator[None]:
    saved = sys.argv
    sys.argv = [saved[0] if saved else "deepfeat"]  # LightningCLI reads args= only; keep sys.argv out of it
    try:
        yield
    finally:
        sys.argv = saved


def check_config(name_or_path: str | Path, what: str = "config") -> Path:
    """Check every key of a config YAML (a path or a shipped recipe's name) with the recipe parser, building nothing.

    The same parser as :func:`load_recipe` and ``deepfeat fit`` (LightningCLI's, abbreviations off), so a misspelt
    key under ``trainer:``, ``model:``, ``data:`` or ``recipe:`` is refused with the nearest valid name; but no
    module, data module or trainer is built and no seed is set, so it takes a fraction of a second once Lightning is
    imported. A ``recipe:`` section is checked against :class:`RecipeSection` when the file has one.

    Returns:
        The YAML file checked.

    Raises:
        DataError: unknown recipe, unreadable YAML (its line named), or a key or value the parser refused (one line:
            the file, the key and the nearest valid name).
    """
    from deepfeat.finetune.training.config import parser_reason
    from deepfeat.finetune.training.datamodule import RetrievalDataModule
    from deepfeat.finetune.training.module import MetricLearningModule

    path = resolve_config(name_or_path)
    typed = isinstance(read_yaml(path, what).get("recipe"), dict)
    # the seed is the run's business: checking must not seed this process's generators
    args = ["--config", str(path), "--seed_everything=false"]
    with _argv_alone():
        try:
            _checking_cli(typed)(MetricLearningModule, RetrievalDataModule, args=args, run=False,
                                 save_config_callback=None, auto_configure_optimizers=False,
                                 parser_kwargs={"exit_on_error": False, "allow_abbrev": False})
        except SystemExit as exc:  # jsonargparse may report through parser.error
            raise DataError(f"{what} {str(path)!r} was refused by the parser (see the message above); fix the key "
                            f"or value it names") from exc
        except Exception as exc:
            if type(exc).__name__ in ("ArgumentError", "NSKeyError") or "jsonargparse" in type(exc).__module__:
                raise DataError(f"{what} {str(path)!r} was refused: {parser_reason(exc)}") from exc
            raise
    return path


@dataclass(frozen=True)
class RecipeInfo:
    """A shipped recipe: its name, one-line description and YAML."""

    name: str
    description: str
    path: Path


def read_yaml(path: Path, what: str = "recipe") -> dict[str, Any]:
    """The mapping the YAML file ``path`` holds.

    Raises:
        DataError: the file cannot be read, is not UTF-8, is not YAML (the line and column named) or is not a
            mapping; the message names ``what`` (``recipe``, ``config``), the file and the fix.
    """
    try:
        with path.open(encoding="utf-8") as stream:  # a stream: YAML's error marks then name the file
            data = yaml.safe_load(stream)
    except OSError as exc:
        raise DataError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}; check the path and its "
                        f"permissions") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as a UTF-8 YAML "
                        f"file") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise DataError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}; fix the YAML syntax there") from exc
    if not isinstance(data, dict):
        raise DataError(f"{what} {str(path)!r} is not a YAML mapping (got {type(data).__name__}); write its sections "
                        f"as keys: trainer:, model:, data: (and recipe:), as in 'deepfeat recipe show fashion'")
    return data


def list_recipes(config_dir: str | Path = CONFIG_DIR) -> list[RecipeInfo]:
    """The recipes whose YAML has a ``recipe:`` section, sorted by name (reads YAML only: fast)."""
    out = []
    for path in sorted(Path(config_dir).glob("*.yaml")):
        section = read_yaml(path).get("recipe")
        if isinstance(section, dict):
            out.append(RecipeInfo(str(section.get("name", path.stem)), str(section.get("description", "")), path))
    return out


def resolve_config(name_or_path: str | Path) -> Path:
    """A recipe YAML by path, or a shipped recipe by name (``fashion`` -> the installed ``fashion.yaml``).

    Raises:
        DataError: neither a file nor a shipped recipe (the shipped names are listed).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    # "fashion", "fashion.yaml" (a bare file name that is not in this folder) or the README's
    # "recipes/configs/fashion.yaml" outside the checkout is the shipped recipe
    shipped = CONFIG_DIR / f"{path.stem if path.suffix in ('.yaml', '.yml') else name_or_path}.yaml"
    in_configs = path.parent == Path(".") or path.parent.parts[-2:] == ("recipes", "configs")
    if shipped.is_file() and (path.suffix not in (".yaml", ".yml") or in_configs):
        return shipped
    names = [r.name for r in list_recipes()]
    raise DataError(f"recipe {str(name_or_path)!r} is neither a file nor a shipped recipe; the shipped recipes are "
                    f"{names} ('deepfeat recipe list'), or pass the path of a recipe .yaml")


def _plain(value: Any) -> Any:
    """Namespaces and dataclasses as plain dicts (for JSON, ``recipe show`` and the actions' options)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "as_dict"):
        return _plain(value.as_dict())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)  # paths and the like


@dataclass
class RecipeConfig:
    """A parsed recipe: the training objects, the typed recipe section and accessors for the actions."""

    path: Path
    training: Any  # deepfeat.finetune.training.config.Training
    options: RecipeSection

    @property
    def name(self) -> str:
        """The action's name."""
        return self.options.name

    @property
    def description(self) -> str:
        """The one-line description."""
        return self.options.description

    @property
    def train(self) -> bool:
        """``recipe.train``: fine-tune (default) or index with the off-the-shelf backbone."""
        return self.options.train

    @property
    def raw(self) -> dict[str, Any]:
        """The whole parsed config as plain data (defaults filled in)."""
        raw = _plain(self.training.config)
        raw.pop("config", None)  # the parser's record of the files it read
        return raw  # type: ignore[no-any-return]

    @property
    def recipe(self) -> dict[str, Any]:
        """The ``recipe:`` section as a mapping."""
        return _plain(self.options)  # type: ignore[no-any-return]

    @property
    def action(self) -> dict[str, Any]:
        """The action's own options (``recipe.<name>``, defaults filled in)."""
        opts = getattr(self.options, self.name, None)
        if opts is None and self.name in _OPTION_TYPES:
            opts = _OPTION_TYPES[self.name]()
        return _plain(opts) if opts is not None else {}  # type: ignore[no-any-return]

    @property
    def search(self) -> dict[str, Any]:
        """``recipe.search``: top_k, group_by, filter, n_queries."""
        return _plain(self.options.search)  # type: ignore[no-any-return]

    @property
    def collection(self) -> CollectionOptions:
        """``recipe.collection`` (its name defaults to the recipe's)."""
        c = self.options.collection
        return CollectionOptions(c.name or self.name, c.index or "AUTOINDEX", c.key)

    def section(self, *keys: str) -> dict[str, Any]:
        """A nested mapping of the parsed config (``section("data")``), ``{}`` when absent."""
        node: Any = self.raw
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return dict(node) if isinstance(node, dict) else {}


_OPTION_TYPES: dict[str, type[Any]] = {
    "fashion": FashionOptions, "medical": MedicalOptions, "dedup": DedupOptions, "classify": ClassifyOptions,
    "cluster": ClusterOptions, "quickstart": QuickstartRecipeOptions,
}


def _section(value: Any, path: Path) -> RecipeSection:
    if isinstance(value, RecipeSection):
        return value
    if value is None:
        raise DataError(f"{str(path)!r} has no 'recipe:' section; it is a plain training config (use 'deepfeat fit "
                        f"--config'), not a recipe")
    data = _plain(value)
    kw: dict[str, Any] = dict(data)
    kw["collection"] = CollectionOptions(**(data.get("collection") or {}))
    kw["search"] = SearchOptions(**(data.get("search") or {}))
    for name, cls in _OPTION_TYPES.items():
        if data.get(name) is not None:
            kw[name] = cls(**data[name])
    return RecipeSection(**kw)


def load_recipe_name(name_or_path: str | Path) -> str:
    """The action's name of a recipe, from its YAML alone (no objects built)."""
    path = resolve_config(name_or_path)
    section = read_yaml(path).get("recipe")
    return str(section.get("name", path.stem)) if isinstance(section, dict) else path.stem


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = (), *, args: Sequence[str] = ()) -> RecipeConfig:
    """Read a shipped recipe (by name) or a recipe YAML (by path), apply ``key=value`` overrides, build its objects.

    Raises:
        DataError: unknown recipe, unreadable YAML, no ``recipe:`` section, an unknown action, or a key or value
            the parser refused (overrides included).
    """
    from deepfeat.finetune.training.config import build_training

    path = resolve_config(name_or_path)
    read_yaml(path)  # a YAML syntax error is named with its line before the parser sees the file
    training = build_training(path, overrides, args=args, cli_class=_recipe_cli())
    section = _section(training.recipe, path)
    if section.name not in RECIPES:
        raise DataError(f"recipe {str(path)!r} names the action {section.name!r}; known actions: {sorted(RECIPES)}")
    return RecipeConfig(path, training, section)
