"""Token ids to text, incrementally: safe UTF-8 deltas and stop strings, for streaming and for final texts."""

from __future__ import annotations

from typing import Any, Sequence

# Tokens of prompt context decoded along with the output, so that tokenizers which drop a leading
# space when a sequence starts (SentencePiece) decode the first new token the way the whole text would.
_CONTEXT_TOKENS = 4
_REPLACEMENT = "\ufffd"


class TextStream:
    """Turns one request's growing token ids into text deltas, stopping at the first stop string.

    Decodes only a short window of recent tokens each step (vLLM's prefix/read offsets), holds text
    back while it ends in an incomplete UTF-8 character or could be the start of a stop string, and
    cuts the text just before a stop string. The concatenated deltas are the final text, which never
    ends in a partial character."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        if self._decode(context).endswith(_REPLACEMENT):
            context = []  # a prompt cut mid-character would garble the first delta; decode without it
        self.ids: list[int] = context  # context tokens, then the generated ones
        self.prefix_offset = 0         # window start: decoded text before read_offset is already in self.text
        self.read_offset = len(context)
        self.text = ""                 # decoded text so far (complete characters only, until flushed)
        self.emitted = 0               # how many characters of self.text were handed out
        self.stopped = False           # a stop string was found; self.text ends just before it

    def _decode(self, ids: Sequence[int]) -> str:
        # Special tokens (eos, chat markers) are control, not text, as in transformers' pipelines.
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if ids else ""

    def _new_text(self, flush: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith(_REPLACEMENT) and not flush):
            return ""  # the newest token ends mid-character (or adds no text): wait for more
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that became safe to show."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        return self._advance(self._new_text(flush=False), final=False)

    def finish(self) -> str:
        """The request ended: return the text still held back, less a character its last tokens left unfinished."""
        if self.stopped:
            return ""
        tail = self._new_text(flush=True) if self.read_offset < len(self.ids) else ""
        # A request cut mid-character (by its token budget, a stop token or a full context) ends in the bytes of
        # part of one, which decode as U+FFFD: drop them rather than show a character the model never wrote.
        # (A real U+FFFD the model wrote last would go too; no tokenizer API tells the two apart.)
        return self._advance(tail.rstrip(_REPLACEMENT), final=True)

    def _advance(self, new: str, final: bool) -> str:
        self.text += new
        if self.stop:
            # A stop string cannot start before `emitted`: text that might begin one is never emitted.
            hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text) - self.emitted), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
