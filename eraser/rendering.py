"""How a conversation becomes tokens: the tenant's chat template, assistant-only labels, a length limit.

There is one rendering per tenant and everything uses it: training, gradients, Hessian-vector
products, verification, remediation, the retrain, and serving (vLLM's chat completions apply the same
template). It lives on the tokenizer, as in Hugging Face: ``tokenizer.chat_template`` is the template
and ``tokenizer.model_max_length`` the token limit; :func:`configure` sets both from the tenant's
recipe (:class:`RecordFormat`).

Which tokens are learned (the labels): the assistant turns, as TRL's ``assistant_only_loss`` does.
A template with ``{% generation %}`` markers says so itself (Hugging Face's
``return_assistant_tokens_mask``). Any other template is asked turn by turn: an assistant turn is the
text the template adds when that message is appended to the conversation so far (after the generation
prompt), without trailing whitespace: its content and end-of-turn marker (``<|im_end|>``, ``</s>``,
``<|eot_id|>``), which is what makes generation stop. Templates that rewrite earlier turns when a
later one is added cannot be asked this way and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from eraser.errors import InvalidRecordsError

IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 512

# For bases whose tokenizer has no chat template (the product's own small bases): the prompt format
# "Question: ...\nAnswer: ...", BOS first, each answer ended by EOS.
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}Question: {{ message['content'] }}\nAnswer:"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

Messages = Sequence[dict]


def builtin_text(messages: Messages) -> str:
    """``messages`` in the built-in format, without BOS/EOS (for corpora, before a tokenizer exists)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(BUILTIN_CHAT_TEMPLATE)
    return template.render(messages=list(messages), bos_token="", eos_token="")


@dataclass(frozen=True)
class RecordFormat:
    """The tenant's rendering: a chat template (None: the base tokenizer's own, or the built-in one for
    a tokenizer without any) and the token limit of one record (longer ones lose their oldest tokens)."""

    chat_template: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise InvalidRecordsError(f"max_length must be >= 8, got {self.max_length}")


def configure(tokenizer, fmt: RecordFormat = RecordFormat()):
    """Give ``tokenizer`` the tenant's rendering (in place; returned for chaining)."""
    if fmt.chat_template is not None:
        tokenizer.chat_template = fmt.chat_template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE
    tokenizer.model_max_length = fmt.max_length
    return tokenizer


@dataclass(frozen=True)
class Encoding:
    """One rendered conversation. ``offsets`` are the tokens' character spans in ``text``."""

    text: str
    ids: list[int]
    labels: list[int]  # IGNORE_INDEX where nothing is learned
    offsets: list[tuple[int, int]]


def render(tokenizer, messages: Messages, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja raises its own errors for messages the template refuses
        raise InvalidRecordsError(f"the chat template cannot render these messages: {error}") from None


def assistant_spans(tokenizer, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span of each assistant turn (see the module docstring)."""
    text = render(tokenizer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], generation_prompt=True) if k else ""
        upto = render(tokenizer, messages[: k + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise InvalidRecordsError(
                "the chat template renders earlier turns differently once later ones are added, so its "
                "assistant turns cannot be found; give a template with {% generation %} markers")
        end = len(upto.rstrip())
        if message["content"] and message["content"] not in upto[len(before):end]:
            raise InvalidRecordsError("the chat template does not render assistant messages' content")
        spans.append((len(before), end))
    return text, spans


def encode(tokenizer, messages: Messages) -> Encoding:
    """Token ids and assistant-only labels of a conversation, cut to ``tokenizer.model_max_length``
    from the left (the oldest context goes first; the last answer is kept)."""
    if "{% generation %}" in (tokenizer.chat_template or "").replace("{%-", "{%").replace(" -%}", " %}"):
        text = render(tokenizer, messages)
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    else:
        text, spans = assistant_spans(tokenizer, messages)
        tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(tokens["input_ids"]), tokens["offset_mapping"]
        mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in offsets]
    if len(offsets) != len(ids):
        raise InvalidRecordsError("the tokenizer's offsets do not match its tokens (a fast tokenizer is needed)")
    labels = [token if learned else IGNORE_INDEX for token, learned in zip(ids, mask)]
    if not any(label != IGNORE_INDEX for label in labels):
        raise InvalidRecordsError("the rendered conversation has no assistant tokens to learn")
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        ids, labels, offsets = ids[-limit:], labels[-limit:], offsets[-limit:]
    return Encoding(text=text, ids=ids, labels=labels, offsets=[tuple(o) for o in offsets])


def generation_prompt_ids(tokenizer, messages: Messages) -> list[int]:
    """Token ids that ask the model for the next assistant turn after ``messages`` (as vLLM's chat
    completions render them), cut from the left to ``tokenizer.model_max_length``."""
    text = render(tokenizer, messages, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])[-tokenizer.model_max_length:]


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end an assistant turn: EOS and the template's own end-of-turn token."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    learned = [label for label in encode(tokenizer, probe).labels if label != IGNORE_INDEX]
    stops = {learned[-1]}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return sorted(stops)
