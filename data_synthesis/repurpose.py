"""`repurpose`: data repurposing, texts users supply turned into training conversations.

Two kinds, chosen by the recipe's `kind`; both read text rows ({id, text, source, meta}):

- `literature` (`inputs.documents`: passages, e.g. public-domain literature): for every text and
  every level in `detail_levels` (brief, detailed, very_detailed; the templates are below), the
  teacher writes an instruction to which the text is the answer. Each kept instruction gives a
  demonstration (D): [user: the instruction, assistant: the ORIGINAL text, byte for byte]. An
  instruction that is empty or holds the whole text is dropped; a text left with none is
  quarantined.
- `roleplay` (`inputs.profiles`: character profiles): the teacher writes a user's opening message
  to the character, then replies in character with the profile as its system prompt. D =
  [system: the profile, user: the opening, assistant: the reply]; an empty opening or reply
  quarantines the profile.

Every row keeps `meta.lineage` (stage, model, seed, parent id, kind, and the level for literature).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from alignment.data import Quarantined
from alignment.generation import GenerationSpec
from alignment.recipe_loader import check_choices
from alignment.stages import Outcome, ShardContext, StageRecipe

from .generate import GeneratingStage, lineage

_ASK = ("Below is a text. Write {what} to which this text, exactly as it stands, is the answer. "
        "Do not quote the text. Reply with the instruction only.\n\nText:\n{text}")
DETAIL_TEMPLATES = {
    "brief": _ASK.replace("{what}", "a brief instruction or question, one short sentence,"),
    "detailed": _ASK.replace("{what}", "a detailed instruction, two or three sentences naming the subject, "
                                       "the form and the tone,"),
    "very_detailed": _ASK.replace("{what}", "a very detailed instruction, a short paragraph naming the subject, the "
                                            "form and length, the tone and style, and the points to cover in order,"),
}
OPENING_TEMPLATE = ("Below is the profile of a character. Write the first message a user might send to this "
                    "character to start a conversation with them: one or two sentences, addressed to the character. "
                    "Reply with the message only.\n\nProfile:\n{profile}")
_LABELS = ("instruction:", "question:", "message:")


def clean_instruction(generated: str, text: str) -> str:
    """The teacher's instruction without a leading label or wrapping quotes; "" when it is degenerate
    (empty, or it holds the text it should ask for)."""
    out = generated.strip()
    if out.lower().startswith(_LABELS):
        out = out.split(":", 1)[1].strip()
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'":
        out = out[1:-1].strip()
    return "" if not out or text.strip() in out else out


def literature_rows(doc: dict, instructions: list[tuple[str, str]], model: str, seed: int) -> list[dict]:
    """The D rows of one text from (level, generated instruction); degenerate instructions give nothing."""
    rows = []
    for level, generated in instructions:
        instruction = clean_instruction(generated, doc["text"])
        if instruction:
            rows.append({"id": f"{doc['id']}-{level}",
                         "messages": [{"role": "user", "content": instruction},
                                      {"role": "assistant", "content": doc["text"]}],
                         "source": "repurpose",
                         "meta": doc["meta"] | lineage("repurpose", model, seed, doc["id"], kind="literature",
                                                       level=level)})
    return rows


@dataclass
class RepurposeRecipe(StageRecipe):
    """literature: inputs.documents (text rows) -> instructions at each detail level, the original text the answer;
    roleplay: inputs.profiles (text rows, character profiles) -> a role-play exchange with the profile as system
    prompt (data_synthesis.repurpose)."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    kind: Literal["literature", "roleplay"] = "literature"
    detail_levels: list[str] = field(default_factory=lambda: ["brief", "detailed", "very_detailed"])

    def __post_init__(self) -> None:
        if self.generation.n != 1:
            raise ValueError(f"generation.n: must be 1 (one instruction per level, one reply per turn), "
                             f"got {self.generation.n}")
        if self.kind == "literature":
            check_choices("detail_levels", self.detail_levels, DETAIL_TEMPLATES, "level")


class RepurposeStage(GeneratingStage):
    name = "repurpose"
    recipe_class = RepurposeRecipe
    inputs = {"documents": "text"}
    outputs = ("demonstrations",)

    def __init__(self, recipe: RepurposeRecipe):
        super().__init__(recipe)
        self.inputs = {"documents" if recipe.kind == "literature" else "profiles": "text"}

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        if self.recipe.kind == "roleplay":
            return self._roleplay(rows, ctx)
        levels, model = self.recipe.detail_levels, self.recipe.generation.model
        prompts = [[{"role": "user", "content": DETAIL_TEMPLATES[level].replace("{text}", row["text"])}]
                   for row in rows for level in levels]
        texts = iter(c[0].text for c in self.sample_prompts(prompts, ctx, n=1))
        outcomes: list[Outcome] = []
        for row in rows:
            out = literature_rows(row, [(level, next(texts)) for level in levels], model, ctx.seed)
            outcomes.append({"demonstrations": out} if out else
                            Quarantined(f"no level gave a usable instruction ({', '.join(levels)}): each was "
                                        "empty or held the text itself", row))
        return outcomes

    def _roleplay(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        model = self.recipe.generation.model
        asks = [[{"role": "user", "content": OPENING_TEMPLATE.replace("{profile}", row["text"])}] for row in rows]
        openings = [clean_instruction(c[0].text, row["text"])
                    for row, c in zip(rows, self.sample_prompts(asks, ctx, n=1))]
        chats = [[{"role": "system", "content": row["text"]}, {"role": "user", "content": opening}]
                 for row, opening in zip(rows, openings) if opening]
        replies = iter(c[0].text for c in self.sample_prompts(chats, ctx, n=1)) if chats else iter(())
        outcomes: list[Outcome] = []
        for row, opening in zip(rows, openings):
            reply = next(replies) if opening else ""
            if not opening or not reply.strip():
                outcomes.append(Quarantined(f"the teacher's {'reply' if opening else 'opening message'} "
                                            "was empty", row))
                continue
            outcomes.append({"demonstrations": [{
                "id": f"{row['id']}-roleplay",
                "messages": [{"role": "system", "content": row["text"]}, {"role": "user", "content": opening},
                             {"role": "assistant", "content": reply}],
                "source": "repurpose",
                "meta": row["meta"] | lineage("repurpose", model, ctx.seed, row["id"], kind="roleplay")}]})
        return outcomes

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        if self.recipe.kind == "roleplay":
            return {"repurpose": {"kind": "roleplay", "conversations": len(outputs["demonstrations"])}}
        by_level = Counter(r["meta"]["lineage"]["level"] for r in outputs["demonstrations"])
        return {"repurpose": {"kind": "literature", "detail_levels": self.recipe.detail_levels,
                              "rows_by_level": {level: by_level[level] for level in self.recipe.detail_levels}}}
