"""The general plugin: idempotent registration, members that survive a fresh process."""

import pickle
import subprocess
import sys

from vllm.v1.attention.backends.registry import AttentionBackendEnum

from kvfold.attention_backends import BACKENDS, CUSTOM_BACKEND
from kvfold.vllm_plugins.general import register

# A fresh interpreter that has NOT loaded vLLM's plugins, like vLLM's spawned engine process
# while it unpickles its config.
UNPICKLE = "import pickle, sys; m = pickle.loads(sys.stdin.buffer.read()); print(m.name, m.get_path())"


def fresh_unpickle(data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", UNPICKLE], input=data, capture_output=True,
                          timeout=120, env={"VLLM_PLUGINS": "", "PATH": ""})


def test_register_is_idempotent() -> None:
    register()
    register()
    for name, path in BACKENDS.items():
        assert AttentionBackendEnum[name].get_path() == path
    assert AttentionBackendEnum.CUSTOM.get_path() == CUSTOM_BACKEND


def test_members_unpickle_in_a_process_without_plugins() -> None:
    register()
    for name, path in BACKENDS.items():
        proc = fresh_unpickle(pickle.dumps(AttentionBackendEnum[name]))
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert proc.stdout.decode().split() == [name, path]


def test_a_dynamic_member_without_kvfold_reducer_does_not() -> None:
    # The failure kvfold's reducer exists for (vLLM's own register_backend, pickled by value).
    from vllm.v1.attention.backends.registry import register_backend

    name = "KVFOLD_TEST_PLAIN"
    if name not in AttentionBackendEnum.__members__:
        register_backend(name, "kvfold.attention_backends.dense.backend.DenseBackend_plain")
    proc = fresh_unpickle(pickle.dumps(AttentionBackendEnum[name]))
    assert proc.returncode != 0
    assert b"is not a valid AttentionBackendEnum" in proc.stderr
