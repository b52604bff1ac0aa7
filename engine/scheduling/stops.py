"""Turning generated token ids into text, and cutting that text at stop strings.

``IncrementalDetokenizer`` follows the prefix/read-offset scheme of vLLM's
``detokenize_incrementally`` (vllm/transformers_utils/detokenizer_utils.py, itself from Hugging Face
text-generation-inference ``decode_token``): decode a short window of recent tokens twice, with and
without the newest ones, and emit the difference -- unless it ends in U+FFFD, which means a
multi-byte UTF-8 character is split across tokens and the next token will complete it.

``StopMatcher`` implements OpenAI ``stop`` semantics
(https://platform.openai.com/docs/api-reference/chat/create#chat-create-stop): the returned text
never contains a stop string, and generation ends at the first one found. Text that might be the
start of a stop string is held back until the following text decides it.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the first generated one, as in vLLM


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text each completes (``skip_special_tokens``).

    ``prompt_ids``: optional tail of the prompt, used only as decoding context so that tokenizers
    whose pieces depend on their left neighbour (SentencePiece leading spaces) decode the first
    generated token as they would mid-text. Its own text is never emitted.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:]
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.ids)  # text of ids[:read_offset] has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _pending(self) -> tuple[str, str]:
        """(text of the window already emitted, text of the whole window)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return prefix_text, self._decode(self.ids[self.prefix_offset :])

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly completed text (often "")."""
        self.ids.append(int(token_id))
        prefix_text, new_text = self._pending()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, replacement characters included."""
        prefix_text, new_text = self._pending()
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Cuts streamed text at the first stop string; holds back possible stop-string prefixes.

    ``push`` returns (text safe to emit now, stopped). Once stopped, the text from the stop string
    on is dropped and further pushes return ("", True). When several stop strings occur in the
    pending text the one starting earliest wins.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""
        self.stopped = False

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for n in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def push(self, text: str) -> tuple[str, bool]:
        """Add newly decoded text; return (text to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        pending = self.pending + text
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending, self.stopped = "", True
            return pending[: min(hits)], True
        held = self._held_length(pending)
        self.pending = pending[len(pending) - held :]
        return pending[: len(pending) - held], False

    def flush(self) -> str:
        """Held-back text, for when generation ends for another reason (length, EOS)."""
        text, self.pending = self.pending, ""
        return "" if self.stopped else text
