"""Bedrock's own exceptions through boto3's `bedrock-runtime` client, raised by real failures of a
second app ("bedrock-keyed": API keys, 1 request per minute per key, so each test has a key of its
own). boto3 sends a Bedrock API key from `AWS_BEARER_TOKEN_BEDROCK` as `Authorization: Bearer`, but
only over HTTPS; against this plain-HTTP test server an event hook adds it as `x-api-key` instead.
The cold-start case of ModelNotReadyException is in test_scale_to_zero.py, beside the app that
scales to zero."""

import hashlib
import secrets
import threading

import boto3
import pytest
from botocore.config import Config

from tests.e2e.variants import deploy, kill_replica_once_generating, model_args

pytestmark = pytest.mark.e2e
APP = "bedrock-keyed"
MODEL = "bedrock-keyed-demo"
MODEL_DEPLOYMENT = f"Model-{MODEL}"
KEYS = {test: f"sk-conduit-test-{secrets.token_hex(12)}" for test in ("throttled", "killed", "killed-stream")}
MESSAGES = [{"role": "user", "content": [{"text": "Hello there"}]}]
LONG = {"maxTokens": 1000, "temperature": 0}  # greedy: this prompt runs 1000 tokens (seconds), no EOS


@pytest.fixture(scope="module")
def keyed(server, model_path, tmp_path_factory):
    from ray import serve

    keys_file = tmp_path_factory.mktemp("auth") / "api_keys.sha256"
    keys_file.write_text("".join(hashlib.sha256(key.encode()).hexdigest() + "\n" for key in KEYS.values()))
    args = {"models": [model_args(model_path, MODEL, max_model_len=1024)], "auth": {"api_keys_file": str(keys_file)},
            "rate_limits": {"requests_per_minute": 1}}
    yield deploy(server, APP, args, {})
    serve.delete(APP, _blocking=False)  # an ingress takes ~30 s to drain; nothing waits on it


def bedrock_client(endpoint: str, key: str):
    # retries off: boto3 would retry ThrottlingException and ModelNotReadyException itself, hiding them
    bedrock = boto3.client("bedrock-runtime", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="unused", aws_secret_access_key="unused",
                           config=Config(retries={"total_max_attempts": 1}))
    bedrock.meta.events.register("before-sign.bedrock-runtime.*",
                                 lambda request, **_: request.headers.__setitem__("x-api-key", key))
    return bedrock


def converse(bedrock, streaming: bool) -> str:
    config = {"maxTokens": 4, "temperature": 0}
    if streaming:
        events = bedrock.converse_stream(modelId=MODEL, messages=MESSAGES, inferenceConfig=config)["stream"]
        return next(e["messageStop"]["stopReason"] for e in events if "messageStop" in e)
    return bedrock.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig=config)["stopReason"]


def test_key_over_its_rate_limit_raises_throttling_exception(keyed):
    bedrock = bedrock_client(keyed, KEYS["throttled"])
    # the limit's window is the wall-clock minute: one more call covers a minute boundary in between
    for _ in range(3):
        try:
            converse(bedrock, streaming=False)
        except bedrock.exceptions.ThrottlingException as e:
            throttled = e
            break
    else:
        pytest.fail("no ThrottlingException within 3 calls at 1 request per minute")
    assert "Rate limit reached for requests per minute (limit 1)" in str(throttled)
    assert throttled.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    # converse-stream is refused before its stream begins, so boto3 raises on the call itself
    with pytest.raises(bedrock.exceptions.ThrottlingException, match="limit 1"):
        converse(bedrock, streaming=True)


@pytest.mark.parametrize("streaming", [False, True])
def test_wrong_key_raises_access_denied(keyed, streaming):
    bedrock = bedrock_client(keyed, "sk-wrong")
    with pytest.raises(bedrock.exceptions.AccessDeniedException, match="Incorrect API key"):
        converse(bedrock, streaming)


def test_replica_lost_mid_request_raises_model_not_ready(keyed):
    bedrock = bedrock_client(keyed, KEYS["killed"])
    outcome = {}

    def call():
        try:
            outcome["response"] = bedrock.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig=LONG)
        except Exception as e:
            outcome["error"] = e

    caller = threading.Thread(target=call)
    caller.start()
    kill_replica_once_generating(APP, MODEL_DEPLOYMENT, blocks=3, within_s=30)  # 48 tokens
    caller.join(timeout=60)
    assert isinstance(outcome.get("error"), bedrock.exceptions.ModelNotReadyException), outcome
    assert "replica serving this request failed" in str(outcome["error"])


def test_replica_lost_mid_stream_is_a_service_unavailable_event(keyed):
    from botocore.exceptions import EventStreamError

    bedrock = bedrock_client(keyed, KEYS["killed-stream"])
    events = bedrock.converse_stream(modelId=MODEL, messages=MESSAGES, inferenceConfig=LONG)["stream"]
    assert next(iter(events)) == {"messageStart": {"role": "assistant"}}  # the 200 and the stream's start
    kill_replica_once_generating(APP, MODEL_DEPLOYMENT, blocks=3, within_s=30)  # 48 tokens
    with pytest.raises(EventStreamError, match="serviceUnavailableException") as raised:
        for _ in events:
            pass
    assert "replica serving this request failed" in str(raised.value)
