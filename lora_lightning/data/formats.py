"""Causal-LM data formats: rows → (input_ids, labels) with −100 wherever no loss is taken. Pure functions of a
transformers tokenizer and one row; no Lightning.

Formats (``detect_format`` picks one from the columns):

    chat         a ``messages`` column: a list of {"role": "system"|"user"|"assistant", "content": str}. The
                 conversation is rendered with the TOKENIZER'S OWN chat template (``apply_chat_template``)
                 and tokenised once. Loss on the assistant turns only: the characters from the end of
                 render(turns before it, add_generation_prompt=True) to the end of render(turns up to it),
                 i.e. the reply and the template's end-of-turn marker (so the model learns to stop); a token
                 is a target when its first character lies in such a span (offsets of a fast tokenizer).
                 ``train_on_prompt``: every token is a target.
    instruction  ``instruction`` / ``input`` / ``output`` columns (Alpaca). The prompt is
                 ``prompt_template`` (or ``prompt_template_no_input`` when ``input`` is empty) formatted
                 with the row's columns, e.g. "{instruction}"; the target is ``output`` + EOS. Prompt and
                 target are tokenised separately and concatenated (the prompt with the tokenizer's special
                 tokens, e.g. BOS; the target without). ``prompt_template: chat`` instead renders
                 [user: instruction (+ blank line + input), assistant: output] with the chat template.
    text         a ``text`` column (continued pre-training): every token is a target, + EOS.

Truncation keeps the first ``max_length`` tokens; an example with no target token left is dropped by the
caller (``Encoded.n_targets == 0``). Prompts for generation (``encode_prompt``) are the same formats without
the answer: chat without a final assistant turn (a final one is the reference), instruction without output
(an output is the reference), text as is; a long prompt keeps its last ``max_length`` tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

IGNORE_INDEX = -100
FORMATS = ("chat", "instruction", "text")
CHAT_TEMPLATE = "chat"  # prompt_template value: render instruction rows with the tokenizer's chat template

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class Columns(NamedTuple):
    """Column names of the formats (``CausalLMDataModule`` arguments)."""

    messages: str = "messages"
    text: str = "text"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"


class Encoded(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    length: int = 0  # tokens before truncation

    @property
    def n_targets(self) -> int:
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)  # position 0 is never predicted


class ChatTemplateError(ValueError):
    """The chat template renders a conversation's prefixes inconsistently, so assistant spans cannot be found."""


def detect_format(columns: list[str], cols: Columns, fmt: str = "auto") -> str:
    """"chat" if there is a messages column, else "instruction" if there is an instruction column, else "text"
    if there is a text column; ``fmt`` other than "auto" is checked against the columns."""
    needs = {"chat": [cols.messages], "instruction": [cols.instruction], "text": [cols.text]}
    if fmt != "auto":
        if fmt not in needs:
            raise ValueError(f"data.format={fmt!r}: choose one of auto, {', '.join(FORMATS)}")
        missing = [c for c in needs[fmt] if c not in columns]
        if missing:
            raise ValueError(
                f"data.format={fmt!r} needs column {missing[0]!r}; the data has {', '.join(columns)} "
                f"(rename it with data.{'messages' if fmt == 'chat' else fmt}_column)"
            )
        return fmt
    for name in FORMATS:
        if needs[name][0] in columns:
            return name
    raise ValueError(
        f"cannot tell the data format from the columns {', '.join(columns)}: give a {cols.messages!r} column "
        f"(chat), {cols.instruction!r}/{cols.output!r} (instruction) or {cols.text!r} (plain text), or set "
        "data.messages_column / data.instruction_column / data.text_column"
    )


def required_columns(fmt: str, cols: Columns, with_answer: bool) -> list[str]:
    """Columns that must be present and non-empty in every row."""
    if fmt == "chat":
        return [cols.messages]
    if fmt == "instruction":
        return [cols.instruction, cols.output] if with_answer else [cols.instruction]
    return [cols.text]


def invalid_messages(messages: Any) -> Optional[str]:
    """Why a ``messages`` value is not a chat (None if it is one)."""
    if not isinstance(messages, (list, tuple)):
        return f"messages is a {type(messages).__name__}, not a list of turns"
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not turn.get("role"):
            return f"turn {i} has no role"
        if not isinstance(turn.get("content"), str):
            return f"turn {i} has no text content"
    return None


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template, so chat data cannot be rendered; "
            "use a chat/instruct model's tokenizer (data.tokenizer), or instruction data with a prompt_template"
        )
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns."""
    text = render_chat(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render_chat(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ChatTemplateError(
                "the chat template does not render the conversation's turns as prefixes of the whole (it changes "
                f"earlier turns depending on later ones, turn {i}); set data.train_on_prompt: true (loss on every "
                "token) or use a template whose prefixes are stable"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _truncate(ids: list[int], labels: list[int], max_length: int) -> Encoded:
    if len(ids) > max_length:
        return Encoded(ids[:max_length], labels[:max_length], True, len(ids))
    return Encoded(ids, labels, False, len(ids))


def encode_chat(tokenizer: Any, messages: list[dict], train_on_prompt: bool, max_length: int) -> Encoded:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        return _truncate(ids, list(ids), max_length)
    labels = [
        tok if any(start <= s < end for start, end in spans) else IGNORE_INDEX
        for tok, (s, _) in zip(ids, enc["offset_mapping"])
    ]
    return _truncate(ids, labels, max_length)


def instruction_messages(row: dict, cols: Columns, with_answer: bool = True) -> list[dict]:
    user = row[cols.instruction]
    if row.get(cols.input):
        user = f"{user}\n\n{row[cols.input]}"
    turns = [{"role": "user", "content": user}]
    return turns + ([{"role": "assistant", "content": row[cols.output]}] if with_answer else [])


def instruction_prompt(row: dict, cols: Columns, template: str, template_no_input: str) -> str:
    values = {k: ("" if v is None else v) for k, v in row.items()}
    values.setdefault(cols.input, "")
    chosen = template if values[cols.input] else template_no_input
    try:
        return chosen.format_map(values)
    except KeyError as err:
        raise ValueError(
            f"prompt_template names column {err.args[0]!r}, which the data does not have (columns: "
            f"{', '.join(row)}); write the template with those column names, e.g. '{{{cols.instruction}}}'"
        ) from None


def _eos(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("add_eos: the tokenizer has no EOS token; set data.add_eos: false")
    return [tokenizer.eos_token_id]


def encode_instruction(
    tokenizer: Any, row: dict, cols: Columns, template: str, template_no_input: str, train_on_prompt: bool,
    add_eos: bool, max_length: int,
) -> Encoded:
    if template == CHAT_TEMPLATE:
        return encode_chat(tokenizer, instruction_messages(row, cols), train_on_prompt, max_length)
    prompt = tokenizer(instruction_prompt(row, cols, template, template_no_input))["input_ids"]
    target = tokenizer(row[cols.output], add_special_tokens=False)["input_ids"] + (_eos(tokenizer) if add_eos else [])
    labels = (list(prompt) if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + list(target)
    return _truncate(list(prompt) + list(target), labels, max_length)


def encode_text(tokenizer: Any, text: str, add_eos: bool, max_length: int) -> Encoded:
    ids = list(tokenizer(text)["input_ids"]) + (_eos(tokenizer) if add_eos else [])
    return _truncate(ids, list(ids), max_length)


def encode_example(
    tokenizer: Any, row: dict, fmt: str, cols: Columns, template: str, template_no_input: str,
    train_on_prompt: bool, add_eos: bool, max_length: int,
) -> Encoded:
    """One training/evaluation row of format ``fmt`` → (input_ids, labels, truncated)."""
    if fmt == "chat":
        return encode_chat(tokenizer, row[cols.messages], train_on_prompt, max_length)
    if fmt == "instruction":
        return encode_instruction(
            tokenizer, row, cols, template, template_no_input, train_on_prompt, add_eos, max_length
        )
    return encode_text(tokenizer, row[cols.text], add_eos, max_length)


def encode_prompt(
    tokenizer: Any, row: dict, fmt: str, cols: Columns, template: str, template_no_input: str, max_length: int,
) -> tuple[list[int], Optional[str], bool]:
    """(prompt ids, the reference answer or None, truncated) of a row to generate from (module docstring)."""
    reference: Optional[str] = None
    if fmt == "chat":
        turns = list(row[cols.messages])
        if turns and turns[-1]["role"] == "assistant":
            reference = turns.pop()["content"]
        ids = tokenizer(render_chat(tokenizer, turns, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
    elif fmt == "instruction":
        reference = row.get(cols.output) or None
        if template == CHAT_TEMPLATE:
            text = render_chat(tokenizer, instruction_messages(row, cols, with_answer=False), add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(instruction_prompt(row, cols, template, template_no_input))["input_ids"]
    else:
        ids = tokenizer(row[cols.text])["input_ids"]
    ids = list(ids)
    return (ids[-max_length:], reference, True) if len(ids) > max_length else (ids, reference, False)


__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHAT_TEMPLATE",
    "ChatTemplateError",
    "Columns",
    "Encoded",
    "FORMATS",
    "IGNORE_INDEX",
    "assistant_spans",
    "detect_format",
    "encode_example",
    "encode_prompt",
    "invalid_messages",
    "required_columns",
]
