"""Micro-batching and the text cache: coalescing, ordering, limits, errors, draining, and the app under concurrency."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_app_support import shape_image

from app.batching import MicroBatcher
from app.encoders import LRUCache
from app.main import create_app
from app.settings import Settings
from model import CLIPInference


def _recording_fn(calls: list[list[int]], delay: float = 0.01):
    def fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(delay)  # a forward pass takes time; meanwhile more requests queue up
        return [x * 10 for x in items]

    return fn


def test_concurrent_submits_coalesce_in_order() -> None:
    calls: list[list[int]] = []

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", _recording_fn(calls), pool, max_batch_size=8, max_wait_ms=20)
            batcher.start()
            results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
            await batcher.stop()
            return results

    results = asyncio.run(main())
    assert results == [i * 10 for i in range(20)]
    assert all(len(c) <= 8 for c in calls)
    assert max(len(c) for c in calls) == 8  # they really were coalesced
    assert sorted(x for c in calls for x in c) == list(range(20))


def test_batch_size_one_is_batch_one_serving() -> None:
    calls: list[list[int]] = []

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", _recording_fn(calls, 0.0), pool, max_batch_size=1, max_wait_ms=50)
            batcher.start()
            await asyncio.gather(*(batcher.submit(i) for i in range(6)))
            await batcher.stop()

    asyncio.run(main())
    assert [len(c) for c in calls] == [1] * 6


def test_heavy_item_runs_alone_and_weights_bound_batches() -> None:
    calls: list[list[list[int]]] = []

    def fn(groups: list[list[int]]) -> list[int]:
        calls.append(groups)
        return [sum(g) for g in groups]

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", fn, pool, max_batch_size=4, max_wait_ms=10)
            batcher.start()
            groups = [[1] * 10, [2, 2], [3, 3], [4]]
            out = await asyncio.gather(*(batcher.submit(g, weight=len(g)) for g in groups))
            await batcher.stop()
            return out

    assert asyncio.run(main()) == [10, 4, 6, 4]
    for groups in calls:
        weight = sum(len(g) for g in groups)
        assert weight <= 4 or len(groups) == 1


def test_errors_reach_every_waiter_and_the_batcher_survives() -> None:
    def fn(items: list[int]) -> list[int]:
        if 3 in items:
            raise ValueError("boom")
        return items

    async def main() -> tuple[list[object], int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", fn, pool, max_batch_size=8, max_wait_ms=20)
            batcher.start()
            out = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
            after = await batcher.submit(7)
            await batcher.stop()
            return out, after

    out, after = asyncio.run(main())
    assert any(isinstance(x, ValueError) for x in out)
    assert after == 7


def test_stop_drains_submitted_work_and_refuses_new() -> None:
    done: list[int] = []

    def fn(items: list[int]) -> list[int]:
        time.sleep(0.02)
        done.extend(items)
        return items

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", fn, pool, max_batch_size=2, max_wait_ms=0)
            batcher.start()
            tasks = [asyncio.create_task(batcher.submit(i)) for i in range(6)]
            await asyncio.sleep(0)
            await batcher.stop()
            assert [t.result() for t in tasks] == list(range(6))
            with pytest.raises(RuntimeError, match="not running"):
                await batcher.submit(9)

    asyncio.run(main())
    assert sorted(done) == list(range(6))


def test_batches_run_off_the_event_loop() -> None:
    threads: set[str] = set()

    def fn(items: list[int]) -> list[int]:
        threads.add(threading.current_thread().name)
        return items

    async def main() -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
            batcher = MicroBatcher("t", fn, pool, max_batch_size=4, max_wait_ms=1)
            batcher.start()
            await asyncio.gather(*(batcher.submit(i) for i in range(4)))
            await batcher.stop()

    asyncio.run(main())
    assert threads and all(name.startswith("worker") for name in threads)


def test_lru_cache_evicts_least_recent() -> None:
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    off = LRUCache(0)
    off.put("a", 1)
    assert off.get("a") is None and len(off) == 0


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


@pytest.mark.parametrize("batching", [True, False])
def test_app_coalesces_concurrent_requests(tiny_checkpoint: Path, batching: bool) -> None:
    """32 concurrent /embed/text and /similarity requests: same answers as one by one; batches only when on."""
    clip = CLIPInference.load(tiny_checkpoint)
    settings = Settings(checkpoint=tiny_checkpoint, batching=batching, max_batch_size=16, max_wait_ms=20,
                        text_cache_size=0)
    app = create_app(settings)
    texts = [f"a {c} {s} number {i}" for i, (c, s) in enumerate((c, s) for c in ("red", "blue") for s in ("circle", "square", "triangle", "star") for _ in range(4))]
    image = shape_image("circle", "blue")

    async def main() -> tuple[list[np.ndarray], list[dict], str]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                text_calls = [client.post("/embed/text", json={"texts": [t]}) for t in texts]
                sim_calls = [client.post("/similarity", files={"image": ("a.png", image)}, data={"texts": ["a", "b"]})
                             for _ in range(8)]
                responses = await asyncio.gather(*text_calls, *sim_calls)
                assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
                metrics = (await client.get("/metrics")).text
        emb = [np.array(r.json()["embeddings"][0], dtype=np.float32) for r in responses[: len(texts)]]
        sims = [r.json() for r in responses[len(texts):]]
        return emb, sims, metrics

    emb, sims, metrics = asyncio.run(main())
    np.testing.assert_allclose(np.stack(emb), clip.embed_texts(texts), atol=2e-5)
    expected = clip.rank_texts(image, ["a", "b"])
    for body in sims:
        assert [r["similarity"] for r in body["results"]] == pytest.approx([e["similarity"] for e in expected], abs=2e-5)
    batches = _metric(metrics, 'clipforge_batch_size_count{kind="text"}')
    rows = _metric(metrics, 'clipforge_batch_size_sum{kind="text"}')
    assert rows == len(texts) + 8 * 2
    if batching:
        assert batches < rows  # some forward passes carried several requests
        assert _metric(metrics, 'clipforge_batch_size_count{kind="image"}') < 8
    else:
        assert batches == len(texts) + 8  # one forward pass per request (each /similarity sends its 2 texts together)


def test_a_lone_request_does_not_wait_for_company() -> None:
    """With every in-flight request already queued, the batch starts at once instead of after max_wait."""

    async def main(in_flight: int) -> float:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", lambda items: items, pool, max_batch_size=8, max_wait_ms=1000,
                                   in_flight=lambda: in_flight)
            batcher.start()
            started = time.perf_counter()
            await batcher.submit(1)
            elapsed = time.perf_counter() - started
            await batcher.stop()
            return elapsed

    assert asyncio.run(main(in_flight=1)) < 0.5
    assert asyncio.run(main(in_flight=3)) >= 0.9  # others could still join: it waits for them


def test_concurrent_classify_label_prompts_share_one_text_batch(tiny_checkpoint: Path) -> None:
    """Two /classify requests with new labels: all their prompts go through one text forward pass (cached after)."""
    clip = CLIPInference.load(tiny_checkpoint)
    # a batch of exactly both requests' prompts (3 + 2 labels x 2 templates) flushes the moment it is full;
    # the 1 s window only bounds how late the second request may arrive on a slow machine
    settings = Settings(checkpoint=tiny_checkpoint, max_batch_size=10, max_wait_ms=1000)
    app = create_app(settings)
    image = shape_image("square", "red")
    label_sets = [["circle", "square", "star"], ["triangle", "red square"]]
    templates = ["a photo of a {}.", "a {} drawing"]

    async def main() -> tuple[list[dict], str, list[dict]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                calls = [client.post("/classify", files={"image": ("a.png", image)},
                                     data={"labels": labels, "templates": templates}) for labels in label_sets]
                responses = await asyncio.gather(*calls)
                assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
                metrics = (await client.get("/metrics")).text
                again = await client.post("/classify", files={"image": ("a.png", image)},
                                          data={"labels": label_sets[0], "templates": templates})
                after = (await client.get("/metrics")).text
        return [r.json() for r in responses], metrics + "\n#after\n" + after, again.json()

    bodies, metrics, again = asyncio.run(main())
    before, after = metrics.split("\n#after\n")
    assert _metric(before, 'clipforge_batch_size_count{kind="text"}') == 1
    assert _metric(before, 'clipforge_batch_size_sum{kind="text"}') == (3 + 2) * len(templates)
    assert _metric(after, 'clipforge_batch_size_count{kind="text"}') == 1  # the repeat came from the label cache
    for labels, body in zip(label_sets, [*bodies]):
        expected = {e["label"]: e for e in clip.classify(image, labels, templates)}  # unbatched
        for p in body["predictions"]:
            assert p["similarity"] == pytest.approx(expected[p["label"]]["similarity"], abs=2e-5)
            assert p["probability"] == pytest.approx(expected[p["label"]]["probability"], abs=2e-5)
    assert [p["label"] for p in again["predictions"]] == [p["label"] for p in bodies[0]["predictions"]]
