"""Evaluations of the base model, computed once and reused, keyed by content.

In a ``fedtune compare`` every run starts from the same base model (LoRA B = 0: the initial
adapter adds exactly zero, so the model computes what the base computes) and evaluates it on
the same held-out rows: base, each local-only client, federated and centralized all measured
the same round-0 loss and answered the same configured sample prompts (samples picked after
training are answered with the final adapter in one pass, not from here). ``fedtune eval
--base`` measures it once more. A :class:`BaseEvalCache` keeps each such result in a small JSON file named by
the SHA-256 of everything that determines it:

- the model: the content of every file in the base model's folder (weights, config,
  tokenizer; a file in the Hugging Face cache is named by its blob's SHA-256, so it is not
  read), the weights' dtype, the device type, quantisation and compute precision, and the
  torch, transformers and peft versions (the cache outlives installs);
- what is evaluated: the held-out rows' token ids, prompt lengths and categories, or the
  rendered prompt texts;
- the settings that shape the result: batching and packing of the held-out loss, the DPO
  loss settings and reference, ``max_new_tokens``, the batch size of the answers and how they
  are prefilled.

A changed held-out set, model file, template, ``data.max_length`` or setting gives another key,
so nothing stale is reused. Answers are cached for the base (adapter disabled, or a no-op
initial adapter) only, and only greedy ones. Held-out losses are cached for the base and for
a run's final adapter, keyed by the adapter's content as well (its tensors and the LoRA
settings that decide what they add): a compare evaluates each run's final adapter on the very held-out set the
run ended on, and ``fedtune eval RUN`` does too, so both read the run's own final evaluation
back instead of repeating it.

Where: ``eval.base_cache_dir`` (default ``<fedtune cache>/eval``, i.e. ``~/.cache/fedtune/eval``),
shared by every compare, run and ``fedtune eval`` of the user, so a compare re-run in a new
folder reuses it too. Entries are trusted as written: keep the folder your own. Files are written to a temporary name and renamed (atomic); two
processes computing the same entry write the same content. A file whose content hash was
computed once is remembered by (path, size, mtime) under ``files/``, so a large model is read
once, not once per run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from fedtune.federation.rundir import write_atomic
from fedtune.model.frozen import stored_dtype
from fedtune.model.generate import generate, render_prompts
from fedtune.reporting.progress import GENERATION, Progress
from fedtune.types import Adapter

log = logging.getLogger(__name__)
HASH_CHUNK = 1 << 20


# how fedtune's forward rounds under autocast: LoRA's rank-r matmuls in autocast's dtype, the decoder norms'
# outputs cast once, attention on a CPU in float32 (model/lora_dropout.py, model/activations.py, model/attention.py);
# results computed otherwise are not reused
FORWARD = "lora in autocast dtype, norms cast once, cpu attention in float32"
PREFILL = "shared prefix once per batch"  # how answers are computed (model/generate.py): other float sums than a full prefill


@functools.cache
def library_versions() -> dict[str, str]:
    """The installed torch, transformers and peft: the cache outlives installs, and an upgraded
    kernel or model class may compute other numbers (looked up once, when a key is first needed)."""
    return {name: version(name) for name in ("torch", "transformers", "peft")}

SKIP_DIRS = frozenset({".git", ".cache", "__pycache__"})


def is_noop(adapter: Adapter) -> bool:
    """True when ``adapter`` adds exactly nothing (every LoRA B is zero, as ``attach_lora``
    initialises it): with it loaded the model computes what the base model computes."""
    b = [v for k, v in adapter.items() if "lora_B" in k]
    return bool(b) and all(not bool(v.any()) for v in b)


# the LoRA settings that decide what an adapter's tensors add: the scaling, and lora_dropout, which
# picks the forward (lean dropout's or PEFT's own, which round differently under autocast; model/lora_dropout.py)
LORA_FORWARD = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "fan_in_fan_out", "lora_dropout")


def adapter_digest(adapter: Adapter, peft_config) -> str:
    """SHA-256 of an adapter's tensors (names, dtypes, shapes, bytes) and of the LoRA settings
    that decide what they add (``peft_config``'s alpha, rank, rsLoRA, dropout ...)."""
    h = hashlib.sha256()
    for name in sorted(adapter):
        t = adapter[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes of any dtype (bf16 has no numpy type)
    h.update(digest({k: getattr(peft_config, k, None) for k in LORA_FORWARD}).encode())
    return h.hexdigest()


def digest(value: Any) -> str:
    """SHA-256 of a JSON-able value (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def encoded_digest(items: Sequence, categories: Sequence[str]) -> str:
    """SHA-256 of encoded held-out rows (``Encoded`` or ``EncodedPair``) and their categories."""
    h = hashlib.sha256()
    for item, cat in zip(items, categories):
        for e in (item.chosen, item.rejected) if hasattr(item, "chosen") else (item,):
            h.update(e.input_ids.to(torch.int64).numpy().tobytes())
            h.update(f"|{e.prompt_len}|".encode())
        h.update(f"{cat}\n".encode())
    h.update(str(len(items)).encode())
    return h.hexdigest()


class BaseEvalCache:
    """Base-model results stored under ``folder`` by content key (None: no cache, everything
    is computed)."""

    def __init__(self, folder: Optional[Path]):
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.fingerprints: dict[tuple, str] = {}  # this object's own memo: one model is hashed once per process

    def get_or_compute(self, key: dict, compute: Callable[[], Any],
                       valid: Optional[Callable[[Any], bool]] = None) -> tuple[Any, bool]:
        """(result, True) when ``key`` is stored (and its result passes ``valid``), else
        (``compute()``, False) after storing it; a damaged or foreign file is recomputed over."""
        if self.folder is None:
            return compute(), False
        path = self.folder / f"{digest(key)}.json"
        stored = _read_entry(path, key)
        if stored is not None and (valid is None or valid(stored["result"])):
            return stored["result"], True
        result = compute()
        try:
            _write_atomic(path, json.dumps({"key": key, "result": result}))
        except OSError as err:  # a cache that cannot be written costs time, not the run
            log.warning("evaluation cache %s not written (%s); set eval.base_cache_dir or eval.base_cache=false", path, err)
        return result, False

    def evaluate(self, bundle, evaluator, compute: Callable[[bool], dict], progress: Optional[Progress] = None,
                 per_example: bool = False, adapter: Optional[Adapter] = None) -> dict:
        """``evaluator``'s result for the base model, or with ``adapter`` (loaded in
        ``bundle``; a no-op one is the base) for that adapter (``compute(per_example)``
        evaluates it), reused when stored; an evaluator whose result is not the base's
        (``cache_key()`` None) computes. The stored result keeps the per-example values (one
        entry serves a run's round 0 or final round and a compare's paired intervals); they
        are returned only when asked for."""
        key = evaluator.cache_key() if self.folder is not None else None
        model = self.model_key(bundle) if key is not None else None
        if model is None:
            return compute(per_example)
        trained = adapter is not None and not is_noop(adapter)
        if trained:
            model["adapter"] = adapter_digest(adapter, bundle.peft_config)
        result, hit = self.get_or_compute({**key, **model}, lambda: compute(True),
                                          valid=lambda r: isinstance(r, dict) and isinstance(r.get("per_example"), dict))
        if hit and progress is not None:
            progress.message(f"{'this adapter' if trained else 'base model'} {key['kind']} evaluation from the evaluation cache {self.folder}")
        return result if per_example else {k: v for k, v in result.items() if k != "per_example"}

    def answer_prompts(self, bundle, prompts: Sequence[str], inputs: Sequence[str], *, template: str, max_new_tokens: int,
                       batch_size: int, progress: Optional[Progress] = None, phase: str = GENERATION) -> list[str]:
        """Greedy answers of ``bundle``'s model as it stands (model/generate.py ``generate``),
        reused when stored: callers pass this cache for the base model and a disabled one
        (``BaseEvalCache(None)``) for anything else."""
        texts = render_prompts(bundle.tokenizer, prompts, inputs, template)
        return self.answers(bundle, texts, add_special_tokens=(template == "alpaca"), max_new_tokens=max_new_tokens,
                            batch_size=batch_size, progress=progress,
                            compute=lambda: generate(bundle.model, bundle.tokenizer, prompts, inputs=inputs, template=template,
                                                     max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, phase=phase))

    def answers(self, bundle, texts: Sequence[str], *, add_special_tokens: bool, max_new_tokens: int, batch_size: int,
                compute: Callable[[], list[str]], progress: Optional[Progress] = None) -> list[str]:
        """The base model's greedy answers to the rendered prompts ``texts``, ``batch_size`` at
        most at a time (``compute()`` generates them), reused when stored. The batch size is
        in the key: which prompts share a padded batch can flip a near-tie of the top token."""
        model = self.model_key(bundle) if texts and self.folder is not None else None
        if model is None:
            return compute() if texts else []
        key = {"kind": "answers", "texts": digest(list(texts)), "add_special_tokens": add_special_tokens,
               "max_new_tokens": max_new_tokens, "batch_size": batch_size, "prefill": PREFILL, **model}
        stored = stored_dtype(bundle.model)  # a training process's bf16 projections answer differently outside autocast
        if stored is not None:  # (losses, computed under autocast, are the same: model/frozen.py)
            key["projections"] = str(stored)
        result, hit = self.get_or_compute(
            key, compute, valid=lambda r: isinstance(r, list) and len(r) == len(texts) and all(isinstance(a, str) for a in r))
        if hit and progress is not None:
            progress.message(f"base model answers to {len(texts)} prompts from the evaluation cache {self.folder}")
        return result

    def model_key(self, bundle) -> Optional[dict]:
        """The model part of a key: its files' fingerprint and the compute precision (None:
        the model is not a folder of files, so it has no content to key on)."""
        if not Path(bundle.base_path).is_dir():
            return None
        weights = next(iter(bundle.model.parameters()))
        memo = (bundle.base_path, str(weights.dtype), weights.device.type)
        if memo not in self.fingerprints:
            self.fingerprints[memo] = self.model_fingerprint(bundle.base_path, bundle.model)
        key = {"model": self.fingerprints[memo], "precision": bundle.precision, "libraries": library_versions()}
        if bundle.precision != "fp32":  # only autocast's rounding changed
            key["forward"] = FORWARD
        return key

    def model_fingerprint(self, base_path: str, model) -> str:
        """SHA-256 over the base model folder's files and how the model was loaded."""
        root = Path(base_path)
        files = sorted(p for p in root.rglob("*") if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts))
        weights = next(iter(model.parameters()))
        config = getattr(model, "config", None)
        return digest({
            "files": [(str(p.relative_to(root)), self.file_hash(p)) for p in files],
            "dtype": str(weights.dtype), "device": weights.device.type,
            "quantization": str(getattr(config, "quantization_config", None)),
        })

    def file_hash(self, path: Path) -> str:
        """A file's SHA-256: its blob name in the Hugging Face cache, a remembered one for the
        same (path, size, mtime), else read."""
        target = path.resolve()
        if target.parent.name == "blobs" and len(target.name) == 64:  # HF cache: blobs/<sha256> (LFS files)
            return target.name
        stat = target.stat()
        memo = self.folder / "files" / f"{digest([str(target), stat.st_size, stat.st_mtime_ns])}" if self.folder else None
        if memo is not None and memo.is_file():
            with contextlib.suppress(OSError, ValueError):
                remembered = memo.read_text().strip()
                if re.fullmatch(r"[0-9a-f]{64}", remembered):
                    return remembered  # anything else (a damaged memo) is hashed again and rewritten
        h = hashlib.sha256()
        with open(target, "rb") as f:
            for block in iter(lambda: f.read(HASH_CHUNK), b""):
                h.update(block)
        if memo is not None:
            with contextlib.suppress(OSError):
                _write_atomic(memo, h.hexdigest())
        return h.hexdigest()


def _read_entry(path: Path, key: dict) -> Optional[dict]:
    """The stored {"key", "result"} at ``path`` when it is for ``key``; None when missing,
    unreadable, not JSON or not this key's (a half-written file cannot exist: writes are renamed)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or "result" not in stored or stored.get("key") != json.loads(json.dumps(key, default=str)):
        return None
    return stored


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
