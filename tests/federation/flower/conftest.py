import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower Messages take their run and sender from the process's task identity, which a
    ServerApp process has; tests built outside one set it here."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A ClientApp sets torch's threads for its process (node_cache.py); give the test process its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
