"""Incremental detokenization and stop strings.

Decoding the whole output each step is quadratic and a byte-level BPE token may end mid-character,
so text is released the way vLLM does it: decode a short window and emit only what is stable.
Text that could still grow into a stop string is held back until it cannot.

Stop strings are matched character by character (Knuth-Morris-Pratt), so a token's cost is its own
text times the number of stop strings, whatever the output's length, and the result does not depend
on where token boundaries fall: the text ends where the first stop string completes (of several
completing on the same character, the longest), and everything from that stop string on is dropped."""

from __future__ import annotations


class _StopString:
    """One stop string and `matched`: how many of its first characters the text now ends with."""

    def __init__(self, text: str):
        self.text = text
        self.matched = 0
        # fallback[k]: the length of the longest proper prefix of text[:k + 1] that is also its suffix
        self.fallback = [0] * len(text)
        k = 0
        for i in range(1, len(text)):
            while k and text[i] != text[k]:
                k = self.fallback[k - 1]
            if text[i] == text[k]:
                k += 1
            self.fallback[i] = k

    def feed(self, char: str) -> bool:
        """Advance by one character of output; True when the stop string is complete."""
        k, text = self.matched, self.text
        while k and text[k] != char:
            k = self.fallback[k - 1]
        if text[k] == char:
            k += 1
        self.matched = k
        return k == len(text)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.stops = [_StopString(s) for s in dict.fromkeys(s for s in stop if s)]
        self.ids: list[int] = list(prompt_ids[-6:])  # context so the first token decodes as it would mid-text
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.pending = ""  # stable text not yet handed out: the held-back tail, then the new text
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add_token(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._append(full[len(prefix) :])
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def _append(self, new: str) -> None:
        start = len(self.pending)
        self.pending += new
        for i, char in enumerate(new):
            done = [s.text for s in self.stops if s.feed(char)]
            if done:
                # a stop string's earlier characters were held back, so it lies within `pending`
                self.matched = max(done, key=len)
                self.pending = self.pending[: start + i + 1 - len(self.matched)]
                self.stopped = True
                return

    def take_delta(self, final: bool) -> str:
        held = 0 if (final or self.stopped) else max((s.matched for s in self.stops), default=0)
        delta = self.pending[: len(self.pending) - held]
        self.pending = self.pending[len(delta) :]
        return delta
