"""Conversation templates of the released models, rendered exactly as the original renders them.

`render` takes the turns in order (user, assistant, user, ...); a final `None` leaves the assistant
turn open for generation. BOS is not part of the text: the tokenizer adds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mgjax.errors import MGJaxError

IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class Template:
    name: str
    style: str  # "two" | "llama2" | "mpt" | "gemma" | "plain"
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str = ""
    stop: tuple[str, ...] = ()  # what ends an answer at generation, besides the tokenizer's eos

    def render(self, turns: Sequence[str | None]) -> str:
        seps = (self.sep, self.sep2)
        if self.style == "two":
            out = self.system + self.sep
            for i, m in enumerate(turns):
                out += f"{self.roles[i % 2]}: {m}{seps[i % 2]}" if m else f"{self.roles[i % 2]}:"
            return out
        if self.style == "mpt":
            out = self.system + self.sep
            for i, m in enumerate(turns):
                out += f"{self.roles[i % 2]}{m}{self.sep}" if m else self.roles[i % 2]
            return out
        if self.style == "gemma":
            out = self.system + self.sep
            for i, m in enumerate(turns):
                head = f"<start_of_turn>{self.roles[i % 2]}\n"
                out += f"{head}{m}<end_of_turn>\n{seps[i % 2]}" if m else head
            return out
        if self.style == "llama2":
            out = ""
            for i, m in enumerate(turns):
                if not m:
                    continue
                if i == 0 and self.system:
                    m = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{m}"
                out += f"{self.sep}[INST] {m} [/INST]" if i % 2 == 0 else f" {m} {self.sep2}"
            # The original strips the leading separator ("<s>") with str.lstrip, i.e. any of its characters.
            return out.lstrip(self.sep)
        # plain (stage-1 captioning): the image, then the caption and a newline.
        return "".join(m + self.sep for m in turns if m)


_LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")

TEMPLATES = {
    "vicuna_v1": Template(
        "vicuna_v1", "two",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        ("USER", "ASSISTANT"), " ", "</s>", ("</s>",)),
    "gemma": Template("gemma", "gemma", "", ("user", "model"), "", "<eos>", ("<end_of_turn>", "<eos>")),
    "mistral_instruct": Template("mistral_instruct", "llama2", "", ("USER", "ASSISTANT"), "<s>", "</s>", ("</s>",)),
    "chatml_direct": Template("chatml_direct", "mpt", "<|im_start|>system\nAnswer the questions.",
                              ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>", stop=("<|im_end|>",)),
    # MGM-8B was trained and evaluated with the answer turn headed `system` (docs/mgm_spec.md section 7).
    "llama_3": Template("llama_3", "mpt", f"<|start_header_id|>system<|end_header_id|>\n\n{_LLAMA3_SYSTEM}",
                        ("<|start_header_id|>user<|end_header_id|>\n\n",
                         "<|start_header_id|>system<|end_header_id|>\n\n"), "<|eot_id|>", stop=("<|eot_id|>",)),
    # stage 1 learns `caption\n`
    "plain": Template("plain", "plain", "", ("", ""), "\n", stop=("\n",)),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise MGJaxError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}") from None


def with_image_markers(template: Template, question: str, images: int) -> str:
    """A user message with one `<image>` per image leading it, as the original writes them (stage-1
    `plain` prompts are the image alone)."""
    q = question.replace(IMAGE_MARKER, "").strip()
    if not images:
        return q
    return IMAGE_MARKER * images if template.style == "plain" else f"{IMAGE_MARKER}\n" * images + q


def build_prompt(question: str, template: str, with_image: bool = True) -> str:
    """A one-turn prompt with the assistant turn open; the image marker leads the question."""
    t = get_template(template)
    return t.render([with_image_markers(t, question, int(with_image)), None])
