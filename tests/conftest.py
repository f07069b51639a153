"""Fixtures shared by several test files."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lit_modules.transfer import TransferClassifier
from tests.test_gan import _classifier_ckpt


@pytest.fixture(scope="session")
def judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random digits classifier in ExportWeights' format: the GAN's FID feature extractor."""
    return _classifier_ckpt(tmp_path_factory.mktemp("judge") / "digits_classifier.pt")


def _untracked(root: Path) -> set[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    return set(out.stdout.splitlines()) if out.returncode == 0 else set()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_in_the_clone() -> Iterator[None]:
    """Tests write under tmp_path only: a file a test leaves in the working tree (a picture of
    a run without a run dir, say) is a defect, reported at the end of the session."""
    root = Path(__file__).resolve().parents[1]
    before = _untracked(root)
    yield
    left = sorted(_untracked(root) - before)
    assert not left, f"tests left files in the repository: {left}"


@pytest.fixture(autouse=True)
def no_wandb_service_left() -> Iterator[None]:
    """A test that starts W&B in the pytest process must tear it down: wandb exports its service's
    address as WANDB_SERVICE, every later subprocess (a whole CLI run) would join that service, and
    a run killed there stays registered, so its resume fails with "run ID ... is in use"."""
    yield
    assert "WANDB_SERVICE" not in os.environ, "this test left a W&B service: call wandb.teardown()"


@pytest.fixture
def source_ckpt(tmp_path: Path) -> Path:
    """A digits 0-4 'pretraining' checkpoint in Lightning's layout (random weights suffice)."""
    torch.manual_seed(0)
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": TransferClassifier(num_classes=5, mode="scratch").state_dict()}, path)
    return path
