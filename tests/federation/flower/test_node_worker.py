import io
import zipfile
from types import SimpleNamespace

import pytest
import tomli_w

from fedtune.federation.flower import node_worker
from fedtune.federation.flower.deploy import CLIENTAPP, SERVERAPP


def fab(clientapp):
    app = {"publisher": "p", "components": {"serverapp": SERVERAPP, "clientapp": clientapp}, "config": {}}
    project = {"name": "x", "version": "1.0.0", "description": "", "license": "Apache-2.0", "dependencies": ["flwr"]}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("pyproject.toml", tomli_w.dumps({"project": project, "tool": {"flwr": {"app": app}}}))
    return SimpleNamespace(content=buffer.getvalue())


def test_the_worker_runs_fedtunes_client_app_and_refuses_another():
    node_worker.fedtune_app(fab(CLIENTAPP))
    with pytest.raises(RuntimeError, match="runs only fedtune.federation.flower.client_app:app, not 'other.app:app'"):
        node_worker.fedtune_app(fab("other.app:app"))


class FakeRuntime:
    """The SuperNode's Runtime API as the worker sees it: two tasks, then none."""

    def __init__(self):
        from flwr.proto.runtime_pb2 import AcquireTaskResponse
        from flwr.proto.task_pb2 import Task

        self.queue = [AcquireTaskResponse(task=Task(task_id=i), token=f"t{i}") for i in (1, 2)]
        self.closed = 0

    def AcquireTask(self, request):
        from flwr.proto.runtime_pb2 import AcquireTaskResponse

        return self.queue.pop(0) if self.queue else AcquireTaskResponse()

    def SendTaskHeartbeat(self, request):
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse

        return SendTaskHeartbeatResponse(success=True)

    def close(self):
        self.closed += 1


def test_a_failing_task_gets_an_error_reply_and_the_worker_serves_the_next(monkeypatch):
    # Arrange: the first message makes the app raise, the second is answered
    from flwr.app import Context, Message, RecordDict
    from flwr.app.error import Error
    from flwr.supernode.runtime import run_clientapp

    runtime, pushed, outputs, tokens = FakeRuntime(), [], [], []
    monkeypatch.setattr(node_worker, "runtime_client", lambda address, insecure, certs, token=None: tokens.append(token) or runtime)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    inbox = [Message(RecordDict(), dst_node_id=7, message_type="train") for _ in range(2)]
    for m in inbox:
        m.metadata.__dict__["_message_id"] = m.object_id
    monkeypatch.setattr(run_clientapp, "pull_task_input", lambda client: (inbox.pop(0), context, None, fab(CLIENTAPP)))
    monkeypatch.setattr(run_clientapp, "push_message", lambda client, reply, ctx: pushed.append(reply))
    monkeypatch.setattr(run_clientapp, "push_task_output", lambda client, ctx, status, details: outputs.append((status, details)))
    calls = []

    def app(message, context):
        calls.append(message)
        if len(calls) == 1:
            raise ValueError("boom")
        return Message(RecordDict(), reply_to=message)

    # Act
    ran = node_worker.serve("127.0.0.1:1", app=app, poll_seconds=0, stop=lambda: not runtime.queue and len(calls) == 2)

    # Assert
    assert ran == 2 and tokens == [None, "t1", "t2"]
    assert isinstance(pushed[0].error, Error) and "boom" in pushed[0].error.reason and not pushed[1].has_error()
    assert [s for s, _ in outputs] == ["failed", "completed"]
