"""Where the tests find TFDS datasets: ../shared/tfds, then $TFDS_DATA_DIR, then
TFDS's own download into its default directory. Only when all three fail do data
tests skip, and the reason says why. Tests that read real data are ``slow``."""

from __future__ import annotations

import functools
import os
import pathlib
import socket
from collections.abc import Callable
from typing import Any

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


# Where TFDS downloads each dataset from (besides Google's bucket).
_HOSTS = {
    "cifar10": "www.cs.toronto.edu",
    "tiny_shakespeare": "raw.githubusercontent.com",
}


@functools.cache
def find(name: str) -> tuple[str | None, str]:
    """``(data_dir, reason)``: a directory holding dataset ``name`` (None for TFDS's
    default directory after a successful download), or ``(None, why not)``."""
    for candidate in (REPO.parent / "shared" / "tfds", os.environ.get("TFDS_DATA_DIR")):
        if candidate and (pathlib.Path(candidate) / name).is_dir():
            return str(candidate), ""
    missing = f"{name} is neither in ../shared/tfds nor in $TFDS_DATA_DIR, and TFDS"
    how = (
        "set TFDS_DATA_DIR to a directory holding it in array_record format, or "
        "run the tests once on a machine with internet after "
        "`pip install -e '.[dev]'` (which includes TFDS's [prepare] extra)"
    )
    try:
        import tensorflow_datasets as tfds

        builder = tfds.builder(name)
        if builder.is_prepared():  # TFDS's default directory holds it already
            return str(pathlib.Path(builder.data_dir).parents[1]), ""
    except Exception as error:
        return (
            None,
            f"{missing} cannot open it ({type(error).__name__}: {error}); {how}",
        )
    host = _HOSTS.get(name, "storage.googleapis.com")
    try:  # fails at once without a network, where TFDS retries for minutes
        socket.getaddrinfo(host, 443)
    except OSError as error:
        return None, f"{missing} cannot download it ({host}: {error}); {how}"
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=True),
        )
        return str(pathlib.Path(builder.data_dir).parents[1]), ""
    except Exception as error:  # no internet, no dataset: the tests must say so.
        return None, (
            f"{missing} could not download it ({type(error).__name__}: {error}); {how}"
        )


def needs(name: str) -> Callable[[Any], Any]:
    """Decorates a test that reads dataset ``name``: marked ``slow`` (real data)
    and skipped, with the reason, when the data cannot be found."""
    data_dir, why = find(name)
    skip = pytest.mark.skipif(data_dir is None, reason=why)
    return lambda test: pytest.mark.slow(skip(test))
