"""Result files: the run folder's layout, schema validation, loading a folder of results."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import jsonschema

from bench.result import SCHEMA_PATH, Result


class FolderInUse(Exception):
    """Another harness holds the results folder's lock."""


@dataclass(frozen=True)
class RunFolder:
    """results/<run>/: cells/<cell id>.json, logs/<cell id>.log, tables/, .staging/<cell id>/
    where a cell finds its request and writes its result before that is checked and moved into
    cells/ (a container sees that folder alone), and jobs/ where a cluster
    backend keeps the jobs it submitted until their results are collected."""

    root: Path

    @property
    def cells(self) -> Path:
        return self.root / "cells"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def staging(self) -> Path:
        return self.root / ".staging"

    def cell_staging(self, cell_id: str) -> Path:
        return self.staging / cell_id

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def result_path(self, cell_id: str) -> Path:
        return self.cells / f"{cell_id}.json"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one harness at a time (whatever its backend), until the block ends;
        FolderInUse when another harness holds it. The kernel lets go of a killed harness's lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise FolderInUse(f"{self.root}: another harness is using this results folder ({holder}); "
                                  f"wait for it to end, or pass another --results") from None
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            handle.flush()
            try:
                yield
            finally:
                handle.truncate(0)
                fcntl.flock(handle, fcntl.LOCK_UN)


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_problem(payload: object) -> str | None:
    """Why ``payload`` is not a valid cell result, or None when it is."""
    error = jsonschema.exceptions.best_match(_validator().iter_errors(payload))
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path) or "(top)"
    return f"{where}: {error.message}"


def read_result(path: Path) -> Result:
    """A validated result; ValueError says why a file is not one."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not readable JSON ({error})") from error
    problem = schema_problem(payload)
    if problem:
        raise ValueError(f"not a cell result ({problem})")
    return Result.from_dict(payload)


@dataclass
class LoadedResults:
    results: list[tuple[Path, Result]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "path: why it was skipped"


def load_results(*folders: Path) -> LoadedResults:
    """Every result JSON under the folders; corrupt or foreign files are reported, not fatal.
    Hidden folders (a cell's staging area) and generated tables are not results."""
    loaded = LoadedResults()
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.json")):
            relative = path.relative_to(folder).parts
            if any(part.startswith(".") for part in relative) or "tables" in relative[:-1]:
                continue
            try:
                loaded.results.append((path, read_result(path)))
            except ValueError as error:
                loaded.problems.append(f"{path}: skipped, {error}")
    return loaded
