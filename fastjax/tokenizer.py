"""Tokenizer: a `tokenizers.Tokenizer` plus a jinja2 chat template, file-compatible with transformers.

`Tokenizer.from_pretrained(dir)` reads the files `transformers` (5.x) reads for a fast tokenizer:

    tokenizer.json                 the backend (model, pre-tokenizer, post-processor, added tokens)
    tokenizer_config.json          special tokens, model_max_length, chat_template (str or named list)
    special_tokens_map.json        legacy; only read when tokenizer_config.json has no added_tokens_decoder
    chat_template.jinja            the default template (wins over tokenizer_config.json)
    additional_chat_templates/     named templates, <name>.jinja
    chat_template.json             legacy processor file {"chat_template": ...}; used only as a last resort

and `save_pretrained(dir)` writes the same set, so `transformers.AutoTokenizer.from_pretrained(dir)`
gives the same ids and the same chat template.

As in transformers 5, the post-processor stored in tokenizer.json decides which special tokens
`encode(..., add_special_tokens=True)` adds; `add_bos_token` / `add_eos_token` in the config are not
applied on load. Passing `add_bos_token=True` / `add_eos_token=True` to the constructor installs a
`TemplateProcessing` post-processor that adds them (what transformers does for explicit flags).

Chat templates render in a sandboxed jinja2 environment configured exactly like transformers'
(`trim_blocks`, `lstrip_blocks`, `loopcontrols`, a `tojson` that does not escape HTML,
`raise_exception`, `strftime_now`, the `{% generation %}` tag) with `bos_token`, `eos_token`,
`unk_token`, `pad_token` (those that are set) and `add_generation_prompt` in scope.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from fastjax._io import atomic_write_bytes

Message = Mapping[str, Any]

# Private-use code points that bracket `{% generation %}` output while rendering with a mask.
_GEN_OPEN, _GEN_CLOSE = "\ue000", "\ue001"
_TRACK_GENERATION = "_fastjax_track_generation"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks text the assistant produces.

    Rendered normally it is a no-op. With the render variable `_fastjax_track_generation` set, the
    block's output is bracketed by two private-use characters, which the caller strips and turns
    into character spans (this avoids transformers' shared mutable tracker state).
    """

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render", [jinja2.nodes.ContextReference()])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render(self, context: jinja2.runtime.Context, caller: Any) -> str:
        text = caller()
        if context.get(_TRACK_GENERATION):
            return f"{_GEN_OPEN}{text}{_GEN_CLOSE}"
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON (as transformers).
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compiles `template` in the same sandboxed environment transformers uses (cached)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _token_str(value: Any) -> str | None:
    """Config token values are strings or serialized AddedTokens ({"content": ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return str(value["content"])
    raise TypeError(f"unsupported special-token value {value!r}")


def _write_text(path: pathlib.Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer:
    """A `tokenizers.Tokenizer` with special tokens and a chat template.

    Args:
      backend: the fast tokenizer. It is copied; the copy gets any named special token that it
        lacks added as a special token (as transformers does).
      chat_template: a jinja2 template, or a mapping of named templates containing "default".
      bos_token, eos_token, pad_token, unk_token: special token strings.
      add_bos_token, add_eos_token: when either is True, the post-processor is replaced by one that
        adds BOS/EOS to every `encode(..., add_special_tokens=True)`. When both are False the
        backend's post-processor is kept as is (it may add tokens itself, like Llama-3's).
      model_max_length: the longest sequence the model was trained for, if known.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | Mapping[str, str] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = BackendTokenizer.from_str(backend.to_str())
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.model_max_length = model_max_length
        if isinstance(chat_template, Mapping):
            self.chat_templates = dict(chat_template)
            if "default" not in self.chat_templates:
                raise ValueError(
                    f"named chat templates need a 'default'; got {list(chat_template)}"
                )
        else:
            self.chat_templates = {} if chat_template is None else {"default": chat_template}

        added = {str(t.content) for t in self.backend.get_added_tokens_decoder().values()}
        missing = [t for t in self.special_tokens.values() if t not in added]
        if missing:
            self.backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            )
        for name in ("bos", "eos"):
            wanted = add_bos_token if name == "bos" else add_eos_token
            if wanted and getattr(self, f"{name}_token") is None:
                raise ValueError(f"add_{name}_token=True but {name}_token is None")
        if add_bos_token or add_eos_token:
            self.backend.post_processor = self._template_post_processor(
                add_bos_token, add_eos_token
            )
        probe = self.backend.encode("", add_special_tokens=True).ids
        self.add_bos_token = bool(probe) and probe[0] == self.bos_token_id
        self.add_eos_token = bool(probe) and probe[-1] == self.eos_token_id

    def _template_post_processor(self, bos: bool, eos: bool) -> processors.TemplateProcessing:
        b = f"{self.bos_token}:0 " if bos else ""
        e = f" {self.eos_token}:0" if eos else ""
        b1 = f" {self.bos_token}:1" if bos else ""
        e1 = f" {self.eos_token}:1" if eos else ""
        specials = [(self.bos_token, self.bos_token_id)] if bos else []
        specials += [(self.eos_token, self.eos_token_id)] if eos else []
        return processors.TemplateProcessing(
            single=f"{b}$A:0{e}", pair=f"{b}$A:0{e}{b1} $B:1{e1}", special_tokens=specials
        )

    # ----------------------------------------------------------------------------------------
    # Files

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Loads tokenizer.json + tokenizer_config.json (+ chat template files) from `directory`."""
        d = pathlib.Path(directory)
        if not (d / "tokenizer.json").is_file():
            present = sorted(p.name for p in d.iterdir()) if d.is_dir() else "directory not found"
            raise FileNotFoundError(f"no tokenizer.json in {str(d)!r} (found: {present})")
        backend = BackendTokenizer.from_file(str(d / "tokenizer.json"))
        config = (
            _read_json(d / "tokenizer_config.json")
            if (d / "tokenizer_config.json").is_file()
            else {}
        )
        if "added_tokens_decoder" not in config and (d / "special_tokens_map.json").is_file():
            config.update(_read_json(d / "special_tokens_map.json"))  # transformers' legacy rule
        for spec in (config.get("added_tokens_decoder") or {}).values():
            backend.add_tokens([AddedToken(**{k: v for k, v in spec.items() if k != "__type"})])

        templates: dict[str, str] = {}
        if (d / "chat_template.jinja").is_file():
            templates["default"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = d / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                templates[f.stem] = f.read_text(encoding="utf-8")
        if not templates:
            raw = config.get("chat_template")
            if raw is None and (d / "chat_template.json").is_file():
                raw = _read_json(d / "chat_template.json").get("chat_template")
            if isinstance(raw, str):
                templates["default"] = raw
            elif isinstance(raw, list):
                templates = {t["name"]: t["template"] for t in raw}
        chat_template: str | dict[str, str] | None = templates or None
        if templates.keys() == {"default"}:
            chat_template = templates["default"]
        elif templates and "default" not in templates:
            raise ValueError(f"chat templates in {str(d)!r} lack a 'default': {list(templates)}")

        max_len = config.get("model_max_length")
        return cls(
            backend,
            chat_template=chat_template,
            bos_token=_token_str(config.get("bos_token")),
            eos_token=_token_str(config.get("eos_token")),
            pad_token=_token_str(config.get("pad_token")),
            unk_token=_token_str(config.get("unk_token")),
            # Like transformers 5: tokenizer.json's post-processor decides, the flags are not applied.
            model_max_length=int(max_len)
            if isinstance(max_len, (int, float)) and max_len < 1e12
            else None,
        )

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
        (and additional_chat_templates/<name>.jinja for named templates), each atomically."""
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_text(d / "tokenizer.json", self.backend.to_str(pretty=True))
        specials = self.special_tokens
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        _write_text(d / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        _write_text(
            d / "special_tokens_map.json", json.dumps(specials, indent=2, ensure_ascii=False)
        )
        for name, template in self.chat_templates.items():
            if name == "default":
                _write_text(d / "chat_template.jinja", template)
            else:
                (d / "additional_chat_templates").mkdir(exist_ok=True)
                _write_text(d / "additional_chat_templates" / f"{name}.jinja", template)

    # ----------------------------------------------------------------------------------------
    # Ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens that are set: {"bos_token": "<s>", ...}."""
        return {n: getattr(self, n) for n in _SPECIAL_NAMES if getattr(self, n) is not None}

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        """The pad token's id, or the EOS id when no pad token is set."""
        pad = self.token_to_id(self.pad_token)
        return self.eos_token_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary without added tokens (transformers' `vocab_size`)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the vocabulary including added tokens (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[int]]:
        encs = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(
        self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    # ----------------------------------------------------------------------------------------
    # Chat templates

    @property
    def chat_template(self) -> str | None:
        """The default chat template (None when there is none)."""
        return self.chat_templates.get("default")

    def _select_template(self, chat_template: str | None, tools: Any) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" not in self.chat_templates:
            raise ValueError(
                "this tokenizer has no chat template: pass chat_template=... or load one that has it "
                "(chat_template.jinja / tokenizer_config.json['chat_template'] / GGUF "
                "tokenizer.chat_template)"
            )
        return self.chat_templates["default"]

    def _render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool,
        chat_template: str | None,
        tools: Any,
        documents: Any,
        track: bool,
        template_kwargs: Mapping[str, Any],
    ) -> str:
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        template = compile_chat_template(self._select_template(chat_template, tools))
        kwargs = {
            **self.special_tokens,
            **template_kwargs,
        }  # caller's kwargs win, as in transformers
        if track:
            kwargs[_TRACK_GENERATION] = True
        return template.render(
            messages=list(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Renders one conversation like transformers' `apply_chat_template`.

        `tokenize=True` returns ids of the rendered text encoded with `add_special_tokens=False`
        (the template writes its own special tokens). `chat_template` is a template name or a
        template string; extra keyword arguments are visible to the template.
        """
        text = self._render(
            messages,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            tools=tools,
            documents=documents,
            track=False,
            template_kwargs=template_kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def apply_chat_template_with_assistant_mask(
        self,
        messages: Sequence[Message],
        *,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and a 0/1 mask marking assistant tokens.

        This is what `train_on_responses_only` trains on. Two ways to find assistant text:

        * The template has `{% generation %}` blocks: their output is the assistant text, and a token
          is marked the way transformers' `return_assistant_tokens_mask` marks it (from the token
          holding the block's first character through the one holding its last).
        * Otherwise the conversation is rendered turn by turn. For each assistant message i the
          span runs from the end of `render(messages[:i], add_generation_prompt=True)` to the end
          of `render(messages[:i + 1])` without trailing whitespace, so it covers the reply and the
          template's end-of-turn marker (e.g. `<|im_end|>`) but not the generation prompt. Every
          prefix render must be a prefix of the full render; templates that rewrite earlier turns
          (e.g. ones that drop old reasoning) raise ValueError: add `{% generation %}` to those.

        Returns (ids, mask), two lists of equal length.
        """
        render = functools.partial(
            self._render,
            chat_template=chat_template,
            tools=tools,
            documents=None,
            template_kwargs=template_kwargs,
        )
        template = self._select_template(chat_template, tools)
        if _GENERATION_TAG.search(template):
            marked = render(messages, add_generation_prompt=False, track=True)
            text, spans = _strip_generation_markers(marked)
            if text != render(messages, add_generation_prompt=False, track=False):
                raise ValueError(
                    "{% generation %} markers were altered by the template or the "
                    "messages contain U+E000/U+E001"
                )
            enc = self.backend.encode(text, add_special_tokens=False)
            mask = [0] * len(enc.ids)
            for start, end in spans:
                if end <= start:
                    continue
                first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
                if first is None:
                    continue
                for t in range(first, (last if last is not None else len(mask) - 1) + 1):
                    mask[t] = 1
            return enc.ids, mask

        text = render(messages, add_generation_prompt=False, track=False)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = render(messages[:i], add_generation_prompt=True, track=False) if i else ""
            after = render(messages[: i + 1], add_generation_prompt=False, track=False)
            if not (
                text.startswith(before) and text.startswith(after) and after.startswith(before)
            ):
                raise ValueError(
                    f"chat template is not prefix-stable at message {i}: rendering the first turns "
                    "does not give a prefix of the full conversation; use a template with "
                    "{% generation %} blocks"
                )
            spans.append((len(before), len(after.rstrip())))
        enc = self.backend.encode(text, add_special_tokens=False)
        mask = [int(any(s < e and ts < e and te > s for s, e in spans)) for ts, te in enc.offsets]
        return enc.ids, mask


def _strip_generation_markers(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Removes the generation markers from `marked`, returning the text and its assistant spans."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos, start = 0, None
    for piece in re.split(f"([{_GEN_OPEN}{_GEN_CLOSE}])", marked):
        if piece == _GEN_OPEN:
            if start is not None:
                raise ValueError("nested {% generation %} blocks are not supported")
            start = pos
        elif piece == _GEN_CLOSE:
            if start is None:
                raise ValueError("unbalanced {% generation %} output")
            spans.append((start, pos))
            start = None
        else:
            out.append(piece)
            pos += len(piece)
    if start is not None:
        raise ValueError(
            "unbalanced {% generation %} output (messages must not contain U+E000/E001)"
        )
    return "".join(out), spans
