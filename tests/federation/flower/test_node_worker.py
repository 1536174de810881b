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
