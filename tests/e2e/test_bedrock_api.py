"""The Bedrock Runtime Converse API through boto3's own `bedrock-runtime` client."""

import boto3
import pytest
from botocore.config import Config

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": [{"text": "Hello there"}]}]
SYSTEM = [{"text": "Be brief."}]


@pytest.fixture
def bedrock(server):
    return boto3.client(
        "bedrock-runtime", endpoint_url=server, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="y",
        config=Config(retries={"total_max_attempts": 1}),
    )


def openai_greedy(client, max_tokens: int, stop: list[str] | None = None):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          temperature=0, stop=stop).choices[0]


def test_converse_greedy_equals_openai_route(bedrock, client):
    res = bedrock.converse(modelId=MODEL, messages=MESSAGES, system=SYSTEM,
                           inferenceConfig={"maxTokens": 12, "temperature": 0})
    expected = openai_greedy(client, 12)
    assert res["output"]["message"] == {"role": "assistant", "content": [{"text": expected.message.content}]}
    assert res["stopReason"] == ("max_tokens" if expected.finish_reason == "length" else "end_turn")
    usage = res["usage"]
    assert usage["outputTokens"] == 12 and usage["inputTokens"] > 0
    assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]
    assert res["metrics"]["latencyMs"] >= 0
    assert res["ResponseMetadata"]["RequestId"]


def test_converse_stream_events(bedrock, client):
    res = bedrock.converse_stream(modelId=MODEL, messages=MESSAGES, system=SYSTEM,
                                  inferenceConfig={"maxTokens": 12, "temperature": 0})
    events = list(res["stream"])
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "messageStart" and events[0]["messageStart"] == {"role": "assistant"}
    assert kinds[-3:] == ["contentBlockStop", "messageStop", "metadata"]
    assert set(kinds[1:-3]) == {"contentBlockDelta"}
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events[1:-3])
    assert text == openai_greedy(client, 12).message.content
    assert events[-2]["messageStop"]["stopReason"] == "max_tokens"
    usage = events[-1]["metadata"]["usage"]
    assert usage["outputTokens"] == 12 and usage["totalTokens"] == usage["inputTokens"] + 12
    assert events[-1]["metadata"]["metrics"]["latencyMs"] >= 0


@pytest.mark.parametrize("streaming", [False, True])
def test_stop_sequence(bedrock, client, streaming):
    full = openai_greedy(client, 24).message.content
    stop = full[8:11]  # some text the model is known to produce
    config = {"maxTokens": 24, "temperature": 0, "stopSequences": [stop]}
    if streaming:
        events = list(bedrock.converse_stream(modelId=MODEL, messages=MESSAGES, system=SYSTEM,
                                              inferenceConfig=config)["stream"])
        text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
        reason = next(e["messageStop"]["stopReason"] for e in events if "messageStop" in e)
    else:
        res = bedrock.converse(modelId=MODEL, messages=MESSAGES, system=SYSTEM, inferenceConfig=config)
        text, reason = res["output"]["message"]["content"][0]["text"], res["stopReason"]
    assert text == full[: full.find(stop)]
    assert reason == "stop_sequence"


@pytest.mark.parametrize("streaming", [False, True])
def test_unknown_model_raises_resource_not_found(bedrock, streaming):
    call = bedrock.converse_stream if streaming else bedrock.converse
    with pytest.raises(bedrock.exceptions.ResourceNotFoundException, match="no-such-model"):
        call(modelId="no-such-model", messages=MESSAGES)


def test_bad_parameter_raises_validation_exception(bedrock):
    with pytest.raises(bedrock.exceptions.ValidationException, match="inferenceConfig.temperature"):
        bedrock.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"temperature": 1.5})


def test_unsupported_content_raises_validation_exception(bedrock):
    messages = [{"role": "user", "content": [{"image": {"format": "png", "source": {"bytes": b"\x89PNG"}}}]}]
    with pytest.raises(bedrock.exceptions.ValidationException, match="image"):
        bedrock.converse(modelId=MODEL, messages=messages)


def test_too_many_tokens_raises_validation_exception(bedrock):
    with pytest.raises(bedrock.exceptions.ValidationException, match="maximum context length"):
        bedrock.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 100_000})
