"""The README runs as written, from a folder outside the checkout (as OML runs its README blocks in CI).

Every Python block runs (block 1 twice: a documented example must be re-runnable), and every ``deepfeat`` line of
the command-line block runs in a temporary folder holding the names the README uses (``catalogue/``,
``query.jpg``, ``unlabelled/``, ``scans/``) with tiny generated images. Lines that train get tiny overrides
appended (:data:`TINY_ARGS`: the test backbone at 32 px, two steps); lines that cannot run in a test are listed in
:data:`NOT_RUN` with the reason. The default run covers the commands that need no training (:data:`FAST`, with a
tiny ``my-bundle`` exported first); the whole walk, training included, is marked slow.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from support.imagegen import class_image, make_image_folder
from support.recipes import TINY, make_scans

from deepfeat.finetune.models.bundle import export_bundle
from deepfeat.finetune.models.model import build_embedding_model
from deepfeat.recipes.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"

#: LightningCLI arguments that shrink ``deepfeat fit|test|predict --config fashion`` to seconds on ``catalogue/``
FIT_TINY = ("--data.source=catalogue", "--data.split_mode=by_group", "--data.fractions=[0.5,0.25,0.25]",
            "--data.limit_per_class=null", "--data.p=3", "--data.k=2", "--data.batches_per_epoch=2",
            "--data.num_workers=0", "--data.eval_batch_size=32", "--model.backbone=test_efficientnet",
            "--model.weights=none", "--model.image_size=32", "--model.embedding_dim=16", "--model.max_minutes=null",
            "--model.warmup_steps=0", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false")
#: What each README command gets appended to run in seconds (keys are :func:`command_kind`).
TINY_ARGS: dict[str, tuple[str, ...]] = {
    "quickstart": ("--tiny", "--data", "catalogue", "--quiet"),
    "fit": FIT_TINY,
    "test": FIT_TINY,
    "predict": FIT_TINY,
    "evaluate": ("--baseline-weights", "none", "--num-workers", "0"),
    "layers": ("--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32", "--num-workers", "0"),
    "recipe run medical": ("--quiet", "--set", *TINY, "data.fractions=[0.34,0.33,0.33]"),
    "recipe run dedup": ("--quiet", "--set", *TINY),
    "embed": ("--quiet", "--num-workers", "0"),
    "dedup": ("--calibration-images", "12"),
}
#: README lines that are not run here, and why.
NOT_RUN: dict[str, str] = {
    "make demo": "creates the venv and installs everything (network, minutes); 'make demo' itself is the check",
    "make test": "reinstalls and runs this very suite",
    "serve": "a web server that runs until stopped; tests/recipes/test_serve.py drives the page it serves",
}
#: Commands of the default run: no training, a tiny bundle exported as my-bundle beforehand.
FAST = ("embed", "load", "sync", "search", "collections list", "recipe list", "dedup", "classify", "cluster")


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[list[str]]:
    """The ``deepfeat`` lines of the README's shell blocks, comments stripped, split as a shell would."""
    commands = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            if line.startswith("deepfeat "):
                commands.append(shlex.split(line, comments=True))
    return commands


def command_kind(argv: list[str]) -> str:
    """``fit``, ``recipe run medical``, ``collections list``, ...: what a README line is, for the tables above."""
    words = [w for w in argv[1:4] if not w.startswith("-")]
    if words[:1] == ["recipe"]:
        return " ".join(words[:3] if words[1:2] == ["run"] else words[:2])
    if words[:1] == ["collections"]:
        return " ".join(words[:2])
    return words[0]


def _workspace(root: Path) -> Path:
    """The names the README uses, outside the checkout: a catalogue, a query image, unlabelled images, scans."""
    make_image_folder(root / "catalogue", n_classes=4, per_class=10, size=32)
    Image.fromarray(class_image(1, 99, 32)).save(root / "query.jpg")
    (root / "unlabelled").mkdir()
    for i in range(3):
        Image.fromarray(class_image(i, 50 + i, 32)).save(root / "unlabelled" / f"u{i}.png")
    make_scans(root / "scans")
    return root


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """One README line in this process (the ``deepfeat`` entry point's ``main``)."""
    extra = TINY_ARGS.get(command_kind(argv), ())
    code = main([*argv[1:], *extra])
    out = capsys.readouterr()
    assert code == 0, f"README line {shlex.join(argv)!r} exited {code}: {out.err.strip()[-800:]}"
    return out.out


def _run_process(argv: list[str]) -> str:
    """One README line as a user runs it: the installed ``deepfeat`` command, a process of its own."""
    extra = TINY_ARGS.get(command_kind(argv), ())
    script = Path(sys.executable).parent / "deepfeat"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "deepfeat.recipes.cli"]
    done = subprocess.run([*command, *argv[1:], *extra], capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, (f"README line {shlex.join(argv)!r} exited {done.returncode}: "
                                  f"{done.stderr.strip()[-800:]}")
    return done.stdout


def test_readme_shows_the_two_setup_commands_first() -> None:
    first = _blocks("bash")[0]
    assert "make demo" in first and "make test" in first


def test_every_readme_command_is_run_or_says_why_not() -> None:
    known = set(TINY_ARGS) | set(NOT_RUN) | set(FAST) | {"export", "validate"}
    kinds = [command_kind(argv) for argv in readme_commands()]
    assert kinds, "no deepfeat lines found in the README"
    assert not [k for k in kinds if k not in known], "a README command this test does not know: add it"
    for block in _blocks("bash"):
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#") and not line.startswith("deepfeat "):
                assert shlex.split(line, comments=True)[:2] in (["make", "demo"], ["make", "test"]), line


def _exec_block(index: int, folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    make_image_folder(folder / "catalogue", n_classes=3, per_class=6, size=32)
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out.strip()
    assert out, "the block printed nothing"
    return out


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs(index: int, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _exec_block(index, tmp_path, capsys)


@pytest.mark.slow
def test_readme_first_python_block_runs_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # its comment says a re-run upserts the same keys: the same bundle id must fill the same collection again
    monkeypatch.chdir(tmp_path)
    first = _exec_block(0, tmp_path, capsys)
    assert _exec_block(0, tmp_path, capsys) == first


def test_readme_commands_without_training(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = _workspace(tmp_path / "newcomer")
    monkeypatch.chdir(workspace)
    model = build_embedding_model("test_efficientnet", "none", embedding_dim=16, image_size=32)
    export_bundle(model, "my-bundle", torchscript=False, onnx=False)
    ran = []
    for argv in readme_commands():
        if command_kind(argv) in FAST:
            out = _run(argv, capsys)
            ran.append(command_kind(argv))
            if command_kind(argv) == "dedup":
                assert "calibrated on" in out  # --threshold auto is the default
    assert set(ran) == set(FAST)
    assert len(list(Path("shards").glob("part-*.parquet"))) >= 1
    assert Path("duplicates.csv").is_file() and any(Path("clusters").iterdir())


@pytest.mark.slow
def test_every_readme_command_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = _workspace(tmp_path / "newcomer")
    monkeypatch.chdir(workspace)
    for argv in readme_commands():
        if command_kind(argv) in NOT_RUN:
            continue
        out = _run_process(argv)
        if command_kind(argv) == "evaluate":
            assert "data 'catalogue/', split 'test'" in out
    assert Path("runs/fashion/checkpoints/best.ckpt").is_file() and Path("my-bundle/card.json").is_file()
    assert list(Path("runs/fashion/predictions").glob("part-*.parquet"))
