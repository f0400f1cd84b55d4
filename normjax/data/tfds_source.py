"""Locating a TFDS dataset and opening it for random access (array_record).

Shared by every dataset module: the data directory is the argument (from the
config), else ``$TFDS_DATA_DIR``, else TFDS's default (``~/tensorflow_datasets``);
nothing is downloaded unless ``download=True``; a missing dataset raises
:class:`DataNotFoundError` saying where it looked and how to get it.
"""

from __future__ import annotations

import os
from typing import Any

PathLike = str | os.PathLike[str]

__all__ = ["DataNotFoundError", "open_source", "resolve_data_dir"]


class DataNotFoundError(FileNotFoundError):
    """A dataset is not in the data directory (the message says where and how)."""


# TFDS downloads and converts the datasets with TensorFlow, which only the
# [prepare] extra installs (normjax reads the prepared files without it).
PREPARE_HINT = (
    "install TFDS's preparation dependencies with `pip install -e '.[prepare]'` "
    "(from the repository) and run with --config.download=True "
    "(load_cifar10(..., download=True) in Python)"
)


def _missing_module(error: BaseException) -> str | None:
    """The name of a module missing anywhere in ``error``'s chain, or None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError):
            return current.name or str(current)
        current = current.__cause__ or current.__context__
    return None


def resolve_data_dir(data_dir: PathLike | None) -> str | None:
    """The TFDS data directory: ``data_dir`` if given (from the config), else
    ``$TFDS_DATA_DIR`` if set and non-empty, else None (TFDS's default,
    ``~/tensorflow_datasets``). ``~`` is expanded."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get("TFDS_DATA_DIR") or None
    return None if data_dir is None else os.path.expanduser(os.fspath(data_dir))


def _missing_message(
    name: str,
    title: str,
    splits: str,
    data_dir: str | None,
    looked_in: str,
    reason: str,
) -> str:
    origin = (
        "TFDS's default data directory (neither a data_dir nor $TFDS_DATA_DIR given)"
        if data_dir is None
        else f"data_dir={data_dir!r}"
    )
    hint = ""
    if data_dir is not None and (
        os.path.exists(os.path.join(data_dir, "dataset_info.json"))
        or os.path.basename(os.path.normpath(data_dir)) == name
    ):
        hint = (
            f"\nIt looks like {data_dir!r} is the dataset folder itself: pass the "
            f"folder that contains {name}/ instead."
        )
    return (
        f"{title} ({reason}) in {looked_in}, from {origin}. The TFDS layout is "
        f"<data_dir>/{name}/<version>/ with dataset_info.json and "
        f"{name}-{{{splits}}}.array_record-* files.{hint}\n"
        "To get it: point to a directory holding it with --config.data_dir=DIR "
        "or TFDS_DATA_DIR=DIR (on our machines: ../shared/tfds); or, on a "
        f"machine with internet, {PREPARE_HINT}, which downloads it once and "
        "prepares it in array_record format."
    )


def open_source(
    name: str,
    split: str,
    data_dir: str | None,
    *,
    download: bool,
    title: str,
    splits: tuple[str, ...],
    decoders: dict[str, Any] | None = None,
) -> Any:
    """The TFDS random-access source of ``name``/``split`` (``data_dir`` already
    resolved); :class:`DataNotFoundError` when it is absent (and ``download`` is
    off), stored in another format, or unreadable. ``title`` and ``splits`` only
    word the error message."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    looked_in = os.fspath(builder.data_dir)
    prepared = builder.is_prepared()

    def missing(reason: str) -> DataNotFoundError:
        return DataNotFoundError(
            _missing_message(name, title, ",".join(splits), data_dir, looked_in, reason)
        )

    if not prepared and not download:
        raise missing("not found")
    if prepared:
        file_format = getattr(builder.info.file_format, "value", None)
        if file_format is not None and file_format != "array_record":
            raise missing(
                f"found as {file_format!r}, but random access needs array_record: "
                "prepare it with file_format='array_record'"
            )
    try:
        return tfds.data_source(
            name, split=split, data_dir=data_dir, download=download, decoders=decoders
        )
    except Exception as e:  # TFDS raises many kinds; say what we looked for
        module = _missing_module(e)
        if module is not None:
            raise DataNotFoundError(
                f"{title} could not be prepared in {looked_in}: TFDS needs the "
                f"module {module!r} to download and prepare it. To get it, "
                f"{PREPARE_HINT}; or point --config.data_dir (TFDS_DATA_DIR) to a "
                "directory that already holds it."
            ) from e
        reason = "could not be downloaded" if not prepared else "could not be read"
        raise missing(f"{reason}: {e!r}") from e
