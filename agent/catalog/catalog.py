"""The model catalog (models/catalog.yaml): every file the agent knows how to fetch, with sizes, checksums and
mirror URLs, validated on load so that a bad entry names its key and line."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from agent.contract.exitcodes import ExitCode
from agent.yamlfile import YamlError, read_yaml, show

CATALOG_PATH = Path(str(resources.files("models") / "catalog.yaml"))
KINDS = ("llm", "mmproj", "whisper")
MIRRORS = {"huggingface": ("https://huggingface.co", "HF_ENDPOINT"),
           "modelscope": ("https://modelscope.cn", "MODELSCOPE_ENDPOINT")}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HEX = {"sha256": re.compile(r"^[0-9a-f]{64}$"), "sha1": re.compile(r"^[0-9a-f]{40}$")}


class CatalogError(Exception):
    """The catalog file is unreadable or invalid; the message names the file, the line and the key."""


class FetchError(Exception):
    """A `models` operation failed; `code` is the exit code the CLI returns."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code



@dataclass(frozen=True)
class FileSpec:
    name: str
    size: int | None
    sha256: str | None
    urls: dict[str, str]
    sha1: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    kind: str
    files: tuple[FileSpec, ...]
    mmproj: str | None = None
    pairs_with: tuple[str, ...] = ()
    unavailable: str | None = None

    @property
    def size(self) -> int | None:
        """Total bytes, or None when any file's size is not published."""
        sizes = [f.size for f in self.files]
        return None if None in sizes else sum(s for s in sizes if s is not None)


@dataclass(frozen=True)
class Catalog:
    source: str
    models: dict[str, ModelSpec]

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise FetchError(f"unknown model {name!r} (known: {known})", ExitCode.EX_USAGE) from None


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """Read and validate a catalog (default: the one shipped next to this module)."""
    source = Path(path) if path is not None else CATALOG_PATH
    try:
        data, lines = read_yaml(source, "catalog")
    except YamlError as exc:
        raise CatalogError(str(exc)) from None
    return _Validator(str(source), lines).catalog(data)


class _Validator:
    def __init__(self, source: str, lines: dict[str, int]) -> None:
        self.source = source
        self.lines = lines

    def fail(self, path: str, message: str) -> NoReturn:
        probe = path
        while probe and probe not in self.lines:
            probe = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", probe)
        where = f"{self.source}, line {self.lines[probe]}" if probe else self.source
        raise CatalogError(f"{where}: {path or '<top level>'}: {message}")

    def mapping(self, value: Any, path: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {show(value)}")
        for key in value:
            if key not in required and key not in optional:
                self.fail(f"{path}.{key}" if path else str(key),
                          f"unknown key (known here: {', '.join([*required, *optional])})")
        for key in required:
            if key not in value:
                self.fail(path, f"missing key {key!r}")
        return value

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"expected a non-empty string, got {show(value)}")
        return value.strip()

    def catalog(self, data: Any) -> Catalog:
        top = self.mapping(data, "", ["models"])
        entries = top["models"]
        if not isinstance(entries, dict) or not entries:
            self.fail("models", f"expected a non-empty mapping of model names, got {show(entries)}")
        models = {}
        for name, entry in entries.items():
            if not isinstance(name, str) or not _NAME.match(name):
                self.fail(f"models.{name}", "a model name is 1-64 lower-case letters, digits, '.', '_', '-'")
            models[name] = self.model(name, entry)
        self.cross_check(models)
        return Catalog(self.source, models)

    def model(self, name: str, entry: Any) -> ModelSpec:
        path = f"models.{name}"
        entry = self.mapping(entry, path, ["description", "kind", "files"],
                             ["mmproj", "pairs_with", "unavailable"])
        kind = entry["kind"]
        if kind not in KINDS:
            self.fail(f"{path}.kind", f"expected one of {', '.join(KINDS)}, got {show(kind)}")
        files = entry["files"]
        if not isinstance(files, list) or not files:
            self.fail(f"{path}.files", f"expected a non-empty list of files, got {show(files)}")
        unavailable = None
        if "unavailable" in entry:
            unavailable = self.text(entry["unavailable"], f"{path}.unavailable")
        specs = tuple(self.file(item, f"{path}.files[{i}]", unavailable is not None)
                      for i, item in enumerate(files))
        mmproj = entry.get("mmproj")
        if mmproj is not None and (kind != "llm" or not isinstance(mmproj, str)):
            self.fail(f"{path}.mmproj", "only an llm entry names an mmproj, by its model name")
        pairs = entry.get("pairs_with", [])
        if "pairs_with" in entry and (kind != "mmproj" or not isinstance(pairs, list)
                                      or not all(isinstance(p, str) for p in pairs)):
            self.fail(f"{path}.pairs_with", "only an mmproj entry has pairs_with, a list of llm model names")
        return ModelSpec(name, self.text(entry["description"], f"{path}.description"), kind, specs, mmproj,
                         tuple(pairs), unavailable)

    def file(self, item: Any, path: str, unavailable: bool) -> FileSpec:
        item = self.mapping(item, path, ["name", "size", "sha256", "urls"], ["sha1"])
        name = item["name"]
        if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".")
                or name.endswith(".part") or len(name) > 200 or "\x00" in name):
            self.fail(f"{path}.name",
                      f"expected a plain file name (no '/', not hidden, not *.part), got {show(name)}")
        size = item["size"]
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            self.fail(f"{path}.size", f"expected a positive byte count or null, got {show(size)}")
        sums: dict[str, str | None] = {}
        for algo in ("sha256", "sha1"):
            value = item.get(algo)
            if value is not None and not (isinstance(value, str) and _HEX[algo].match(value.lower())):
                digits = 64 if algo == "sha256" else 40
                self.fail(f"{path}.{algo}", f"expected {digits} hex digits (quoted if need be) or null, "
                                            f"got {show(value)}")
            sums[algo] = value.lower() if isinstance(value, str) else None
        urls = item["urls"]
        if not isinstance(urls, dict):
            self.fail(f"{path}.urls", f"expected a mapping of mirror name to URL, got {show(urls)}")
        for mirror, url in urls.items():
            if mirror not in MIRRORS:
                self.fail(f"{path}.urls.{mirror}", f"unknown mirror (known: {', '.join(MIRRORS)})")
            if (not isinstance(url, str) or not url.startswith(("https://", "http://"))
                    or any(c.isspace() for c in url)):
                self.fail(f"{path}.urls.{mirror}", f"expected an http(s) URL, got {show(url)}")
        if not urls and not unavailable:
            self.fail(f"{path}.urls", "no download URL: add one, or say why in the model's `unavailable`")
        return FileSpec(name, size, sums["sha256"], dict(urls), sums["sha1"])

    def cross_check(self, models: dict[str, ModelSpec]) -> None:
        owners: dict[str, str] = {}
        for model in models.values():
            for i, f in enumerate(model.files):
                if f.name in owners:
                    self.fail(f"models.{model.name}.files[{i}].name",
                              f"{f.name!r} is already a file of {owners[f.name]}: file names must be unique")
                owners[f.name] = model.name
            if model.mmproj is not None and models.get(model.mmproj) is None:
                self.fail(f"models.{model.name}.mmproj", f"no model named {model.mmproj!r} in the catalog")
            if model.mmproj is not None and models[model.mmproj].kind != "mmproj":
                self.fail(f"models.{model.name}.mmproj", f"{model.mmproj!r} is not of kind mmproj")
            for other in model.pairs_with:
                if other not in models or models[other].kind != "llm":
                    self.fail(f"models.{model.name}.pairs_with",
                              f"{other!r} is not an llm model in the catalog")
