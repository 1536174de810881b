"""What a SuperNode keeps between messages, and what its ClientApp measures about itself.

Flower 1.41's own ``flwr-clientapp`` serves one message and exits (its warm executor pools
exist only for Kubernetes and not for ClientApps), so with ``--isolation subprocess`` nothing
in memory outlives a fit; fedtune's long-lived worker (node_worker.py, ``--isolation
process``) keeps the model and shards in memory instead. What outlives any process:

- the tokenised shard, on the node's disk (:class:`ShardCache`), keyed by the content of
  the examples, the tokenizer, the template and ``data.max_length``;
- the thread count: each ClientApp sets torch's threads once (:func:`client_threads`), so
  SuperNodes or Ray actors sharing a machine do not oversubscribe its cores (torch's default,
  one thread per core in every process, trains several times slower when two run at once).

:func:`process_age` tells how long the process lived before the handler ran (Python start,
imports, Flower's own start-up): the part of a deployed fit no cache on the node removes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

from fedtune.data.preferences import EncodedPair
from fedtune.data.prompts import Encoded

log = logging.getLogger(__name__)

THREADS = "threads"  # --node-config key: torch threads of this node's ClientApps
CACHE_DIR = "cache-dir"  # --node-config key: where this node keeps tokenised shards
SHARD_FORMAT = 1  # bump when the stored layout changes


def process_age() -> Optional[float]:
    """Seconds since this process started (None where there is no /proc)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def client_threads(node_config: dict, client_cpus: float) -> int:
    """Torch threads for this ClientApp: ``--node-config threads=N`` when the node gives it,
    else ``$OMP_NUM_THREADS`` when set (what the node's operator or Ray chose), else
    ``flower.client_cpus`` (at least 1)."""
    given = node_config.get(THREADS)
    if isinstance(given, int) and not isinstance(given, bool) and given > 0:
        return given
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, int(client_cpus))


def set_threads(n: int) -> int:
    """Use ``n`` torch threads in this process (a no-op when it already does)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def files_fingerprint(path) -> list:
    """What changes when the files under ``path`` change: each file's name, size and
    modification time (a stat per file, no reads; [] where ``path`` is not on this disk)."""
    root = Path(str(path)).expanduser()
    if not root.exists():
        return []
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append([str(f.relative_to(root)) if f != root else f.name, st.st_size, st.st_mtime_ns])
    return out


TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "*.model", "chat_template*")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the tokenizer's files (vocabulary, merges, normaliser;
    cheaper than serialising a loaded one, ~1 ms against ~0.2 s), then what can change in
    memory: added and special tokens, the chat template, BOS/EOS flags."""
    h = hashlib.sha256()
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    files = sorted({p for pattern in TOKENIZER_FILES for p in folder.glob(pattern) if p.is_file()}) if folder.is_dir() else []
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    if not files:  # a tokenizer built in memory: serialise it
        backend = getattr(tokenizer, "backend_tokenizer", None)
        h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    added = {int(i): str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    extra = [type(tokenizer).__name__, len(tokenizer), added, getattr(tokenizer, "chat_template", None), tokenizer.all_special_tokens,
             getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]
    h.update(json.dumps(extra, default=str, sort_keys=True).encode())
    return h.hexdigest()


def shard_key(examples: list, tokenizer_hash: str, template: str, max_length: int) -> str:
    """Content hash of a tokenised shard's inputs (the examples' text, not where they came from)."""
    h = hashlib.sha256(json.dumps([SHARD_FORMAT, tokenizer_hash, template, max_length]).encode())
    for e in examples:
        h.update(json.dumps(_as_dict(e), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _as_dict(example) -> object:
    return dataclasses.asdict(example) if dataclasses.is_dataclass(example) else example


def pack(e) -> tuple:
    """An encoded example as tensors, ints and strings (what ``torch.load(weights_only=True)`` reads)."""
    if isinstance(e, EncodedPair):
        return ("pair", pack(e.chosen), pack(e.rejected))
    return ("one", e.input_ids, int(e.prompt_len))


def unpack(t: tuple):
    if t[0] == "pair":
        return EncodedPair(unpack(t[1]), unpack(t[2]))
    if t[0] == "one":
        return Encoded(t[1], int(t[2]))
    raise ValueError(f"unknown shard entry {t[0]!r}")


class ShardCache:
    """Tokenised shards on the node's disk, one ``<key>.pt`` file each (written to a temp
    file, then renamed, so a crash never leaves half a file). ``hits`` and ``builds`` count
    this process's lookups."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.hits = self.builds = 0

    def get(self, key: str, build):
        path = self.directory / f"{key}.pt"
        if path.is_file():
            try:
                encoded = [unpack(e) for e in torch.load(path, weights_only=True)]  # tensors, ints, strings only
                self.hits += 1
                return encoded
            except Exception as err:  # a damaged or foreign file: rebuild it
                log.warning("rebuilding the tokenised shard %s (%s)", path, err)
        encoded = build()
        self.builds += 1
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save([pack(e) for e in encoded], tmp)
            os.replace(tmp, path)
        except OSError as err:  # a read-only or full disk costs the cache, not the fit
            log.warning("could not keep the tokenised shard in %s: %s", self.directory, err)
        return encoded


class Stopwatch:
    """Named durations of one handler call (seconds), for the fit's metrics."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def time(self, name: str, fn):
        started = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
