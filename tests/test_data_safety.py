"""A CIFAR-10 batch is a pickle, and a pickle runs code on load: `load_cifar10` must refuse any
global the official files don't hold, before it is called, and say which file and global."""

from __future__ import annotations

import os
import pickle
import shlex

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from diffusion_lib.config import ConfigError, DataConfig
from diffusion_lib.data import CIFAR_FOLDER, CIFAR_TRAIN_FILES, load_dataset

from conftest import CIFAR_ROOT, TINY_RUN, needs_cifar

IMAGES_PER_FILE = 4
FORBIDDEN = f"{os.system.__module__}.system"  # posix.system on Linux


class TouchesMarker:
    """Unpickles as os.system("touch MARKER"): a live payload that leaves evidence."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_batch(path, entry):
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=4)  # bytes natively; the array via numpy._core.multiarray._reconstruct


def valid_batch(i):
    data = np.random.default_rng(i).integers(0, 256, (IMAGES_PER_FILE, 3072), dtype=np.uint8)
    return {
        b"batch_label": f"training batch {i} of 5".encode(),
        b"labels": [i] * IMAGES_PER_FILE,
        b"data": data,
        b"filenames": [f"img_{i}_{j}.png".encode() for j in range(IMAGES_PER_FILE)],
    }


def cifar_root(tmp_path, marker=None):
    """tmp_path/root/cifar-10-batches-py with five valid-looking batches; data_batch_1 carries the
    payload when a marker is given."""
    folder = tmp_path / "root" / CIFAR_FOLDER
    folder.mkdir(parents=True)
    for i, fname in enumerate(CIFAR_TRAIN_FILES, start=1):
        entry = valid_batch(i)
        if marker is not None and i == 1:
            entry[b"filenames"].append(TouchesMarker(marker))
        write_batch(folder / fname, entry)
    return tmp_path / "root"


def test_the_crafted_batch_is_live_under_plain_pickle(tmp_path):
    marker = tmp_path / "pwned"
    root = cifar_root(tmp_path, marker)
    with open(root / CIFAR_FOLDER / "data_batch_1", "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists(), "the payload never ran: the refusal tests below would prove nothing"


def test_a_crafted_batch_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    root = cifar_root(tmp_path, marker)
    with pytest.raises(ConfigError) as caught:
        load_dataset(DataConfig(name="cifar10", root=str(root)))
    message = str(caught.value)
    assert f"{root / CIFAR_FOLDER / 'data_batch_1'}: refused to load" in message
    assert f"references {FORBIDDEN}," in message
    assert "\n" not in message
    assert not marker.exists()


def test_batches_written_by_this_numpy_still_load(tmp_path):
    dataset = load_dataset(DataConfig(name="cifar10", root=str(cifar_root(tmp_path))))
    assert dataset.images.shape == (5 * IMAGES_PER_FILE, 3, 32, 32)
    expected = valid_batch(1)[b"data"].reshape(-1, 3, 32, 32)
    assert np.array_equal(dataset.images[:IMAGES_PER_FILE].numpy(), expected)


@needs_cifar
def test_the_real_subset_still_loads():
    dataset = load_dataset(DataConfig(name="cifar10", root=str(CIFAR_ROOT)))
    assert dataset.images.shape == (5085, 3, 32, 32)


def test_sweep_train_on_a_crafted_batch_exits_2_before_training(tmp_path):
    marker = tmp_path / "pwned"
    root = cifar_root(tmp_path, marker)
    config = tmp_path / "run.yaml"
    # tiny settings, so that were the payload let through, this test fails in seconds, not minutes
    raw = {**TINY_RUN, "data": {"name": "cifar10", "root": str(root)}}
    raw["train"] = {**TINY_RUN["train"], "total_steps": 2, "device": "cpu"}
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"error: {root / CIFAR_FOLDER / 'data_batch_1'}: refused to load: "
        f"the pickle references {FORBIDDEN}, which a CIFAR-10 batch never holds\n"
    )
    assert not marker.exists()
    assert not out.exists()
