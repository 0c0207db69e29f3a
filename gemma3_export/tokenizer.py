"""Gemma 3 tokenizer: SentencePiece model rebuilt from a GGUF vocabulary, streaming decode, chat format.

Control tokens (`<bos>`, `<start_of_turn>`, `<end_of_turn>`) are never parsed out of text by
SentencePiece, so chat prompts are encoded piecewise with those tokens inserted by id.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import gguf
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma3_export.errors import UserError

_SPACE = "\u2581"  # SentencePiece's escaped whitespace
_PIECE = sp_pb2.ModelProto.SentencePiece
# GGUF token types (llama.cpp) onto SentencePiece piece types.
_GGUF_TO_SP_TYPE = {1: _PIECE.NORMAL, 2: _PIECE.UNKNOWN, 3: _PIECE.CONTROL,
                    4: _PIECE.USER_DEFINED, 5: _PIECE.UNUSED, 6: _PIECE.BYTE}

BOS, START_OF_TURN, END_OF_TURN, EOS = "<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"

# The chat template Google ships in tokenizer_config.json / chat_template.json of the gemma-3 -it models.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def sentencepiece_model_from_gguf(reader: gguf.GGUFReader) -> bytes:
    """Rebuild Gemma's SentencePiece ModelProto (serialized) from the `tokenizer.ggml.*` GGUF fields."""
    fields = reader.fields
    keys = ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"]
    keys += [f"tokenizer.ggml.{k}_token_id" for k in ("unknown", "bos", "eos", "padding")]
    missing = [key for key in keys if key not in fields]
    if missing:
        raise UserError(f"The GGUF file has no SentencePiece vocabulary (missing {', '.join(missing)}).")
    if fields["tokenizer.ggml.model"].contents() != "llama":
        raise UserError("The GGUF tokenizer is not a SentencePiece one (tokenizer.ggml.model is not 'llama').")
    tokens: list[str] = fields["tokenizer.ggml.tokens"].contents()
    scores: list[float] = fields["tokenizer.ggml.scores"].contents()
    types: list[int] = fields["tokenizer.ggml.token_type"].contents()
    ids = {name: int(fields[f"tokenizer.ggml.{key}_token_id"].contents())
           for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    if not len(tokens) == len(scores) == len(types) or not set(types) <= set(_GGUF_TO_SP_TYPE):
        raise UserError("The GGUF tokenizer vocabulary is malformed (mismatched lengths or unknown token types).")

    proto = sp_pb2.ModelProto()
    for i, (piece, score, gtype) in enumerate(zip(tokens, scores, types)):
        kind = _GGUF_TO_SP_TYPE[int(gtype)]
        if i == ids["unk"]:
            kind = _PIECE.UNKNOWN  # llama.cpp marks <unk> CONTROL; SentencePiece needs exactly one UNKNOWN
        elif kind == _PIECE.UNKNOWN:
            kind = _PIECE.CONTROL
        if kind == _PIECE.USER_DEFINED:
            piece = piece.replace(" ", _SPACE)  # llama.cpp pre-normalizes user-defined "▁▁" to "  "
        proto.pieces.add(piece=piece, score=float(score), type=kind)

    ts = proto.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.split_digits = True
    ts.split_by_whitespace = True
    ts.split_by_number = True
    ts.split_by_unicode_script = True
    ts.allow_whitespace_only_pieces = True
    ts.treat_whitespace_as_suffix = False
    ts.character_coverage = 0.99995
    for name, token_id in ids.items():
        setattr(ts, f"{name}_id", token_id)
        setattr(ts, f"{name}_piece", tokens[token_id])

    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()


class Tokenizer:
    """A SentencePiece processor with Gemma's conventions (explicit BOS, two stop ids)."""

    def __init__(self, model: str | os.PathLike[str] | bytes) -> None:
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise UserError(f"Tokenizer model {os.fspath(model)!r} does not exist.")
        self._proto = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, with `<bos>` prepended when `bos` is set; control pieces in text stay text."""
        ids = self.sp.encode(text, out_type=int)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control tokens decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: `<eos>` (pretrained) and `<end_of_turn>` (instruction-tuned)."""
        return [self.id_of(EOS), self.id_of(END_OF_TURN)]

    def id_of(self, piece: str) -> int:
        """Id of an exact piece; KeyError if the vocabulary lacks it."""
        token_id = self.sp.piece_to_id(piece)
        if token_id == self.sp.unk_id() and piece != self.sp.id_to_piece(token_id):
            raise KeyError(f"piece {piece!r} is not in the vocabulary")
        return token_id

    def piece_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token contributes to decoded text (a single byte for byte-fallback pieces)."""
        sp = self.sp
        if sp.is_byte(token_id):
            return bytes([int(sp.id_to_piece(token_id)[3:5], 16)])
        if sp.is_control(token_id) or sp.is_unused(token_id):
            return b""
        if sp.is_unknown(token_id):
            return self._unk_surface.encode("utf-8")
        return sp.id_to_piece(token_id).replace(_SPACE, " ").encode("utf-8")

    @functools.cached_property
    def _unk_surface(self) -> str:
        return sp_pb2.ModelProto.FromString(self._proto).trainer_spec.unk_surface

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the serialized model (a `tokenizer.model`) to `path`."""
        out = Path(path)
        out.write_bytes(self._proto)
        return out


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_hf_tokenizer(tokenizer: Tokenizer, folder: str | os.PathLike[str]) -> list[str]:
    """Write the tokenizer in Hugging Face form (tokenizer.json + tokenizer_config.json, with the chat
    template) into `folder`: what ExecuTorch's C++ runner, swift-transformers and `tokenizers` read.
    transformers converts the SentencePiece model; returns the file names written."""
    from transformers import GemmaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp) / "tokenizer.model")
        GemmaTokenizer.from_pretrained(tmp).save_pretrained(Path(tmp) / "hf")
        shutil.copy(Path(tmp) / "hf" / "tokenizer.json", Path(folder) / "tokenizer.json")
        # The template inside tokenizer_config.json, as Google's checkpoints ship it (transformers 5
        # would write a separate chat_template.jinja, which older readers do not look for).
        config = json.loads((Path(tmp) / "hf" / "tokenizer_config.json").read_text())
        config["chat_template"] = CHAT_TEMPLATE
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return list(HF_TOKENIZER_FILES)

class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only text completed by that id (no partial UTF-8)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.piece_bytes(int(token_id)))

    def flush(self) -> str:
        """Text held back at the end (replacement characters for an unfinished byte sequence)."""
        return self._utf8.decode(b"", final=True)


def _message_text(message: dict, index: int, trim: bool) -> str:
    """Text of a message (string or list of text parts); turns are trimmed, the system prompt is not."""
    content = message.get("content")
    if isinstance(content, str):
        return content.strip() if trim else content
    if isinstance(content, list):
        parts = []
        for item in content:
            if not isinstance(item, dict) or item.get("type") != "text":
                raise UserError(f"Message {index} has a non-text content part, and only text is supported.")
            text = str(item.get("text", ""))
            parts.append(text.strip() if trim else text)
        return "".join(parts)
    raise UserError(f"Message {index} content must be a string or a list of text parts.")


def _chat_parts(messages: list[dict], add_generation_prompt: bool) -> Iterator[tuple[bool, str]]:
    """Yield (is_control, text) parts of Gemma's chat format, validating roles."""
    if not messages:
        raise UserError("The conversation has no messages.")
    prefix, first = "", 0
    if messages[0].get("role") == "system":
        prefix, first = _message_text(messages[0], 0, trim=False) + "\n\n", 1
        if len(messages) == 1:
            raise UserError("A system message must be followed by a user message.")
    yield True, BOS
    for index in range(first, len(messages)):
        role = messages[index].get("role")
        expected = ("user",) if (index - first) % 2 == 0 else ("assistant", "model")
        if role not in expected:
            raise UserError(f"Message {index} has role {role!r}, but a conversation is an optional system "
                            f"message followed by alternating user and assistant turns starting with user.")
        text = _message_text(messages[index], index, trim=True)
        yield True, START_OF_TURN
        yield False, ("user" if role == "user" else "model") + "\n" + (prefix if index == first else "") + text
        yield True, END_OF_TURN
        yield False, "\n"
    if add_generation_prompt:
        yield True, START_OF_TURN
        yield False, "model\n"


def format_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Gemma's chat template rendered as text (control tokens spelled out), same as `CHAT_TEMPLATE`."""
    return "".join(text for _, text in _chat_parts(messages, add_generation_prompt))


def encode_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat prompt, with control tokens inserted by id and the text between them encoded."""
    ids: list[int] = []
    for is_control, text in _chat_parts(messages, add_generation_prompt):
        ids.extend([tokenizer.id_of(text)] if is_control else tokenizer.encode(text, bos=False))
    return ids


def load_gguf_tokenizer(path: str | os.PathLike[str] | gguf.GGUFReader) -> Tokenizer:
    """A Tokenizer rebuilt from a GGUF file's vocabulary."""
    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(os.fspath(path))
    return Tokenizer(sentencepiece_model_from_gguf(reader))


_SP_TO_GGUF_TYPE = {v: k for k, v in _GGUF_TO_SP_TYPE.items()}


def add_gguf_vocab(writer: gguf.GGUFWriter, model: bytes) -> None:
    """Write a SentencePiece model as GGUF `tokenizer.ggml.*` fields (the inverse of the rebuild)."""
    proto = sp_pb2.ModelProto.FromString(model)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([_SP_TO_GGUF_TYPE[p.type] for p in proto.pieces])
    spec = proto.trainer_spec
    writer.add_unk_token_id(spec.unk_id)
    writer.add_bos_token_id(spec.bos_id)
    writer.add_eos_token_id(spec.eos_id)
    writer.add_pad_token_id(spec.pad_id)


@functools.lru_cache(maxsize=4)
def _tiny_model_proto(vocab_size: int) -> bytes:
    import io
    from importlib import resources

    text = resources.files("gemma3_export").joinpath("data/validation.txt").read_text()
    # Fillers put <start_of_turn>/<end_of_turn> at Gemma's ids 105/106, so stop ids and chat
    # formatting behave exactly as with the real vocabulary.
    control = [f"<unused{i}>" for i in range(101)] + [START_OF_TURN, END_OF_TURN]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines() * 4), model_writer=out, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, control_symbols=control,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece=EOS, bos_piece=BOS,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        hard_vocab_limit=False, num_threads=1, minloglevel=2, max_sentence_length=100000,
    )
    return out.getvalue()


def tiny_tokenizer(vocab_size: int) -> Tokenizer:
    """A small Gemma-shaped tokenizer (same special ids) trained on the bundled text, for `tiny`."""
    return Tokenizer(_tiny_model_proto(vocab_size))
