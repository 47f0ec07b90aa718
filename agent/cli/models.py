"""`gemma-agent models list | pull NAME | verify [NAME] | remove NAME | convert NAME --checkpoint DIR`: the model
catalog and its files."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.catalog import convert, download
from agent.catalog.catalog import Catalog, CatalogError, FetchError, load_catalog
from agent.catalog.download import (
    DEFAULT_DIR,
    DEFAULT_MIRRORS,
    MIRRORS_ENV,
    FetchOptions,
    human_size,
    parse_mirrors,
    pull,
    remove,
    status,
    verify_model,
)
from agent.contract.exitcodes import ExitCode

log = logging.getLogger("agent.catalog")


def add(subparsers: Any) -> argparse.ArgumentParser:
    """Register `models list|pull|verify|remove` on an argparse subparsers object; run it with run_cli."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given after the action overrides the one before it instead of being reset to default
    common.add_argument("--dir", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                        help=f"models directory (default: ./{DEFAULT_DIR})")
    common.add_argument("--catalog", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                        help="catalog file (default: the catalog.yaml shipped with gemma-agent)")
    common.add_argument("--log-level", dest="log_level_after", default=argparse.SUPPRESS,
                        choices=["debug", "info", "warning", "error"], help="override log.level")
    codes = (download.__doc__ or "").split("Exit codes", 1)[1]
    p = subparsers.add_parser("models", help="list, download, verify or remove model files",
                              description="Model files: list the catalog, download (resumable, "
                                          "checksum-verified), verify, remove.",
                              epilog="exit codes" + codes,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), metavar="DIR",
                   help=f"models directory (default: ./{DEFAULT_DIR})")
    p.add_argument("--catalog", type=Path, default=None, metavar="PATH",
                   help="catalog file (default: built in)")
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    sub.add_parser("list", parents=[common], help="the catalog, with what is in the models directory")
    pull_p = sub.add_parser("pull", parents=[common], help="download a model (resumes a partial download)")
    pull_p.add_argument("name", help="model name from `models list`")
    pull_p.add_argument("--with-mmproj", action="store_true", help="also download the model's projector")
    pull_p.add_argument("--mirrors", metavar="LIST", default=None,
                        help=f"mirror order, e.g. modelscope,huggingface (default: ${MIRRORS_ENV} or "
                             f"{','.join(DEFAULT_MIRRORS)}); HF_ENDPOINT / MODELSCOPE_ENDPOINT replace "
                             "the hosts")
    pull_p.add_argument("--retries", type=int, default=5, metavar="N", help="retries per mirror (default 5)")
    pull_p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="network timeout (default 30 s)")
    verify_p = sub.add_parser("verify", parents=[common], help="check size and checksum of downloaded files")
    verify_p.add_argument("name", nargs="?", help="one model (default: every model with files present)")
    remove_p = sub.add_parser("remove", parents=[common], help="delete a model's files and partial downloads")
    remove_p.add_argument("name", help="model name")
    convert_codes = (convert.__doc__ or "").split("Exit codes", 1)[1]
    convert_p = sub.add_parser(
        "convert", parents=[common], help="build an unpublished projector from its Hugging Face checkpoint",
        description="Build a projector GGUF that is not published (Gemma 3n's gemma3nv) from the Hugging Face "
                    "checkpoint with the llama.cpp converter vendored in the installed llama-cpp-python, check "
                    "its header and put it in the models directory under the catalog's name. Needs torch and "
                    "transformers (pip install 'gemma-agent[convert]', or --python); run it on a bigger machine "
                    "and copy the file to the board.",
        epilog="exit codes" + convert_codes, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert_p.add_argument("name", help=f"projector to build: {', '.join(convert.CONVERTIBLE)}")
    convert_p.add_argument("--checkpoint", type=Path, required=True, metavar="DIR",
                           help="the downloaded checkpoint (config.json, preprocessor_config.json, *.safetensors), "
                                "e.g. of google/gemma-3n-E2B-it")
    convert_p.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                           help="a llama.cpp checkout with convert_hf_to_gguf.py (default: the one vendored in the "
                                "installed llama-cpp-python, from its source distribution on PyPI, cached)")
    convert_p.add_argument("--python", default=None, metavar="PATH",
                           help="Python interpreter with torch and transformers (default: this one)")
    convert_p.add_argument("--text-model", type=Path, default=None, metavar="GGUF",
                           help="also check that the projector's width matches this text model's n_embd")
    convert_p.add_argument("--outtype", default="f16", choices=["f16", "bf16", "f32"],
                           help="tensor type (default f16, the catalog's file name)")
    convert_p.add_argument("--force", action="store_true", help="replace an existing file")
    return p


def main(args: argparse.Namespace) -> int:
    """Run a parsed `models` command; return its exit code (see the module docstring)."""
    try:
        catalog = load_catalog(args.catalog)
        return _COMMANDS[args.models_command](catalog, args)
    except CatalogError as exc:
        print(f"gemma-agent models: catalog error: {exc}", file=sys.stderr)
        return ExitCode.EX_CONFIG
    except FetchError as exc:
        print(f"gemma-agent models: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("gemma-agent models: interrupted; a partial download is kept as FILE.part and resumes on the "
              "next pull", file=sys.stderr)
        return ExitCode.INTERRUPTED


def _cmd_list(catalog: Catalog, args: argparse.Namespace) -> int:
    rows = [(m.name, m.kind, human_size(m.size) if m.size else "?", status(m, args.dir), m.description)
            for m in catalog.models.values()]
    widths = [max(len(r[i]) for r in [*rows, ("NAME", "KIND", "SIZE", "STATUS", "")]) for i in range(4)]
    print(f"{'NAME':<{widths[0]}}  {'KIND':<{widths[1]}}  {'SIZE':>{widths[2]}}  {'STATUS':<{widths[3]}}  "
          f"DESCRIPTION   (in {args.dir})")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}")
    return ExitCode.OK


def _cmd_pull(catalog: Catalog, args: argparse.Namespace) -> int:
    mirrors_text = args.mirrors if args.mirrors is not None else os.environ.get(MIRRORS_ENV, "")
    if args.retries < 0 or not 0 < args.timeout <= 3600:
        raise FetchError("--retries must be >= 0 and --timeout from 0 to 3600 seconds", ExitCode.EX_USAGE)
    opts = FetchOptions(mirrors=parse_mirrors(mirrors_text) if mirrors_text.strip() else DEFAULT_MIRRORS,
                        retries=args.retries, timeout=args.timeout)
    names = [args.name]
    model = catalog.get(args.name)
    if args.with_mmproj and model.mmproj:
        names.append(model.mmproj)
    elif model.mmproj:
        log.info("%s: its projector is %s (`models pull %s`, or pull with --with-mmproj)", model.name,
                 model.mmproj, model.mmproj)
    for name in names:
        for path in pull(catalog, name, args.dir, opts):
            print(path)
    return ExitCode.OK


def _cmd_verify(catalog: Catalog, args: argparse.Namespace) -> int:
    if args.name:
        models = [catalog.get(args.name)]
    else:
        models = [m for m in catalog.models.values()
                  if any((Path(args.dir) / f.name).is_file() for f in m.files)]
        if not models:
            print(f"no catalogued model files in {args.dir}")
            return ExitCode.OK
    checks = [c for m in models for c in verify_model(m, args.dir)]
    for c in checks:
        print(f"{c.status:<8}  {c.model}  {c.path}: {c.detail}")
    if any(c.status == "corrupt" for c in checks):
        return ExitCode.EX_DATAERR
    if any(c.status == "missing" for c in checks):
        return ExitCode.EX_NOINPUT
    return ExitCode.OK


def _cmd_remove(catalog: Catalog, args: argparse.Namespace) -> int:
    for path in remove(catalog, args.name, args.dir):
        print(f"removed {path}")
    return ExitCode.OK


def _cmd_convert(catalog: Catalog, args: argparse.Namespace) -> int:
    path, s = convert.convert(catalog, args.name, args.checkpoint, args.dir, llama_cpp=args.llama_cpp,
                              python=args.python, text_model=args.text_model, outtype=args.outtype, force=args.force)
    print(path)
    print(f"checked: arch clip, projector {s['projector_type']}, {s['image_tokens']} image tokens "
          f"(image_size {s['image_size']} / patch_size {s['patch_size']}), n_embd {s['n_embd']}, "
          f"{s['tensors']} tensors, {human_size(s['size'])}; copy it to the board's models directory")
    return ExitCode.OK


_COMMANDS: dict[str, Callable[[Catalog, argparse.Namespace], int]] = {
    "list": _cmd_list, "pull": _cmd_pull, "verify": _cmd_verify, "remove": _cmd_remove, "convert": _cmd_convert}
