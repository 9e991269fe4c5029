"""The tokenizer of a GGUF file: byte-level BPE built from its metadata, as llama.cpp does.

:meth:`Tokenizer.from_gguf_metadata` reads the ``tokenizer.ggml.*`` keys of a GGUF file
(the vocabulary, the merges, the token types, the special ids, the pre-tokenizer name and
the chat template) and builds a HuggingFace ``tokenizers`` BPE model whose ids are
llama.cpp's: the text is split by the regexes llama.cpp's ``llama-vocab.cpp`` uses for
the file's ``tokenizer.ggml.pre`` value (:data:`PRE_TOKENIZERS` lists the supported
ones), the pieces are mapped to GPT-2's byte alphabet and merged by rank. The tests
compare the ids with llama.cpp's own tokenizer on varied texts.

Token types follow llama.cpp: control (3) and unknown (2) tokens are the *special* ones:
matched whole in text only with ``parse_special=True`` and dropped by
``decode(skip_special=True)``; user-defined (4) tokens are always matched whole and always
decoded; byte tokens (6, ``<0x0A>``) decode to their byte. Tokens llama.cpp treats as
control by name (``<|im_end|>``, ``<|eot_id|>``, the FIM tokens ...) are control here too.

Decoding concatenates each token's bytes and decodes UTF-8 once (invalid bytes become
U+FFFD), so ``decode(encode(text)) == text``; :meth:`Tokenizer.stream_decoder` does the
same one token at a time, holding back a character split across tokens. One exception,
shared with llama.cpp: a byte the vocabulary has no token for is dropped when encoding
(SmolLM2's lacks a few control bytes and the lead bytes of U+40000..U+BFFFF).

Needs the ``llm`` extra (``tokenizers``; ``jinja2`` for chat templates).

Example:
    >>> from jqx.llm.tokenizer import Tokenizer
    >>> tok = Tokenizer.from_gguf_metadata({
    ...     "tokenizer.ggml.model": "gpt2",
    ...     "tokenizer.ggml.pre": "gpt-2",
    ...     "tokenizer.ggml.tokens": ["<|endoftext|>", "h", "e", "l", "o", "Ġ", "he", "ll",
    ...                               "hell", "hello", "Ġhello"],
    ...     "tokenizer.ggml.token_type": [3] + [1] * 10,
    ...     "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o", "Ġ hello"],
    ...     "tokenizer.ggml.eos_token_id": 0,
    ... })
    >>> tok.encode("hello hello<|endoftext|>")
    [9, 10, 0]
    >>> tok.decode([9, 10, 0]), tok.decode([9, 10, 0], skip_special=True)
    ('hello hello<|endoftext|>', 'hello hello')
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import difflib
import json
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Tokenizer", "TokenizerError", "StreamDecoder", "PRE_TOKENIZERS"]


class TokenizerError(ValueError):
    """A tokenizer cannot be built from the metadata, or a token or id is unknown."""


# ---------------------------------------------------------------- llama.cpp's token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp (llama-vocab.cpp, "control-looking token ... its type will be overridden")
# makes these control tokens by their text, whatever type the file gives them.
_CONTROL_BY_TEXT = frozenset(
    """<|eot_id|> <|im_end|> <|end|> <|return|> <|call|> <|flush|> <|calls|> <end_of_turn>
    <|endoftext|> <|end_of_text|> <EOT> _<EOT> [EOT] [EOS] <end_of_utterance> <eos> <turn|>
    <|tool_response> <|eom_id|> <｜end▁of▁sentence｜> [e~[ <|fim_prefix|> <fim-prefix>
    <fim_prefix> <｜fim▁begin｜> <PRE> ▁<PRE> <|code_prefix|> <|prefix|> <|fim_suffix|>
    <fim-suffix> <fim_suffix> <｜fim▁hole｜> <SUF> ▁<SUF> <|code_suffix|> <|suffix|>
    <|fim_middle|> <fim-middle> <fim_middle> <｜fim▁end｜> <MID> ▁<MID> <|code_middle|>
    <|middle|> <|fim_pad|> <fim-pad> <fim_pad> <PAD> [PAD] <|fim_repo|> <|repo_name|>
    <fim-repo> <REPO> <reponame> <|file_sep|>""".split()
)

# ---------------------------------------------------------------- pre-tokenizers
# The regexes of llama.cpp's llm_tokenizer_bpe (llama-vocab.cpp), applied in order: each
# splits every piece of the previous one, keeping matches and the text between them. GPT-2's
# regex ends in `|\s+` here: llama.cpp's own GPT-2 splitter treats a whitespace run that
# `\s+(?!\S)` cannot take that way (HuggingFace's ByteLevel regex has the same ending).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_DIGITS_GPT2 = (r"\p{N}", _GPT2)


@dataclasses.dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a whole token is taken as is (llama 3)
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token key


def _family(names: str, spec: _PreTokenizer) -> dict[str, _PreTokenizer]:
    return dict.fromkeys(names.split(), spec)


#: ``tokenizer.ggml.pre`` values supported, each with llama.cpp's split regexes.
PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer(_DEFAULT),
    **_family("gpt-2 phi-2 mpt olmo jais exaone4 trillion", _PreTokenizer((_GPT2,))),
    **_family(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
        _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    ),
    **_family("dbrx smaug-bpe", _PreTokenizer((_LLAMA3,))),
    **_family("qwen2 deepseek-r1-qwen stablelm2 megrez", _PreTokenizer((_QWEN2,))),
    **_family(
        "smollm starcoder refact command-r codeshell exaone minerva-7b",
        _PreTokenizer(_DIGITS_GPT2),
    ),
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map of the 256 bytes onto printable characters (byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = dict(zip(keep, keep, strict=True))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in sorted(chars.items())}


_BYTE_TO_CHAR = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _import_tokenizers():
    try:
        import tokenizers  # noqa: PLC0415 - an extra, imported where used
    except ImportError as e:
        raise ImportError(
            "jqx.llm.Tokenizer builds on the `tokenizers` package, which is not installed; "
            "install it with: pip install 'jqx[llm]'"
        ) from e
    return tokenizers


def _import_jinja2():
    try:
        import jinja2  # noqa: PLC0415 - an extra, imported where used
        import jinja2.ext  # noqa: PLC0415
        import jinja2.sandbox  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            "Tokenizer.apply_chat_template renders the file's Jinja template with the "
            "`jinja2` package, which is not installed; install it with: pip install 'jqx[llm]'"
        ) from e
    return jinja2


def _piece_bytes(text: str, kind: int) -> bytes:
    """The bytes one token stands for (llama.cpp's token_to_piece for a BPE vocabulary)."""
    if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED):
        return text.encode("utf-8")
    if kind == _NORMAL:
        # A character outside the byte alphabet cannot come from byte-level BPE; keep it.
        return b"".join(
            bytes((_CHAR_TO_BYTE[c],)) if c in _CHAR_TO_BYTE else c.encode("utf-8") for c in text
        )
    if kind == _BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        return bytes((int(text[3:5], 16),))
    return b""  # unused and undefined tokens print nothing in llama.cpp


class StreamDecoder:
    """Turns token ids into text one at a time, holding back a character split across
    tokens until its last byte arrives. Made by :meth:`Tokenizer.stream_decoder`.

    The concatenated output of :meth:`push` and :meth:`flush` equals
    :meth:`Tokenizer.decode` of the same ids.
    """

    def __init__(self, pieces: Sequence[bytes], skip: frozenset[int], source: str):
        self._pieces = pieces
        self._skip = skip
        self._source = source
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Adds one token and returns the text it completes ('' while a character is split).

        Args:
          token_id: the next token id.

        Returns:
          The newly completed text.

        Raises:
          TokenizerError: ``token_id`` is outside the vocabulary.
        """
        i = _check_id(token_id, len(self._pieces), self._source, "push(token_id)")
        if i in self._skip:
            return ""
        return self._utf8.decode(self._pieces[i])

    def flush(self) -> str:
        """Ends the stream: a character left incomplete becomes U+FFFD. The decoder can
        be used again afterwards."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


def _check_id(token_id: Any, n: int, source: str, what: str) -> int:
    if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
        raise TypeError(
            f"{what}: a token id is an int, got {type(token_id).__name__} {token_id!r}; "
            "pass the integer ids that encode() returns."
        )
    i = int(token_id)
    if not 0 <= i < n:
        raise TokenizerError(
            f"{what}: token id {i} is outside the vocabulary of {source} (ids 0..{n - 1}); "
            "the ids must come from this file's model."
        )
    return i


def _require(metadata: Mapping[str, Any], key: str, source: str, why: str) -> Any:
    if key not in metadata or metadata[key] is None:
        raise TokenizerError(
            f"{source} has no metadata key {key!r} ({why}); a GGUF file converted by "
            "llama.cpp's convert_hf_to_gguf.py has it: reconvert the model, or pass the "
            "metadata of a file that has a tokenizer."
        )
    return metadata[key]


def _optional_id(metadata: Mapping[str, Any], key: str, n: int, source: str) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
        raise TokenizerError(
            f"{source}: metadata {key}={value!r} is not a token id of its vocabulary "
            f"(0..{n - 1}); the file is inconsistent: reconvert it."
        )
    return int(value)


class Tokenizer:
    """A GGUF file's tokenizer: ``encode``, ``decode``, streaming, the chat template.

    Build it with :meth:`from_gguf_metadata`. It holds no mutable state that calls
    share: one instance may serve several threads.
    """

    def __init__(
        self,
        *,
        tokens: Sequence[str],
        kinds: Sequence[int],
        merges: Sequence[str],
        pre: str,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        source: str,
    ):
        """Use :meth:`from_gguf_metadata`; the arguments are its checked values."""
        tk = _import_tokenizers()
        spec = PRE_TOKENIZERS[pre]
        self._tokens = list(tokens)
        self._kinds = list(kinds)
        self._pre = pre
        self._bos_id, self._eos_id, self._pad_id = bos_id, eos_id, pad_id
        self._add_bos = add_bos
        self._chat_template = chat_template
        self._source = source
        # Later duplicates win, as in llama.cpp's token_to_id map.
        self._ids = {t: i for i, t in enumerate(self._tokens)}
        self._special_ids = frozenset(
            i for i, k in enumerate(self._kinds) if k in (_CONTROL, _UNKNOWN)
        )
        self._pieces = [_piece_bytes(t, k) for t, k in zip(self._tokens, self._kinds, strict=True)]

        pairs = []
        for m in merges:
            # llama.cpp splits at the first space after the first character.
            cut = m.find(" ", 1)
            a, b = (m[:cut], m[cut + 1 :]) if cut > 0 else (m, "")
            # tokenizers rejects a merge whose parts or result are not tokens; llama.cpp
            # would fall back to bytes for such a result, which a valid file never needs.
            if a in self._ids and b in self._ids and a + b in self._ids:
                pairs.append((a, b))
        model = tk.models.BPE(
            vocab=self._ids, merges=pairs, ignore_merges=spec.ignore_merges, fuse_unk=False
        )
        hf = tk.Tokenizer(model)
        hf.pre_tokenizer = tk.pre_tokenizers.Sequence(
            [tk.pre_tokenizers.Split(tk.Regex(r), behavior="isolated") for r in spec.regexes]
            + [tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        hf.decoder = tk.decoders.ByteLevel()

        def added(i: int, special: bool):
            return tk.AddedToken(
                self._tokens[i],
                special=special,
                normalized=False,
                lstrip=False,
                rstrip=False,
                single_word=False,
            )

        hf.add_special_tokens([added(i, True) for i in sorted(self._special_ids)])
        user = [i for i, k in enumerate(self._kinds) if k == _USER_DEFINED]
        if user:
            hf.add_tokens([added(i, False) for i in user])
        self._hf = hf
        self._hf_plain = None  # with special tokens read as text: built on first use
        self._lock = threading.Lock()
        self._template = None

    # ------------------------------------------------------------ construction
    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], *, source: str = "<metadata>"
    ) -> Tokenizer:
        """Builds the tokenizer described by a GGUF file's metadata.

        Args:
          metadata: the file's metadata as plain Python values
            (``jqx.load_gguf(path).metadata``): ``tokenizer.ggml.model``, ``.pre``,
            ``.tokens``, ``.merges``, ``.token_type``, ``.bos_token_id``,
            ``.eos_token_id``, ``.padding_token_id``, ``.add_bos_token`` and
            ``tokenizer.chat_template``.
          source: what the metadata came from (the file's path), named in errors.

        Returns:
          A :class:`Tokenizer`.

        Raises:
          TokenizerError: a required key is missing or inconsistent, or the model or
            pre-tokenizer type is not supported (the message lists the supported ones).
          ImportError: ``tokenizers`` is not installed (``pip install 'jqx[llm]'``).

        Example:
            >>> from jqx.llm.tokenizer import Tokenizer
            >>> tok = Tokenizer.from_gguf_metadata({
            ...     "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            ...     "tokenizer.ggml.tokens": ["<s>", "1", "2", "a", "Ġ", "Ġa"],
            ...     "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1],
            ...     "tokenizer.ggml.merges": ["Ġ a"], "tokenizer.ggml.bos_token_id": 0,
            ... }, source="tiny.gguf")
            >>> tok.encode("12 a", add_bos=True), tok.vocab_size, tok.bos_id
            ([0, 1, 2, 5], 6, 0)
        """
        if not isinstance(metadata, Mapping):
            raise TypeError(
                f"from_gguf_metadata(metadata=...) expects a dict of metadata keys, got "
                f"{type(metadata).__name__}; pass jqx.load_gguf(path).metadata."
            )
        model = _require(metadata, "tokenizer.ggml.model", source, "the tokenizer type")
        if model != "gpt2":
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model={model!r} is not supported; jqx reads "
                "'gpt2' (byte-level BPE, as in Llama 3, Qwen 2, SmolLM, GPT-2). "
                "SentencePiece ('llama') and other tokenizer types are not implemented: "
                "use a model with a byte-level BPE tokenizer, or tokenize with llama.cpp."
            )
        pre = metadata.get("tokenizer.ggml.pre")
        if pre is None or pre == "":
            warnings.warn(
                f"{source} has no tokenizer.ggml.pre; using llama.cpp's 'default' "
                "pre-tokenizer, which may split text unlike the original tokenizer "
                "(llama.cpp warns the same). Reconvert the model to record it.",
                stacklevel=2,
            )
            pre = "default"
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(
                f"{source}: tokenizer.ggml.pre={pre!r} is not a supported pre-tokenizer; "
                f"supported: {', '.join(sorted(PRE_TOKENIZERS))}. Its split rules are in "
                "llama.cpp's llama-vocab.cpp; add them to jqx.llm.tokenizer.PRE_TOKENIZERS "
                "with a test against llama.cpp's ids."
            )
        tokens = _require(metadata, "tokenizer.ggml.tokens", source, "the vocabulary")
        merges = _require(metadata, "tokenizer.ggml.merges", source, "the BPE merges")
        if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError(
                f"{source}: tokenizer.ggml.tokens must be a list of str, got "
                f"{type(tokens).__name__}; the file is corrupt."
            )
        if not tokens:
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens is empty; reconvert it.")
        if not isinstance(merges, (list, tuple)) or not all(isinstance(m, str) for m in merges):
            raise TokenizerError(
                f"{source}: tokenizer.ggml.merges must be a list of 'a b' strings, got "
                f"{type(merges).__name__}; the file is corrupt."
            )
        n = len(tokens)
        kinds = metadata.get("tokenizer.ggml.token_type")
        if kinds is None:
            kinds = [_NORMAL] * n  # llama.cpp's default too
        if len(kinds) != n:
            raise TokenizerError(
                f"{source}: tokenizer.ggml.token_type has {len(kinds)} entries for "
                f"{n} tokens; the file is inconsistent: reconvert it."
            )
        kinds = [
            _CONTROL if t in _CONTROL_BY_TEXT else int(k)
            for t, k in zip(tokens, kinds, strict=True)
        ]
        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        template = metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(
                f"{source}: tokenizer.chat_template must be a str, got "
                f"{type(template).__name__}; the file is corrupt."
            )
        return cls(
            tokens=tokens,
            kinds=kinds,
            merges=merges,
            pre=pre,
            bos_id=_optional_id(metadata, "tokenizer.ggml.bos_token_id", n, source),
            eos_id=_optional_id(metadata, "tokenizer.ggml.eos_token_id", n, source),
            pad_id=_optional_id(metadata, "tokenizer.ggml.padding_token_id", n, source),
            add_bos=PRE_TOKENIZERS[pre].add_bos if add_bos is None else bool(add_bos),
            chat_template=template or None,
            source=source,
        )

    # ------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of tokens (ids are ``0 .. vocab_size - 1``)."""
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the file names none."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None if the file names none."""
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None if the file names none."""
        return self._pad_id

    @property
    def add_bos(self) -> bool:
        """Whether :meth:`encode` prepends BOS by default (the file's add_bos_token)."""
        return self._add_bos

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the control and unknown tokens (see the module docstring)."""
        return self._special_ids

    @property
    def pre(self) -> str:
        """The pre-tokenizer name (the file's ``tokenizer.ggml.pre``)."""
        return self._pre

    @property
    def chat_template(self) -> str | None:
        """The file's Jinja chat template, or None."""
        return self._chat_template

    @property
    def source(self) -> str:
        """What the metadata came from, as named in errors."""
        return self._source

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self._source!r}, vocab_size={self.vocab_size}, pre={self._pre!r}, "
            f"bos_id={self._bos_id}, eos_id={self._eos_id}, "
            f"chat_template={'yes' if self._chat_template else 'no'})"
        )

    # ------------------------------------------------------------ tokens
    def token_to_id(self, token: str) -> int:
        """The id of a token, written as in the vocabulary.

        Byte-level vocabularies store a space as ``Ġ`` and a newline as ``Ċ``: the token
        for " the" is ``"Ġthe"``; the error for an unknown token suggests close ones.

        Args:
          token: the token's text (e.g. ``"<|im_end|>"``).

        Returns:
          Its id.

        Raises:
          TokenizerError: the vocabulary has no such token.

        Example:
            >>> from jqx.llm.tokenizer import Tokenizer
            >>> tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
            ...     "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "Ġ", "Ġa"],
            ...     "tokenizer.ggml.merges": ["Ġ a"]})
            >>> tok.token_to_id("Ġa")
            2
        """
        if not isinstance(token, str):
            raise TypeError(
                f"token_to_id(token=...) expects a str, got {type(token).__name__} {token!r}."
            )
        i = self._ids.get(token)
        if i is not None:
            return i
        hint = ""
        as_bytes = "".join(_BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
        if as_bytes in self._ids:
            hint = (
                f" This vocabulary writes it byte-level: {as_bytes!r} (id {self._ids[as_bytes]})."
            )
        close = difflib.get_close_matches(token, self._ids, n=3, cutoff=0.6)
        close_text = f" Close matches: {', '.join(repr(c) for c in close)}." if close else ""
        raise TokenizerError(
            f"token {token!r} is not in the vocabulary of {self._source} "
            f"({self.vocab_size} tokens).{hint}{close_text} "
            "To get the ids of arbitrary text, use encode(text)."
        )

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary text of an id (byte-level: ``Ġ`` for a space).

        Example:
            >>> from jqx.llm.tokenizer import Tokenizer
            >>> tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
            ...     "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "Ġ", "Ġa"],
            ...     "tokenizer.ggml.merges": ["Ġ a"]})
            >>> tok.id_to_token(2)
            'Ġa'
        """
        return self._tokens[_check_id(token_id, self.vocab_size, self._source, "id_to_token")]

    # ------------------------------------------------------------ encode / decode
    def encode(
        self, text: str, *, add_bos: bool | None = None, parse_special: bool = True
    ) -> list[int]:
        """Token ids of a text: llama.cpp's ``llama_tokenize(text, add_special=add_bos,
        parse_special=parse_special)``.

        Args:
          text: the text.
          add_bos: prepend the BOS id; None uses the file's ``add_bos_token``.
          parse_special: match control tokens written in the text (``<|im_start|>``) as
            single tokens; False tokenizes them as plain text. User-defined tokens are
            matched either way, as in llama.cpp.

        Returns:
          The ids, a list of int.

        Raises:
          TypeError: ``text`` is not a str.
          TokenizerError: BOS is asked for but the file names no BOS token, or ``text``
            holds a lone surrogate (not valid Unicode).

        Example:
            >>> from jqx.llm.tokenizer import Tokenizer
            >>> tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
            ...     "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["<s>", "<", ">",
            ...     "s", "a"], "tokenizer.ggml.token_type": [3, 1, 1, 1, 1],
            ...     "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 0})
            >>> tok.encode("<s>a"), tok.encode("<s>a", parse_special=False, add_bos=True)
            ([0, 4], [0, 1, 3, 2, 4])
        """
        if not isinstance(text, str):
            fix = " decode it first: text.decode('utf-8')." if isinstance(text, bytes) else ""
            raise TypeError(f"encode(text=...) expects a str, got {type(text).__name__}.{fix}")
        add = self._add_bos if add_bos is None else add_bos
        ids = []
        if add:
            if self._bos_id is None:
                raise TokenizerError(
                    f"encode(add_bos=True): {self._source} names no BOS token "
                    "(tokenizer.ggml.bos_token_id); call encode(text, add_bos=False)."
                )
            ids.append(self._bos_id)
        if text:
            hf = self._hf if parse_special else self._plain()
            try:
                ids += hf.encode(text, add_special_tokens=False).ids
            except TypeError as e:  # tokenizers refuses a str that is not valid Unicode
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as u:
                    raise TokenizerError(
                        f"encode(text=...): character {u.start} is a lone surrogate "
                        f"U+{ord(text[u.start]):04X}, which is not text; decode the source "
                        "bytes with errors='replace' (or fix how the str was built)."
                    ) from u
                raise e
        return ids

    def _plain(self):
        # A copy that reads control tokens as text: the library's switch is a setting of
        # the tokenizer object, so flipping it per call would race between threads.
        with self._lock:
            if self._hf_plain is None:
                tk = _import_tokenizers()
                plain = tk.Tokenizer.from_str(self._hf.to_str())
                plain.encode_special_tokens = True
                self._hf_plain = plain
        return self._hf_plain

    def _ids_list(self, ids: Any, what: str) -> list[int]:
        if isinstance(ids, (str, bytes)) or not (
            hasattr(ids, "__array__") or isinstance(ids, Iterable)
        ):
            raise TypeError(
                f"{what} expects a sequence of token ids, got {type(ids).__name__}; "
                "for one id write decode([token_id])."
            )
        if hasattr(ids, "__array__"):
            arr = np.asarray(ids)
            if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
                raise TypeError(
                    f"{what} expects a 1-D array of integer ids, got shape {arr.shape} "
                    f"dtype {arr.dtype}; decode each row separately."
                )
            ids = arr.tolist()
        n = self.vocab_size
        return [_check_id(i, n, self._source, what) for i in ids]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """The text of token ids: each token's bytes, concatenated and decoded as UTF-8
        (bytes that are not valid UTF-8 become U+FFFD).

        Args:
          ids: token ids (a list, tuple or 1-D integer array).
          skip_special: drop control and unknown tokens (``<|im_end|>``) instead of
            writing their text.

        Returns:
          The text.

        Raises:
          TokenizerError: an id is outside the vocabulary.

        Example:
            >>> from jqx.llm.tokenizer import Tokenizer
            >>> tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
            ...     "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "Ġ", "Ġa"],
            ...     "tokenizer.ggml.merges": ["Ġ a"]})
            >>> tok.decode([0, 2, 2])
            'a a a'
        """
        ids = self._ids_list(ids, "decode(ids)")
        skip = self._special_ids if skip_special else frozenset()
        data = b"".join(self._pieces[i] for i in ids if i not in skip)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        """A decoder for ids that arrive one at a time (generation).

        Args:
          skip_special: as in :meth:`decode`.

        Returns:
          A :class:`StreamDecoder`: ``push(token_id) -> str`` gives the text completed so
          far (a character split across tokens waits for its last byte), ``flush()`` the
          rest at the end.

        Example:
            >>> from jqx.llm.tokenizer import Tokenizer
            >>> euro = "".join(Tokenizer.byte_level(b) for b in "€".encode())  # 3 bytes
            >>> tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
            ...     "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": [euro[:2],
            ...     euro[2], "a"], "tokenizer.ggml.merges": []})
            >>> dec = tok.stream_decoder()
            >>> [dec.push(i) for i in (2, 0, 1, 2)], dec.flush()
            (['a', '', '€', 'a'], '')
        """
        skip = self._special_ids if skip_special else frozenset()
        return StreamDecoder(self._pieces, skip, self._source)

    @staticmethod
    def byte_level(byte: int) -> str:
        """The character byte-level BPE vocabularies use for one byte (GPT-2's alphabet:
        ``Ġ`` for a space, ``Ċ`` for a newline, printable ASCII unchanged).

        Example:
            >>> from jqx.llm.tokenizer import Tokenizer
            >>> Tokenizer.byte_level(ord(" ")), Tokenizer.byte_level(ord("a"))
            ('Ġ', 'a')
        """
        return _BYTE_TO_CHAR[byte]

    # ------------------------------------------------------------ chat
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """Renders a conversation with the file's chat template (Jinja, sandboxed).

        The template sees what HuggingFace transformers gives it: ``messages``,
        ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception`` and
        ``strftime_now``; blocks are trimmed (``trim_blocks``, ``lstrip_blocks``). Encode
        the result with ``encode(text)``: its special tokens are then single tokens.

        Args:
          messages: the conversation, e.g. ``[{"role": "user", "content": "Hi"}]``.
          add_generation_prompt: end with the header of an assistant turn, so the model
            answers.

        Returns:
          The prompt text.

        Raises:
          TokenizerError: the file has no chat template, or the template fails (its own
            ``raise_exception`` included).
          TypeError: ``messages`` is not a list of dicts with a ``role``.
          ImportError: ``jinja2`` is not installed (``pip install 'jqx[llm]'``).

        Example:
            >>> from jqx.llm.tokenizer import Tokenizer
            >>> tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
            ...     "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a"],
            ...     "tokenizer.ggml.merges": [], "tokenizer.chat_template":
            ...     "{% for m in messages %}[{{ m.role }}] {{ m.content }}\\n{% endfor %}"})
            >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])
            '[user] Hi\\n'
        """
        if self._chat_template is None:
            raise TokenizerError(
                f"{self._source} has no chat template (metadata key "
                "'tokenizer.chat_template'); format the prompt yourself and call "
                "encode(text), or use a model file that carries a template."
            )
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError(
                "apply_chat_template(messages=...) expects a list of dicts such as "
                f"[{{'role': 'user', 'content': 'Hi'}}], got {type(messages).__name__}."
            )
        for k, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m:
                raise TypeError(
                    f"apply_chat_template: messages[{k}] is {m!r}; each message is a dict "
                    "with 'role' and 'content', e.g. {'role': 'user', 'content': 'Hi'}."
                )
        jinja2 = _import_jinja2()
        template = self._compiled_template(jinja2)
        tokens = self._tokens
        try:
            return template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=tokens[self._bos_id] if self._bos_id is not None else "",
                eos_token=tokens[self._eos_id] if self._eos_id is not None else "",
            )
        except TokenizerError:
            raise
        except jinja2.TemplateError as e:
            raise TokenizerError(
                f"the chat template of {self._source} failed: {e}; check the messages "
                "(roles and order the template accepts)."
            ) from e

    def _compiled_template(self, jinja2):
        with self._lock:
            if self._template is None:
                source = self._source

                def raise_exception(message: str):
                    raise TokenizerError(f"the chat template of {source} says: {message}")

                def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                    return json.dumps(
                        x,
                        ensure_ascii=ensure_ascii,
                        indent=indent,
                        separators=separators,
                        sort_keys=sort_keys,
                    )

                env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
                )
                env.filters["tojson"] = tojson
                env.globals["raise_exception"] = raise_exception
                env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
                try:
                    self._template = env.from_string(self._chat_template)
                except jinja2.TemplateSyntaxError as e:
                    raise TokenizerError(
                        f"the chat template of {source} is not valid Jinja ({e}, line "
                        f"{e.lineno}); the file's tokenizer.chat_template is broken."
                    ) from e
        return self._template
