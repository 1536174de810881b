"""What travels between the fedtune ServerApp and ClientApp, as Flower records.

Only adapter tensors (canonical PEFT keys, float32) and plain numbers cross the wire. Record
keys are the constants below::

    query   server -> node   QUERY      {}
            node -> server              NODE: ConfigRecord {client, num_examples, steps}
    train   server -> node   TRAIN      ADAPTER: ArrayRecord  global adapter
                                        FIT: ConfigRecord     {client, round, lr}
                                        CLIENT_CONFIG: ConfigRecord          scalar strategy settings
                                        CLIENT_CONFIG + ".<name>": ArrayRecord tensor-valued settings
                                        ROLLBACKS: ConfigRecord {session, rounds} (client state to drop;
                                                   federation/flower/node_state.py)
            node -> server              DELTA: ArrayRecord    local - global
                                        CONTROL_DELTA: ArrayRecord (SCAFFOLD, optional)
                                        UPDATE: ConfigRecord  {client, num_examples}
                                        METRICS: MetricRecord loss, steps, tokens, seconds ...

A reply is read back with :func:`read_update`, which raises :class:`ReplyError` with a reason
for anything that is not a well-formed update; checking it against the global adapter is the
round loop's job (``fedtune.server.validate.validate_updates``), once.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.types import Adapter, ClientUpdate

ADAPTER = "adapter"
FIT = "fit"
CLIENT_CONFIG = "client_config"
DELTA = "delta"
CONTROL_DELTA = "control_delta"
UPDATE = "update"
METRICS = "metrics"
NODE = "node"
QUERY = "query"
ROLLBACKS = "rollbacks"
SESSION = "session"
ROUNDS = "rounds"

CLIENT = "client"
ROUND = "round"
LR = "lr"
NUM_EXAMPLES = "num_examples"
RANK = "rank"
STEPS = "steps"
TENSOR = "tensor"  # the one key of a client-config entry that is a single tensor


class ReplyError(ValueError):
    """A reply that cannot be read as a client update; the message is the reason."""


# ----------------------------------------------------------------------------- tensors


LAYOUT = "layout"  # the two arrays of a packed adapter record
PACKED = "packed"


def to_record(adapter: Adapter) -> ArrayRecord:
    """Adapter -> ArrayRecord of two arrays: every tensor's bytes back to back (``packed``)
    and, as JSON bytes, each tensor's key, dtype and shape in that order (``layout``). Flower
    moves each array of a message as its own object, one request per hop; a tensor per array
    (420 for SmolLM2's all-linear LoRA) cost a deployment ~40 s a round on 2 cores."""
    layout, parts = [], []
    for k, v in adapter.items():
        a = v.detach().cpu().contiguous().numpy()
        layout.append([k, a.dtype.str, list(a.shape)])
        parts.append(a.reshape(-1).view(np.uint8))
    packed = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    meta = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy()
    return ArrayRecord({LAYOUT: Array(meta), PACKED: Array(packed)})


def from_record(record: ArrayRecord) -> Adapter:
    """ArrayRecord (see :func:`to_record`) -> adapter (CPU tensors in the dtype that was sent;
    copies, writable)."""
    if set(record.keys()) != {LAYOUT, PACKED}:
        raise ReplyError(f"an adapter record has arrays {sorted(record.keys())}, not {LAYOUT!r} and {PACKED!r}")
    try:
        layout = json.loads(record[LAYOUT].numpy().tobytes())
        packed = record[PACKED].numpy().view(np.uint8).reshape(-1)
        out, at = {}, 0
        for k, dtype, shape in layout:
            dtype = np.dtype(dtype)
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if at + size > packed.size:
                raise ValueError(f"tensor {k} runs past the packed bytes")
            out[k] = torch.from_numpy(packed[at:at + size].view(dtype).reshape(shape).copy())
            at += size
    except (TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise ReplyError(f"the adapter record cannot be read ({err})") from None
    if at != packed.size:
        raise ReplyError(f"the adapter record has {packed.size - at} bytes its layout does not name")
    return out


# ----------------------------------------------------------------------------- server -> node


def train_content(global_adapter: Adapter, client: int, round: int, lr: float, client_config: dict,
                  rollbacks: Optional[tuple[str, list[int]]] = None) -> RecordDict:
    """The TRAIN message for one client: the global adapter and what its fit needs, and the
    server's (session, rolled-back rounds) the node's client state must agree with."""
    records: dict[str, Any] = {
        ADAPTER: to_record(global_adapter),
        FIT: ConfigRecord({CLIENT: client, ROUND: round, LR: float(lr)}),
    }
    if rollbacks is not None and rollbacks[1]:
        records[ROLLBACKS] = ConfigRecord({SESSION: rollbacks[0], ROUNDS: [int(r) for r in rollbacks[1]]})
    scalars = {}
    for name, value in client_config.items():
        if isinstance(value, torch.Tensor):
            records[f"{CLIENT_CONFIG}.{name}"] = to_record({TENSOR: value})
        elif isinstance(value, dict):
            records[f"{CLIENT_CONFIG}.{name}"] = to_record(value)
        else:
            scalars[name] = value
    records[CLIENT_CONFIG] = ConfigRecord(scalars)
    return RecordDict(records)


def read_train(content: RecordDict) -> tuple[Adapter, int, int, float, dict]:
    """(global adapter, client, round, lr, client_config) of a TRAIN message."""
    fit = content[FIT]
    client_config: dict[str, Any] = dict(content[CLIENT_CONFIG])
    prefix = f"{CLIENT_CONFIG}."
    for key, record in content.array_records.items():
        if key.startswith(prefix):
            tensors = from_record(record)
            client_config[key[len(prefix):]] = tensors[TENSOR] if list(tensors) == [TENSOR] else tensors
    return from_record(content[ADAPTER]), int(fit[CLIENT]), int(fit[ROUND]), float(fit[LR]), client_config


def read_rollbacks(content: RecordDict) -> tuple[str, list[int]]:
    """(session, rolled-back rounds) of a TRAIN message (("", []) when it carries none)."""
    record = content.config_records.get(ROLLBACKS)
    if record is None:
        return "", []
    return str(record[SESSION]), [int(r) for r in record[ROUNDS]]


def query_content() -> RecordDict:
    return RecordDict({QUERY: ConfigRecord({})})


# ----------------------------------------------------------------------------- node -> server


def node_content(client: int, num_examples: int, steps: int) -> RecordDict:
    """A node's answer to the query: which fedtune client it is and how much it trains."""
    return RecordDict({NODE: ConfigRecord({CLIENT: client, NUM_EXAMPLES: num_examples, STEPS: steps})})


def read_node(content: RecordDict) -> tuple[int, int, int]:
    """(client, num_examples, steps) of a node's answer; ReplyError if malformed."""
    record = content.config_records.get(NODE)
    values = [record.get(k) if record is not None else None for k in (CLIENT, NUM_EXAMPLES, STEPS)]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ReplyError(f"the node's answer has no valid {CLIENT}/{NUM_EXAMPLES}/{STEPS} (got {values})")
    return values[0], values[1], values[2]


def update_content(update: ClientUpdate, payload: Optional[Adapter] = None) -> RecordDict:
    """A client update as a reply: the delta (or its compressed ``payload``,
    federation/compression.py), the example count, the rank it trained and the metrics."""
    head = {CLIENT: update.client_id, NUM_EXAMPLES: update.num_examples}
    if update.rank is not None:
        head[RANK] = update.rank
    records: dict[str, Any] = {
        DELTA: to_record(update.delta if payload is None else payload),
        UPDATE: ConfigRecord(head),
        METRICS: MetricRecord({k: int(v) if isinstance(v, bool) else v for k, v in update.metrics.items()}),
    }
    if update.control_delta is not None:
        records[CONTROL_DELTA] = to_record(update.control_delta)
    return RecordDict(records)


def read_update(content: RecordDict, expected_client: int) -> ClientUpdate:
    """The ClientUpdate in a reply; ReplyError naming what is missing or wrong."""
    update = content.config_records.get(UPDATE)
    if update is None or DELTA not in content.array_records:
        raise ReplyError(f"the reply lacks the '{UPDATE}' or '{DELTA}' record")
    client, n = update.get(CLIENT), update.get(NUM_EXAMPLES)
    if client != expected_client:
        raise ReplyError(f"the reply says it is client {client!r}, but the message went to client {expected_client}")
    if not isinstance(n, int) or isinstance(n, bool):
        raise ReplyError(f"{NUM_EXAMPLES} is missing or not an integer (got {n!r})")
    metrics = dict(content.metric_records.get(METRICS) or {})
    control: Optional[Adapter] = None
    if CONTROL_DELTA in content.array_records:
        control = from_record(content[CONTROL_DELTA])
    rank = update.get(RANK)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ReplyError(f"{RANK} must be a positive integer (got {rank!r})")
    return ClientUpdate(client, n, from_record(content[DELTA]), metrics, control, rank)


# ----------------------------------------------------------------------------- federated evaluation
#
#   evaluate  server -> node   EVALUATE   ADAPTER: ArrayRecord  global adapter
#                                         EVALUATION: ConfigRecord {client, round}
#             node -> server              SCORE: ConfigRecord {client, categories: [names]}
#                                         SUMS: MetricRecord {"<i>.<field>": sum or count of category i}

EVALUATION = "evaluation"
SCORE = "score"
SUMS = "sums"
CATEGORIES = "categories"


def evaluate_content(global_adapter: Adapter, client: int, round: int) -> RecordDict:
    """The EVALUATE message for one client: the adapter to score on its own held-out rows."""
    return RecordDict({ADAPTER: to_record(global_adapter), EVALUATION: ConfigRecord({CLIENT: client, ROUND: round})})


def read_evaluate(content: RecordDict) -> tuple[Adapter, int, int]:
    """(adapter, client, round) of an EVALUATE message."""
    head = content[EVALUATION]
    return from_record(content[ADAPTER]), int(head[CLIENT]), int(head[ROUND])


def score_content(client: int, sums: dict[str, dict[str, float]]) -> RecordDict:
    """A client's federated-evaluation sums (evaluation/federated.py) as a reply."""
    names = sorted(sums)
    flat = {f"{i}.{field}": value for i, name in enumerate(names) for field, value in sums[name].items()}
    return RecordDict({SCORE: ConfigRecord({CLIENT: client, CATEGORIES: names}), SUMS: MetricRecord(flat)})


def read_score(content: RecordDict, expected_client: int) -> dict[str, dict[str, float]]:
    """The sums in a reply ({category: {field: value}}); ReplyError naming what is wrong."""
    head, flat = content.config_records.get(SCORE), content.metric_records.get(SUMS)
    if head is None or flat is None:
        raise ReplyError(f"the reply lacks the '{SCORE}' or '{SUMS}' record")
    if head.get(CLIENT) != expected_client:
        raise ReplyError(f"the reply says it is client {head.get(CLIENT)!r}, but the message went to client {expected_client}")
    names = list(head.get(CATEGORIES) or [])
    sums: dict[str, dict[str, float]] = {name: {} for name in names}
    for key, value in flat.items():
        index, _, field = key.partition(".")
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
        if not index.isdigit() or int(index) >= len(names) or not number or (field in ("examples", "tokens") and value < 0):
            raise ReplyError(f"sum {key}={value!r} is not a finite number of a named category")
        sums[names[int(index)]][field] = value
    if any("examples" not in s for s in sums.values()):
        raise ReplyError("a category of the reply has no example count")
    return sums
