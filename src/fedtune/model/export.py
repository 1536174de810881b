"""``fedtune export``: a run's adapter merged into its base, as a model any tool can serve.

Formats:

* ``hf``: a transformers folder (``config.json``, ``model.safetensors``, tokenizer, model card,
  ``fedtune.json``) for vLLM, TGI, transformers or ``fedtune serve``; ``dtype`` float32,
  bfloat16 or float16.
* ``gguf``: one ``NAME.TYPE.gguf`` file (model/gguf_export.py) for llama.cpp and Ollama, with
  the model card and ``fedtune.json``; ``dtype`` float32, float16, bfloat16 or q8_0.

The source is a finished run directory, a PEFT adapter folder (a run's ``adapter/``, or a
checkpoint ``checkpoints/round_N``) or a merged model folder (re-exported, e.g. to GGUF). The
merge runs on the CPU in float32 (PEFT ``merge_and_unload``: W + (alpha/r) B A), and the
export is written to a temporary folder beside ``out`` that replaces it only when complete.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fedtune.errors import CheckpointError, ConfigError
from fedtune.reporting.progress import Progress

FORMATS = ("hf", "gguf")
HF_DTYPES = ("float32", "bfloat16", "float16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    folder: Path
    files: list[str]  # the model's own files in it (the .gguf, or model.safetensors ...)


def check_options(format: str, dtype: str) -> None:
    from fedtune.model.gguf_export import GGUF_TYPES

    if format not in FORMATS:
        raise ConfigError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    allowed = HF_DTYPES if format == "hf" else GGUF_TYPES
    if dtype not in allowed:
        raise ConfigError(f"--dtype {dtype}: --format {format} writes {', '.join(allowed)}")


def export_model(source: Path, out: Path, *, format: str = "hf", dtype: str = "float32", overwrite: bool = False,
                 progress: Optional[Progress] = None) -> ExportResult:
    """Merge ``source``'s adapter into its base and write it to ``out`` as ``format``
    (see the module docstring). Reports each phase through ``progress.message``."""
    from fedtune.federation.loader import MERGED, RUN, folder_kind, load_any_model
    from fedtune.federation.rundir import finished_adapter

    progress = progress or Progress()
    source, out = Path(source), Path(out)
    check_options(format, dtype)
    kind = folder_kind(source)
    if kind == RUN and finished_adapter(source) is None:
        raise CheckpointError(f"run {source} has not finished (no adapter/ yet); finish it with `fedtune run --resume {source}`, "
                              f"or export one of its checkpoints ({source}/checkpoints/round_N)")
    _check_out(out, source, overwrite)
    progress.message(f"loading {source} ({kind} folder) on the CPU in float32")
    loaded = load_any_model(source, device="cpu", dtype="float32")
    progress.message("no adapter to merge: re-exporting the model" if kind == MERGED else
                     f"merging the adapter ({loaded.folder}) into the base model")
    model = loaded.model if kind == MERGED else loaded.model.merge_and_unload()
    progress.message(f"writing {format} ({dtype}) to {out}")
    tmp = out.parent / f".{out.name}.export-tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = _write(tmp, model, loaded, source, format, dtype)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as err:
        raise CheckpointError(f"{err.filename or out}: {err.strerror or err} while writing the export; "
                              f"{'free space' if err.errno in (errno.ENOSPC, errno.EDQUOT) else 'check permissions'} "
                              "or choose another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress.message(f"exported {', '.join(files)} to {out}")
    return ExportResult(out, files)


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that would clobber something; check it can be written, before loading anything."""
    from fedtune.federation.sharing import SHARE_FILE

    if out.resolve() == source.resolve() or source.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--out {out} would replace the source {source}; choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
        if not (out / SHARE_FILE).is_file():
            raise ConfigError(f"--out {out} holds files that are not a fedtune export; --overwrite only replaces exports: "
                              "choose another --out or empty it")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    probe = out.parent / f".{out.name}.export-tmp"
    try:
        probe.mkdir(parents=True, exist_ok=True)
        probe.rmdir()
    except OSError as err:
        raise CheckpointError(f"cannot write to {parent or out.parent} ({err.strerror or err}); choose another --out") from None


def _write(folder: Path, model, loaded, source: Path, format: str, dtype: str) -> list[str]:
    from fedtune.federation.sharing import model_card, share_record, write_share_files

    summary = _summary(loaded, source)
    record = share_record(summary["base"], kind="merged" if format == "hf" else "gguf", template=loaded.template,
                          task=summary["task"])
    if format == "hf":
        model.to(TORCH_DTYPES[dtype]).save_pretrained(str(folder))
        write_share_files(folder, record, loaded.tokenizer, model_card(summary, kind="merged"))
        return sorted(p.name for p in folder.glob("*.safetensors"))
    from fedtune.model.gguf_export import TYPE_LABEL, write_gguf

    name = f"{summary['run']}.{TYPE_LABEL[dtype]}.gguf"
    write_gguf(folder / name, model, loaded.tokenizer, dtype=dtype, name=summary["run"])
    write_share_files(folder, record, None, model_card(summary, kind="gguf", files=[name]))
    return [name]


def _summary(loaded, source: Path) -> dict:
    """The model card's facts: the run's (metrics and config) or, for a folder, what fedtune.json says."""
    from fedtune.federation.sharing import base_identity, folder_summary, read_share_record, run_summary

    if loaded.cfg is not None:
        return run_summary(loaded.cfg, source)
    name = source.resolve().parent.name if source.name == "adapter" else source.resolve().name
    record = read_share_record(source)
    base = record.get("base_model") or base_identity(loaded.bundle.base_path, loaded.bundle.base_path)
    return folder_summary(name, base, task=record.get("task", "sft"), template=loaded.template)
