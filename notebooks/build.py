"""Builds the notebooks from their sources and executes them, outputs included.

    python notebooks/build.py            # every notebook
    python notebooks/build.py inspect    # those whose name contains 'inspect'

Each ``notebooks/src/NAME.py`` is split into cells at ``# %%`` lines (``# %% [md]``
starts a markdown cell whose lines drop their leading ``# ``), written to
``notebooks/NAME.ipynb`` and executed top to bottom in ``notebooks/`` with
``nbclient``, so the committed notebooks carry the outputs of a real run.
"""

from __future__ import annotations

import pathlib
import sys

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent


def cells(source: str) -> list[nbformat.NotebookNode]:
    out, kind, lines = [], None, []

    def flush() -> None:
        text = "\n".join(lines).strip("\n")
        if kind is None or not text:
            return
        if kind == "md":
            text = "\n".join(
                line[2:] if line.startswith("# ") else line.lstrip("#")
                for line in text.splitlines()
            )
            out.append(nbformat.v4.new_markdown_cell(text))
        else:
            out.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("md" if "[md]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return out


def build(src: pathlib.Path, timeout: int = 600) -> pathlib.Path:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    notebook.cells = cells(src.read_text())
    client = nbclient.NotebookClient(
        notebook, timeout=timeout, resources={"metadata": {"path": str(HERE)}}
    )
    client.execute()
    target = HERE / f"{src.stem}.ipynb"
    nbformat.write(notebook, target)
    return target


def main(patterns: list[str]) -> None:
    for src in sorted((HERE / "src").glob("*.py")):
        if not patterns or any(p in src.stem for p in patterns):
            print(f"building {src.stem} ...", flush=True)
            print(f"wrote {build(src)}")


if __name__ == "__main__":
    main(sys.argv[1:])
