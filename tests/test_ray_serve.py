"""Ray Serve replicas (qllm_integrations.ray_serve): two CPU replicas of the embedded model on a local Ray
instance, driven over HTTP, answer as the single-process server does, read each document once, keep a
document's questions on the replica that holds it, and lose nothing when a replica dies."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from qllm_integrations.server import create_app, document_id
from qllm_runtime import QLLMEngine
from qllm_runtime.loading import default_gguf_path, load
from tests.conftest import SMALL_WINDOWS

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from qllm_integrations.ray_serve import ray_app, replica_resources  # noqa: E402 (needs ray)

pytestmark = pytest.mark.slow
APP = "quickllama-test"
QUESTION = "What is my cat called?"
DOCUMENTS = [f"My cat is called {name}. It likes to sleep in the sun." for name in ["Tom", "Max", "Bella", "Luna"]]
SHORT, LONG = 6, 40  # tokens of an answer; a long one is still being generated when its replica is killed


def counting_engine(log: str) -> QLLMEngine:
    """A replica's engine (the embedded model, test windows, one CPU thread) that appends `<pid> read <id>` to
    `log` for each document it read and `<pid> load <id>` for each memory it loaded from the store."""
    torch.set_num_threads(1)
    engine = QLLMEngine(*load(default_gguf_path(), device="cpu"), SMALL_WINDOWS)
    read, load_memory = engine.read, engine.load_memory

    def record(event: str, doc_id: str) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {event} {doc_id}\n")

    def counted_read(text, progress=None):
        memory = read(text, progress)
        record("read", document_id(engine.model_name, engine.config, text))
        return memory

    def counted_load(path):
        memory = load_memory(path)
        record("load", Path(path).stem)
        return memory

    engine.read, engine.load_memory = counted_read, counted_load
    return engine


def events(log: Path) -> list[tuple[int, str, str]]:
    """(pid, event, document id) of every read and load so far."""
    lines = log.read_text().split("\n") if log.exists() else []
    return [(int(pid), event, doc) for pid, event, doc in (line.split() for line in lines if line)]


@pytest.fixture(scope="module")
def reference(default_engine, tmp_path_factory) -> tuple[dict[str, str], str]:
    """The single-process server's answers (on one CPU thread, as the replicas): document id → short answer,
    in DOCUMENTS' order, and the first document's long answer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with TestClient(create_app(default_engine, tmp_path_factory.mktemp("reference"))) as client:
            ids = [client.post("/v1/documents", json={"text": text}).json()["id"] for text in DOCUMENTS]
            return {doc_id: answer(client, doc_id) for doc_id in ids}, answer(client, ids[0], LONG)
    finally:
        torch.set_num_threads(threads)


def answer(client: httpx.Client | TestClient, doc_id: str, max_tokens: int = SHORT) -> str:
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "document": doc_id, "max_tokens": max_tokens,
        "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[httpx.Client, Path, Path]]:
    """(client of the app, store folder, read/load log) of two replicas on a local Ray instance."""
    folder = tmp_path_factory.mktemp("ray")
    store, log = folder / "store", folder / "events.log"
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = functools.partial(counting_engine, str(log))
        serve.run(ray_app(engine, store, replicas=2, max_new_tokens=8, cached_documents=2), name=APP)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client, store, log
    finally:
        serve.shutdown()
        ray.shutdown()


def settle() -> None:
    """Give the replicas' multiplexed ids (pushed every 0.1 s) time to reach the gateway's router."""
    time.sleep(0.5)


def wait_for_replicas(n: int, timeout: float = 60) -> None:
    """Wait until the engine deployment has `n` running replicas."""
    deadline = time.monotonic() + timeout
    while serve.status().applications[APP].deployments["EngineReplica"].replica_states.get("RUNNING", 0) < n:
        assert time.monotonic() < deadline, "no replacement replica started"
        time.sleep(0.2)


def test_replicas_take_gpus_only_for_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert replica_resources(None, None) == (2, {"num_gpus": 1})  # one replica per GPU
    assert replica_resources("cuda", 1) == (1, {"num_gpus": 1})
    assert replica_resources("cpu", None) == (1, {"num_cpus": 8})  # CPU replicas on a GPU machine
    assert replica_resources("cpu", 4) == (4, {"num_cpus": 2})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert replica_resources(None, 3) == (3, {"num_cpus": 2})


def test_ray_is_imported_only_by_the_ray_app():
    code = "import sys, qllm_runtime.cli, qllm_integrations.server; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_replicas_read_once_keep_affinity_and_survive_a_killed_replica(cluster, reference):
    client, store, log = cluster
    answers, long_answer = reference
    ids = list(answers)

    # each document read once, spread over the replicas (a new id goes to the one holding the fewest)
    for text in [*DOCUMENTS, DOCUMENTS[0]]:  # the repeat is not read again
        assert client.post("/v1/documents", json={"text": text}).json()["id"] in ids
        settle()
    reads = events(log)
    assert sorted(doc for _, event, doc in reads if event == "read") == sorted(ids)
    held = {pid: {doc for p, _, doc in reads if p == pid} for pid, _, _ in reads}
    assert len(held) == 2 and all(len(docs) == 2 for docs in held.values()), held
    assert sorted(p.stem for p in store.glob("*.qmem")) == sorted(ids)

    # answers equal the single-process server's, each from the replica that read the document (no load)
    assert {doc_id: answer(client, doc_id) for doc_id in ids} == answers
    assert events(log) == reads

    # the replica holding the first document dies while answering it: that answer, and the questions on its
    # documents sent right after, come from the live replicas, which load those documents from the store
    killed = next(pid for pid, docs in held.items() if ids[0] in docs)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(answer, client, ids[0], LONG)
        time.sleep(0.3)
        os.kill(killed, signal.SIGKILL)
        assert in_flight.result() == long_answer
    assert {doc_id: answer(client, doc_id) for doc_id in held[killed]} == {d: answers[d] for d in held[killed]}
    wait_for_replicas(2)
    settle()
    assert {doc_id: answer(client, doc_id) for doc_id in ids} == answers
    after = events(log)[len(reads):]
    assert {event for _, event, _ in after} == {"load"}  # nothing read again
    assert killed not in {pid for pid, _, _ in after}
    assert held[killed] <= {doc for _, _, doc in after}
    assert [d["id"] for d in client.get("/v1/documents").json()["data"]] == sorted(ids)

    # a new text posted twice at once is read once
    text = "My dog is called Rex. It likes to run in the park."
    with ThreadPoolExecutor(2) as pool:
        posted = list(pool.map(lambda _: client.post("/v1/documents", json={"text": text}).json()["id"], range(2)))
    assert posted[0] == posted[1]
    assert [event for _, event, doc in events(log) if doc == posted[0]].count("read") == 1
