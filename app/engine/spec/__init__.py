"""Speculative decoding (docs/speculative-decoding.md): proposers draft tokens, the target verifies them
all in one forward, and the gate decides when drafting would not pay."""
