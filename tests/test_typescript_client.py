"""The TypeScript client (clients/typescript): its generated types are the served OpenAPI document's,
and its tests (node's test runner) pass against a live server. `make test` installs its packages
with `npm ci`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.harness import neuroserve
from service.api.app import create_app
from service.config import Settings
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
CLIENT = ROOT / "clients" / "typescript"
if shutil.which("node") is None or not (CLIENT / "node_modules" / "openapi-typescript").is_dir():
    pytest.skip("node or the client's packages are missing (make test runs npm ci)", allow_module_level=True)


def test_the_committed_types_are_the_served_openapi_documents(tmp_path: Path) -> None:
    document = tmp_path / "openapi.json"
    document.write_text(json.dumps(create_app(Settings(repository=ROOT / "models")).openapi()))
    generated = tmp_path / "schema.d.ts"
    subprocess.run(
        ["node", "node_modules/openapi-typescript/bin/cli.js", str(document), "-o", str(generated)],
        cwd=CLIENT,
        check=True,
        capture_output=True,
    )
    committed = (CLIENT / "src" / "schema.d.ts").read_text()
    assert generated.read_text() == committed, (
        "clients/typescript/src/schema.d.ts is not the served OpenAPI document's types: regenerate it "
        "(cd clients/typescript && NEUROSERVE_URL=http://127.0.0.1:8000 npm run generate)"
    )


def test_the_types_compile_for_a_node_esm_project(tmp_path: Path) -> None:
    """Under "module": "nodenext" a relative import needs its extension: "./schema" broke every
    project of that kind (TS2834)."""
    config = {
        "compilerOptions": {"module": "nodenext", "moduleResolution": "nodenext", "strict": True, "noEmit": True},
        "files": [str(CLIENT / "src" / "index.d.ts")],
    }
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    tsc = CLIENT / "node_modules" / "typescript" / "bin" / "tsc"
    result = subprocess.run(["node", str(tsc), "-p", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]


def test_answers_of_routes_that_also_send_images_or_events_are_typed_as_their_json(tmp_path: Path) -> None:
    """/v1/image-generation and /v1/object-detection can answer image/png and /v1/completions
    text/event-stream beside JSON: openapi-fetch typed their data as the union ({} or string), so
    `data.images` did not compile (TS2339). The client takes the JSON answers' types."""
    usage = tmp_path / "usage.ts"
    usage.write_text(
        f'import {{ createNeuroserve }} from "{CLIENT / "src" / "index.js"}";\n'
        'const api = createNeuroserve("http://127.0.0.1:8000");\n'
        "export async function use(): Promise<number> {\n"
        '  const gen = await api.POST("/v1/image-generation", { body: { digits: "42" } });\n'
        '  const det = await api.POST("/v1/object-detection", { body: { images: ["iVBORw0KGgo="] } });\n'
        '  const comp = await api.POST("/v1/completions", { body: { model: "text-generator", prompt: "Hi" } });\n'
        "  return (gen.data?.images.length ?? 0) + (det.data?.images.length ?? 0) + (comp.data?.choices.length ?? 0);\n"
        "}\n"
    )
    config = {
        "compilerOptions": {"module": "nodenext", "moduleResolution": "nodenext", "strict": True, "noEmit": True},
        "files": [str(usage)],
    }
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    tsc = CLIENT / "node_modules" / "typescript" / "bin" / "tsc"
    result = subprocess.run(["node", str(tsc), "-p", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]


def test_the_client_passes_its_tests_against_a_live_server() -> None:
    with neuroserve(ROOT / "models") as server:
        result = subprocess.run(
            ["node", "--test", "test/"],
            cwd=CLIENT,
            env={**os.environ, "NEUROSERVE_URL": server.url("")},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "# pass 8" in result.stdout and "# fail 0" in result.stdout
