"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_gan import _classifier_ckpt


@pytest.fixture(scope="session")
def judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random digits classifier in ExportWeights' format: the GAN's FID feature extractor."""
    return _classifier_ckpt(tmp_path_factory.mktemp("judge") / "digits_classifier.pt")
