"""Every vlp-build sub-command has --help documenting each of its options."""

import pytest
from click.testing import CliRunner

from vlp.cli import build_main

EXPECTED = {"objects-labels", "labels-in-order", "vg-phrases", "hard-negatives", "topics", "import-coco",
            "import-cc", "import-sbu", "import-flickr30k", "import-vqa", "import-gqa", "import-nlvr2",
            "import-snli-ve", "import-vizwiz", "import-mmimdb", "import-refcoco", "import-vcr", "web-filter",
            "train-web-scorer", "generate-captions"}


def test_the_sub_commands_exist():
    assert set(build_main.commands) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_help_documents_every_option(name):
    result = CliRunner().invoke(build_main, [name, "--help"])
    assert result.exit_code == 0 and result.output.startswith("Usage:"), result.output
    for param in build_main.commands[name].params:
        if param.param_type_name == "option":
            assert param.opts[-1] in result.output, (name, param.opts)
            assert param.help or param.name == "help", (name, param.opts)
    assert "--out" in result.output
    if name != "train-web-scorer":  # the others write pair stores; it writes a model file
        assert "--overwrite" in result.output and "--progress" in result.output
    out = next(p for p in build_main.commands[name].params if p.name == "out")
    assert sorted(out.opts) == ["--out", "-o"], name
