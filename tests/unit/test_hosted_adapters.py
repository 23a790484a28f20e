"""TGI and Cloudflare translations that the demo model rarely reaches end to end: an EOS or a stop
sequence ending a delta, text that is not its tokens' texts joined, and the error mappings."""

import json

import pytest

from app.api.errors import ConduitError, model_not_found
from app.api.wire import cloudflare, tgi
from app.engine.engine import RequestOutput
from app.engine.logprobs import Logprob, TokenLogprobs

EOS = 0


def delta(ids, names, text, finish=None, stop_reason=None):
    logprobs = [TokenLogprobs(Logprob(i, n, -1.0)) for i, n in zip(ids, names)]
    return RequestOutput("r", token_ids=list(ids), text=text, finished=finish is not None, finish_reason=finish,
                         stop_reason=stop_reason, num_prompt_tokens=3, num_output_tokens=5, logprobs=logprobs)


def texts(tokens):
    return [token["text"] for token, _ in tokens]


def test_each_token_gets_its_own_text_when_they_join_to_the_delta():
    out = delta([5, 6], ["ab", "c"], "abc")
    assert texts(tgi.delta_tokens(out, tgi.delta_text(out))) == ["ab", "c"]


def test_split_character_puts_the_delta_text_on_the_last_token():
    out = delta([5, 6], ["\ufffd", "\ufffd"], "é")
    assert texts(tgi.delta_tokens(out, tgi.delta_text(out))) == ["", "é"]


def test_eos_is_special_and_carries_no_text():
    out = delta([5, EOS], ["ab", "</s>"], "ab", finish="stop")
    tokens = tgi.delta_tokens(out, tgi.delta_text(out))
    assert texts(tokens) == ["ab", ""]
    assert [token["special"] for token, _ in tokens] == [False, True]
    assert tgi.finish_reason(out) == "eos_token"


def test_stop_sequence_is_kept_in_the_text():
    out = delta([5, 6], ["ab", "c."], "abc", finish="stop", stop_reason=".")
    text = tgi.delta_text(out)
    assert text == "abc." and tgi.finish_reason(out) == "stop_sequence"
    assert "".join(texts(tgi.delta_tokens(out, text))) == "abc."


def test_tgi_sampling_follows_tgi():
    assert tgi.Parameters().sampling(stream=False).temperature == 0.0  # greedy by default
    warped = tgi.Parameters(top_k=5).sampling(stream=False)
    assert warped.temperature == 1.0 and warped.seed is not None  # a warper means sampling, seeded
    assert tgi.Parameters(do_sample=True, seed=3).sampling(stream=True).seed == 3
    with pytest.raises(ValueError, match="typical_p"):
        tgi.Parameters(typical_p=0.5)


@pytest.mark.parametrize("err, status, kind", [
    (ConduitError("bad", 400), 422, "validation"),
    (model_not_found("x"), 404, "validation"),
    (ConduitError("busy", 503, "server_error"), 429, "overloaded"),
    (ConduitError("boom", 500, "server_error"), 424, "generation"),
])
def test_tgi_error_shape(err, status, kind):
    response = tgi.error_response(err)
    assert response.status_code == status
    assert json.loads(response.body) == {"error": err.message, "error_type": kind}


@pytest.mark.parametrize("err, status, code", [
    (model_not_found("x"), 400, 5007),  # Workers AI answers an unknown model with a 400
    (ConduitError("bad", 400), 400, 5006),
    (ConduitError("busy", 503, "server_error"), 503, 3040),
])
def test_cloudflare_error_envelope(err, status, code):
    response = cloudflare.error_response(err)
    assert response.status_code == status
    assert json.loads(response.body) == {"result": None, "success": False, "messages": [],
                                         "errors": [{"code": code, "message": err.message}]}


def test_cloudflare_model_names():
    assert cloudflare.model_id("@cf/conduit-demo") == "conduit-demo"
    assert cloudflare.model_id("@hf/org/model") == "org/model"
    assert cloudflare.model_id("demo") == "demo"
