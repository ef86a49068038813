"""Multi-turn chat over images (`mgjax chat`), and the image-generation prompt of MGM_SPEC section 8."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mgjax.data.image import ImageLike
from mgjax.data.templates import get_template, with_image_markers

GEN_SUFFIX = " <GEN>"  # appended to a user message that asks for an image
_GEN_PROMPT = re.compile(r"<h>(.*?)</h>", re.DOTALL)


def generation_prompt(answer: str) -> str | None:
    """The text-to-image prompt of an answer to a <GEN> request: the last `<h> ... </h>` pair, stripped."""
    found = _GEN_PROMPT.findall(answer)
    return found[-1].strip() if found else None


@dataclass
class Chat:
    """A conversation with a `Pretrained` model: each `ask` renders every turn so far in the model's
    template (images' markers in the message that brought them) and generates the next answer."""

    model: Any
    generate_kwargs: dict = field(default_factory=lambda: {"max_new_tokens": 512})
    turns: list[str] = field(default_factory=list)  # user, assistant, user, ...
    images: list = field(default_factory=list)  # (images, images_aux) per image, in prompt order

    def ask(self, message: str, images: Sequence[ImageLike] = (), gen: bool = False) -> str:
        template = get_template(self.model.config.template)
        text = message + (GEN_SUFFIX if gen else "")
        self.turns.append(with_image_markers(template, text, len(images)))
        self.images += [self.model.preprocess(im) for im in images]
        ids = self.model.tokenize(template.render([*self.turns, None]))
        if self.images:
            pixels = np.stack([a for a, _ in self.images]), np.stack([b for _, b in self.images])
        else:
            pixels = self.model.zero_images()
        answer = self.model.generate([ids], *pixels, **self.generate_kwargs).text[0]
        self.turns.append(answer)
        return answer

    def reset(self) -> None:
        self.turns.clear()
        self.images.clear()
