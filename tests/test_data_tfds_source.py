"""normjax.data.tfds_source: TFDS's download-and-prepare path runs with what the
set-up installs, and a dataset that cannot be had says exactly what to run."""

import functools
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest

from normjax.data import cifar, tfds_source

CLASSES = ("airplane automobile bird cat deer dog frog horse ship truck").split()


def _cifar10_archive(rng, per_file):
    """A CIFAR-10 binary archive as the dataset's site serves it (each record a
    label byte and 3072 pixel bytes, channel-major), with its records."""
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    records = {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:

        def add(name, data):
            info = tarfile.TarInfo("cifar-10-batches-bin/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name in files:
            labels = rng.integers(0, 10, (per_file, 1))
            pixels = rng.integers(0, 256, (per_file, 3072))
            rows = np.concatenate([labels, pixels], axis=1).astype(np.uint8)
            records[name] = rows
            add(name, rows.tobytes())
        add("batches.meta.txt", ("\n".join(CLASSES) + "\n").encode())
    return buffer.getvalue(), records


def _as_examples(rows):
    """Records -> sorted (label, HWC image bytes) pairs, to compare as sets."""
    images = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return sorted(
        (int(label), image.tobytes())
        for label, image in zip(rows[:, 0], images, strict=True)
    )


@pytest.mark.slow  # TFDS prepares a (small) dataset, TensorFlow included
def test_tfds_prepares_cifar10_and_normjax_reads_it(tmp_path, monkeypatch):
    """The whole download-and-prepare path, with the dataset served from this
    machine: every module it imports is installed, and the prepared files load."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import cifar as tfds_cifar

    archive, records = _cifar10_archive(np.random.default_rng(0), per_file=3)
    served = tmp_path / "site"
    served.mkdir()
    (served / "cifar-10-binary.tar.gz").write_bytes(archive)
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(served)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-binary.tar.gz"
    original = tfds_cifar.Cifar10._cifar_info
    monkeypatch.setattr(
        tfds_cifar.Cifar10,
        "_cifar_info",
        property(lambda self: original.fget(self)._replace(url=url)),
    )
    try:
        data_dir = tmp_path / "tfds"
        tfds.builder("cifar10", data_dir=str(data_dir)).download_and_prepare(
            file_format="array_record"
        )
    finally:
        server.shutdown()
    data = cifar.load_cifar10(data_dir, cache=False)
    assert data.class_names == tuple(CLASSES)
    train = np.concatenate([records[f"data_batch_{i}.bin"] for i in range(1, 6)])
    for images, labels, rows in (
        (data.train_images, data.train_labels, train),
        (data.test_images, data.test_labels, records["test_batch.bin"]),
    ):
        loaded = sorted(
            (int(label), image.tobytes())
            for label, image in zip(labels, images, strict=True)
        )
        assert loaded == _as_examples(rows)


def test_a_missing_preparation_module_names_the_install_command(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def fails(*args, **kwargs):
        try:
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
        except ModuleNotFoundError as missing:
            raise RuntimeError("Error while extracting") from missing

    monkeypatch.setattr(tfds, "data_source", fails)
    with pytest.raises(tfds_source.DataNotFoundError) as info:
        tfds_source.open_source(
            "cifar10",
            "train",
            str(tmp_path),
            download=True,
            title="CIFAR-10",
            splits=("train", "test"),
        )
    message = str(info.value)
    assert "'tensorflow'" in message
    assert "pip install -e '.[prepare]'" in message
    assert "--config.download=True" in message
