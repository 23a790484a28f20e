"""Incremental detokenization and stop strings.

Decoding the whole output each step is quadratic and a byte-level BPE token may end mid-character,
so text is released the way vLLM does it: decode a short window and emit only what is stable.
Text that could still grow into a stop string is held back until it cannot."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = list(prompt_ids[-6:])  # context so the first token decodes as it would mid-text
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all stable output text so far (stop string excluded)
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add_token(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        self._check_stop()

    def _check_stop(self) -> None:
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped, self.matched = True, s
                return

    def _held_back(self) -> int:
        """Chars at the end of the text that are a proper prefix of some stop string."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:n]):
                    held = n
                    break
        return held

    def take_delta(self, final: bool) -> str:
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._held_back()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta
