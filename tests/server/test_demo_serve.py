"""The main job: remix-serve on the committed demo adapter and the bundled SmolLM2-135M base (what `make serve`
runs, on a free port), asked through the official openai client."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import ROOT
from tests.helpers.server import RemixServer

pytestmark = [pytest.mark.integration, pytest.mark.engine]
DEMO = ROOT / "examples" / "demo-adapter"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    srv = RemixServer(DEMO, log=tmp_path_factory.mktemp("demo") / "server.log", dtype="bfloat16")
    try:
        srv.wait_ready()
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as c:
            yield c
    finally:
        assert srv.close() == 0


def ask(client: openai.OpenAI, question: str) -> str:
    out = client.chat.completions.create(
        model="demo-adapter", messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
    )
    return out.choices[0].message.content


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("What is 70 + 45?", "115"),
        ("Write 'pencil' in capital letters.", "PENCIL"),
        ("What is the capital of France?", "Paris"),
    ],
)
def test_demo_adapter_answers_its_trained_skills(client, question, answer):
    assert answer in ask(client, question)


def test_demo_adapter_streams(client):
    stream = client.completions.create(model="demo-adapter", prompt="The capital of France is", max_tokens=8,
                                       temperature=0, stream=True)  # fmt: skip
    assert "Paris" in "".join(chunk.choices[0].text for chunk in stream)
