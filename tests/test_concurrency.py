"""Eight visitors at once on a public deployment, for about two minutes: merges, asks with fixed
seeds, sweeps, cancellations, and visitors that leave without a word (no heartbeat). No errors,
the same answer for the same seed whatever else runs, and once the sessions have expired the
server is back where it started: memory, threads, session folders."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from attack_helpers import start_public_server  # noqa: E402
from visitors import RawVisitor, lab_recipe, pane_text  # noqa: E402

IDLE_SECONDS = 12
PROMPT = "Reverse the words: red lamp quiet"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(condition, seconds: float, step: float = 0.5) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


@pytest.fixture(scope="module")
def busy_server(demo_cache, tmp_path_factory):
    server = start_public_server(demo_cache, tmp_path_factory.mktemp("busy"), session_idle_seconds=IDLE_SECONDS)
    server.wait_ready()
    yield server
    server.stop()


def settled(server, idle: float = IDLE_SECONDS):
    """Wait for every session to expire and the server to go quiet: no session folder, no CPU
    spent, no thread in MergeLab's code, Gradio's idle worker threads gone. Its RSS and thread
    count then."""
    assert wait_until(lambda: not server.session_folders(), idle + 30), "sessions were not freed"
    before = cpu_seconds(server.pid)
    time.sleep(2)
    assert cpu_seconds(server.pid) - before < 0.5, "the server is still working with no visitor"
    assert wait_until(lambda: not server.busy_threads(), 10), server.busy_threads()
    # Gradio runs handlers on AnyIO's worker threads, which end after 10 s idle but are only
    # looked at when the next call comes: wait, then make one cheap call
    time.sleep(11)
    RawVisitor(server.url).call("clear")
    samples = [server.rss_bytes()]  # the RSS once it no longer falls (the last frees can lag a reaper round)
    while len(samples) < 30 and (len(samples) < 6 or samples[-6] - samples[-1] > 0.01 * samples[-1]):
        time.sleep(1)
        samples.append(server.rss_bytes())
    return samples[-1], len(server.thread_names())


def test_eight_visitors_share_the_server_correctly(busy_server, demo_family):
    server = busy_server
    family = {k: str(v) for k, v in demo_family.items()}

    answers: dict[tuple, list] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def visitor(index: int, answers: dict) -> None:
        t, seed = (0.3, 5) if index % 2 else (0.7, 9)  # pairs of visitors share recipe and seed
        try:
            if index < 6:
                client = RawVisitor(server.url)  # never sends a heartbeat: freed by expiry
            else:
                from gradio_client import Client  # a browser-like client that leaves (unload)

                client = Client(server.url, verbose=False)
            call = client.call if isinstance(client, RawVisitor) else \
                (lambda api, *data: client.predict(*data, api_name=f"/{api}"))
            assert "Merged" in call("merge", lab_recipe(family, t), False)
            panes = call("ask", PROMPT, 12, 0.8, seed, False)  # four visitors share each recipe and seed
            with lock:
                answers.setdefault((t, seed), []).append(tuple(pane_text(p) for p in panes[:3]))
            if index in (1, 2):  # a long answer, cancelled at its first token
                client.cancel_after_first_output("ask", "Write a long story about a dragon.", 256, 0.8, seed, False)
            if index in (3, 6):  # a sweep of two points
                outputs = call("sweep", lab_recipe(family, t), "t", 0, 0, 0, 1, 2, "", None, "", None,
                               ["reverse skill"], 2)
                assert "Done" in outputs[2]
            if index == 4:  # a sweep cancelled after its first point
                client.cancel_after_first_output("sweep", lab_recipe(family, t), "t", 0, 0, 0, 1, 5, "", None, "",
                                                 None, ["json skill"], 2)
            if not isinstance(client, RawVisitor):
                client.close()  # the heartbeat ends: the browser left
        except Exception as error:  # noqa: BLE001 - every visitor's failure is reported
            with lock:
                errors.append(f"visitor {index}: {type(error).__name__}: {error}")

    # the baseline is taken after one visitor of each kind has come and gone: imports, the
    # parents' first load, every code path's first use, thread pools
    for index in (2, 4, 6):
        visitor(index, {})
    assert not errors, errors
    baseline_rss, baseline_threads = settled(server)

    started = time.time()
    threads = [threading.Thread(target=visitor, args=(i, answers)) for i in range(8)]
    for thread in threads:
        thread.start()
        time.sleep(0.5)
    for thread in threads:
        thread.join(timeout=600)
    elapsed = time.time() - started
    assert not errors, errors
    assert sorted(answers) == [(0.3, 5), (0.7, 9)] and all(len(v) == 4 for v in answers.values())
    for key, seen in answers.items():
        assert len(set(seen)) == 1, f"t={key[0]} seed={key[1]} gave different answers: {set(seen)}"
    a, b, merged = answers[(0.3, 5)][0]
    assert a and b and merged  # three real answers, sampled at temperature 0.8

    rss, thread_count = settled(server)
    print(f"\n8 visitors in {elapsed:.0f} s; RSS {baseline_rss / 1e6:.0f} MB before, {rss / 1e6:.0f} MB after; "
          f"threads {baseline_threads} before, {thread_count} after")
    assert rss <= 1.10 * baseline_rss, f"RSS {rss / 1e6:.0f} MB, baseline {baseline_rss / 1e6:.0f} MB"
    assert thread_count <= baseline_threads, f"{thread_count} threads, {baseline_threads} before"
    assert server.alive()
