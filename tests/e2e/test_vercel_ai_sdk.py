"""The Vercel AI SDK (`ai` 6 + `@ai-sdk/openai-compatible`) against the running server: the Node
script tests/node/vercel_ai_sdk.mjs checks generateText, streamText (usage, finish reason) and an
error; here its text is compared with the openai SDK's. Without npm this test fails, not skips."""

import json
import os
import shutil
import subprocess

import pytest

from app.config import PROJECT_ROOT
from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e
NODE_DIR = PROJECT_ROOT / "tests" / "node"


@pytest.fixture(scope="session")
def node_project():
    npm = shutil.which("npm")
    assert npm, "npm not found: the Vercel AI SDK test needs Node.js >= 20 with npm"
    installed = NODE_DIR / "node_modules" / ".package-lock.json"  # npm writes it on every install
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    return NODE_DIR


def test_generate_and_stream_text(node_project, server, client):
    env = {**os.environ, "CONDUIT_URL": server, "CONDUIT_MODEL": MODEL}
    run = subprocess.run(["node", "vercel_ai_sdk.mjs", "chat"], cwd=node_project, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"node script failed:\n{run.stdout}\n{run.stderr}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expected = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert result["generated"] == result["streamed"] == expected.choices[0].message.content
    assert result["usage"]["inputTokens"] == expected.usage.prompt_tokens
