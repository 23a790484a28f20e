"""Stop strings in IncrementalDetokenizer, fed token by token by the demo model's byte-level BPE
tokenizer (characters and stop strings split across tokens), against a character-by-character
reference: the text ends where the first stop string completes (the longest, if several complete
on one character), and until then exactly the text that cannot start a stop string is released."""

import random

import pytest
from transformers import AutoTokenizer

from app.engine.detokenizer import IncrementalDetokenizer

TEXT = "The café says 😀 hi,  twice\n\nover the lazy dog; the quick brown fox jumps over the lazy cat"


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


def reference(text: str, stops: list[str]) -> tuple[str, str | None]:
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[: end - len(stop)], stop
    return text, None


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that are a proper prefix of some stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def stream(tokenizer, text: str, stops: list[str]) -> tuple[str, str | None]:
    """Feeds `text` token by token as the engine does; checks every delta against the reference."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello"), stops)
    out = ""
    for n in range(1, len(ids) + 1):
        detok.add_token(ids[n - 1])
        final = n == len(ids)
        out += detok.take_delta(final=final)
        if detok.stopped or final:
            break
        so_far = tokenizer.decode(ids[:n])
        if not so_far.endswith("\ufffd"):  # a character still incomplete is not released yet
            assert out == so_far[: len(so_far) - held_back(so_far, stops)], f"after token {n}"
        assert len(detok.pending) < max(map(len, stops), default=1), "held back more than a stop prefix"
    return out, detok.matched


def test_text_without_stops_passes_through(tokenizer):
    assert stream(tokenizer, TEXT, []) == (TEXT, None)


@pytest.mark.parametrize("stop", ["lazy dog", "😀 hi", "\n\n", "fé s", "cat"])
def test_stop_split_across_tokens_ends_the_text_before_it(tokenizer, stop):
    assert stream(tokenizer, TEXT, [stop]) == (TEXT[: TEXT.index(stop)], stop)


def test_first_stop_to_complete_wins_whatever_the_list_order(tokenizer):
    # "the lazy" completes before "lazy dog" and "over the lazy dog; the quick"
    stops = ["over the lazy dog; the quick", "lazy dog", "the lazy"]
    assert stream(tokenizer, TEXT, stops) == (TEXT[: TEXT.index("the lazy")], "the lazy")
    # of two stops completing on the same character, the longer one is cut
    assert stream(tokenizer, TEXT, ["dog", "lazy dog"]) == (TEXT[: TEXT.index("lazy dog")], "lazy dog")


def test_held_back_prefix_is_released_when_it_cannot_become_a_stop(tokenizer):
    # "the l" is a prefix of the stop string every time "the lazy" comes by, and is held back until
    # the next character rules it out; stream() checks each release
    assert stream(tokenizer, TEXT, ["the lazy cow"]) == (TEXT, None)


def test_held_back_prefix_is_released_at_the_end(tokenizer):
    assert stream(tokenizer, "over the lazy", ["lazy dog"]) == ("over the lazy", None)


def test_random_texts_match_the_reference(tokenizer):
    rng = random.Random(0)
    alphabet = "ab é😀\n"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        assert stream(tokenizer, text, stops) == reference(text, stops), (text, stops)
