"""ingress.input_limits: configured caps apply, each error names its field; the surrogate check."""

import pytest

from app.api.errors import ConduitError
from app.api.input_limits import cap_max_tokens, check_embedding_inputs, check_generate, surrogate_error
from app.api.protocol import GenerateRequest, ToolSpec
from app.config import parse_app_config
from app.engine.sampling_params import SamplingParams

LIMITS = parse_app_config({
    "models": [{"name": "m", "source": "x"}],
    "ingress": {"input_limits": {"max_messages": 2, "max_n": 2, "max_tokens": 10, "max_stop_sequences": 1,
                                 "max_stop_length": 3, "max_top_logprobs": 2, "max_tools": 1,
                                 "max_embedding_inputs": 3}},
}).ingress.input_limits


def request(messages=1, n=1, tools=0, **sampling) -> GenerateRequest:
    sampling.setdefault("max_tokens", 4)
    return GenerateRequest("r", "m", SamplingParams(**sampling), messages=[{"role": "user", "content": "hi"}] * messages,
                           n=n, tools=[ToolSpec(f"f{i}") for i in range(tools)])


@pytest.mark.parametrize(
    "req,param",
    [
        (request(messages=3), "messages"),
        (request(n=3), "n"),
        (request(stop=["a", "b"]), "stop"),
        (request(stop=["abcd"]), "stop"),
        (request(stop=[""]), "stop"),
        (request(logprobs=3), "top_logprobs"),
        (request(prompt_logprobs=3), "top_logprobs"),
        (request(tools=2), "tools"),
    ],
)
def test_each_cap_names_its_field(req, param):
    with pytest.raises(ConduitError) as e:
        check_generate(req, LIMITS)
    assert e.value.status == 400 and e.value.param == param


def test_within_the_caps_passes():
    check_generate(request(messages=2, n=2, max_tokens=10, stop=["abc"], logprobs=2, tools=1), LIMITS)


def test_max_tokens_given_past_the_cap_is_refused_and_unset_is_lowered():
    given = request(max_tokens=11)
    with pytest.raises(ConduitError) as e:
        cap_max_tokens(given, given.sampling, LIMITS)
    assert e.value.param == "max_tokens"
    unset = request(max_tokens=10**6)  # what the tokenizer fills in: the rest of the context window
    unset.max_tokens_given = False
    cap_max_tokens(unset, unset.sampling, LIMITS)
    assert unset.sampling.max_tokens == 10


def test_completions_name_logprobs():
    req = GenerateRequest("r", "m", SamplingParams(max_tokens=4, logprobs=3), prompt="hi")
    with pytest.raises(ConduitError) as e:
        check_generate(req, LIMITS)
    assert e.value.param == "logprobs"


def test_embedding_inputs():
    check_embedding_inputs(3, LIMITS)
    with pytest.raises(ConduitError, match="at most 3"):
        check_embedding_inputs(4, LIMITS)


@pytest.mark.parametrize(
    "body,refused",
    [
        (b'{"prompt": "\\ud800"}', True),
        (b'{"prompt": "\\uDFFF x"}', True),
        (b'{"prompt": "\\ud83d\\ude00"}', False),  # a pair: one emoji
        (b'{"prompt": "\\\\ud800"}', False),  # an escaped backslash, then plain text
        (b'{"prompt": "\\ud800', False),  # not JSON: left to the route's parser
        (b'{"prompt": "plain"}', False),
    ],
)
def test_surrogate_error(body, refused):
    assert (surrogate_error(body) is not None) == refused
