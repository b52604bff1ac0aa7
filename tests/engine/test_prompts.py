"""Prompt tokenization with remembered prefixes gives exactly the tokenizer's own answer."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.model.loader import load_tokenizer
from engine.prompts import PromptEncoder


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, EngineConfig().cache_dir)


def test_growing_conversation_tokenizes_like_the_tokenizer(tokenizer):
    encoder = PromptEncoder(tokenizer)
    assert encoder.enabled
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in range(6):
        messages.append({"role": "user", "content": f"Question {turn}: what about ünïcödé, emoji 🚀 and  spaces?"})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False)
        messages.append({"role": "assistant", "content": f" Answer {turn}\n\twith tabs"})
    assert len(encoder.prefixes) >= 6


def test_edited_history_and_plain_text(tokenizer):
    encoder = PromptEncoder(tokenizer, capacity=2)
    for text in ["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
                 "<|im_start|>user\nhellO<|im_end|>\n<|im_start|>assistant\n",  # diverges inside a cached prefix
                 "no special tokens at all",
                 "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n<|im_start|>user\nx"]:
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False)
    assert len(encoder.prefixes) <= 2


def test_a_tokenizer_that_does_not_split_cleanly_is_not_cached():
    class Glued:
        all_special_tokens = ["<s>"]

        def encode(self, text, add_special_tokens=False):
            return [len(text)]  # one token for any text: pieces never add up

    encoder = PromptEncoder(Glued())
    assert not encoder.enabled
    assert encoder.encode("a<s>b") == [5]


def test_concurrent_encodes_from_many_threads(tokenizer):
    """The server renders chat prompts in a thread pool: encodes running at once must neither fail (the
    prefix table was once iterated while another thread inserted: "OrderedDict mutated during iteration",
    a 500 under load) nor mix up their tokens."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    encoder = PromptEncoder(tokenizer, capacity=8)
    texts = [f"<|im_start|>system\nS{i % 3}<|im_end|>\n<|im_start|>user\nq{i} " + "word " * (i % 7) + "<|im_end|>\n"
             "<|im_start|>assistant\n" for i in range(40)]
    want = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        with ThreadPoolExecutor(8) as pool:
            for _ in range(5):
                assert list(pool.map(encoder.encode, texts * 4)) == want * 4
    finally:
        sys.setswitchinterval(interval)
