"""Speculative decoding through the endpoint (issue 20): the shared app's second model decodes with
n-gram speculation. Greedy output, streamed or not, eight requests of different lengths at once,
equals transformers' plain `generate`, and the replica really drafted and accepted tokens."""

from concurrent.futures import ThreadPoolExecutor

from tests.e2e.conftest import SECOND_MODEL
from tests.e2e.variants import call_deployment

PROMPTS = ["alpha beta gamma", "the quick brown fox", "one two one two one", "def f(x): return x"]


def spec_counters():
    return call_deployment("conduit", f"Model-{SECOND_MODEL}", "stats")["spec"]


def test_greedy_with_speculation_equals_plain_generate(client, hf_model, reference_greedy):
    _, tokenizer = hf_model
    before = spec_counters()

    def ask(i: int) -> tuple[str, int, int, str]:
        prompt, max_tokens = PROMPTS[i % len(PROMPTS)], 24 + 8 * (i % 3)  # sequences leave at different steps
        kwargs = dict(model=SECOND_MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                      extra_body={"min_tokens": max_tokens})
        if i % 2:
            chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
            text, used = "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage
        else:
            res = client.completions.create(**kwargs)
            text, used = res.choices[0].text, res.usage
        expected = tokenizer.decode(reference_greedy(tokenizer.encode(prompt), max_tokens), skip_special_tokens=True)
        return text, used.completion_tokens, max_tokens, expected

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    for text, completion_tokens, max_tokens, expected in results:
        assert (text, completion_tokens) == (expected, max_tokens)
    after = spec_counters()
    drafted = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    assert after.num_drafts > before.num_drafts and drafted > 0, (before, after)
    assert accepted > 0, (before, after)  # the demo model repeats itself, so n-gram drafts do get accepted
    print(f"speculation: {after.num_drafts - before.num_drafts} drafts, {accepted}/{drafted} draft tokens accepted")
