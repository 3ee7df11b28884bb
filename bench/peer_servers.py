"""The peer benchmark's servers: clipforge, infinity and clip-retrieval's back end on loopback.

Each runs from its own environment (the peers from bench/peer_venvs.sh's .cache/peers), with the
same OpenMP/MKL thread count and the hub switched off, so nothing is fetched at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from peer_load import INDEX_NAME, SERVED_NAME
from peer_weights import ROOT
from service_bench import free_port

CACHE = ROOT / ".cache" / "peer_bench"
PEERS = ROOT / ".cache" / "peers"
# clip-retrieval's back end hard-codes app.run(host="0.0.0.0"); this launcher keeps it on loopback.
CLIP_BACK_LAUNCHER = (
    "import sys, flask, fire\n"
    "run = flask.Flask.run\n"
    "flask.Flask.run = lambda self, host=None, port=None, **kw: run(self, host='127.0.0.1', port=port, **kw)\n"
    "from clip_retrieval.clip_back import clip_back\n"
    "sys.argv = ['clip_back', *sys.argv[1:]]\n"
    "fire.Fire(clip_back)\n"
)


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path
    version: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(CACHE / "hf-home")}


def _tree(pid: int) -> list[int]:
    """pid and its descendants."""
    out, todo = [], [pid]
    while todo and len(out) < 256:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return out


def reset_peak_rss(pid: int) -> None:
    """Writing 5 to clear_refs resets VmHWM, so each row reports its own peak."""
    for p in _tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass


def peak_rss_mib(pid: int) -> float:
    """Sum of VmHWM over the server's processes, MiB."""
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def last_error_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["(no output)"])[-1][:400]


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=30)


def wait_ready(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited (rc {server.proc.returncode}): {last_error_line(server.log)}")
        try:
            with urllib.request.urlopen(f"http://{server.host}{path}", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    stop(server)
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f}s: {last_error_line(server.log)}")


def venv_python(peer: str) -> Path:
    """The peer's interpreter, or the reason it has none (bench/peer_venvs.sh's UNAVAILABLE line)."""
    python = PEERS / peer / "bin" / "python"
    if not (PEERS / peer / ".installed").is_file():
        reason = (PEERS / peer / "UNAVAILABLE").read_text().strip() if (PEERS / peer / "UNAVAILABLE").is_file() \
            else f"no environment at {PEERS / peer} (run bash bench/peer_venvs.sh)"
        raise RuntimeError(f"{peer}: cannot be installed here: {reason}")
    return python


def package_version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m, torch; print(m.version('{dist}'), torch.__version__)"
    out = subprocess.run([str(python), "-c", code], check=False, capture_output=True, text=True, timeout=120)
    return out.stdout.strip().replace(" ", ", torch ")


def _launch(name: str, cmd: list[str], *, cwd: Path, work: Path, threads: int) -> Server:
    log = work / f"{name}.log"
    proc = subprocess.Popen(cmd, cwd=cwd, env=thread_env(threads), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Server(name, int(cmd[cmd.index("--port") + 1]), proc, log)


def clipforge_name(precision: str = "fp32") -> str:
    """The bench's name of the clipforge server (and index build) of that precision."""
    return "clipforge" if precision == "fp32" else f"clipforge-{precision}"


def start_clipforge(
    ckpt: Path, index: Path, work: Path, args: argparse.Namespace, *, onnx: Path | None = None, precision: str = "fp32",
) -> Server:
    """clipforge serve; with `onnx` (its own export of the checkpoint) the forward passes run in onnxruntime."""
    cmd = [sys.executable, "-m", "clipforge_cli", "serve", "--checkpoint", str(ckpt), "--index", str(index),
           "--host", "127.0.0.1", "--port", str(free_port()), "--threads", str(args.threads),
           "--max-batch-size", str(args.max_batch_size), "--log-level", "warning"]
    if onnx is not None:
        cmd += ["--onnx", str(onnx)]
    if precision != "fp32":
        cmd += ["--precision", precision]
    name = "clipforge-onnx" if onnx else clipforge_name(precision)
    server = _launch(name, cmd, cwd=ROOT, work=work, threads=args.threads)
    wait_ready(server, "/readyz", args.start_timeout)
    import torch

    server.version = f"clipforge (this checkout), torch {torch.__version__}"
    if onnx is not None:
        import onnxruntime

        server.version += f", onnxruntime {onnxruntime.__version__}"
    server.extra["command"] = "clipforge " + " ".join(cmd[3:])
    return server


def start_infinity(hf: Path, work: Path, args: argparse.Namespace, *, dtype: str = "float32") -> Server:
    """infinity_emb v2 on the CPU; dtype int8 is its dynamic quantisation (it applies bfloat16 only on CUDA)."""
    python = venv_python("infinity")
    cmd = [str(python.parent / "infinity_emb"), "v2", "--model-id", str(hf), "--served-model-name", SERVED_NAME,
           "--host", "127.0.0.1", "--port", str(free_port()), "--engine", "torch", "--device", "cpu",
           "--batch-size", str(args.max_batch_size), "--no-bettertransformer", "--no-vector-disk-cache",
           "--dtype", dtype, "--log-level", "warning"]
    server = _launch("infinity" if dtype == "float32" else f"infinity-{dtype}", cmd, cwd=work, work=work, threads=args.threads)
    wait_ready(server, "/health", args.start_timeout)
    server.version = "infinity_emb " + package_version(python, "infinity_emb")
    server.extra["command"] = "infinity_emb " + " ".join(cmd[1:])
    return server


def start_clip_back(hf: Path, cr_index: Path, work: Path, args: argparse.Namespace) -> Server:
    """clip-retrieval's back end over its own index; results carry ids and scores only, its lightest
    answer: with no columns it skips re-encoding every hit's image as base64. That takes its hdf5
    metadata provider (enable_hdf5): the default parquet one fails every query on an empty column
    list (IndexError in ParquetMetadataProvider.get, a 500), while hdf5 answers empty records."""
    python = venv_python("clip-retrieval")
    indices = work / "indices_paths.json"
    indices.write_text(json.dumps({INDEX_NAME: {
        "indice_folder": str(cr_index), "clip_model": f"hf_clip:{hf}", "enable_mclip_option": False,
        "provide_safety_model": False, "provide_violence_detector": False, "provide_aesthetic_embeddings": False,
        "use_jit": False, "enable_hdf5": True, "columns_to_return": []}}))
    cmd = [str(python), "-c", CLIP_BACK_LAUNCHER, "--indices_paths", str(indices), "--port", str(free_port()),
           "--clip_model", f"hf_clip:{hf}", "--enable_mclip_option", "False", "--use_jit", "False",
           "--provide_aesthetic_embeddings", "False", "--enable_hdf5", "True", "--columns_to_return", "[]"]
    server = _launch("clip-retrieval", cmd, cwd=work, work=work, threads=args.threads)
    wait_ready(server, "/indices-list", args.start_timeout)
    server.version = "clip_retrieval " + package_version(python, "clip_retrieval")
    server.extra["command"] = "clip-retrieval back " + " ".join(cmd[3:]) + " (bound to 127.0.0.1 by a launcher)"
    return server
