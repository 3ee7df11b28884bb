"""bench/peer_bench.py's plumbing without any peer environment: the load generator against real
loopback servers that behave like the peers (keep-alive, Flask's close-but-never-close, errors,
silence), a peer whose environment could not be built, the goals and the same-weights check."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import peer_bench
import peer_servers
from peer_load import REQUESTS, caption, drive, run_drive
from peer_weights import check_agreement, rows_cosine


class Loopback:
    """An HTTP/1.1 server on a background event loop; `mode` picks how it answers."""

    def __init__(self, mode: str) -> None:
        self.mode, self.connections, self.requests = mode, 0, 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            self.requests += 1
            if self.mode == "silent":
                await asyncio.sleep(3600)
            status = b"500 Internal Server Error" if self.mode == "error" and self.requests % 2 else b"200 OK"
            close = self.mode == "close"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n"
                         + (b"Connection: close\r\n" if close else b"") + b"\r\nok")
            await writer.drain()
            if close:  # Flask's development server: says close, then neither closes nor reads on
                await asyncio.sleep(3600)

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loopback() -> Iterator[type[Loopback]]:
    made: list[Loopback] = []

    def make(mode: str) -> Loopback:
        made.append(Loopback(mode))
        return made[-1]

    yield make  # type: ignore[misc]
    for server in made:
        server.stop()


def requests(port: int, n: int) -> list[bytes]:
    host = f"127.0.0.1:{port}"
    return [REQUESTS["clipforge"]["text_embedding"](i, b"", host) for i in range(n)]


def test_a_kept_connection_carries_every_request_of_its_worker(loopback) -> None:
    server = loopback("keep")
    out = asyncio.run(drive(server.port, requests(server.port, 40), 4))
    assert (out["errors"], len(out["latencies"]), server.requests) == (0, 40, 40)
    assert server.connections == 4


def test_a_server_that_says_close_but_keeps_the_socket_gets_a_new_connection_per_request(loopback) -> None:
    server = loopback("close")
    out = run_drive(server.port, requests(server.port, 12), 3, timeout=20)
    assert (out["errors"], len(out["latencies"]), server.connections) == (0, 12, 12)
    assert not out.get("timed_out")


def test_error_statuses_count_as_errors(loopback) -> None:
    server = loopback("error")
    out = run_drive(server.port, requests(server.port, 10), 1, timeout=20)
    assert out["errors"] == 5 and len(out["latencies"]) == 10


def test_a_round_past_its_bound_counts_every_request_as_an_error(loopback) -> None:
    server = loopback("silent")
    out = run_drive(server.port, requests(server.port, 6), 2, timeout=1)
    assert out == {"latencies": [], "errors": 6, "seconds": 1, "requests": 6, "timed_out": True}


def test_every_caption_is_a_different_string() -> None:
    assert len({caption(i) for i in range(5000)}) == 5000


def test_a_peer_without_an_environment_is_reported_with_the_line_pip_left(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(peer_servers, "PEERS", tmp_path)
    (tmp_path / "infinity").mkdir()
    (tmp_path / "infinity" / "UNAVAILABLE").write_text("ERROR: No matching distribution found for infinity-emb\n")
    with pytest.raises(RuntimeError, match="infinity: cannot be installed here: ERROR: No matching distribution"):
        peer_servers.venv_python("infinity")
    with pytest.raises(RuntimeError, match="no environment at .*clip-retrieval .*peer_venvs.sh"):
        peer_servers.venv_python("clip-retrieval")


def test_last_error_line_is_the_last_line_that_names_an_error(tmp_path) -> None:
    log = tmp_path / "x.log"
    log.write_text("starting\nTraceback\nValueError: bad weights\nshutting down\n")
    assert peer_servers.last_error_line(log) == "ValueError: bad weights"
    log.write_text("only this\n\n")
    assert peer_servers.last_error_line(log) == "only this"


def row(endpoint: str, server: str, conc: int, rps: float, p99: float) -> dict:
    return {"endpoint": endpoint, "server": server, "concurrency": conc, "rps": rps, "p99_ms": p99}


def test_goals_compare_with_the_best_peer() -> None:
    rows = [row("text_embedding", "clipforge", 32, 30.0, 900), row("text_embedding", "infinity", 32, 25.0, 800),
            row("search", "clipforge", 32, 60.0, 500), row("search", "clip-retrieval", 32, 10.0, 4000),
            row("text_embedding", "clipforge", 1, 10.0, 90), row("text_embedding", "infinity", 1, 9.0, 80)]
    builds = [{"tool": "clipforge index build", "images_per_s": 12.0},
              {"tool": "clip-retrieval inference", "images_per_s": 2.0}]
    met = {g["goal"].split(" (")[0]: (g["met"], g["value"]) for g in peer_bench.goals(rows, builds, [1, 32])}
    assert met["text_embedding c=32 req/s >= 1.5x best peer"] == (False, "30.0 req/s = 1.2x")
    assert met["search c=32 req/s >= 1.5x best peer"] == (True, "60.0 req/s = 6.0x")
    assert met["text_embedding c=1 p99 below every peer's"] == (False, "90 ms")
    assert met["index build >= 1.5x clip-retrieval inference"] == (True, "12.0 images/s = 6.0x")
    assert not any(k.startswith("image_embedding") for k in met)  # no rows, no verdict
    rows.append(row("text_embedding", "clipforge-onnx", 32, 40.0, 600))
    onnx = peer_bench.goals(rows, builds, [1, 32], me="clipforge-onnx")
    assert [(g["server"], g["value"], g["met"]) for g in onnx] == [("clipforge-onnx", "40.0 req/s = 1.6x", True)]
    # a bf16 server is judged on its own index build; the best peer may be a quantised one
    rows += [row("text_embedding", "clipforge-bf16", 32, 80.0, 300), row("text_embedding", "infinity-int8", 32, 50.0, 500)]
    builds.append({"tool": "clipforge index build --precision bf16", "images_per_s": 30.0})
    bf16 = {g["goal"].split(" (")[0]: g["value"] for g in peer_bench.goals(rows, builds, [1, 32], me="clipforge-bf16")}
    assert bf16["text_embedding c=32 req/s >= 1.5x best peer"] == "80.0 req/s = 1.6x"
    assert bf16["index build >= 1.5x clip-retrieval inference"] == "30.0 images/s = 15.0x"


def test_the_same_weights_check_needs_same_inputs_closer_than_different_ones() -> None:
    check_agreement({"text_min_cosine": 0.9999, "different_texts_max_cosine": 0.93})
    with pytest.raises(SystemExit, match="not the same weights: image cosine 0.98"):
        check_agreement({"image_min_cosine": 0.98, "different_images_max_cosine": 0.5})
    with pytest.raises(SystemExit, match="different inputs reach 0.9999"):
        check_agreement({"text_min_cosine": 0.9995, "different_texts_max_cosine": 0.9999})
    import numpy as np

    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert rows_cosine(a, np.array([[3.0, 0.0], [1.0, 0.0]])) == [1.0, 0.0]


def test_help_runs_without_any_peer_environment() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "peer_bench.py"), "--help"], check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--concurrency" in out.stdout and "infinity" in out.stdout


def test_index_peers_summary_takes_each_engines_fastest_setting_that_reaches_the_target() -> None:
    import index_peers

    def r(engine: str, setting: str, recall: float, p50: float, build: float, **extra: object) -> dict:
        return {"engine": engine, "setting": setting, "recall@10": recall, "p50_ms": p50, "p99_ms": 2 * p50,
                "build_s": build, "rss_mib": 1.0, **extra}

    rows = [r("clipforge-hnswsq", "ef=32", 0.96, 0.3, 50), r("clipforge-hnswsq", "ef=64", 0.985, 0.5, 50),
            r("clipforge-hnswsq", "faiss-only ef=64", 0.985, 0.2, 50, faiss_only=True),
            r("hnswlib", "ef=64", 0.97, 0.25, 40), r("hnswlib", "ef=128", 0.99, 0.6, 40),
            r("hnswlib", "ef=96", 0.99, 0.7, 40), r("usearch-f16", "ef=256", 0.9, 0.1, 30)]
    summary = index_peers.fastest_per_target(rows, (0.95, 0.98, 0.995))
    picked = {(s["target"], s["engine"]): s["setting"] for s in summary}
    assert picked[(0.95, "clipforge-hnswsq")] == "ef=32" and picked[(0.95, "hnswlib")] == "ef=64"
    assert picked[(0.98, "clipforge-hnswsq")] == "ef=64"  # the faiss-only row is faster but not the service path
    assert picked[(0.98, "hnswlib")] == "ef=128"  # ef=96 reaches it too, but slower
    assert picked[(0.95, "usearch-f16")] is None and picked[(0.995, "hnswlib")] is None
    family = {"clipforge-hnswsq": "clipforge", "hnswlib": "hnswlib", "usearch-f16": "usearch"}
    goal = {v["target"]: v for v in index_peers.verdicts(summary, family)}
    assert goal[0.95]["p50_goal_met"] is False and goal[0.95]["build_goal_met"] is False  # 0.3 > 0.25 ms, 50 > 40 s
    assert goal[0.98]["p50_goal_met"] is True and goal[0.98]["best_peer"] == "hnswlib ef=128"
    assert goal[0.995]["p50_goal_met"] is None  # nobody reaches it: no verdict
    assert index_peers.interleaved(["a", "b"], ["x", "y", "z"], 1) == ["b", "y", "a", "z", "x"]
