"""A long-lived ClientApp process for a SuperNode: every message of the node in one process.

Flower 1.41's SuperNode runs each message as a task. With ``--isolation subprocess`` (its
default) its SuperExec starts a fresh ``flwr-clientapp`` process per task, which serves that
one task and exits (``flwr.supernode.runtime.run_clientapp``), so each fit pays Python and
library imports and the base model load (~6 s + ~7 s for SmolLM2 on 2 cores). Flower's
pre-started ("warm") executors exist only for Kubernetes and not for ClientApps.

With ``flower-supernode --isolation process`` the SuperNode starts nothing: some process
outside it claims each pending task on its Runtime API (``AcquireTask``, what Flower's
SuperExec does) and runs it with the task's token (``PullTaskInput``, the message, the reply,
``PushTaskOutput``, what ``flwr-clientapp`` does). :func:`serve` is that process, started
once per SuperNode (``fedtune flower worker``): it runs fedtune's ClientApp for every task in
this same process, so :data:`fedtune.federation.flower.client_app.CACHE` (the base model, the
tokenised shard, torch's threads) lives across messages and rounds, as in the simulation's Ray
actors. The app is imported once and never reloaded; each task's run config and node context
come from the SuperNode as for ``flwr-clientapp``, and the cache is keyed by what built it.

It serves only fedtune's own ClientApp (the Flower App ``fedtune flower run`` sends names
:data:`~fedtune.federation.flower.deploy.CLIENTAPP`; a run of another app gets an error reply
naming this). The FAB is not installed: fedtune's holds no code.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import httpx

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05  # between AcquireTask calls while the node has no task (Flower's SuperExec: 1 s)


def retry_invoker():
    """Retries while the SuperNode's Runtime API is unreachable (it may start after this
    process, or restart); gives up on any other HTTP error, which fails the task at hand,
    not the process (Flower's own invoker signals its process to exit on a stale token)."""
    from flwr.common.constant import MAX_RETRY_DELAY
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    retryable = {httpx.codes.BAD_GATEWAY, httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT}
    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=MAX_RETRY_DELAY),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=None,
        should_giveup=lambda exc: isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in retryable,
    )


def runtime_client(address: str, insecure: bool, root_certificates_path: Optional[str], token: Optional[str] = None):
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        interceptors=interceptors, retry_invoker=retry_invoker(),
    )


def fedtune_app(fab) -> None:
    """Refuse a FAB whose ClientApp is not fedtune's (this process runs only that one)."""
    from flwr.common.config import get_fab_config

    from fedtune.federation.flower.deploy import CLIENTAPP

    named = get_fab_config(fab.content).get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if named != CLIENTAPP:
        raise RuntimeError(
            f"this SuperNode's fedtune worker runs only {CLIENTAPP}, not {named!r}: start the SuperNode with --isolation subprocess for other apps"
        )


def run_task(address: str, token: str, insecure: bool, root_certificates_path: Optional[str], app) -> bool:
    """Run one claimed task (``token``) with ``app`` in this process, as ``flwr-clientapp``
    would in a new one; True when the app answered."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = runtime_client(address, insecure, root_certificates_path, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, _, fab = pull_task_input(client)
        fedtune_app(fab)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # the task fails with an error reply, as in flwr-clientapp; this process goes on
        log.error("ClientApp raised an exception", exc_info=ex)
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:
            log.error("could not push the reply to the SuperNode", exc_info=ex)
            status = SubStatus.FAILED
        push_task_output(client, context, status, details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return status == SubStatus.COMPLETED


def serve(
    address: str,
    *,
    insecure: bool = True,
    root_certificates_path: Optional[str] = None,
    poll_seconds: float = POLL_SECONDS,
    stop: Callable[[], bool] = lambda: False,
    app=None,
) -> int:
    """Claim and run the SuperNode's ClientApp tasks until ``stop()``; returns how many ran."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    if app is None:
        from fedtune.federation.flower.client_app import app  # imported once: its CACHE lives as long as this process
    client = runtime_client(address, insecure, root_certificates_path)
    ran = 0
    try:
        while not stop():
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                run_task(address, res.token, insecure, root_certificates_path, app)
                ran += 1
            else:
                time.sleep(poll_seconds)
    finally:
        client.close()
    return ran
