import hashlib
from pathlib import Path

import pytest

from vlp.schemas import vocab

# sha256 of the exact BUTD files (objects_vocab.txt / attributes_vocab.txt, no trailing newline)
OBJECTS_SHA256 = "d985096938db111f585a311ff0a2ee9092fbc325c3a619ac9622e57e5389722f"
ATTRIBUTES_SHA256 = "19981b5a288f284c576545a21de78634f1a78c26b6949f7acf12b924739fdc66"


def test_sizes_and_hashes_are_the_butd_files():
    assert len(vocab.objects()) == 1600
    assert len(vocab.attributes()) == 400
    assert vocab.objects().sha256 == OBJECTS_SHA256
    assert vocab.attributes().sha256 == ATTRIBUTES_SHA256


def test_matches_shared_reference_when_present():
    shared = Path(__file__).resolve().parents[2] / "shared" / "reference" / "vg-vocab"
    if not shared.is_dir():
        pytest.skip("shared/reference not beside the checkout")
    for name, digest in (("objects_vocab.txt", OBJECTS_SHA256), ("attributes_vocab.txt", ATTRIBUTES_SHA256)):
        assert hashlib.sha256((shared / name).read_bytes()).hexdigest() == digest


def test_display_name_is_first_synonym_and_synonyms_resolve():
    attributes = vocab.attributes()
    assert attributes.name(0) == "gray"
    assert attributes.id("grey") == 0 == attributes.id("gray")
    assert attributes.id("multicolored") == attributes.id("multi colored")
    objects = vocab.objects()
    assert objects.name(0) == "yolk"
    assert objects.name(1599) == "buoy"
    assert objects.id("buoy") == 1599


def test_errors_name_the_vocabulary():
    with pytest.raises(KeyError, match="objects vocabulary"):
        vocab.objects().id("no-such-thing")
    with pytest.raises(IndexError, match="attributes id 400"):
        vocab.attributes().name(400)
