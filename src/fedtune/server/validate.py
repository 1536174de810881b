"""Server-side validation of every incoming update, before any aggregation (always on).

An update is rejected, with the client id and the reason, when

1. its delta does not have exactly the global adapter's tensor names, shapes and dtype, or
   holds NaN/Inf values (``aggregate.check_tensors``; never relies on broadcasting);
2. its example count is not a non-negative integer, or the client already answered this round;
3. its L2 norm over all tensors is above ``norm_bound_factor`` times the median norm of the
   round's structurally valid updates:

       reject i  if  ||d_i||_2 > factor * median_j ||d_j||_2

   The relative bound needs no knowledge of the task's scale and stops scaled-update
   attacks that a weighted mean would otherwise follow. It only bites when most updates are
   honest (the median is then an honest norm) and when the round has at least three
   updates (with two, the median is their mean). Under client-level DP the bound is off:
   clipping to C bounds every update, and a bound relative to the others' norms would make
   one client's rejection depend on the other clients' data (see SECURITY.md).

Rejected updates are never merged. Whether the round can go on with the rest is the round
loop's decision (``federation.min_clients``; see federation/inprocess.py).
"""

from __future__ import annotations

import statistics
from typing import Optional, Sequence

from fedtune.errors import AggregationError
from fedtune.privacy.dp import l2_norm
from fedtune.server.aggregate import check_tensors
from fedtune.types import Adapter, ClientFailure, ClientUpdate


def validate_updates(
    global_adapter: Adapter, updates: Sequence[ClientUpdate], norm_bound_factor: Optional[float]
) -> tuple[list[ClientUpdate], list[ClientFailure], dict[int, float]]:
    """(accepted updates in client-id order, rejections with reasons, L2 norm of every
    structurally valid delta by client id). ``norm_bound_factor`` None: no norm bound."""
    valid, rejected, seen = [], [], set()
    for u in sorted(updates, key=lambda u: u.client_id):
        reason = structural_problem(global_adapter, u, seen)
        seen.add(u.client_id)
        if reason is None:
            valid.append(u)
        else:
            rejected.append(ClientFailure(u.client_id, reason))
    norms = {u.client_id: l2_norm(u.delta) for u in valid}
    if norm_bound_factor is None or not valid:
        return valid, rejected, norms
    median = statistics.median(norms.values())
    bound = norm_bound_factor * median
    accepted = []
    for u in valid:
        if norms[u.client_id] > bound:
            rejected.append(ClientFailure(
                u.client_id, f"update norm {norms[u.client_id]:.4g} is above privacy.norm_bound_factor={norm_bound_factor:g} "
                f"x the round's median norm {median:.4g} (= {bound:.4g})",
            ))
        else:
            accepted.append(u)
    return accepted, sorted(rejected, key=lambda f: f.client_id), norms


def structural_problem(global_adapter: Adapter, update: ClientUpdate, seen: set[int]) -> Optional[str]:
    """Why ``update`` cannot be merged with ``global_adapter`` (None: it can)."""
    if update.client_id in seen:
        return "sent a second update in one round (each client answers once)"
    if not (isinstance(update.num_examples, int) and not isinstance(update.num_examples, bool) and update.num_examples >= 0):
        return f"num_examples must be a non-negative integer, got {update.num_examples!r}"
    try:
        check_tensors(global_adapter, update.delta, f"client {update.client_id}")
    except AggregationError as err:
        return str(err).split(": ", 1)[1]  # without the "client N: " prefix (the log line names the client)
    return None
