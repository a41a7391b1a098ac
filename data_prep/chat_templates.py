"""Built-in chat templates (Jinja, rendered by transformers' `apply_chat_template` like a model's own) for base models
that have none, and the lookup of the template a `prep sft` run uses.

- `llama-2`: LongLoRA's supervised format (supervised-fine-tune.py, the LongAlpaca models). A user turn is
  `<s>[INST]{content}[/INST]`, the answer follows directly and ends with `</s>`. An Alpaca record with a non-empty
  `input` is rendered as LongLoRA renders it: Llama-2's default system prompt in a `<<SYS>>` block, then
  ` {instruction} \\n{input} [/INST]`. A leading system message goes into the same `<<SYS>>` block of the first turn.
- `alpaca`: Stanford Alpaca's prompts (LongLoRA's PROMPT_DICT `prompt_input` / `prompt_no_input`): a preamble,
  `### Instruction:`, optionally `### Input:`, then `### Response:` with the answer and EOS right after it.
- `vicuna`: LongQLoRA's supervised format (its VicunaSFTDataset): Vicuna's system line, `USER: {content}` and
  `ASSISTANT:` on their own lines. Differences from LongQLoRA's script: the text starts with BOS (Vicuna was trained
  with it; the script encodes without special tokens), and the space after `ASSISTANT:` belongs to the answer, so that
  a generation prompt does not end in a space.

The templates read `message['instruction']` / `message['input']`, which `data_prep.sft` keeps on the user message
of an Alpaca record beside its `content`; a model's own template sees only role and content.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from longctx.errors import UserError

# Llama-2-chat's default system prompt as LongLoRA's PROMPT_DICT spells it (two spaces before "Your answers").
LLAMA2_DEFAULT_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information."
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _literal(text: str) -> str:
    """A Jinja string literal holding `text` (JSON's escapes are Jinja's for this ASCII text)."""
    return json.dumps(text)


_SYSTEM_ONLY_FIRST = (
    "{% elif message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message may only be the first message') }}"
)

LLAMA2 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}"
    "{% if message.get('input') %}"
    "{{ '[INST] <<SYS>>\\n' + " + _literal(LLAMA2_DEFAULT_SYSTEM) + " + '\\n<</SYS>> \\n\\n ' + "
    "message['instruction'] + ' \\n' + message['input'] + ' [/INST]' }}"
    "{% elif loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{{ '[INST] <<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>> \\n\\n ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST]' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    + _SYSTEM_ONLY_FIRST
    + "{% endif %}{% endfor %}"
)

ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{% if loop.first %}{{ "
    + _literal(ALPACA_PREAMBLE_INPUT)
    + " if message.get('input') else "
    + _literal(ALPACA_PREAMBLE)
    + " }}"
    "{% elif messages[loop.index0 - 1]['role'] == 'assistant' %}{{ '\\n\\n' }}{% endif %}"
    "{% if message.get('input') %}"
    "{{ '### Instruction:\\n' + message['instruction'] + '\\n\\n### Input:\\n' + message['input'] + "
    "'\\n\\n### Response:' }}"
    "{% else %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

VICUNA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' %}{{ " + _literal(VICUNA_SYSTEM) + " }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\\nUSER: ' + message['content'] + '\\nASSISTANT:' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    + _SYSTEM_ONLY_FIRST
    + "{% endif %}{% endfor %}"
)

BUILTIN_TEMPLATES = {"llama-2": LLAMA2, "alpaca": ALPACA, "vicuna": VICUNA}


@dataclass(frozen=True)
class ChatTemplate:
    """The Jinja text a run renders with, and where it came from (recorded in the manifest)."""

    name: str
    """model (the tokenizer's own), a built-in name, or the .jinja file's path."""
    text: str

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.name, "sha256": hashlib.sha256(self.text.encode()).hexdigest()}


def resolve_template(choice: str, hf_tokenizer, tokenizer_path: str | Path) -> ChatTemplate:
    """`prep sft --template`: model (the tokenizer's chat_template), a built-in name, or a .jinja file."""
    if choice in BUILTIN_TEMPLATES:
        return ChatTemplate(choice, BUILTIN_TEMPLATES[choice])
    builtins = ", ".join(BUILTIN_TEMPLATES)
    if choice == "model":
        text = hf_tokenizer.chat_template
        if isinstance(text, dict):  # several named templates: the default one is the chat template
            text = text.get("default")
        if not text:
            raise UserError(
                f"the tokenizer in {tokenizer_path} has no chat template: give --template with a built-in one "
                f"({builtins}) or a .jinja file"
            )
        return ChatTemplate("model", text)
    path = Path(choice)
    if path.suffix == ".jinja" and path.is_file():
        return ChatTemplate(str(path.resolve()), path.read_text(encoding="utf-8"))
    raise UserError(f"--template {choice!r} is neither model, a built-in template ({builtins}) nor a .jinja file")


def trained_template(shard_dir: str | Path) -> ChatTemplate | None:
    """The chat template `prep sft` rendered these shards with, when it is not the tokenizer's own (a built-in or a
    .jinja file, which the tokenizer's files do not carry); None for pre-training shards, the model's own template,
    or shards that are no longer there."""
    manifest = Path(shard_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    template = json.loads(manifest.read_text()).get("sft", {}).get("template") or {}
    if template.get("name") in (None, "model") or not template.get("text"):
        return None
    return ChatTemplate(template["name"], template["text"])


def write_chat_template(tokenizer_dir: str | Path, template: ChatTemplate) -> None:
    """Make `template` the chat template of the saved tokenizer in tokenizer_dir (chat_template.jinja, which
    transformers' AutoTokenizer loads; a template inside tokenizer_config.json is removed so that it cannot win)."""
    tokenizer_dir = Path(tokenizer_dir)
    (tokenizer_dir / "chat_template.jinja").write_text(template.text)
    config_path = tokenizer_dir / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.pop("chat_template", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
