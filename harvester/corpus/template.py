"""``--template``: what an instruct prompt or an EC40 source looks like to the model.

``chat`` wraps an instruct example in the tokenizer's own chat template (``apply_chat_template``): a
user turn with the prompt and an assistant turn with the response. The prompt group gets the rendered
text up to and including the assistant's header (what ``add_generation_prompt=True`` renders after the
user turn); the response group gets the rest: the response and the template's closing tokens.

Any other value is a Python format string: ``{prompt}`` for instruct corpora, ``{src_lang}``,
``{tgt_lang}`` and ``{src}`` for EC40 (the direction's language codes, as the Aya study writes them:
``Translate from fr to en: ...``). The formatted text replaces the prompt (or the source side); the
response (or the target side) is left as it is. Literal braces are written ``{{`` and ``}}``.
"""

from __future__ import annotations

import hashlib
import string

from harvester.errors import HarvestError

CHAT = "chat"


class FormatTemplate:
    """A checked format string: only ``fields`` as placeholders, and ``needed`` among them."""

    def __init__(self, text: str, fields: tuple[str, ...], needed: str, kind: str):
        try:
            parts = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(text)
                     if name is not None]
        except ValueError as err:
            raise HarvestError(f"--template {text!r} is not a format string ({err}); write a literal "
                               "brace as {{ or }}") from None
        for name, spec, conversion in parts:
            if spec or conversion:  # {src!x}, {prompt:d}, {prompt:>99999999999}: an error or a huge text
                raise HarvestError(f"--template {text!r}: a placeholder takes no conversion or format spec "
                                   f"({{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}); "
                                   "write it as {" + (name or "") + "}")
        names = [name for name, _, _ in parts]
        known = ", ".join("{" + f + "}" for f in fields)
        for name in names:
            if name not in fields:
                raise HarvestError(f"--template {text!r}: unknown placeholder {{{name}}} for {kind} corpora; "
                                   f"known: {known}")
        if needed not in names:
            raise HarvestError(f"--template {text!r} has no {{{needed}}}: the {kind} text would be left out")
        self.text = text

    def render(self, **values: str) -> str:
        return self.text.format(**values)


class ChatTemplate:
    """The tokenizer's chat template, split into the prompt part and the response part."""

    def __init__(self, tokenizer):
        if tokenizer is None:
            raise HarvestError("--template chat needs the model's tokenizer")
        text = getattr(tokenizer, "chat_template", None)
        if not text:
            raise HarvestError("--template chat: this model's tokenizer has no chat template; give a format "
                               "string instead, e.g. --template 'Question: {prompt}'")
        self.tokenizer = tokenizer
        self.sha256 = hashlib.sha256(str(text).encode()).hexdigest()

    def render(self, prompt: str, response: str) -> tuple[str, str]:
        """``(prompt part, response part)``: their concatenation is the whole rendered conversation."""
        user = [{"role": "user", "content": prompt}]
        head = self._apply(user, add_generation_prompt=True)
        whole = self._apply(user + [{"role": "assistant", "content": response}], add_generation_prompt=False)
        if not whole.startswith(head):
            raise HarvestError("--template chat: the chat template renders the conversation differently from "
                               "its prompt with the generation prompt, so there is no prompt/response boundary; "
                               "give a format string instead")
        return head, whole[len(head):]

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:  # a template that raises (roles, system turns) is the same user error
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise HarvestError(f"--template chat: the chat template failed ({first})") from None


def instruct_template(text: str | None, tokenizer):
    """The template of instruct corpora: None, a :class:`ChatTemplate` or a :class:`FormatTemplate`."""
    if text is None:
        return None
    if text == CHAT:
        return ChatTemplate(tokenizer)
    return FormatTemplate(text, ("prompt",), "prompt", "instruct")


def ec40_template(text: str | None) -> FormatTemplate | None:
    """The template of EC40's source side (a format string; ``chat`` is for instruct corpora)."""
    if text is None:
        return None
    if text == CHAT:
        raise HarvestError("--template chat is for instruct corpora; EC40 takes a format string, e.g. "
                           "--template 'Translate from {src_lang} to {tgt_lang}: {src}'")
    return FormatTemplate(text, ("src_lang", "tgt_lang", "src"), "src", "EC40")
