import os
from pathlib import Path

import pytest

import vlp
import vlp.cli
import vlp.schemas


def test_namespace_imports():
    for name in ("schemas", "pipeline", "detectors", "builders", "trainer"):
        module = __import__(f"vlp.{name}", fromlist=["_"])
        assert module.__name__ == f"vlp.{name}"


def test_vocab_files_ship_with_the_package():
    vocab_dir = Path(vlp.schemas.__file__).parent / "vocab"
    assert (vocab_dir / "objects_vocab.txt").is_file()
    assert (vocab_dir / "attributes_vocab.txt").is_file()


@pytest.mark.skipif(os.environ.get("VLP_EXPECT_INSTALLED") != "1", reason="only under .ci/run")
def test_ci_imports_the_installed_package_not_the_checkout():
    assert "site-packages" in Path(vlp.__file__).parts
    assert "site-packages" in Path(vlp.cli.__file__).parts
