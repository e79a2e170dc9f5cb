"""Detokenizer tests on a byte-level BPE trained here, so they run offline in a second."""

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxpaged.detokenizer import IncrementalDetokenizer, convert_ids_list_to_tokens
from jaxpaged.sampling_params import SamplingParams

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "The end is near. Stop here please! 日本語 is spoken in Japan.",
    "café, naïve, and résumé are borrowed words.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def run(tok, text: str, prompt: str = "Prompt:", one_by_one: bool = True, **kw) -> IncrementalDetokenizer:
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), **kw)
    ids = tok.encode(text)
    for chunk in ([i] for i in ids) if one_by_one else [ids]:
        if detok.update(chunk) is not None:
            break
    return detok


@pytest.mark.parametrize("text", ["Hello world", " 日本語 and 🙂 emoji", "résumé\nnaïve!", "a  b   c", ""])
def test_matches_full_decode(tokenizer, text: str) -> None:
    detok = run(tokenizer, text)
    assert detok.output_text == text == tokenizer.decode(tokenizer.encode(text))
    assert detok.stop_reason is None and detok.output_token_ids == tokenizer.encode(text)


def test_multibyte_character_split_across_byte_tokens(tokenizer) -> None:
    ids = tokenizer.encode("ok🙂")  # the emoji is four byte tokens: not in the corpus
    assert len(ids) >= 4 and all("\ufffd" in tokenizer.decode([i]) for i in ids[-4:])
    detok = IncrementalDetokenizer(tokenizer, [])
    seen = []
    for i in ids:
        detok.update([i])
        seen.append(detok.output_text)
        assert "\ufffd" not in detok.output_text
        assert "\ufffd" not in detok.get_next_output_text(finished=False, delta=True)
    assert seen[-4:] == ["ok", "ok", "ok", "ok🙂"]


def test_stop_string_spanning_tokens(tokenizer) -> None:
    pieces = convert_ids_list_to_tokens(tokenizer, tokenizer.encode("Hello world"))
    assert not any("lo wo" in piece for piece in pieces), pieces
    detok = run(tokenizer, "Hello world, the fox", stop=["lo wo"])
    assert detok.stop_reason == "lo wo" and detok.output_text == "Hel"
    assert tokenizer.decode(detok.output_token_ids) == "Hello wor"  # the token completing the stop ends it
    detok = run(tokenizer, "Hello world, the fox", stop=["lo wo"], include_stop_str_in_output=True)
    assert detok.output_text == "Hello wo"


def test_text_after_stop_and_later_tokens_dropped(tokenizer) -> None:
    detok = run(tokenizer, "The end is near. Stop here", one_by_one=False, stop=["is"])
    assert detok.stop_reason == "is" and detok.output_text == "The end "
    assert tokenizer.decode(detok.output_token_ids).startswith("The end is")
    assert len(detok.output_token_ids) < len(tokenizer.encode("The end is near. Stop here"))
    with pytest.raises(ValueError, match="update"):
        detok.update([1])


def test_first_completed_stop_wins(tokenizer) -> None:
    detok = run(tokenizer, "the lazy dog", one_by_one=False, stop=["dog", "the lazy", "y d"])
    assert detok.stop_reason == "the lazy" and detok.output_text == ""
    # Inside one token (" wor"): "wo" completes before "lo wor", though it starts later.
    detok = run(tokenizer, "Hello world", stop=["lo wor", "wo"])
    assert detok.stop_reason == "wo" and detok.output_text == "Hello "


def test_min_tokens_defers_stop_strings(tokenizer) -> None:
    ids = tokenizer.encode("the lazy dog, the lazy dog")
    first = len(tokenizer.encode("the lazy dog"))
    detok = IncrementalDetokenizer(tokenizer, [], stop=["lazy"], min_tokens=first)
    assert detok.update(ids) == "lazy"
    assert detok.output_text == "the lazy dog, the "


def test_stop_terminated_token_text_left_out(tokenizer) -> None:
    ids = tokenizer.encode("Hello world")  # the last token, "ld", plays a stop token id
    for include, expected in ((False, "Hello wor"), (True, "Hello world")):
        detok = IncrementalDetokenizer(tokenizer, [], include_stop_str_in_output=include)
        assert detok.update(ids[:-2]) is None
        assert detok.update(ids[-2:], stop_terminated=True) is None
        assert detok.output_text == expected and detok.output_token_ids == ids


def test_streaming_holds_back_partial_stop(tokenizer) -> None:
    text, stop = "Stop here please! Stop", "please!!"
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    streamed = ""
    for i in tokenizer.encode(text):
        detok.update([i])
        streamed += detok.get_next_output_text(finished=False, delta=True)
        assert detok.output_text.startswith(streamed)
        assert len(streamed) <= max(len(detok.output_text) - (len(stop) - 1), 0)
    assert "please!" not in streamed
    assert detok.get_next_output_text(finished=False, delta=False) == streamed
    streamed += detok.get_next_output_text(finished=True, delta=True)
    assert streamed == text == detok.get_next_output_text(finished=True, delta=False)


def test_skip_special_tokens(tokenizer) -> None:
    ids = tokenizer.encode("Hello") + [tokenizer.eos_token_id] + tokenizer.encode(" world")
    for skip, expected in ((True, "Hello world"), (False, "Hello<|endoftext|> world")):
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
        for i in ids:
            detok.update([i])
        assert detok.output_text == expected


def test_from_sampling_params(tokenizer) -> None:
    params = SamplingParams(stop=["ab", "abcd"], skip_special_tokens=False, min_tokens=2)
    detok = IncrementalDetokenizer.from_sampling_params(tokenizer, [1, 2], params)
    assert detok.stop == ["ab", "abcd"] and detok.stop_buffer_length == params.output_text_buffer_length == 3
    assert not detok.skip_special_tokens and detok.min_tokens == 2


def test_decodes_a_bounded_window_per_token(tokenizer) -> None:
    """Work per token must not grow with the output length (no full re-decode)."""
    longest = 0
    original = tokenizer.convert_tokens_to_string

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def convert_tokens_to_string(self, tokens):
            nonlocal longest
            longest = max(longest, len(tokens))
            return original(tokens)

    detok = IncrementalDetokenizer(Counting(), tokenizer.encode(" ".join(CORPUS)), fast=False)
    ids = tokenizer.encode(" ".join(CORPUS * 5))
    for i in ids:
        detok.update([i])
    assert detok.output_text == " ".join(CORPUS * 5)
    assert len(ids) > 100 and longest <= 12


def test_convert_ids_list_to_tokens(tokenizer) -> None:
    ids = tokenizer.encode("Hello 🙂")
    pieces = convert_ids_list_to_tokens(tokenizer, ids)
    assert "".join(pieces[:-4]) == "Hello " and pieces[-4:] == ["\ufffd"] * 4


def reference(tok, ids: list[int], stop: list[str], include: bool) -> str:
    """Full re-decode after every token: the first step whose text shows a stop string ends it."""
    text = ""
    for k in range(1, len(ids) + 1):
        new = tok.decode(ids[:k])
        if new.endswith("\ufffd") or len(new) <= len(text):
            continue
        start = len(text)
        hits = [(new.find(s, max(start - len(s) + 1, 0)), n, s) for n, s in enumerate(stop)]
        hits = [(index + len(s), n, index, s) for index, n, s in hits if index != -1]
        if hits:
            _, _, index, s = min(hits)  # first to complete, then first listed
            return new[: index + len(s)] if include else new[:index]
        text = new
    return text


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="ab c.日本語é🙂\n", max_size=30),
    stop=st.lists(st.text(alphabet="ab c.日本é🙂", min_size=1, max_size=3), max_size=3),
    include=st.booleans(),
)
def test_matches_reference_property(tokenizer, text: str, stop: list[str], include: bool) -> None:
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=stop, include_stop_str_in_output=include)
    for i in ids:
        if detok.update([i]) is not None:
            break
    assert detok.output_text == reference(tokenizer, ids, stop, include)
    assert detok.get_next_output_text(finished=True, delta=False) == detok.output_text


def test_host_only() -> None:
    code = "import sys, jaxpaged.detokenizer; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def fast_and_slow(tok, prompt: list[int], ids: list[int], skip: bool) -> tuple[str, str]:
    texts = []
    for fast in (None, False):  # None: the fast path unless the prompt ends mid-character
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip, fast=fast)
        for i in ids:
            detok.update([i])
        texts.append(detok.output_text)
    return texts[0], texts[1]


@settings(max_examples=400, deadline=None)
@given(prompt=st.lists(st.integers(0, 319), max_size=8), ids=st.lists(st.integers(0, 319), max_size=40),
       skip=st.booleans())
def test_fast_path_matches_the_python_one_on_any_ids(tokenizer, prompt, ids, skip) -> None:
    """Arbitrary ids (lone UTF-8 bytes, the special token, any prompt context): the Rust
    DecodeStream path and the Python offsets path give the same text."""
    fast, slow = fast_and_slow(tokenizer, prompt, ids, skip)
    assert fast == slow


def test_fast_path_matches_on_smollm2s_tokenizer(smollm2) -> None:
    import random

    tok, rng = smollm2.tokenizer, random.Random(0)
    assert IncrementalDetokenizer(tok, [1, 2])._stream is not None  # the default takes it
    for _ in range(20):
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 10))]
        ids = [rng.randrange(len(tok)) for _ in range(60)] + [2, 0, 1]  # specials too
        for skip in (True, False):
            fast, slow = fast_and_slow(tok, prompt, ids, skip)
            assert fast == slow


def test_fast_needs_a_fast_tokenizer(tokenizer) -> None:
    class Slow:
        def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
            return tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

        def convert_tokens_to_string(self, tokens):
            return tokenizer.convert_tokens_to_string(tokens)

    assert IncrementalDetokenizer(Slow(), [1])._stream is None
    with pytest.raises(ValueError, match="fast=True needs"):
        IncrementalDetokenizer(Slow(), [1], fast=True)
